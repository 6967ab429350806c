"""Every command the README shows runs as written (with ``debug=limit`` and smaller data added).

The commands are read from README.md itself: the lines of its ``bash`` blocks and its inline
``mtl-...`` spans, so a command added to the README is tested without touching this file. They run
in README order in one working directory (so ``mtl-eval`` finds the run ``mtl-train
hydra.run.dir=outputs/my_run`` made), through the entry points' own ``main`` in this process.
A command that cannot run here is listed in ``NOT_RUN`` with the reason; an entry that no longer
matches a README command fails, so the list stays true.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra.core.global_hydra import GlobalHydra

from tests.conftest import ROOT

README = ROOT / "README.md"

#: README commands not run here (a substring of the command -> why)
NOT_RUN = {
    "make train": "CI builds the venv from nothing and runs `make test`; `make train` runs `mtl-train`, run below",
    "make test": "this is the test suite",
    "trainer=ddp ": "needs GPUs (tests/test_ddp.py runs DDP on CPU processes)",
    "trainer=ddp_cpu trainer.devices=4": "four processes on this 2-core machine; tests/test_ddp.py runs two",
    "hydra/launcher=slurm_ddp": "needs a SLURM cluster",
    "python scripts/": "benchmarks and reproductions (minutes each); tests/test_scripts.py and "
                       "tests/backbones/test_repro_script.py run small forms of bench_overhead, bench_balancers, "
                       "bench_solvers, dense_baselines, repro_mmoe_synthetic and transfer_curve",
    "python -m pytest": "this is the test suite",
}

#: added to every mtl-train command: few batches, at most two epochs per stage
LIMITS = ["debug=limit", "logger=csv"]
#: smaller data for the datasets the README's commands use (by the data config's name)
SMALL_DATA = {
    "multidigits": ["data.n_train=256", "data.n_val=64", "data.n_test=64", "data.batch_size=32", "++data.label_budget.sum=64"],
    "synthetic": ["data.n_train=256", "data.n_val=64", "data.n_test=64"],
    "scenes": ["data.n_train=32", "data.n_val=16", "data.n_test=16", "data.batch_size=8"],
}
#: what a swept multirun may keep: the first two values of each comma list
SWEEP_VALUES = 2


def _code_blocks(text: str) -> list[tuple[int, str]]:
    out, in_bash, pending, start = [], False, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            in_bash = line.strip() == "```bash" if not in_bash else False
            continue
        if not in_bash:
            continue
        if not pending:
            start = number
        pending += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            out.append((start, pending.strip()))
            pending = ""
    return out


def _inline(text: str) -> list[tuple[int, str]]:
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        for span in re.findall(r"`((?:mtl-[a-z]+|python -m mtl\.[a-z]+|make [a-z-]+)(?: [^`]*)?)`", line):
            if re.search(r"<|\.\.\.|\[--", span):  # placeholders are not commands
                continue
            if " " not in span and span != "mtl-train":  # the name of a tool, not a command
                continue
            out.append((number, span))
    return out


def readme_commands(text: str | None = None) -> list[tuple[int, list[str]]]:
    """``(line, argv)`` of each command in README order; ``a ; b`` gives two commands."""
    text = README.read_text() if text is None else text
    seen, out = set(), []
    for number, command in sorted(_code_blocks(text) + _inline(text)):
        for part in command.split(" ; "):
            argv = shlex.split(part, comments=True)
            if argv and tuple(argv) not in seen:
                seen.add(tuple(argv))
                out.append((number, argv))
    return out


def not_run_reason(argv: list[str]) -> str | None:
    line = " ".join(argv) + " "
    return next((why for key, why in NOT_RUN.items() if key in line), None)


def test_the_not_run_list_matches_the_readme():
    commands = [" ".join(a) + " " for _, a in readme_commands()]
    stale = [key for key in NOT_RUN if key != "python -m pytest" and not any(key in c for c in commands)]
    assert not stale, f"NOT_RUN entries that match no README command: {stale}"


def test_commands_are_found():
    text = "a `mtl-train x=1` b `mtl-plot <run>`\n```bash\nmtl-train -m a=1,2 \\\n    b=3   # c\nmtl-report A ; python s.py\n```\n"
    assert readme_commands(text) == [
        (1, ["mtl-train", "x=1"]), (3, ["mtl-train", "-m", "a=1,2", "b=3"]), (5, ["mtl-report", "A"]), (5, ["python", "s.py"]),
    ]


def _data_name(argv: list[str]) -> str:
    data = next((a.split("=", 1)[1] for a in argv if a.startswith("data=")), None)
    if data:
        return data
    experiment = next((a.split("=", 1)[1] for a in argv if a.startswith("experiment=")), None)
    if experiment:
        text = (ROOT / "conf" / "experiment" / f"{experiment}.yaml").read_text()
        found = re.search(r"override /data: (\w+)", text)
        if found:
            return found.group(1)
    return "multidigits"


def _small_sweep(overrides: list[str]) -> list[str]:
    """The first ``SWEEP_VALUES`` values of each swept key (``balancer=ew,uw,pcgrad`` -> ``ew,uw``)."""
    out = []
    for o in overrides:
        key, eq, value = o.partition("=")
        if eq and "," in value and not value.startswith(("[", "{", "'")):
            value = ",".join(value.split(",")[:SWEEP_VALUES])
        out.append(f"{key}{eq}{value}")
    return out


def mtl_train_argv(argv: list[str], workdir: Path, name: str = "sweep") -> list[str]:
    """A README ``mtl-train`` command with the test's limits, small data and a sweep directory."""
    args = argv[1:] if argv[0] == "mtl-train" else argv[3:]  # python -m mtl.train
    if "--cfg" in args:
        return args
    multirun = "-m" in args or "--multirun" in args
    args = _small_sweep(args) if multirun else args
    extra = LIMITS + SMALL_DATA.get(_data_name(args), [])
    if any(a.startswith("hparams_search=") for a in args):
        extra.append("hydra.sweeper.n_trials=2")
    if multirun and not any(a.startswith("hydra.sweep.dir=") for a in args):
        extra.append(f"hydra.sweep.dir={workdir / 'outputs' / name}")
    given = {a.split("=", 1)[0].lstrip("+") for a in args if "=" in a}
    return args + [e for e in extra if e.split("=", 1)[0] not in given]


