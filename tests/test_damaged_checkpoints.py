"""A damaged newest checkpoint does not stop a resume: the trainer, the learner and the CLI skip
it (saying so, leaving the file) and resume from the newest intact one."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
import pytest

from l2o.io.checkpoints import (
    CheckpointError,
    checkpoint_path,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from l2o.io.config import ServiceConfig, TrainConfig, config_from_dict
from l2o.training.trainer import Trainer
from learner.core import GradientHeader, Learner
from learner.process import LearnerProcess

ROOT = Path(__file__).resolve().parents[1]
DAMAGES = ("flip", "truncate", "metadata")


def damage(path: Path, how: str) -> bytes:
    """Damage the checkpoint at ``path`` (16 bytes flipped in the middle, cut in half, or a
    metadata format this code does not read under a valid checksum); its new bytes."""
    data = bytearray(path.read_bytes())
    if how == "flip":
        middle = len(data) // 2
        data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
        path.write_bytes(bytes(data))
    elif how == "truncate":
        path.write_bytes(bytes(data[:len(data) // 2]))
    else:
        tree, meta = read_checkpoint(path)
        save_checkpoint(path, tree, {**meta, "format_version": 99})
    return path.read_bytes()


def leaves_close(a: Any, b: Any) -> bool:
    return all(np.allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b),
                               strict=True))


def warned_about(caplog: pytest.LogCaptureFixture, path: Path) -> bool:
    return any(r.levelno == logging.WARNING and path.name in r.getMessage()
               for r in caplog.records)


# --- the single-machine trainer --------------------------------------------------------------

def tiny_config(run_dir: Path) -> TrainConfig:
    return config_from_dict({
        "run_name": "t", "run_dir": str(run_dir), "seed": 3, "meta_steps": 8, "log_every": 2,
        "checkpoint_every": 4, "task": {"name": "quadratic", "kwargs": {"dim": 4}},
        "optimizer": {"name": "learned_adam"},
        "estimator": {"num_tasks": 2, "unroll_length": 5, "num_steps": 20},
        "meta_optimizer": {"learning_rate": 3e-3}})


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A run dir with full checkpoints at steps 4 and 8, and θ at step 8."""
    root = tmp_path_factory.mktemp("trained")
    trainer = Trainer(tiny_config(root))
    trainer.train()
    return root, trainer.state.theta


def run_copy(trained: tuple[Path, Any], dest: Path) -> tuple[TrainConfig, Path, Path]:
    """A copy of the trained run in ``dest``: its config and its full checkpoints 4 and 8."""
    shutil.copytree(trained[0], dest)
    cfg = tiny_config(dest)
    run_dir = cfg.run_path()
    return cfg, checkpoint_path(run_dir, "full", 4), checkpoint_path(run_dir, "full", 8)


@pytest.mark.parametrize("how", DAMAGES)
def test_trainer_skips_a_damaged_newest_checkpoint(trained, tmp_path, caplog, how):
    cfg, older, newest = run_copy(trained, tmp_path / "run")
    damaged = damage(newest, how)
    trainer = Trainer(cfg)
    with caplog.at_level(logging.WARNING):
        assert trainer.restore()
    assert trainer.step == 4 and trainer.resumed_from == older
    assert trainer.skipped_checkpoints == [newest]
    assert warned_about(caplog, newest)
    assert newest.read_bytes() == damaged  # left for the user, untouched


def test_trainer_resumed_past_damage_keeps_the_damaged_file_and_catches_up(trained, tmp_path):
    cfg, _, newest = run_copy(trained, tmp_path / "run")
    damaged = damage(newest, "flip")
    trainer = Trainer(cfg)
    assert trainer.restore() and trainer.step == 4
    trainer.train()  # writes step 8 again: the damaged file is renamed first, never overwritten
    aside = newest.with_name(newest.name + ".damaged")
    assert aside.read_bytes() == damaged
    assert not newest.with_name(newest.name + ".damaged1").exists()
    tree, meta = load_checkpoint(newest)
    assert meta["version"] == 8
    assert leaves_close(trainer.state.theta, trained[1])  # the same θ as the straight run


def test_trainer_with_every_checkpoint_damaged_names_the_dir_and_files(trained, tmp_path):
    cfg, older, newest = run_copy(trained, tmp_path / "run")
    damage(newest, "flip")
    damage(older, "truncate")
    trainer = Trainer(cfg)
    with pytest.raises(CheckpointError) as e:
        trainer.restore()
    message = str(e.value)
    assert "no intact full checkpoint" in message and str(older.parent) in message
    assert newest.name in message and older.name in message and "\n" not in message
    assert trainer.step == 0 and trainer.resumed_from is None


# --- the learner -----------------------------------------------------------------------------

RUN = "run-a"


def make_theta() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": np.zeros(3, np.float32)}


def apply_one(learner: Learner, seq: int) -> None:
    grad = jax.tree_util.tree_map(lambda x: np.full(x.shape, 1.0 + seq, np.float32), make_theta())
    header = GradientHeader(RUN, theta_version=learner.version, gen_id=0, worker_id="w", seq=seq,
                            incarnation=learner.incarnation)
    assert learner.submit(grad, header).accepted
    assert learner.step()


def learner_run(run_dir: Path) -> tuple[Learner, Path, Path]:
    """A learner (not started) with full checkpoints at versions 1 and 2."""
    learner = Learner(make_theta(), optax.adam(1e-2), ServiceConfig(), run_dir, RUN,
                      tensorboard=False, start=False)
    for seq in range(2):
        apply_one(learner, seq)
        learner.save_checkpoint()
    return learner, checkpoint_path(run_dir, "full", 1), checkpoint_path(run_dir, "full", 2)


