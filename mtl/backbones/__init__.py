"""Encoders shared by all tasks, one per file, each a :class:`~mtl.backbones.base.Backbone` built
the same way: ``Backbone(input_shape, **options)`` (``mlp``, ``cnn``, ``resnet``,
``timm_backbone``, ``hf``).

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
