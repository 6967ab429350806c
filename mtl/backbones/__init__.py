"""Encoders shared by all tasks. Each is a :class:`~mtl.backbones.base.Backbone`.

``TimmBackbone`` and ``HFBackbone`` wrap optional packages (extras ``[timm]`` and ``[hf]``); their
modules import ``timm`` / ``transformers`` only when a backbone is built.
"""

from mtl.backbones.base import Backbone
from mtl.backbones.cnn import CNN
from mtl.backbones.hf import HFBackbone
from mtl.backbones.mlp import MLP
from mtl.backbones.resnet import ResNet
from mtl.backbones.timm_backbone import TimmBackbone

__all__ = ["Backbone", "CNN", "HFBackbone", "MLP", "ResNet", "TimmBackbone"]
