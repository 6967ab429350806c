"""What keeps a run directory honest: the non-finite guard, the stage checkpoint, the run lock.

* :class:`NonFiniteGuard` (a Lightning callback) watches every training step's task losses
  (``MultiTaskModule.step_losses``) and gradients, and every validation's metrics. A non-finite
  value either stops the run with an error naming the stage, the step and the task (``stop``), or
  drops that optimizer step (``skip``: no parameter moves, the next batch goes on).
* :class:`StageCheckpoint` (a ``ModelCheckpoint``) never makes a non-finite model (weights or
  monitored value) the best checkpoint, rewrites ``last.ckpt`` after every epoch, writes every file
  atomically (a crash leaves the previous file whole), and keeps its bookkeeping relative to its own
  directory, so a copied run directory resumes from its own files.
* :class:`RunLock` holds ``<run_dir>/.lock`` for the length of a run: a second process in the same
  directory is refused with the holder's PID; the lock of a process that died is taken over.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, Mapping

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

__all__ = [
    "NONFINITE_MODES",
    "NonFiniteError",
    "NonFiniteGuard",
    "RunDirectoryError",
    "RunLock",
    "RunLockedError",
    "StageCheckpoint",
    "finite_or_raise",
    "is_rank_zero",
    "nonfinite_keys",
]

NONFINITE_MODES = ("stop", "skip")


class NonFiniteError(RuntimeError):
    """A loss, gradient, metric or weight became NaN or infinite."""


def nonfinite_keys(tensors: Mapping[Any, Any]) -> list[Any]:
    """Names of the floating-point tensors of ``tensors`` holding a NaN or an infinity.

    One host synchronisation for all tensors of a device (not one per tensor).
    """
    floats = {k: v for k, v in tensors.items() if isinstance(v, Tensor) and v.is_floating_point() and v.numel()}
    bad: list[Any] = []
    by_device: dict[Any, list[Any]] = {}
    for k, v in floats.items():
        by_device.setdefault(v.device, []).append(k)
    for keys in by_device.values():
        ok = torch.stack([torch.isfinite(floats[k]).all() for k in keys]).tolist()
        bad += [k for k, good in zip(keys, ok) if not good]
    bad_set = set(bad)
    return [k for k in floats if k in bad_set]


def _value(x: Any) -> str:
    return f"{float(x):g}" if isinstance(x, (Tensor, float, int)) else repr(x)


class NonFiniteGuard(pl.Callback):
    """Stop on, or skip, training steps whose task losses or gradients are not finite.

    Args:
        stage: the stage's name (for the messages).
        mode: ``stop`` (raise :class:`NonFiniteError`) or ``skip`` (drop the optimizer step: every
            gradient is cleared before the optimizer runs, so no parameter and no optimizer moment
            moves). A non-finite validation metric stops the run under ``stop``; under ``skip`` it
            is reported and :class:`StageCheckpoint` never saves that model as the best.

    Under ``skip`` the module's buffers (batch-norm statistics, a balancer's moving averages and
    step counters) are copied before each step and restored when the step is dropped: the forward
    pass of a bad batch has already updated them. Under DDP the decision is reduced across ranks,
    so every rank stops or skips the same step.
    """

    def __init__(self, stage: str, mode: str = "stop") -> None:
        if mode not in NONFINITE_MODES:
            raise ValueError(f"guard.nonfinite must be one of {list(NONFINITE_MODES)}, got {mode!r}.")
        self.stage = stage
        self.mode = mode
        self.skipped = 0
        self._batch = (0, 0)
        self._buffers: list[Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._batch = (trainer.current_epoch, batch_idx)
        if self.mode == "skip":
            self._buffers = [b.detach().clone() for b in pl_module.buffers()]

    def _where(self, trainer) -> str:
        epoch, batch = self._batch
        return f"stage '{self.stage}', epoch {epoch}, batch {batch} (global step {trainer.global_step})"

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        losses: Mapping[str, Tensor] = getattr(pl_module, "step_losses", {}) or {}
        # under fp16 mixed precision an infinite gradient is the GradScaler's business: it skips
        # that step and lowers its scale; only the losses are checked then
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        grads = {} if scaler is not None else {n: p.grad for n, p in pl_module.named_parameters() if p.grad is not None}
        bad = nonfinite_keys({**{("loss", t): v for t, v in losses.items()}, **{("grad", n): g for n, g in grads.items()}})
        bad_tasks = [name for kind, name in bad if kind == "loss"]
        bad_grads = [name for kind, name in bad if kind == "grad"]
        ok = trainer.strategy.reduce_boolean_decision(not (bad_tasks or bad_grads), all=True)
        if ok:
            return
        if bad_tasks:
            what = "; ".join(f"the loss of task '{t}' is {_value(losses[t])}" for t in bad_tasks)
        elif bad_grads:
            what = f"the task losses are finite but the gradient of {bad_grads[:3]} is not"
        else:
            what = "another process of the run saw a non-finite loss or gradient"
        if self.mode == "stop":
            raise NonFiniteError(
                f"{self._where(trainer)}: {what}. The run is stopped so that no non-finite model is "
                f"saved or handed to the next stage. Lower the learning rate (optimizer.lr, "
                f"schedule.stages.{self.stage}.lr), clip gradients (trainer.gradient_clip_val), scale "
                f"regression targets, or set guard.nonfinite=skip to drop such steps."
            )
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None  # the optimizer skips parameters without a gradient
        with torch.no_grad():
            for b, saved in zip(pl_module.buffers(), self._buffers):
                b.copy_(saved)
        self.skipped += 1
        rank_zero_warn(f"{self._where(trainer)}: {what}; the step is skipped (guard.nonfinite=skip).")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        bad = nonfinite_keys(metrics)
        if not bad:
            return
        what = ", ".join(f"{k}={_value(metrics[k])}" for k in bad[:6])
        if self.mode == "stop":
            raise NonFiniteError(
                f"stage '{self.stage}', epoch {trainer.current_epoch}: validation gave {what}. A model "
                f"with non-finite validation metrics is never kept; check the targets' scale (a "
                f"regression target near 1e20 overflows float32 squared errors), the learning rate, "
                f"or set guard.nonfinite=skip to go on (that epoch then never becomes best.ckpt)."
            )
        rank_zero_warn(
            f"stage '{self.stage}', epoch {trainer.current_epoch}: validation gave {what}; this epoch "
            f"will not become the best checkpoint."
        )


class StageCheckpoint(ModelCheckpoint):
    """``best.ckpt`` (finite models only) and ``last.ckpt`` (every epoch), written atomically.

    Same arguments as :class:`~pytorch_lightning.callbacks.ModelCheckpoint`.
    """

    def check_monitor_top_k(self, trainer: pl.Trainer, current: Tensor | None = None) -> bool:
        if current is not None and not bool(torch.isfinite(torch.as_tensor(current)).all()):
            return False  # a NaN/inf score is never "best" (Lightning would store it as inf)
        if nonfinite_keys(dict(trainer.lightning_module.state_dict())):
            return False
        return super().check_monitor_top_k(trainer, current)

    def _save_last_every_epoch(self, trainer: pl.Trainer) -> None:
        # Lightning rewrites last.ckpt only together with a best checkpoint; a crash could lose
        # every epoch since the last improvement
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_every_epoch(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_every_epoch(trainer)

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        tmp = f"{filepath}.tmp"
        super()._save_checkpoint(trainer, tmp)
        if trainer.is_global_zero:
            os.replace(tmp, filepath)
        trainer.strategy.barrier("StageCheckpoint.replace")
        self._last_checkpoint_saved = filepath

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # paths inside are those of the directory that wrote the checkpoint: re-root them here, so
        # a copied (or moved) run directory keeps its best score and its own best.ckpt
        old = state_dict.get("dirpath")
        new = self.dirpath
        if old and new and str(old) != str(new):
            def move(path: Any) -> Any:
                if isinstance(path, str) and path:
                    p = Path(path)
                    try:
                        return str(Path(new) / p.relative_to(old))
                    except ValueError:
                        return str(Path(new) / p.name)
                return path

            state_dict = dict(state_dict)
            for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
                state_dict[key] = move(state_dict.get(key))
            state_dict["best_k_models"] = {move(k): v for k, v in (state_dict.get("best_k_models") or {}).items()}
            state_dict["dirpath"] = new
        super().load_state_dict(state_dict)


def is_rank_zero() -> bool:
    """Whether this process is the first of its run (every rank reads; only rank 0 writes).

    Read from the environment that DDP launchers set (``RANK``, ``LOCAL_RANK``, ``NODE_RANK``,
    ``GROUP_RANK``, ``SLURM_PROCID``), so it is known before any Trainer exists.
    """
    keys = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")
    return all(int(os.environ.get(k) or 0) == 0 for k in keys)


class RunDirectoryError(RuntimeError):
    """The run directory belongs to another run (locked by it, or holding its stages)."""


class RunLockedError(RunDirectoryError):
    """Another live process holds the run directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run directory: ``<run_dir>/.lock`` holding the owner's PID and host.

    The lock is an ``flock`` on that file, so the operating system releases it when its process
    dies (even by SIGKILL): a lock file left by a dead process is simply taken over. On file
    systems without ``flock`` the PID in the file is checked instead (same host only).

    Use as a context manager, or :meth:`acquire` / :meth:`release`.
    """

    FILE = ".lock"

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / self.FILE
        self._fd: int | None = None

    def _holder(self) -> str:
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def _refuse(self, holder: str) -> None:
        pid = holder.split()[0] if holder else "?"
        raise RunLockedError(
            f"Run directory {self.run_dir} is in use by process {pid} ({holder or 'unknown'}). Two "
            f"runs in one directory would corrupt each other's checkpoints and metrics. Wait for it "
            f"to finish, or use another directory (hydra.run.dir=...). If that process is gone, "
            f"delete {self.path}."
        )

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl

            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._refuse(self._holder())
            except OSError:  # no flock on this file system: trust the PID in the file
                holder = self._holder()
                parts = holder.split()
                if parts and parts[0].isdigit() and int(parts[0]) != os.getpid() and _alive(int(parts[0])) \
                        and (len(parts) < 2 or parts[1] == socket.gethostname()):
                    os.close(fd)
                    self._refuse(holder)
        except ImportError:  # pragma: no cover - Windows
            pass
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        finally:
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def finite_or_raise(path: str | Path, stage: str) -> None:
    """Refuse to hand over a checkpoint whose weights are not all finite."""
    from mtl.transfer.loading import read_state_dict

    bad = nonfinite_keys(read_state_dict(path))
    if bad:
        raise NonFiniteError(
            f"stage '{stage}': the checkpoint {path} has non-finite weights ({bad[:5]}"
            f"{' ...' if len(bad) > 5 else ''}); it is not reported nor used to initialise the next "
            f"stage. Lower the learning rate or clip gradients, then retrain the stage "
            f"(rerun_from={stage})."
        )

