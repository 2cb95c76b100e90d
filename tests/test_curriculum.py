"""L2O-Scale: the horizon curriculum (pure rule, trainer, service), eval problems, presets."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_tree_allclose, assert_tree_equal

from l2o.io.checkpoints import load_checkpoint
from l2o.io.config import ConfigError, config_from_dict, preset
from l2o.training.curriculum import (
    CurriculumState,
    curriculum_init,
    curriculum_update,
    eval_horizon,
    train_horizon,
)
from l2o.training.trainer import Trainer

STAGES = [100, 200, 500, 1000]


def reference_curriculum(stages, patience, scores):
    """An independent, loop-based statement of the rule: per score, (stage, action, restore)."""
    out, stage, best, best_at, since = [], 0, math.inf, None, 0
    for version, s in enumerate(scores):
        if math.isfinite(s) and s < best:
            best, best_at, since = s, version, 0
            out.append((stage, "new_best", None))
            continue
        since += 1
        if since < patience:
            out.append((stage, "keep", None))
            continue
        if stage == len(stages) - 1:
            out.append((stage, "finished", best_at))
            break
        out.append((stage + 1, "advance", best_at))
        stage, best, best_at, since = stage + 1, math.inf, None, 0
    return out


def run_rule(stages, patience, scores):
    state, got = curriculum_init(), []
    for version, s in enumerate(scores):
        state, d = curriculum_update(stages, patience, state, s, version)
        got.append((d.stage, d.action.value, d.restore_version))
        if state.done:
            break
    return state, got


def test_scripted_scores_advance_after_patience_and_remember_bests():
    #        stage 0: best 4.0 at v1, then 3 without a new best -> advance, restore v1
    scores = [5.0, 4.0, 4.0, 6.0, 4.5,
              # stage 1 (fresh best): 9 at v5, 8 at v6, nan/inf never improve -> advance, v6
              9.0, 8.0, math.nan, math.inf, 8.0,
              # stage 2: 3 at v10, 2 at v12 -> advance restore v12
              3.0, 3.5, 2.0, 2.1, 2.2, 2.3,
              # stage 3 (last, scored on its own horizon): finish, restore v16
              7.0, 7.0, 7.5, 9.0]
    state, got = run_rule(STAGES, 3, scores)
    assert got == reference_curriculum(STAGES, 3, scores)
    actions = [a for _, a, _ in got]
    assert actions.count("advance") == 3 and actions[-1] == "finished"
    assert [(i, a, r) for i, (_, a, r) in enumerate(got) if a in ("advance", "finished")] == [
        (4, "advance", 1), (9, "advance", 6), (15, "advance", 12), (19, "finished", 16)]
    assert state.done and state.stage == 3
    assert state.stage_bests == ((1, 4.0), (6, 8.0), (12, 2.0), (16, 7.0))
    assert state.stage_starts == (0, 4, 9, 15)
    with pytest.raises(ValueError, match="finished"):
        curriculum_update(STAGES, 3, state, 1.0, 20)


@pytest.mark.parametrize("patience", [1, 2, 3, 5])
def test_random_score_sequences_match_the_reference(patience):
    rng = np.random.default_rng(patience)
    for _ in range(20):
        scores = list(rng.choice([1.0, 2.0, 3.0, math.nan], size=40))
        _, got = run_rule([10, 20, 40], patience, scores)
        assert got == reference_curriculum([10, 20, 40], patience, scores)


def test_horizons_state_json_and_bad_input():
    assert [train_horizon(STAGES, i) for i in range(4)] == STAGES
    assert [eval_horizon(STAGES, i) for i in range(4)] == [200, 500, 1000, 1000]
    state, _ = run_rule(STAGES, 2, [3.0, 1.0, 2.0, 2.0, 5.0])
    assert CurriculumState.from_json(state.to_json()) == state
    assert CurriculumState.from_json(curriculum_init().to_json()).best_score == math.inf
    for bad in ([], [10, 10], [20, 10], [0, 5]):
        with pytest.raises(ValueError, match="stages"):
            curriculum_update(bad, 3, curriculum_init(), 1.0, 0)
    with pytest.raises(ValueError, match="patience"):
        curriculum_update(STAGES, 0, curriculum_init(), 1.0, 0)
    with pytest.raises(ConfigError, match="curriculum.stages"):
        config_from_dict({"curriculum": {"stages": [100, 50]}})
    with pytest.raises(ConfigError, match="horizon_schedule"):
        config_from_dict({"curriculum": {}, "estimator": {"horizon_schedule": "log_uniform"}})


# ------------------------------------------------------------------------------------------------
# The single-machine trainer


def tiny_curriculum_config(tmp_path, **over):
    base = {
        "run_name": "cl", "run_dir": str(tmp_path), "seed": 1, "meta_steps": 100,
        "log_every": 2, "checkpoint_every": 100, "time_budget_s": None,
        "task": {"name": "quadratic", "kwargs": {"dim": 3}},
        "optimizer": {"name": "lstm", "kwargs": {"layers": [4]}},
        "estimator": {"num_tasks": 2, "unroll_length": 5, "num_steps": 7},
        "meta_optimizer": {"learning_rate": 1e-2},
        "curriculum": {"stages": [10, 20, 40], "patience": 2, "eval_period": 2,
                       "eval_seeds": 2},
    }
    base.update(over)
    return config_from_dict(base)


# scores at steps 2, 4, …: stage 0 best at step 4 -> advance at 8; stage 1 best at 10 -> advance
# at 14; stage 2 best at 16 -> finished at 20
SCRIPT = {2: 5.0, 4: 4.0, 6: 6.0, 8: 7.0, 10: 3.0, 12: 3.5, 14: 3.2, 16: 2.0, 18: 2.5, 20: 2.6}


class Scripted:
    """A scorer that returns SCRIPT[step] and records θ and the eval horizon it was asked for."""

    def __init__(self):
        self.thetas, self.horizons = {}, {}

    def __call__(self, trainer, steps):
        self.thetas[trainer.step] = jax.tree_util.tree_map(np.asarray, trainer.state.theta)
        self.horizons[trainer.step] = steps
        return SCRIPT[trainer.step]


def test_trainer_advances_restores_best_and_resumes(tmp_path):
    cfg = tiny_curriculum_config(tmp_path)
    scorer = Scripted()
    tr = Trainer(cfg, scorer=scorer)
    assert tr.estimator.truncated_step.num_steps == 10
    tr.train(num_steps=8)  # stops right after the advance at step 8
    assert tr.step == 8 and tr.stage == 1
    assert tr.estimator.truncated_step.num_steps == 20
    assert scorer.horizons == {2: 20, 4: 20, 6: 20, 8: 20}  # stage 0 scored at stage 1's horizon
    best0, meta0 = load_checkpoint(tr.stage_best_path(0), tr.state.theta)
    assert meta0["version"] == 4 and meta0["eval_final_loss"] == 4.0 and meta0["stage"] == 0
    assert_tree_equal(best0, scorer.thetas[4])
    assert_tree_equal(tr.state.theta, scorer.thetas[4])  # θ after the advance = the best
    assert not np.array_equal(np.asarray(jax.tree_util.tree_leaves(scorer.thetas[8])[0]),
                              np.asarray(jax.tree_util.tree_leaves(scorer.thetas[4])[0]))
    assert_tree_equal(tr.state.opt_state, tr.meta_tx.init(tr.state.theta))  # fresh moments
    adv = tr.evaluations[-1]
    assert adv["curriculum"] == "advance" and adv["restored_version"] == 4
    assert adv["next_stage"] == 1
    assert [e["stage"] for e in tr.history] == [0, 0, 0, 0]

    # resume from the full checkpoint at step 8: stage 1, its horizon, then to the end
    scorer2 = Scripted()
    tr2 = Trainer(cfg, scorer=scorer2)
    assert tr2.restore() and tr2.step == 8 and tr2.stage == 1
    assert tr2.estimator.truncated_step.num_steps == 20
    assert_tree_equal(tr2.state.theta, scorer.thetas[4])
    tr2.train()
    assert tr2.curriculum.done and tr2.step == 20 and tr2.stage == 2
    assert scorer2.horizons == {10: 40, 12: 40, 14: 40, 16: 40, 18: 40, 20: 40}
    assert [e["curriculum"] for e in tr2.evaluations] == [
        "new_best", "new_best", "keep", "advance", "new_best", "keep", "advance", "new_best",
        "keep", "finished"]
    assert tr2.curriculum.stage_bests == ((4, 4.0), (10, 3.0), (16, 2.0))
    assert_tree_equal(tr2.state.theta, scorer2.thetas[16])
    assert {e["stage"] for e in tr2.history if e["step"] > 14} == {2}
    assert {e["num_steps"] for e in tr2.history if e["step"] > 14} == {40}

    # the same run without the interruption ends at the same θ
    scorer3 = Scripted()
    tr3 = Trainer(tiny_curriculum_config(tmp_path / "straight"), scorer=scorer3)
    tr3.train()
    assert tr3.step == 20
    assert_tree_allclose(tr3.state.theta, tr2.state.theta, rtol=1e-6, atol=1e-7)


def test_trainer_default_scorer_is_the_mean_final_loss_at_the_eval_horizon(tmp_path):
    """Without a scripted scorer the score is the learned optimizer's mean final loss on the eval
    task at the next stage's horizon (20 inner steps, eval_seeds runs)."""
    cfg = tiny_curriculum_config(tmp_path, meta_steps=2)
    tr = Trainer(cfg)
    tr.train()
    entry = tr.evaluations[0]
    assert entry["eval_steps"] == 20 and entry["curriculum"] == "new_best"
    from l2o.evaluation.comparison import loss_curves
    from l2o.training.build import eval_key, task_family_from_config, validation_task_and_run_key

    # selection runs on validation seeds, never on the final evaluation's keys
    task, k_run = validation_task_and_run_key(cfg.seed, task_family_from_config(cfg.eval_task()))
    assert not np.array_equal(k_run, jax.random.split(eval_key(cfg.seed))[1])
    curves = loss_curves(task, tr.learned_opt, tr.state.theta, steps=20, seeds=2, key=k_run)
    assert curves.shape == (2, 21)
    np.testing.assert_allclose(entry["eval_final_loss"], float(np.mean(curves[:, -1])),
                               rtol=1e-6)
    assert tr.stage_best_path(0).exists()