def resume(run_dir: Path) -> Learner:
    return Learner.resume(make_theta(), optax.adam(1e-2), ServiceConfig(), run_dir, RUN,
                          tensorboard=False, start=False)


@pytest.mark.parametrize("how", DAMAGES)
def test_learner_skips_a_damaged_newest_checkpoint(tmp_path, caplog, how):
    _, older, newest = learner_run(tmp_path)
    at_version_1 = load_checkpoint(older)[0]["theta"]
    damaged = damage(newest, how)
    with caplog.at_level(logging.WARNING):
        learner = resume(tmp_path)
    # θ of version 1, numbered past the applied log's newest version (2): versions never repeat
    assert learner.version == 3 and learner.resumed_from == older
    assert learner.skipped_checkpoints == [newest]
    assert leaves_close(learner.theta, at_version_1)
    assert warned_about(caplog, newest)
    assert newest.read_bytes() == damaged
    apply_one(learner, 5)  # version 4: the damaged version-2 file is never written again
    learner.save_checkpoint()
    assert newest.read_bytes() == damaged
    assert load_checkpoint(checkpoint_path(tmp_path, "full", 4))[1]["version"] == 4


def test_learner_with_every_checkpoint_damaged_raises_one_line(tmp_path):
    _, older, newest = learner_run(tmp_path)
    damage(newest, "truncate")
    damage(older, "flip")
    with pytest.raises(CheckpointError, match=r"no intact full checkpoint in .*checkpoints "
                                              r"\(tried full_00000002.ckpt, full_00000001.ckpt\)"):
        resume(tmp_path)


def test_a_checkpoint_of_another_optimizer_is_refused_not_skipped(tmp_path, caplog):
    _, _, newest = learner_run(tmp_path)
    before = newest.read_bytes()
    other = {"w": np.zeros((5, 3), np.float32), "b": np.zeros(3, np.float32)}
    with caplog.at_level(logging.WARNING), pytest.raises(CheckpointError, match=r"full_00000002"
                                                         r".ckpt: array of shape \(4, 3\)"):
        Learner.resume(other, optax.adam(1e-2), ServiceConfig(), tmp_path, RUN,
                       tensorboard=False, start=False)
    assert not warned_about(caplog, newest) and newest.read_bytes() == before


def test_learner_process_resumes_from_the_newest_intact_checkpoint(tmp_path, monkeypatch):
    monkeypatch.delenv("L2O_TOKEN", raising=False)
    cfg = TrainConfig(run_name="proc", run_dir=str(tmp_path))
    proc = LearnerProcess(cfg, theta=make_theta(), token="t", autostart=True)
    try:
        proc.checkpoint()  # version 0
        grad = jax.tree_util.tree_map(lambda x: np.ones(x.shape, np.float32), make_theta())
        assert proc.learner.submit(grad, GradientHeader("proc", 0, 0, "w", 0,
                                                                 proc.learner.incarnation)).accepted
        assert proc.learner.wait_for_version(1, timeout=30)
    finally:
        proc.stop(checkpoint=True)  # version 1
    run_dir = tmp_path / "proc"
    damage(checkpoint_path(run_dir, "full", 1), "flip")
    again = LearnerProcess(cfg, theta=make_theta(), token="t", autostart=True)
    try:
        assert again.learner.resumed_from == checkpoint_path(run_dir, "full", 0)
        assert again.learner.version == 2  # θ of version 0, numbered past the applied log's 1
    finally:
        again.stop(checkpoint=False)
    # none intact: the constructor (a Ray actor's) does not die; address() raises the error
    damage(checkpoint_path(run_dir, "full", 0), "truncate")
    broken = LearnerProcess(cfg, theta=make_theta(), token="t", autostart=True)
    with pytest.raises(CheckpointError, match="no intact full checkpoint"):
        broken.address()


# --- through the CLI -------------------------------------------------------------------------

TINY_YAML = """\
run_name: tiny
run_dir: {run_dir}
seed: 3
meta_steps: 4
log_every: 2
checkpoint_every: 2
task: {{name: quadratic, kwargs: {{dim: 4}}}}
optimizer: {{name: learned_adam}}
estimator: {{num_tasks: 2, unroll_length: 5, num_steps: 20}}
eval: {{steps: 10, seeds: 2, adam_steps_factor: 1, adam_learning_rates: [0.01]}}
"""


def l2o_train(config: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    return subprocess.run(
        [sys.executable, "-c", "from services.cli import app; app()", "train", "--local",
         "--config", str(config)], capture_output=True, text=True, env=env, timeout=600)


def test_cli_train_resumes_past_a_damaged_checkpoint_and_fails_in_one_line(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_YAML.format(run_dir=tmp_path / "runs"))
    first = l2o_train(config)
    assert first.returncode == 0, first.stdout + first.stderr
    run_dir = tmp_path / "runs" / "tiny"
    newest, older = checkpoint_path(run_dir, "full", 4), checkpoint_path(run_dir, "full", 2)
    damage(newest, "flip")
    second = l2o_train(config)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out
    assert "Traceback" not in out
    assert "resume skips a damaged checkpoint" in out and str(newest) in out
    assert newest.with_name(newest.name + ".damaged").exists()

    damage(newest, "truncate")
    damage(older, "flip")
    third = l2o_train(config)
    out = third.stdout + third.stderr
    assert third.returncode == 2, out
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no intact full checkpoint" in errors[0]
    assert newest.name in errors[0] and older.name in errors[0]
