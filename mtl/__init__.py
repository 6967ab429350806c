"""mtl: multi-task and transfer learning on PyTorch Lightning, configured with Hydra."""

from mtl.model import MultiTaskModel
from mtl.module import MultiTaskModule
from mtl.tasks import Task

__all__ = ["MultiTaskModel", "MultiTaskModule", "Task"]
__version__ = "0.1.0"