# ------------------------------------------------------------------------------------------------
# L2O-Scale's evaluation problems


def _write_fake_mnist(folder, rng, n=4):
    from l2o.tasks.datasets import IDX_FILES, write_idx

    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train_x": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
              "train_y": rng.integers(0, 10, (n,), dtype=np.uint8),
              "test_x": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
              "test_y": rng.integers(0, 10, (n,), dtype=np.uint8)}
    for key, base in IDX_FILES.items():
        write_idx(folder / base, arrays[key])


def _write_fake_cifar(folder, rng, n=2):
    import pickle

    folder.mkdir(parents=True)
    for name in [*[f"data_batch_{i}" for i in range(1, 6)], "test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": list(rng.integers(0, 10, n))}
        (folder / name).write_bytes(pickle.dumps(batch))


def _finite_difference_check(task, params, batch):
    """The gradient against a central difference along a random direction (float64)."""
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), params)
        b64 = jax.tree_util.tree_map(
            lambda x: jnp.asarray(x, jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating)
            else x, batch)
        loss = jax.jit(lambda p: task.loss(p, b64))
        value, grad = jax.jit(jax.value_and_grad(loss))(p64)
        assert np.isfinite(float(value))
        assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grad))
        rng = np.random.default_rng(0)
        d = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape)), p64)
        eps = 1e-4  # the data stay float32 inside the loss; ReLU kinks are rare at this scale
        shifted = lambda s: jax.tree_util.tree_map(lambda x, y: x + s * eps * y, p64, d)
        fd = (loss(shifted(1.0)) - loss(shifted(-1.0))) / (2 * eps)
        analytic = sum(jnp.vdot(g, y) for g, y in zip(jax.tree_util.tree_leaves(grad),
                                                     jax.tree_util.tree_leaves(d), strict=True))
        np.testing.assert_allclose(float(fd), float(analytic), rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("label", ["mnist_mlp", "mnist_mlp_relu", "mnist_mlp_deeper",
                                   "mnist_conv", "cifar10_conv"])
def test_l2o_scale_eval_problems(label, tmp_path, monkeypatch):
    from l2o.tasks.datasets import DataNotFoundError
    from l2o.tasks.registry import L2O_SCALE_EVAL_TASKS, make_task_family

    real, standin = L2O_SCALE_EVAL_TASKS[label]
    # the offline stand-in builds (8 examples a batch here); loss and gradient are finite and the
    # gradient matches finite differences away from ReLU kinks (zero biases and blank pixels
    # put pre-activations exactly at 0 at initialization)
    task = make_task_family(standin, batch_size=8).sample_task(jax.random.PRNGKey(0))
    params = task.init(jax.random.PRNGKey(1))
    rng = np.random.default_rng(1)
    moved = jax.tree_util.tree_map(lambda x: x + 0.05 * rng.normal(size=x.shape), params)
    _finite_difference_check(task, moved, task.sample_batch(jax.random.PRNGKey(2)))

    # the real one needs its files: a clear error naming what is missing
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("L2O_DATA_DIR", str(empty))
    with pytest.raises(DataNotFoundError, match=str(empty)):
        make_task_family(real)

    # with (fake) files it has the stand-in's architecture, only the input differs
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    if real == "cifar":
        _write_fake_cifar(data / "cifar-10-batches-py", rng)
    else:
        _write_fake_mnist(data / "mnist", rng)
    monkeypatch.setenv("L2O_DATA_DIR", str(data))
    real_params = jax.eval_shape(make_task_family(real).sample_task(jax.random.PRNGKey(0)).init,
                                 jax.random.PRNGKey(1))
    shapes = lambda p: {jax.tree_util.keystr(k): np.shape(v)
                        for k, v in jax.tree_util.tree_flatten_with_path(p)[0]}
    a, b = shapes(params), shapes(real_params)
    assert a.keys() == b.keys()
    differ = {k for k in a if a[k] != b[k]}
    first = min(k for k in a if k.endswith("['w']"))  # conv_0/w or layer_0/w: the input layer
    assert differ <= {first, "['readout']['w']"}, differ  # input size (and flattened readout)
    for k in a.keys() - differ:
        assert a[k] == b[k]


# ------------------------------------------------------------------------------------------------
# Presets and the CLI

L2O_SCALE_PRESETS = ["l2o-scale", "l2o-scale-curriculum", "l2o-scale-imitation",
                     "l2o-scale-hessian", "l2o-scale-enhanced"]


@pytest.mark.parametrize("name", L2O_SCALE_PRESETS)
def test_l2o_scale_presets_validate(name):
    cfg = preset(name)
    assert cfg.optimizer.name == "hierarchical_rnn" and cfg.estimator.unroll_length == 20
    assert cfg.estimator.horizon_schedule == "constant" and cfg.eval.steps == 1000
    assert cfg.task.name == "digits_mlp"
    assert (cfg.curriculum is not None) == (name in ("l2o-scale-curriculum",
                                                     "l2o-scale-enhanced"))
    assert (cfg.estimator.reg_option == "hessian-esd") == (name in ("l2o-scale-hessian",
                                                                  "l2o-scale-enhanced"))
    assert (cfg.estimator.mt_ratio == 0.1) == (name in ("l2o-scale-imitation",
                                                        "l2o-scale-enhanced"))


@pytest.mark.slow
@pytest.mark.parametrize("name", L2O_SCALE_PRESETS)
def test_l2o_scale_presets_run(name, tmp_path):
    """A 5-meta-step local run of each preset (tiny horizons and batches; ~10-40 s each, mostly
    compiling the hierarchical RNN's truncation)."""
    data = preset(name).model_dump(mode="json")
    data.update(run_dir=str(tmp_path), meta_steps=5, time_budget_s=None, evaluation_period=None,
                log_every=5, checkpoint_every=5)
    data["estimator"].update(unroll_length=5, num_steps=10)
    data["task"]["kwargs"] = {"batch_size": 16}
    if data["curriculum"] is not None:
        data["curriculum"].update(stages=[10, 20], eval_period=2, patience=1, eval_seeds=1)
    tr = Trainer(config_from_dict(data))
    tr.train()
    assert tr.step == 5 and np.isfinite(tr.history[-1]["meta_loss"])
    if data["curriculum"] is not None:
        assert [e["curriculum"] for e in tr.evaluations][:1] == ["new_best"]
        assert all(e["eval_steps"] == 20 for e in tr.evaluations)


@pytest.mark.slow
def test_cli_eval_suite(tmp_path, monkeypatch):
    """``l2o eval CKPT --suite l2o-scale``: stand-ins with --offline, a clear failure without the
    data (two problems of the suite, to keep it fast)."""
    import json

    from typer.testing import CliRunner

    import l2o.tasks.registry as registry
    from services.cli import app

    monkeypatch.setattr(registry, "L2O_SCALE_EVAL_TASKS", {
        k: registry.L2O_SCALE_EVAL_TASKS[k] for k in ("mnist_mlp", "mnist_mlp_deeper")})

    cfg = tiny_curriculum_config(tmp_path, meta_steps=1, curriculum=None)
    tr = Trainer(cfg)
    tr.train()
    ckpt = sorted((tmp_path / "cl" / "checkpoints").glob("params_*.ckpt"))[-1]
    res = CliRunner().invoke(app, ["eval", str(ckpt), "--suite", "l2o-scale", "--offline",
                                   "--steps", "3", "--seeds", "1", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "o" / "suite.json").read_text())
    assert set(out["results"]) == {"mnist_mlp", "mnist_mlp_deeper"}
    for label, r in out["results"].items():
        assert r["task_name"] == registry.L2O_SCALE_EVAL_TASKS[label][1]
        assert np.isfinite(r["learned_final_loss"]) and np.isfinite(r["adam_final_loss"])
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("L2O_DATA_DIR", str(empty))
    res = CliRunner().invoke(app, ["eval", str(ckpt), "--suite", "l2o-scale", "--steps", "3"])
    assert res.exit_code == 2 and "no problem of the suite" in res.output
    res = CliRunner().invoke(app, ["eval", str(ckpt), "--suite", "nope"])
    assert res.exit_code == 2 and "unknown suite" in res.output


# ------------------------------------------------------------------------------------------------
# Through the distributed service


def test_service_curriculum_driver_without_ray(tmp_path):
    """ServiceCurriculum with a fake learner: evaluation timing, best files, publish-then-restore
    order, the deferred final restore, and resume from curriculum.json."""
    from l2o.training.curriculum import ServiceCurriculum

    cfg = tiny_curriculum_config(tmp_path, curriculum={
        "stages": [10, 20], "patience": 1, "eval_period": 3, "eval_seeds": 1})
    learner = {"version": 0, "theta": {"w": np.zeros(2, np.float32)}}
    calls: list[tuple] = []

    def fetch():
        return learner["version"], {"w": learner["theta"]["w"].copy()}

    def restore(path, version):
        theta, meta = load_checkpoint(path, learner["theta"])
        assert meta["version"] == version
        learner["theta"] = theta
        learner["version"] += 1
        calls.append(("restore", int(version)))
        return {"version": learner["version"]}

    def publish(info):
        calls.append(("publish", info["stage"], info["num_steps"], info["eval_steps"]))

    scores = iter([2.0, 3.0, 1.0, 5.0])
    drv = ServiceCurriculum(cfg, cfg.run_path(), fetch, restore, publish,
                            scorer=lambda theta, version, steps: next(scores))
    assert calls == [("publish", 0, 10, 20)]

    def tick(updates, version):
        learner["version"] = version
        learner["theta"] = {"w": np.full(2, float(version), np.float32)}
        return drv.poll({"updates": updates})

    assert tick(2, 2) is None  # not yet: evaluations at 3, 6, …
    assert tick(4, 4)["curriculum"] == "new_best"
    assert tick(5, 5) is None
    calls.clear()
    ev = tick(7, 7)  # worse -> advance, restore v4 (published first)
    assert ev["curriculum"] == "advance" and ev["restored_version"] == 4
    assert calls[:2] == [("publish", 1, 20, 20), ("restore", 4)]
    np.testing.assert_array_equal(learner["theta"]["w"], [4.0, 4.0])

    # a new driver on the same run dir continues in stage 1
    drv = ServiceCurriculum(cfg, cfg.run_path(), fetch, restore, publish,
                            scorer=lambda theta, version, steps: next(scores), updates=7)
    assert drv.state.stage == 1 and drv.next_eval == 9
    assert tick(9, 9)["curriculum"] == "new_best"
    ev = tick(12, 12)
    assert ev["curriculum"] == "finished" and drv.done
    assert ("restore", 9) not in calls  # deferred until the workers have stopped
    assert drv.finish() == {"version": 13}
    np.testing.assert_array_equal(learner["theta"]["w"], [9.0, 9.0])
    assert drv.finish() is None
    assert [e["curriculum"] for e in drv.summary()["events"]] == [
        "new_best", "advance", "new_best", "finished"]


@pytest.fixture
def service_env(tmp_path):
    """Local Ray (2 CPUs) and an embedded Redis for one service run."""
    ray = pytest.importorskip("ray")
    from services.redis_server import EmbeddedRedis

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    srv = EmbeddedRedis()
    yield srv.url
    srv.stop()
    if started:
        ray.shutdown()


@pytest.mark.slow
def test_service_curriculum_moves_workers_and_restores_best(tmp_path, service_env):
    import uuid

    from l2o.io.checkpoints import checkpoint_path, latest_checkpoint
    from services.redis_server import redis_connection
    from services.registry import Registry
    from services.train import read_metrics, run_service

    cfg = config_from_dict({
        "run_name": f"cl-{uuid.uuid4().hex[:8]}", "run_dir": str(tmp_path / "runs"), "seed": 0,
        "meta_steps": 10_000, "time_budget_s": 240, "log_every": 5, "checkpoint_every": 10_000,
        "task": {"name": "quadratic", "kwargs": {"dim": 3}},
        "optimizer": {"name": "lstm", "kwargs": {"layers": [4]}},
        "estimator": {"num_tasks": 2, "unroll_length": 5, "num_steps": 7},
        "meta_optimizer": {"learning_rate": 3e-3},
        "curriculum": {"stages": [10, 20, 40], "patience": 1, "eval_period": 3, "eval_seeds": 1},
        "service": {"num_unroll_workers": 2, "num_eval_workers": 0, "worker_num_cpus": 0.5},
    })
    # patience 1: best, worse -> advance; in every stage
    script = iter([1.0, 2.0, 1.0, 2.0, 1.0, 2.0])
    seen: dict[int, dict] = {}
    horizons: list[int] = []

    def scorer(theta, version, steps):
        seen[version] = jax.tree_util.tree_map(np.array, theta)
        horizons.append(steps)
        return next(script)

    summary = run_service(cfg, redis_url=service_env, final_eval=False,
                          curriculum_scorer=scorer, poll_s=0.05)
    cur = summary["curriculum"]
    events = cur["events"]
    assert [e["curriculum"] for e in events] == ["new_best", "advance"] * 2 + [
        "new_best", "finished"]
    assert horizons == [20, 20, 40, 40, 40, 40] == [e["eval_steps"] for e in events]
    assert cur["stage"] == 2 and cur["done"]

    from l2o.training.build import learned_optimizer_from_config, theta_key

    template = learned_optimizer_from_config(cfg.optimizer).init(theta_key(cfg.seed))
    run_dir = cfg.run_path()
    for i, adv in enumerate(e for e in events if e["curriculum"] in ("advance", "finished")):
        best_version = adv["restored_version"]
        assert best_version == events[2 * i]["version"]  # the stage's best
        best, meta = load_checkpoint(run_dir / "checkpoints" / f"best_stage{i}.ckpt", template)
        assert_tree_equal(best, seen[best_version])  # the θ that was scored best
        assert meta["version"] == best_version
        restored = adv["restored"]
        assert restored["gen_id"] == i + 1 and restored["version"] > adv["version"]
        # the learner's θ right after the restore (checkpointed at once) is the stage's best
        after, _ = load_checkpoint(checkpoint_path(run_dir, "params", restored["version"]),
                                   template)
        assert_tree_equal(after, best)
    # the curriculum finished: the final θ is the last stage's best
    final, final_meta = load_checkpoint(latest_checkpoint(run_dir, "params"), template)
    assert final_meta["gen_id"] == 3
    assert_tree_equal(final, load_checkpoint(run_dir / "checkpoints" / "best_stage2.ckpt",
                                             template)[0])

    # the workers moved to each stage's horizon, and no gradient computed at an old stage's
    # horizon was applied to a restored θ
    client, _ = redis_connection(service_env)
    reg = Registry(client, summary["run_id"])  # the run id the service took
    assert reg.curriculum()["stage"] == 2
    records = [r for r in read_metrics(client, reg) if r["reason"] == "OK"]
    assert {(r["stage"], r["num_steps"]) for r in records} == {(0, 10), (1, 20), (2, 40)}
    for i, adv in enumerate(e for e in events if e["curriculum"] == "advance"):
        after = [r for r in records if r["version"] >= adv["restored"]["version"]]
        assert after and all(r["stage"] >= i + 1 for r in after)
    assert all(s["stage"] == 2 and s["stage_changes"] >= 1 for s in summary["worker_stats"])
