"""Encoders shared by all tasks. Each is a :class:`~mtl.backbones.base.Backbone`."""

from mtl.backbones.base import Backbone
from mtl.backbones.cnn import CNN
from mtl.backbones.mlp import MLP
from mtl.backbones.resnet import ResNet

__all__ = ["Backbone", "CNN", "MLP", "ResNet"]
