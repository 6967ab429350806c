"""mtl: multi-task and transfer learning on PyTorch Lightning, configured with Hydra."""

from mtl.model import MultiTaskModel
from mtl.module import MultiTaskModule
from mtl.tasks import Task



def load(path: str, map_location: str = "cpu") -> MultiTaskModule:
    """The trained :class:`MultiTaskModule` of a checkpoint written by ``mtl-train`` (eval mode);
    ``module(x)`` then gives ``{task: output}``. See :func:`mtl.eval.load_module`."""
    from mtl.eval import load_module

    return load_module(path, map_location)


__all__ = ["MultiTaskModel", "MultiTaskModule", "Task", "load"]
__version__ = "0.1.0"
