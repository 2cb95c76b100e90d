"""Fault tests that can fail: what the learner applied against what it acknowledged, a learner
killed and restarted under a client that still holds the old θ, failed meta-updates."""

from __future__ import annotations

import functools
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_tree_equal

from l2o.io.checkpoints import load_checkpoint
from l2o.io.config import ServiceConfig
from l2o.training.meta_update import MetaState, meta_update
from learner.core import GradientHeader, Learner, mean_of, read_applied_log, to_device
from learner.server import serve
from services.client import LearnerClient, reason_name

TOKEN = "fault-token"
RUN = "faults"


def make_theta() -> dict[str, Any]:
    rng = np.random.default_rng(1)
    return {"w": rng.normal(size=(5, 3)).astype(np.float32), "b": np.zeros(3, np.float32)}


def gradient(worker: int, seq: int) -> dict[str, Any]:
    """A gradient that differs for every (worker, seq)."""
    rng = np.random.default_rng([worker, seq])
    return jax.tree_util.tree_map(
        lambda x: rng.normal(size=np.shape(x)).astype(np.float32), make_theta())


def replay(tx: optax.GradientTransformation, log: list, grads: dict) -> tuple[Any, Any]:
    """θ and the optimizer state after applying the logged batches once each, in order, from θ0,
    through the same meta-update the learner runs."""
    update = jax.jit(functools.partial(meta_update, tx))
    theta = jax.tree_util.tree_map(jnp.asarray, make_theta())
    state = MetaState(theta=theta, opt_state=tx.init(theta), version=jnp.asarray(0, jnp.int32))
    for entry in log:
        grad = to_device(mean_of([grads[key] for key in entry.gradients]))
        state, info = update(state.replace(version=jnp.asarray(entry.version - 1, jnp.int32)),
                             grad)
        assert bool(info.applied)
    return state.theta, state.opt_state


def test_applied_log_replays_to_the_learners_theta(tmp_path: Path) -> None:
    """Three workers push concurrently over gRPC, with retries, stale gradients and gradients of
    another incarnation; replaying the learner's applied log must give its θ bit for bit."""
    tx = optax.adam(3e-2)
    learner = Learner(make_theta(), tx,
                      ServiceConfig(batch_size=2, max_staleness=1, buffer_size=64), tmp_path, RUN,
                      checkpoint_every=1000, tensorboard=False)
    server, port = serve(learner, "127.0.0.1", 0, TOKEN)
    grads: dict[tuple[str, int], Any] = {}
    acked: set[tuple[str, int]] = set()
    answers: list[str] = []
    lock = threading.Lock()

    def worker(index: int) -> None:
        name = f"w{index}"
        with LearnerClient(f"127.0.0.1:{port}", TOKEN, RUN, max_wait_s=10.0) as client:
            version = -1
            for seq in range(16):
                r = client.fetch(have_version=version)
                version = r.version
                grad = gradient(index, seq)
                stamp = {"theta_version": version, "gen_id": 0,
                         "incarnation": client.last_incarnation, "worker_id": name, "seq": seq}
                if seq % 5 == 3:  # computed on a θ long gone
                    stamp["theta_version"] = max(0, version - 3)
                if seq % 7 == 6:  # computed on the θ of another learner
                    stamp["incarnation"] = client.last_incarnation ^ 1
                acks = [client.push_gradient(grad, **stamp)]
                if seq % 4 == 1:  # a retry of a push whose ack was lost
                    acks.append(client.push_gradient(grad, **stamp))
                with lock:
                    grads[(name, seq)] = grad
                    answers.extend(reason_name(a) for a in acks)
                    if acks[0].accepted:
                        acked.add((name, seq))
                learner.wait_for_version(version + 1, timeout=1.0)  # a worker's pace

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        learner.stop(checkpoint=False)
    finally:
        server.stop(0)
    status = learner.status()
    log = learner.applied_log()
    applied = [key for entry in log for key in entry.gradients]
    # every kind of refusal happened, and retries were answered DUPLICATE
    assert {"OK", "DUPLICATE", "STALE", "STALE_INCARNATION"} <= set(answers), set(answers)
    assert len(applied) == len(set(applied)), "a (worker, seq) was applied twice"
    assert set(applied) <= acked, "a gradient was applied that was never acknowledged"
    assert [e.version for e in log] == list(range(1, len(log) + 1)) == \
        list(range(1, status["version"] + 1))
    assert status["applied"] == len(applied) and status["accepted"] == len(acked)
    # what the learner did not apply is counted: stale at apply time, or buffered at the stop
    assert status["accepted"] - status["applied"] <= status["dropped_stale"] + \
        status["dropped_at_stop"]
    assert len(log) >= 5
    theta, opt_state = replay(tx, log, grads)
    assert_tree_equal(theta, learner.theta)
    assert_tree_equal(opt_state, learner.opt_state)
    # the same log is in the run directory, and the check is sharp: one batch twice differs
    on_disk = [e for e in read_applied_log(tmp_path) if "applied" in e]
    assert [(e["version"], [tuple(k) for k in e["applied"]]) for e in on_disk] == \
        [(e.version, list(e.gradients)) for e in log]
    doubled, _ = replay(tx, [*log, log[-1]], grads)
    assert not np.array_equal(np.asarray(doubled["w"]), np.asarray(learner.theta["w"]))


