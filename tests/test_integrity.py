"""A run directory never lies: fingerprints, the non-finite guard, exact resumes after SIGKILL,
relocatable directories, the lock, last.ckpt every epoch, a safe mtl-eval, checks before training,
and clear errors for bad inputs."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import CONF, PYTHON, TINY
from mtl.results import read_json
from mtl.schedule import FingerprintMismatch, NonFiniteError, RunLock, RunLockedError, StageCheckpoint
from mtl.train import build_runner, check_overrides, train

HERE = Path(__file__).resolve().parent
HELPERS = "integrity_helpers"
sys.path.insert(0, str(HERE))


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


# ------------------------------------------------------------------------------ fingerprints
def test_a_changed_config_is_refused_naming_the_keys_and_rerun_from_retrains(make_cfg, tmp_path, capsys):
    run = tmp_path / "run"
    base = ["schedule=transfer", "schedule.stages.finetune.max_epochs=1"]
    train(make_cfg(*base))
    before = (run / "results.json").read_text()
    with pytest.raises(FingerprintMismatch) as err:
        train(make_cfg(*base, "optimizer.lr=0.01"))
    msg = str(err.value)
    assert "stage 'pretrain'" in msg and "optimizer.lr: 0.002 -> 0.01" in msg
    assert "hydra.run.dir" in msg and "rerun_from=pretrain" in msg
    assert (run / "results.json").read_text() == before  # nothing was touched
    # only the last stage changed: the first is kept, the message names the second
    with pytest.raises(FingerprintMismatch, match=r"(?s)stage 'finetune'.*stage\.lr: 0\.003 -> 0\.01"):
        train(make_cfg(*base, "schedule.stages.finetune.lr=0.01"))
    # settings that cannot change a result are not part of the fingerprint
    capsys.readouterr()
    train(make_cfg(*base, "trainer.enable_progress_bar=true", "logger=none", "data.num_workers=0"))
    assert "[finetune] already finished" in capsys.readouterr().out
    # rerun_from retrains the changed stage; the old one is moved aside, results.json is the new run's
    _, new = train(make_cfg(*base, "schedule.stages.finetune.lr=0.01", "rerun_from=finetune"))
    moved = list((run / "replaced").glob("*/stages/finetune/result.json"))
    assert len(moved) == 1 and list((run / "replaced").glob("*/results.json"))
    assert new["config"]["schedule"]["stages"]["finetune"]["lr"] == 0.01
    assert new["stages"]["finetune"]["fingerprint"] == read_json(run / "stages/finetune/result.json")["fingerprint"]
    assert results(run)["fingerprints"]["finetune"] == new["stages"]["finetune"]["fingerprint"]
    # the same command again (a requeued job) resumes instead of retraining
    capsys.readouterr()
    train(make_cfg(*base, "schedule.stages.finetune.lr=0.01", "rerun_from=finetune"))
    assert "[finetune] already finished" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"rerun_from=nope: there is no such stage; the stages are \['pretrain', 'finetune'\]"):
        build_runner(make_cfg(*base, "rerun_from=nope"), run)


def test_an_interrupted_stage_never_resumes_under_a_changed_config(make_cfg, tmp_path):
    crash = [f"+callbacks.crash._target_={HELPERS}.Crash", "+callbacks.crash.stage=train"]
    base = ["schedule=multitask", "trainer.max_epochs=2"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(make_cfg(*base, *crash))
    assert (tmp_path / "run/stages/train/checkpoints/last.ckpt").is_file()
    with pytest.raises(FingerprintMismatch, match=r"(?s)stage 'train'.*stage\.max_epochs: 2 -> 3"):
        train(make_cfg("schedule=multitask", "trainer.max_epochs=3", *crash))
    # an old directory without fingerprints cannot be checked: refused too
    (tmp_path / "run/stages/train/fingerprint.json").unlink()
    with pytest.raises(FingerprintMismatch, match="no record of its config"):
        train(make_cfg(*base, *crash))


# ------------------------------------------------------------------------------ non-finite guard
def _poison(runner, n=8):
    """NaN inputs in the first ``n`` training examples: the batches holding them give NaN losses."""
    runner.datamodule.splits["train"].x[:n] = float("nan")


def test_nonfinite_loss_stops_naming_stage_step_and_task(make_cfg, tmp_path):
    runner = build_runner(make_cfg("schedule=multitask", "data.label_budget.sum=null"), tmp_path / "run")
    _poison(runner)
    with pytest.raises(NonFiniteError, match=r"stage 'train', epoch 0, batch \d+ \(global step \d+\): the loss of task 'left' is nan"):
        runner.run()
    assert not (tmp_path / "run/stages/train/checkpoints/best.ckpt").exists()


def test_nonfinite_steps_are_skipped_and_never_reach_the_weights(make_cfg, tmp_path):
    cfg = make_cfg("schedule=multitask", "guard.nonfinite=skip", "data.label_budget.sum=null", "trainer.limit_train_batches=8")
    runner = build_runner(cfg, tmp_path / "run")
    _poison(runner)
    out = runner.run()["stages"]["train"]
    assert 1 <= out["skipped_steps"] < 8
    state = torch.load(tmp_path / "run/stages/train/checkpoints/best.ckpt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert math.isfinite(out["val_loss"])


def test_a_diverged_first_stage_is_never_handed_to_the_next(make_cfg, tmp_path):
    with pytest.raises(NonFiniteError, match=r"stage 'pretrain', epoch 0: validation gave .*nan"):
        train(make_cfg("schedule=transfer", "optimizer.lr=1e6"))
    assert not (tmp_path / "run/stages/finetune").exists()
    assert not (tmp_path / "run/stages/pretrain/checkpoints/best.ckpt").exists()
    assert not (tmp_path / "run/stages/pretrain/result.json").exists()


def _huge_targets_csv(path: Path) -> Path:
    rows = ["f1,f2,y"] + [f"{i % 7},{(i * 3) % 5},{1e20 * (1 + i % 3)}" for i in range(60)]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_regression_targets_near_1e20_train_and_report_in_their_units(make_cfg, tmp_path, mode):
    # the loss sees standardised targets; the metrics sum in float64, in the column's units, where
    # float32 sums of squared errors (torchmetrics') overflowed to inf near 1e20
    csv = _huge_targets_csv(tmp_path / "huge.csv")
    cfg = make_cfg("data=csv", f"data.path={csv}", "+data.tasks.y={kind: regression}", "data.batch_size=16",
                   "schedule=multitask", f"guard.nonfinite={mode}", "backbone=mlp")
    train(cfg)
    stage = json.loads((tmp_path / "run/stages/train/result.json").read_text())
    assert not stage.get("nonfinite")
    val = stage["tasks"]["y"]["val"]
    assert 1e18 < val["mae"] <= val["rmse"] < 1e21
    # the standardised loss is the MSE over std^2, so in the column's units rmse = std * sqrt(loss)
    std = float(torch.tensor([1e20 * (1 + i % 3) for i in range(60)], dtype=torch.float64).std())
    assert val["rmse"] == pytest.approx(std * val["loss"] ** 0.5, rel=0.1)


# ------------------------------------------------------------------------------ exact resume after SIGKILL
def _main(argv: list[str], log: str) -> None:
    """``python -m mtl.train <argv>`` in a forked process (it starts at once: torch is imported)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from mtl.train import main

    sys.argv = ["mtl.train", *argv]
    main()


