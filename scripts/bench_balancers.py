"""Benchmark every balancer: time per training step and peak memory, against equal weighting.

Usage::

    python scripts/bench_balancers.py [--quick] [--device cpu|cuda] [--out FILE]
        [--tasks T ...] [--methods NAME ...] [--spaces params|representation ...]

``--methods`` and ``--spaces`` time a subset (the references ``ew`` and ``loop_baseline`` always
run; ``--methods`` names aggregators and loss weightings by class name, e.g. ``UPGrad FAMO``).

Prints a JSON list of rows ``{"method", "space", "tasks", "ms_per_step", "ratio_vs_ew",
"ratio_vs_ew_range", "ratio_vs_loop_baseline", "ratio_vs_loop_baseline_range", "peak_mb"}`` (a row whose method failed has ``"error"`` instead of timings) and writes
it to ``--out`` if given.

Setup: a small CNN (:class:`mtl.backbones.CNN`, blocks of 32-64-64 channels on 3x16x16 inputs,
global average pooling to 64 features), batch 32, one linear head per task, losses = cross-entropy
of random labels (10 classes), plain SGD. One *step* = forward + task Jacobian + aggregation +
writing ``.grad`` + ``optimizer.step()``. Methods:

* ``ew``: one backward of the summed loss (the reference of ``ratio_vs_ew``).
* ``loop_baseline``: what LibMTL-style code does: per task, a backward, then all shared gradients
  flattened into a vector that is copied to the host; the host rows are stacked, their mean is
  written back (the reference of ``ratio_vs_loop_baseline``).
* every gradient aggregator of ``mtl.balancing.aggregators`` in both spaces (``params``: Jacobian
  over the shared parameters; ``representation``: over the backbone's pooled output), with the
  engine's default ``method="auto"`` (``--jacobian-method`` to force ``loop`` or ``batched``); heads
  get the gradient of the summed loss. In the representation space ``auto`` computes ``J`` and the
  heads' gradients in one backward pass (:func:`mtl.balancing.jacobian.representation_jacobian`).
* every loss weighting of ``mtl.balancing.weightings`` (``params`` only: one backward of the
  weighted loss; GradNorm gets the last conv layer's weight; weightings that need the losses after
  the step recompute them, which counts in their time).

Contenders alternate: after a warm-up, each runs ``--steps`` steps in turn for ``--rounds`` rounds
(the order rotates), timed by this process's CPU time on the CPU (one thread) and by wall time after
a device sync on CUDA. ``ms_per_step`` is the median over rounds; ``ratio_vs_ew`` and
``ratio_vs_loop_baseline`` are the medians of the per-round ratios to the reference's time in the
same round, with their ``_range`` (min, max) as the spread. The aggregator step is
:func:`mtl.balancing.balanced_backward`, the function the training module calls. ``peak_mb``: on CUDA,
``torch.cuda.max_memory_allocated`` during the method's steps (reset before each method); on CPU,
the process's maximum resident set size (``getrusage`` ``ru_maxrss``) after the method, in MB: a
coarse, monotone high-water mark of the whole process (it only moves when a method needs more than
every method before it), not a per-method figure.

On CPU, denormal floats are flushed to zero (``torch.set_flush_denormal``) unless
``--keep-denormals``: freshly initialised networks produce tiny per-task gradients whose denormal
arithmetic slows CPU backward passes by up to 100x, randomly, which would swamp the comparison.
CPU runs use one thread unless ``--threads``: on a shared machine, OpenMP's barriers wait for a
descheduled worker thread at every parallel region (a probe measured 540 ms per EW step with two
threads on two busy cores against 5 ms with one), so one thread gives the only stable figures.

Imports only torch, ``mtl.balancing`` and ``mtl.backbones`` (no Lightning, no Hydra needed).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import resource
import statistics
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _import_mtl_without_lightning() -> None:
    """``mtl/__init__`` imports the Lightning module; on a machine without Lightning, register a
    bare ``mtl`` package so that the plain-PyTorch subpackages still import."""
    if importlib.util.find_spec("pytorch_lightning") is not None:
        return
    pkg = types.ModuleType("mtl")
    pkg.__path__ = [str(ROOT / "mtl")]
    sys.modules["mtl"] = pkg


_import_mtl_without_lightning()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import mtl.balancing.aggregators as aggregators  # noqa: E402
import mtl.balancing.weightings as weightings  # noqa: E402
from mtl.backbones import CNN  # noqa: E402
from mtl.balancing.backward import balanced_backward  # noqa: E402
from mtl.balancing.jacobian import JacobianEngine, resolve_method  # noqa: E402

BATCH = 32
JACOBIAN_METHOD = "auto"
CLASSES = 10


class BenchModel(nn.Module):
    """CNN backbone 32-64-64 and ``T`` linear heads; the representation is the pooled feature."""

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.backbone = CNN(input_shape=(3, 8, 8), channels=(32, 64, 64), pool_every=1)
        self.heads = nn.ModuleList(
            nn.Linear(self.backbone.out_features, CLASSES) for _ in range(num_tasks)
        )

    def forward(self, x):
        rep = self.backbone(x)
        return [h(rep) for h in self.heads], rep


def task_losses(model: BenchModel, x, y):
    """``([T] cross-entropies, representation [B, 64])``; ``y`` is ``[T, B]``."""
    outs, rep = model(x)
    return torch.stack([F.cross_entropy(o, y[t]) for t, o in enumerate(outs)]), rep


# --------------------------------------------------------------------------------- step makers
def ew_step(model, opt, shared, heads):
    def step(x, y):
        opt.zero_grad(set_to_none=True)
        losses, _ = task_losses(model, x, y)
        losses.sum().backward()
        opt.step()

    return step


def loop_baseline_step(model, opt, shared, heads):
    """LibMTL's way: per-task backward, flatten shared grads, copy to host, stack, mean back."""

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        losses, _ = task_losses(model, x, y)
        rows = []
        for t in range(losses.numel()):
            for p in shared:
                p.grad = None
            losses[t].backward(retain_graph=True)  # heads accumulate their own task's gradient
            rows.append(torch.cat([p.grad.reshape(-1) for p in shared]).cpu())
        g = torch.stack(rows).mean(0).to(x.device)
        offset = 0
        for p in shared:
            p.grad = g[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        opt.step()

    return step


def aggregator_step(agg, space):
    """The training module's aggregator step: :func:`mtl.balancing.balanced_backward`."""
    engine = JacobianEngine(space=space, method=JACOBIAN_METHOD)

    def make(model, opt, shared, heads):
        def step(x, y):
            opt.zero_grad(set_to_none=True)
            losses, rep = task_losses(model, x, y)
            balanced_backward(losses, agg, shared, heads, engine=engine, representations=[rep])
            opt.step()

        return step

    return make


def weighting_step(wt):
    def make(model, opt, shared, heads):
        last_layer = [model.backbone.stages[-1].conv.weight]

        def step(x, y):
            opt.zero_grad(set_to_none=True)
            losses, _ = task_losses(model, x, y)
            total, _ = wt.weighted_loss(losses, shared_parameters=last_layer)
            total.backward()
            opt.step()
            if wt.needs_losses_after_step:
                with torch.no_grad():
                    wt.after_optimizer_step(task_losses(model, x, y)[0])

        return step

    return make


# ----------------------------------------------------------------------------------- harness
def classes_of(package) -> list[tuple[str, type]]:
    return [(name, getattr(package, name)) for name in package.__all__ if inspect.isclass(getattr(package, name))]


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Contender:
    """One method at ``T`` tasks: its model, optimizer, step and batches, ready to be timed."""

    def __init__(self, make_step, extra_params, T, device, seed=0) -> None:
        torch.manual_seed(seed)
        model = BenchModel(T).to(device)
        shared = [p for p in model.backbone.parameters() if p.requires_grad]
        heads = [p for p in model.heads.parameters()]
        groups = [{"params": list(model.parameters())}]
        if extra_params:
            groups.append({"params": extra_params, "weight_decay": 0.0})
        opt = torch.optim.SGD(groups, lr=0.01)
        self.step = make_step(model, opt, shared, heads)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        self.batches = [
            (
                torch.randn(BATCH, 3, 16, 16, generator=gen).to(device),
                torch.randint(0, CLASSES, (T, BATCH), generator=gen).to(device),
            )
            for _ in range(4)
        ]
        self.device = device
        self.calls = 0
        self.ms: list[float] = []  # per round: milliseconds per step

    def run(self, steps: int) -> float:
        """Milliseconds per step over ``steps`` steps: CPU time of this process on the CPU (one
        thread), wall time after a device sync on CUDA."""
        clock = time.perf_counter if self.device.type == "cuda" else time.process_time
        sync(self.device)
        t0 = clock()
        for _ in range(steps):
            self.step(*self.batches[self.calls % len(self.batches)])
            self.calls += 1
        sync(self.device)
        return 1000 * (clock() - t0) / steps


def run(task_counts, device, warmup, steps, rounds, log, methods_filter=None, spaces=("params", "representation")) -> list[dict]:
    """Per ``T``: every contender warmed up, then ``rounds`` rounds in which each runs ``steps``
    steps in turn (the order rotates each round), so that all of them see the same machine load.
    A method's ``ms_per_step`` is its median over rounds; its ratios are the medians of the per-round
    ratios to EW (and to the loop baseline) of the same round, with their min and max."""
    rows: list[dict] = []
    for T in task_counts:
        methods: list[tuple[str, str, object]] = [
            ("ew", "params", lambda: (ew_step, [])),
            ("loop_baseline", "params", lambda: (loop_baseline_step, [])),
        ]
        for space in spaces:
            for name, cls in classes_of(aggregators):
                if methods_filter and name not in methods_filter:
                    continue
                def build(cls=cls, space=space):
                    agg = cls(num_tasks=T).to(device)
                    return aggregator_step(agg, space), list(agg.parameters())

                methods.append((name, space, build))
        for name, cls in classes_of(weightings):
            if (methods_filter and name not in methods_filter) or "params" not in spaces:
                continue

            def build_w(cls=cls):
                wt = cls(num_tasks=T).to(device)
                wt.train()
                return weighting_step(wt), list(wt.parameters())

            methods.append((name, "params", build_w))

        contenders: dict[tuple[str, str], Contender] = {}
        failed: dict[tuple[str, str], str] = {}
        peaks: dict[tuple[str, str], float] = {}
        for name, space, build in methods:
            try:
                make_step, extra = build()
                c = Contender(make_step, extra, T, device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                c.run(warmup)
                peaks[(name, space)] = peak_mb(device)
                contenders[(name, space)] = c
            except Exception as err:  # one broken method must not hide the others
                failed[(name, space)] = f"{type(err).__name__}: {err}"
        keys = list(contenders)
        for r in range(rounds):
            shift = r % len(keys)
            for key in keys[shift:] + keys[:shift]:
                try:
                    contenders[key].ms.append(contenders[key].run(steps))
                except Exception as err:  # noqa: BLE001
                    failed[key] = f"{type(err).__name__}: {err}"
        ew = contenders[("ew", "params")].ms
        loop = contenders[("loop_baseline", "params")].ms
        for name, space, _ in methods:
            key = (name, space)
            row = {"method": name, "space": space, "tasks": T}
            if key in failed:
                row["error"] = failed[key]
            else:
                ms = contenders[key].ms
                vs_ew = [m / e for m, e in zip(ms, ew)]
                vs_loop = [m / b for m, b in zip(ms, loop)]
                row.update(
                    ms_per_step=round(statistics.median(ms), 3),
                    ratio_vs_ew=round(statistics.median(vs_ew), 3),
                    ratio_vs_ew_range=[round(min(vs_ew), 3), round(max(vs_ew), 3)],
                    ratio_vs_loop_baseline=round(statistics.median(vs_loop), 3),
                    ratio_vs_loop_baseline_range=[round(min(vs_loop), 3), round(max(vs_loop), 3)],
                    peak_mb=round(peaks[key], 1),
                )
            rows.append(row)
            log(json.dumps(row))
        del contenders
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="T = 2, 10 and fewer steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON rows here")
    parser.add_argument("--tasks", type=int, nargs="+", default=None, help="override the task counts")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per method and round")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of alternation")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per method")
    parser.add_argument("--keep-denormals", action="store_true", help="CPU: do not flush denormals")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: 1 on CPU, see above)"
    )
    parser.add_argument("--jacobian-method", default="auto", choices=["auto", "loop", "batched"])
    parser.add_argument("--methods", nargs="+", default=None, help="only these aggregators / weightings (class names)")
    parser.add_argument(
        "--spaces", nargs="+", default=["params", "representation"], choices=["params", "representation"],
        help="aggregators in these spaces only (weightings run with params)",
    )
    args = parser.parse_args(argv)
    global JACOBIAN_METHOD
    JACOBIAN_METHOD = args.jacobian_method

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available.")
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
        if not args.keep_denormals:
            torch.set_flush_denormal(True)
    elif args.threads:
        torch.set_num_threads(args.threads)
    task_counts = args.tasks or ([2, 10] if args.quick else [2, 10, 40, 100])
    steps = args.steps or (2 if args.quick else 4)
    rounds = args.rounds or (3 if args.quick else 5)
    warmup = args.warmup or (2 if args.quick else 3)
    print(
        f"# device={device} jacobian_method={resolve_method(JACOBIAN_METHOD, device)} tasks={task_counts} "
        f"warmup={warmup} steps={steps} rounds={rounds} threads={torch.get_num_threads()} torch={torch.__version__}",
        file=sys.stderr,
    )
    rows = run(
        task_counts, device, warmup, steps, rounds, log=lambda s: print(s, file=sys.stderr, flush=True),
        methods_filter=set(args.methods) if args.methods else None, spaces=tuple(args.spaces),
    )
    text = json.dumps(rows, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