def test_failed_meta_updates_are_counted_and_stop_the_learner(tmp_path: Path) -> None:
    def broken_update(updates: Any, state: Any, params: Any = None) -> Any:
        raise FloatingPointError("boom in the meta-optimizer")

    tx = optax.GradientTransformation(optax.sgd(0.1).init, broken_update)
    learner = Learner(make_theta(), tx, ServiceConfig(batch_size=1, max_failed_updates=3),
                      tmp_path, RUN, tensorboard=False, start=False)

    def submit(seq: int) -> Any:
        header = GradientHeader(RUN, theta_version=0, gen_id=0, worker_id="w", seq=seq,
                                incarnation=learner.incarnation)
        return learner.submit(gradient(0, seq), header)

    for seq in range(4):
        assert submit(seq).accepted
    for n in (1, 2):
        with pytest.raises(FloatingPointError):
            learner.step()
        s = learner.status()
        assert s["failed_updates"] == n and "boom" in s["last_error"] and not s["fatal_error"]
    with pytest.raises(FloatingPointError):
        learner.step()
    server, port = serve(learner, "127.0.0.1", 0, TOKEN)
    try:
        with LearnerClient(f"127.0.0.1:{port}", TOKEN, RUN, max_wait_s=10.0) as client:
            s = client.status()
            assert s["failed_updates"] == 3 and s["applied"] == 0 and s["version"] == 0
            assert "3 meta-updates in a row failed" in s["fatal_error"]
            assert "FloatingPointError: boom" in s["fatal_error"] and "boom" in s["last_error"]
            # the fourth accepted gradient was never applied, and is counted so
            assert s["dropped_at_stop"] == 1 and s["buffer_depth"] == 0
            ack = client.push_gradient(gradient(0, 9), theta_version=0, gen_id=0,
                                       incarnation=s["incarnation"], worker_id="w", seq=9)
            assert reason_name(ack) == "STOPPED" and "in a row failed" in ack.detail
    finally:
        server.stop(0)
    assert_tree_equal(learner.theta, jax.tree_util.tree_map(jnp.asarray, make_theta()))


