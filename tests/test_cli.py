"""The entry points as a user runs them, in a subprocess."""

import json
import subprocess

from conftest import PYTHON, TINY, cli_env

TINY_CLI = TINY + ["backbone.channels=[8,16]", "logger=none"]


def run(*args, cwd):
    proc = subprocess.run([PYTHON, *args], cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_multirun_over_schedules_writes_three_results(tmp_path):
    out = run(
        "-m", "mtl.train", "-m", "schedule=multitask,transfer,combined", "trainer.max_epochs=1",
        f"hydra.sweep.dir={tmp_path}/sweep", *TINY_CLI, cwd=tmp_path,
    )
    results = sorted((tmp_path / "sweep").glob("*/results.json"))
    assert len(results) == 3, out[-2000:]
    names = {json.loads(p.read_text())["config"]["schedule"]["name"] for p in results}
    assert names == {"multitask", "transfer", "combined"}


def test_print_config_and_run_dir_and_eval(tmp_path):
    out = run("-m", "mtl.train", "--cfg", "job", "schedule=transfer", cwd=tmp_path)
    assert "finetune:" in out and "_target_: mtl.data.MultiDigitsDataModule" in out
    out = run("-m", "mtl.train", f"hydra.run.dir={tmp_path}/run", "schedule=multitask", *TINY_CLI, cwd=tmp_path)
    assert "Final metrics" in out and (tmp_path / "run" / "results.json").is_file()
    ckpt = tmp_path / "run/stages/train/checkpoints/best.ckpt"
    out = run("-m", "mtl.eval", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path}/eval", cwd=tmp_path)
    assert "Using the config of the run" in out and "│ eval" in out and "acc=" in out
