"""A stand-in for ``torchvision`` so that ``import timm`` works where torchvision cannot be installed.

Why: CI and the developers' machines run the CPU build of torch, and PyPI only has torchvision
wheels built against its CUDA build (they fail to import beside the CPU one: "operator
torchvision::nms does not exist"). timm imports torchvision at import time, but building a model and
loading weights, all that :class:`mtl.backbones.TimmBackbone` does, never calls it. So the tests
install this stub, only when no torchvision is installed at all: every ``torchvision.*`` module
resolves to an empty package whose attributes are placeholder classes that raise if used.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types


class _Placeholder(type):
    """Class of the placeholders: any attribute of one (``InterpolationMode.BILINEAR``) is its name."""

    def __getattr__(cls, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return attr


def _placeholder(name: str) -> type:
    def fail(self, *args, **kwargs):
        raise RuntimeError(f"torchvision is not installed (test stub): {name} cannot be used.")

    return _Placeholder(name, (), {"__init__": fail})


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__stub__ = True

        def getattr_(attr: str, module=module):
            if attr.startswith("__"):
                raise AttributeError(attr)
            value = _placeholder(attr)
            setattr(module, attr, value)
            return value

        module.__getattr__ = getattr_
        return module

    def exec_module(self, module):
        """Nothing to run: every attribute is created on first access by ``getattr_``."""


def install_if_missing() -> bool:
    """Install the stub if no torchvision is installed; returns whether it is in use."""
    if any(isinstance(f, _StubFinder) for f in sys.meta_path):
        return True
    if importlib.util.find_spec("torchvision") is not None:
        return False
    sys.meta_path.append(_StubFinder())
    return True


def uninstall() -> None:
    """Remove the stub and the stub modules (modules that imported them keep their references)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _StubFinder)]
    for name in [n for n, m in sys.modules.items() if n.split(".")[0] == "torchvision"]:
        if getattr(sys.modules[name], "__stub__", False):
            del sys.modules[name]