def _cli(run: Path, *extra: str):
    """Start ``mtl-train`` on a small transfer schedule in ``run``, in its own process."""
    import multiprocessing

    argv = TINY + [
        "backbone.channels=[8,16]", "logger=none", "schedule=transfer", "trainer.max_epochs=2",
        "schedule.stages.finetune.max_epochs=2", "schedule.stages.finetune.policy.probe_epochs=1",
        f"hydra.run.dir={run}", *extra,
    ]
    proc = multiprocessing.get_context("fork").Process(target=_main, args=(argv, f"{run}.log"))
    proc.start()
    return proc


def _tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def test_sigkill_mid_stage_and_between_stages_resumes_bit_identically(tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    kill = [f"+callbacks.kill._target_={HELPERS}.KillAt", "+callbacks.kill.at=[pretrain:1,finetune:0]"]
    uninterrupted = _cli(ref)
    codes = []
    for _ in range(3):  # killed in pretrain's 2nd epoch, then before finetune's 1st step, then finishes
        proc = _cli(cut, *kill)
        proc.join(timeout=300)
        codes.append(proc.exitcode)
        if proc.exitcode == 0:
            break
    uninterrupted.join(timeout=300)
    assert uninterrupted.exitcode == 0, Path(f"{ref}.log").read_text()[-3000:]
    assert codes == [-9, -9, 0], Path(f"{cut}.log").read_text()[-3000:]
    assert (cut / "killed-pretrain-1").exists() and (cut / "killed-finetune-0").exists()
    assert read_json(cut / "stages/pretrain/result.json")["resumed"] is True
    assert read_json(cut / "stages/finetune/result.json")["resumed"] is False  # started afresh after the kill

    def every_tensor(run):  # the model, the optimizer's moments, the best score...
        ckpt = torch.load(run / "stages/finetune/checkpoints/best.ckpt", weights_only=True)
        return {k.replace(str(run), "<run>"): v for k, v in _tensors(ckpt)}

    a, b = every_tensor(ref), every_tensor(cut)
    assert a.keys() == b.keys() and any(k.startswith("/state_dict/") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert results(ref)["stages"]["finetune"]["tasks"] == results(cut)["stages"]["finetune"]["tasks"]


def test_each_stage_is_seeded_by_its_name_not_by_what_ran_before(make_cfg, tmp_path):
    """The finetune stage alone (pretrain skipped) draws the same new head as after a pretrain run."""
    from mtl.schedule.runner import stage_seed

    assert stage_seed(0, "finetune") == stage_seed(0, "finetune") != stage_seed(1, "finetune") != stage_seed(0, "pretrain")
    base = ["schedule=transfer", "schedule.stages.finetune.max_epochs=1"]
    train(make_cfg(*base))
    first = torch.load(tmp_path / "run/stages/finetune/checkpoints/best.ckpt", weights_only=True)["state_dict"]
    shutil.rmtree(tmp_path / "run/stages/finetune")
    torch.manual_seed(12345)  # whatever the global RNG holds
    train(make_cfg(*base))  # pretrain is skipped this time
    again = torch.load(tmp_path / "run/stages/finetune/checkpoints/best.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(first[k], again[k]) for k in first)


# ------------------------------------------------------------------------------ relocatable, lock, last.ckpt
def test_a_copied_run_directory_reads_its_own_checkpoints(make_cfg, tmp_path):
    crash = [f"+callbacks.crash._target_={HELPERS}.Crash", "+callbacks.crash.stage=finetune"]
    base = ["schedule=transfer", "schedule.stages.finetune.max_epochs=2"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(make_cfg(*base, *crash))
    assert read_json(tmp_path / "run/stages/pretrain/result.json")["best_checkpoint"] == "stages/pretrain/checkpoints/best.ckpt"
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "run", copy)
    shutil.rmtree(tmp_path / "run")  # the original is gone: the copy must not need it
    _, out = train(make_cfg(*base, *crash, f"paths.output_dir={copy}"))
    fin = out["stages"]["finetune"]
    assert fin["resumed"] is True and fin["epochs"] == 2
    assert fin["best_checkpoint"] == "stages/finetune/checkpoints/best.ckpt"
    assert not (tmp_path / "run").exists()


def test_the_lock_refuses_a_second_process_and_takes_over_a_dead_ones(make_cfg, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(  # another process holding the lock (it does not need to import mtl)
        [PYTHON, "-c", "import fcntl, os, sys, time; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); "
         "f.write(f'{os.getpid()} host'); f.flush(); print('locked', flush=True); time.sleep(60)", str(run / ".lock")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=rf"Run directory {run} is in use by process {holder.pid}"):
            train(make_cfg("schedule=multitask"))
        assert not (run / "stages").exists()
    finally:
        holder.kill()
        holder.wait()
    (run / ".lock").write_text("999999999 host since yesterday\n")  # left by a process that died
    train(make_cfg("schedule=multitask"))
    assert (run / "results.json").is_file()
    with RunLock(run):  # in one process too: a second holder is refused
        with pytest.raises(RunLockedError, match=str(os.getpid())):
            RunLock(run).acquire()


def test_default_run_directories_do_not_collide():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        dirs = {str(compose("train", return_hydra_config=True).hydra.run.dir) for _ in range(3)}
    GlobalHydra.instance().clear()
    assert len(dirs) == 3


def test_last_ckpt_is_rewritten_every_epoch_even_without_improvement(make_cfg, tmp_path):
    from integrity_helpers import LastEpochs

    LastEpochs.seen = []
    # monitor the epoch, lower is better: epoch 0 stays the best, no later epoch "improves"
    train(make_cfg("schedule=multitask", "trainer.max_epochs=3", "schedule.stages.train.monitor=epoch",
                   f"+callbacks.last._target_={HELPERS}.LastEpochs"))
    assert LastEpochs.seen == [None, 0, 1]
    ckpts = tmp_path / "run/stages/train/checkpoints"
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["epoch"] == 2
    assert torch.load(ckpts / "best.ckpt", weights_only=True)["epoch"] == 0
    assert not list(ckpts.glob("*.tmp"))


def test_checkpoints_are_written_atomically(tmp_path):
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"the previous, complete checkpoint")

    class Dying:
        is_global_zero, global_step, loggers = True, 0, []

        def save_checkpoint(self, path, weights_only=False):
            Path(path).write_bytes(b"half a chec")
            raise KeyboardInterrupt  # killed in the middle of writing

    with pytest.raises(KeyboardInterrupt):
        StageCheckpoint(dirpath=tmp_path)._save_checkpoint(Dying(), str(target))
    assert target.read_bytes() == b"the previous, complete checkpoint"


# ------------------------------------------------------------------------------ mtl-eval safety
def _eval_cfg(*overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("eval", overrides=list(overrides))


def test_eval_rebuilds_from_the_checkpoint_and_ignores_a_planted_config(make_cfg, tmp_path, capsys):
    train(make_cfg("schedule=multitask", "backbone=mlp", "backbone.hidden=[24]"))
    ckpt = tmp_path / "run/stages/train/checkpoints/best.ckpt"
    marker = tmp_path / "pwned"
    planted = f"data:\n  _target_: shutil.copyfile\n  src: {ckpt}\n  dst: {marker}\nbackbone: {{_target_: os.getcwd}}\n"
    for where in (tmp_path / "run", ckpt.parent):
        (where / ".hydra").mkdir(exist_ok=True)
        (where / ".hydra" / "config.yaml").write_text(planted)
    from mtl.eval import evaluate

    out = evaluate(_eval_cfg(f"ckpt_path={ckpt}", "trainer.limit_test_batches=2", "trainer.accelerator=cpu"))
    assert not marker.exists()
    assert "Model and data config from the checkpoint" in capsys.readouterr().out
    assert 0.0 <= out["stages"]["eval"]["tasks"]["left"]["test"]["acc"] <= 1.0
    # a checkpoint whose own spec names code outside mtl is refused, before anything is built
    obj = torch.load(ckpt, weights_only=True)
    obj["mtl_run"]["data"]["_target_"] = "shutil.copyfile"
    torch.save(obj, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match=r"mtl_run\.data\._target_ is 'shutil.copyfile'.*config_from"):
        evaluate(_eval_cfg(f"ckpt_path={tmp_path / 'evil.ckpt'}"))
    assert not marker.exists()
    # an older checkpoint without a model config: say how to name one
    del obj["mtl_run"]
    torch.save(obj, tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match="holds no model config.*config_from="):
        evaluate(_eval_cfg(f"ckpt_path={tmp_path / 'old.ckpt'}"))


# ------------------------------------------------------------------------------ checks before training
def test_parts_and_metric_names_of_every_stage_are_checked_before_training(make_cfg, tmp_path):
    cfg = make_cfg("schedule=transfer", "schedule.stages.finetune.balancer={method: {_target_: mtl.balancing.Nope}}")
    with pytest.raises(ValueError, match=r"(?s)schedule\.stages\.finetune\.balancer\.method: .*Nope"):
        build_runner(cfg, tmp_path / "run")
    cfg = make_cfg("schedule=transfer", "+schedule.stages.finetune.regularizers.l2sp._target_=mtl.transfer.Nope")
    with pytest.raises(ValueError, match=r"(?s)schedule\.stages\.finetune\.regularizers\.l2sp: .*Nope"):
        build_runner(cfg, tmp_path / "run")
    for name, problem in [
        ("finetune/val/left/acc", "stage 'finetune' trains no task 'left'"),
        ("fine/val/sum/acc", "there is no stage 'fine'"),
        ("finetune/train/sum/acc", "the split must be 'val' or 'test'"),
        ("finetune/val/sum/auroc", "task 'sum' has no metric 'auroc'"),
        ("sum_acc", "it is not '<stage>/<split>/<task>/<metric>'"),
    ]:
        with pytest.raises(ValueError, match=rf"optimized_metric '{name}' cannot be produced by this run: {problem}.*finetune/val/sum/acc"):
            build_runner(make_cfg("schedule=transfer", f"optimized_metric={name}"), tmp_path / "run")
    with pytest.raises(ValueError, match=r"optimized_metrics 'pretrain/val/sum/acc'"):
        build_runner(make_cfg("schedule=transfer", "optimized_metrics=[pretrain/val/left/acc,pretrain/val/sum/acc]"), tmp_path / "run")
    assert not (tmp_path / "run" / "stages").exists()


@pytest.mark.parametrize("override,message", [
    ("trainer.max_epochs=three", r"trainer\.max_epochs must be a positive integer, got 'three' \(str\)"),
    ("seed=abc", r"seed must be an integer, got 'abc' \(str\)"),
    ("trainer.limit_train_batches=0", r"trainer\.limit_train_batches=0: no stage would train a step"),
    ("trainer.limit_val_batches=-1", r"trainer\.limit_val_batches must be null"),
    ("guard.nonfinite=ignore", r"guard\.nonfinite must be one of \['stop', 'skip'\]"),
    ("trainer.strategy=ddp_spawn", r"trainer\.strategy=ddp_spawn is not supported by mtl-train.*trainer=ddp_cpu"),
    ("data.label_budget.sum=-5", r"data\.label_budget\.sum=-5: a label budget is the number of labelled training examples"),
    ("data.label_budget.sum=100000", r"data\.label_budget\.sum=100000 is more than the 256 training examples labelled for 'sum'"),
])
def test_bad_settings_are_refused_naming_the_key(make_cfg, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        train(make_cfg("schedule=multitask", override))
    assert not (tmp_path / "run" / "stages").exists()


def test_ddp_presets(make_cfg):
    gpu, cpu = make_cfg("trainer=ddp").trainer, make_cfg("trainer=ddp_cpu").trainer
    assert gpu.strategy == cpu.strategy == "ddp" and gpu.devices == -1 and gpu.precision == "bf16-mixed"
    assert cpu.accelerator == "cpu" and cpu.devices == 2 and cpu.num_nodes == 1


def test_an_empty_mapping_override_is_refused(make_cfg):
    cfg = make_cfg("schedule.stages={}")
    assert list(cfg.schedule.stages) == ["pretrain", "finetune"]  # what Hydra does with it
    with pytest.raises(ValueError, match=r"schedule\.stages=\{\} does not empty the schedule.*schedule\.stages\.<name>=null"):
        check_overrides(cfg, ["schedule.stages={}"])
    with pytest.raises(ValueError, match=r"data\.label_budget=\{\} does not empty data\.label_budget.*data\.label_budget\.sum=null"):
        check_overrides(make_cfg("data.label_budget={}"), ["data.label_budget={}"])
    check_overrides(cfg, ["seed=1", "callbacks={}"])  # nothing to merge into: fine


# ------------------------------------------------------------------------------ damaged files
def test_damaged_checkpoints_and_results_name_the_file(make_cfg, tmp_path):
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"'{empty}' is empty \(0 bytes\)"):
        train(make_cfg("schedule=multitask", f"schedule.stages.train.init={empty}"))
    base = ["schedule=transfer", "schedule.stages.finetune.max_epochs=2"]
    crash = [f"+callbacks.crash._target_={HELPERS}.Crash", "+callbacks.crash.stage=finetune"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(make_cfg(*base, *crash))
    last = tmp_path / "run/stages/finetune/checkpoints/last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated by a full disk, say
    with pytest.raises(ValueError, match=rf"'{last}' cannot be read .*truncated.*Delete it"):
        train(make_cfg(*base, *crash))
    done = tmp_path / "run/stages/pretrain/result.json"
    done.write_text(done.read_text()[:40])
    with pytest.raises(ValueError, match=rf"{done} is not valid JSON"):
        train(make_cfg(*base, *crash))


def test_an_init_key_map_that_matches_nothing(make_cfg, tmp_path):
    train(make_cfg("schedule=multitask"))
    ckpt = tmp_path / "run/stages/train/checkpoints/best.ckpt"
    cfg = make_cfg("schedule=multitask", f"schedule.stages.train.init={ckpt}", "+schedule.stages.train.init_key_map={encodr.: sharing.backbone.}",
                   f"paths.output_dir={tmp_path / 'run2'}")
    with pytest.raises(ValueError, match=r"schedule\.stages\.train\.init_key_map: prefix\(es\) \['encodr\.'\] match no key.*\['heads\.', 'sharing\.'\]"):
        train(cfg)
