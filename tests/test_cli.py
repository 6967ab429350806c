"""The entry points as a user runs them, in a subprocess."""

import json
import subprocess

import pytest

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
    # quiet: no adverts or device inventory; the run's messages are also in train.log
    assert "Tip:" not in out and "GPU available" not in out and "LeafSpec" not in out
    assert "[train] training tasks" in (tmp_path / "run" / "train.log").read_text()
    ckpt = tmp_path / "run/stages/train/checkpoints/best.ckpt"
    out = run("-m", "mtl.eval", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path}/eval", cwd=tmp_path)
    assert "Model and data config from the checkpoint" in out and "│ eval" in out and "acc=" in out
    # by default the results go next to the checkpoint; a failed evaluation leaves nothing behind
    run("-m", "mtl.eval", f"ckpt_path={ckpt}", cwd=tmp_path)
    assert (ckpt.parent / "eval_best" / "eval_results.json").is_file()
    assert not (ckpt.parent / "eval_best" / ".hydra").exists()
    failed = subprocess.run([PYTHON, "-m", "mtl.eval", f"ckpt_path={tmp_path}/none.ckpt"], cwd=tmp_path, env=cli_env(),
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0 and "none.ckpt" in failed.stdout + failed.stderr
    assert not (tmp_path / "eval_none").exists() and not (tmp_path / "outputs").exists()


@pytest.mark.slow  # two jobs of two processes each: about 30 s on two cores
def test_a_multirun_of_ddp_jobs_runs_each_job_once_in_its_own_directory(tmp_path):
    out = run(
        "-m", "mtl.train", "-m", "trainer=ddp_cpu", "seed=0,1", "schedule=multitask",
        *TINY_CLI, cwd=tmp_path,
    )
    sweeps = list((tmp_path / "outputs" / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1, out[-2000:]  # the rank-1 processes did not start sweeps of their own
    assert not (tmp_path / "outputs" / "train" / "runs").exists()
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir() and p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1"]
    for job in jobs:
        results = json.loads((job / "results.json").read_text())
        assert results["config"]["trainer"]["devices"] == 2 and results["config"]["seed"] == int(job.name)
        assert (job / "train_ddp_process_1.log").is_file()  # rank 1 ran in this job's directory
        assert list(job.rglob("results.json")) == [job / "results.json"]


def test_load_a_trained_checkpoint_and_predict(make_cfg, tmp_path):
    """mtl.load and MultiTaskModule.load_from_checkpoint rebuild the module from the checkpoint alone;
    predict_step gives {task: output} equal to the trained model's."""
    import pytorch_lightning as pl
    import torch

    import mtl
    from mtl import MultiTaskModule
    from mtl.train import train

    train(make_cfg("schedule=multitask"))
    ckpt = tmp_path / "run" / "stages" / "train" / "checkpoints" / "best.ckpt"
    module = mtl.load(str(ckpt))
    again = MultiTaskModule.load_from_checkpoint(ckpt)
    x = torch.randn(5, 1, 8, 14)
    with torch.no_grad():
        a, b = module(x), again(x)
    assert set(a) == {"left", "right", "sum"} and a["sum"].shape == (5, 19)
    for t in a:
        assert torch.equal(a[t], b[t])
    preds = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).predict(
        module, torch.utils.data.DataLoader(x, batch_size=5)
    )
    for t in a:
        torch.testing.assert_close(preds[0][t], a[t])