def test_buffered_gradients_at_stop_are_counted_not_applied(tmp_path: Path) -> None:
    learner = Learner(make_theta(), optax.sgd(0.1), ServiceConfig(batch_size=2), tmp_path, RUN,
                      tensorboard=False, start=False)
    for seq in range(3):
        header = GradientHeader(RUN, theta_version=0, gen_id=0, worker_id="w", seq=seq,
                                incarnation=learner.incarnation)
        assert learner.submit(gradient(0, seq), header).accepted
    assert learner.step()
    learner.stop(checkpoint=True)
    s = learner.status()
    assert (s["accepted"], s["applied"], s["dropped_at_stop"], s["buffer_depth"]) == (3, 2, 1, 0)
    assert [e.gradients for e in learner.applied_log()] == [(("w", 0), ("w", 1))]
    header = GradientHeader(RUN, theta_version=1, gen_id=0, worker_id="w", seq=5,
                            incarnation=learner.incarnation)
    assert learner.submit(gradient(0, 5), header).reason.name == "STOPPED"
    resumed = Learner.resume(make_theta(), optax.sgd(0.1), ServiceConfig(batch_size=2), tmp_path,
                             RUN, tensorboard=False, start=False)
    assert resumed.status()["dropped_at_stop"] == 1 and resumed.version == 1  # clean: same number


class LearnerCli:
    """``python -m learner`` in a subprocess, its output lines in a queue."""

    def __init__(self, config: Path, run_dir: Path) -> None:
        env = {**os.environ, "L2O_TOKEN": TOKEN, "JAX_PLATFORMS": "cpu"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "learner", "--config", str(config), "--run-dir", str(run_dir),
             "--port", "0"], cwd=Path(__file__).resolve().parents[1], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(x) for x in self.proc.stdout],
                         daemon=True).start()
        self.output: list[str] = []
        self.address = self.wait_for("learner serving run ").rsplit(" ", 1)[1].strip()

    def wait_for(self, prefix: str) -> str:
        while True:
            line = self.lines.get(timeout=120)
            self.output.append(line)
            if line.startswith(prefix):
                return line

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def test_learner_sigkilled_and_restarted_from_an_older_checkpoint(tmp_path: Path) -> None:
    """The learner is SIGKILLed at version 7 (checkpoint at 5) while a client holds θ(7): after the
    restart its gradient on θ(7) is refused, it gets the new θ in full, and the versions it and
    the status see keep increasing."""
    pytest.importorskip("l2o.optimizers.registry")
    config = tmp_path / "cfg.yaml"
    config.write_text("run_name: crash\ntask: {name: quadratic}\n"
                      "optimizer: {name: learned_adam}\ncheckpoint_every: 5\n"
                      "service: {batch_size: 1, max_staleness: 0}\n")
    run_dir = tmp_path / "run"
    first = LearnerCli(config, run_dir)
    address = {"now": first.address}
    seen: list[int] = []  # every version the client saw, in order
    client = LearnerClient(address["now"], TOKEN, "crash", max_wait_s=60.0,
                           resolve_address=lambda: address["now"])
    second = None
    try:
        r = client.fetch()
        old_incarnation = client.last_incarnation
        for seq in range(7):
            step = 0.01 * (seq + 1)
            grad = jax.tree_util.tree_map(lambda x, step=step: np.full_like(x, step), r.theta)
            ack = client.push_gradient(grad, theta_version=r.version, gen_id=0,
                                       incarnation=old_incarnation, worker_id="w", seq=seq)
            assert ack.accepted, ack
            while (r := client.fetch(have_version=r.version)).theta is None:
                pass
            seen += [r.version, client.status()["version"]]
        assert r.version == 7
        theta7 = r.theta
        first.proc.send_signal(signal.SIGKILL)  # no final checkpoint: the newest is version 5
        first.kill()
        second = LearnerCli(config, run_dir)
        address["now"] = second.address
        assert any("resumed from" in line and "full_00000005" in line for line in second.output)

        # a gradient computed on the pre-crash θ(7) is refused, whatever its version number says
        ack = client.push_gradient(jax.tree_util.tree_map(np.zeros_like, theta7), theta_version=7,
                                   gen_id=0, incarnation=old_incarnation, worker_id="w", seq=7)
        assert reason_name(ack) == "STALE_INCARNATION" and not ack.accepted, ack
        # the client holding θ(7) gets the new θ in full, under a version never used before
        r = client.fetch(have_version=7)
        seen += [r.version, client.status()["version"]]
        assert r.theta is not None and r.version == 8
        assert client.last_incarnation != old_incarnation
        five, _ = load_checkpoint(run_dir / "checkpoints" / "params_00000005.ckpt")
        assert_tree_equal(r.theta, five)
        assert not np.array_equal(np.asarray(jax.tree_util.tree_leaves(r.theta)[0]),
                                  np.asarray(jax.tree_util.tree_leaves(theta7)[0]))
        # training goes on from there
        grad = jax.tree_util.tree_map(lambda x: np.full_like(x, 0.01), r.theta)
        ack = client.push_gradient(grad, theta_version=8, gen_id=0,
                                   incarnation=client.last_incarnation, worker_id="w", seq=8)
        assert ack.accepted, ack
        while (r := client.fetch(have_version=8)).theta is None:
            pass
        seen += [r.version, client.status()["version"]]
        status = client.status()
        assert status["rejected_by_reason"] == {"STALE_INCARNATION": 1}
        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(timeout=60) == 0
    finally:
        client.close()
        first.kill()
        if second is not None:
            second.kill()
    assert seen == sorted(seen) and seen[-1] == 9, seen  # versions seen never went down
    versions = [e["version"] for e in read_applied_log(run_dir)]
    assert versions == [1, 2, 3, 4, 5, 6, 7, 8, 9]  # every version named one θ