def _call(main, argv: list[str]) -> None:
    GlobalHydra.instance().clear()
    old = sys.argv
    sys.argv = argv
    try:
        main()
    except SystemExit as stop:  # Hydra exits 1 on an error it has printed
        assert stop.code in (0, None), f"{' '.join(argv)} exited with {stop.code}"
    finally:
        sys.argv = old
        GlobalHydra.instance().clear()


def run_command(argv: list[str], workdir: Path) -> None:
    """Run one README command through its entry point, in ``workdir``."""
    head = argv[0] if argv[0] != "python" else " ".join(argv[:3])
    if head in ("mtl-train", "python -m mtl.train"):
        from mtl.train import main

        args = mtl_train_argv(argv, workdir, name=f"sweep_{len(list(workdir.glob('outputs/sweep_*')))}")
        _call(main, ["mtl-train", *args])
        sweep = next((a.split("=", 1)[1] for a in args if a.startswith("hydra.sweep.dir=")), None)
        if "-m" in args and sweep:
            failed = sorted(str(p.parent) for p in (workdir / sweep).rglob("error.txt"))
            assert not failed, f"jobs of the multirun failed: {failed}: {(workdir / failed[0] / 'error.txt').read_text()[-3000:]}"
    elif head == "mtl-eval":
        from mtl.eval import main

        _call(main, argv)
    elif head == "mtl-predict":
        from mtl.predict import main

        _call(main, argv)
    elif head == "mtl-report":
        from mtl.report import main

        assert main(argv[1:]) in (0, None)
    elif head == "mtl-plot":
        pytest.importorskip("matplotlib")
        from mtl.plots import main

        assert main(argv[1:]) in (0, None)
    else:
        raise AssertionError(f"README command {argv} has no runner here: add one, or list it in NOT_RUN with why.")


def write_example_csvs(workdir: Path, n: int = 120, seed: int = 0) -> None:
    """``my.csv`` (features x1..x3, a regression ``price``, a binary ``churn``) and ``new.csv``
    (the same features, no targets), the files the README's CSV commands name."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    price = 1000 + 50 * x[:, 0] + rng.normal(scale=5, size=n)
    churn = np.where(x[:, 1] + 0.3 * rng.normal(size=n) > 0, "yes", "no")
    rows = ["x1,x2,x3,price,churn"] + [f"{a:.4f},{b:.4f},{c:.4f},{p:.2f},{y}" for (a, b, c), p, y in zip(x, price, churn)]
    (workdir / "my.csv").write_text("\n".join(rows) + "\n")
    (workdir / "new.csv").write_text("\n".join(["x1,x2,x3"] + [r.rsplit(",", 2)[0] for r in rows[1:11]]) + "\n")


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path))
    write_example_csvs(tmp_path)
    ran, skipped = [], []
    for number, argv in readme_commands():
        if not_run_reason(argv):
            skipped.append(number)
            continue
        try:
            run_command(argv, tmp_path)
        except BaseException as err:
            raise AssertionError(f"README line {number}: `{' '.join(argv)}` failed: {err!r}") from err
        ran.append(" ".join(argv))
    assert len(ran) >= 20, ran
    # the run the README's mtl-eval command evaluates was made by its mtl-train command
    assert (tmp_path / "outputs" / "my_run" / "results.json").is_file()
    # (its later rerun_from=finetune moved that stage, with the evaluation, under replaced/)
    assert list((tmp_path / "outputs" / "my_run").rglob("eval_best/eval_results.json"))