class RecordingRegistry:
    """The part of ``services.registry.Registry`` the driver's loop writes to."""

    def __init__(self) -> None:
        self.fields: dict[str, Any] = {}

    def set_status(self, state: str | None = None, **fields: Any) -> None:
        self.fields.update(fields, **({"state": state} if state else {}))

    def state(self) -> str | None:
        return self.fields.get("state")


def test_driver_mirrors_failures_and_fails_the_run_with_the_learners_error(
        tmp_path: Path) -> None:
    """The driver's poll loop mirrors failed meta-updates and their error, and a learner that
    stopped the run fails it with that error (no Ray needed: the loop talks gRPC and Redis)."""
    from l2o.io.config import TrainConfig
    from services.train import ServiceRun

    def broken_update(updates: Any, state: Any, params: Any = None) -> Any:
        raise FloatingPointError("boom")

    tx = optax.GradientTransformation(optax.sgd(0.1).init, broken_update)
    learner = Learner(make_theta(), tx, ServiceConfig(batch_size=1, max_failed_updates=2),
                      tmp_path, RUN, tensorboard=False, start=False)
    server, port = serve(learner, "127.0.0.1", 0, TOKEN)
    run = ServiceRun.__new__(ServiceRun)  # the loop's state only: no Redis, no Ray
    run.cfg, run.registry, run.status = TrainConfig(meta_steps=100), RecordingRegistry(), {}
    run.history, run._last_bucket, run.run_refs, run.curriculum = [], -1, {}, None
    try:
        with LearnerClient(f"127.0.0.1:{port}", TOKEN, RUN, max_wait_s=10.0) as run.client:
            for seq in range(2):
                header = GradientHeader(RUN, theta_version=0, gen_id=0, worker_id="w", seq=seq,
                                        incarnation=learner.incarnation)
                assert learner.submit(gradient(0, seq), header).accepted
                with pytest.raises(FloatingPointError):
                    learner.step()
            with pytest.raises(RuntimeError, match="the learner stopped the run: 2 meta-updates"
                                                   " in a row failed.*boom"):
                run.loop(poll_s=0.01)
            run.mark_failed(RuntimeError("the learner stopped the run: …"))
    finally:
        server.stop(0)
        learner.stop(checkpoint=False)
    fields = run.registry.fields
    assert fields["state"] == "failed" and "stopped the run" in fields["error"]
    assert fields["failed_updates"] == 2 and "boom" in fields["last_error"]
    assert "in a row failed" in fields["fatal_error"] and fields["skipped_nonfinite"] == 0
