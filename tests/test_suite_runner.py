"""The held-out suite's runner, baseline cache, scores and report, on tiny hand-built tasks."""

from __future__ import annotations

import functools
import json
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.stats import trim_mean

from l2o.suite import baselines as bl
from l2o.suite.base import SuiteTask
from l2o.suite.evaluate import evaluate_on_suite
from l2o.suite.runner import (
    RunResult,
    choose_batching,
    grid_pairs,
    record_steps,
    run_curves,
    seed_keys,
)
from l2o.suite.scores import (
    diverged_seeds,
    iqm,
    speedup,
    steps_to_reach,
    suite_summary,
    task_scores,
)
from l2o.tasks.datasets import load_digits
from l2o.tasks.mlp import MLPTask
from l2o.tasks.quadratic import QuadraticTask

# ---------------------------------------------------------------------------------------------
# tiny suite tasks


def quadratic_suite_task(horizon: int = 20, name: str = "quad") -> SuiteTask:
    """A 5-D least-squares problem without data (train loss = test metric = the objective)."""
    kw, ky = jax.random.split(jax.random.PRNGKey(7))
    task = QuadraticTask(w=jax.random.normal(kw, (5, 5)) / 3.0, y=jax.random.normal(ky, (5,)))
    return SuiteTask(name, "quadratic", horizon, task, "loss",
                     lambda p: task.loss(p, ()), lambda p: task.loss(p, ()))


@functools.cache
def digits_suite_task(horizon: int = 30, name: str = "digits") -> SuiteTask:
    """A 64-8-10 MLP on digits, batch 16; train loss on 200 training examples, test accuracy.
    Cached: the same object (and measurement closures) lets tests share compiled programs."""
    d = load_digits()
    task = MLPTask(data=d, hidden_sizes=(8,), activation="relu", batch_size=16)
    ev = {"x": d.train_x[:200], "y": d.train_y[:200]}
    te = {"x": d.test_x, "y": d.test_y}
    return SuiteTask(name, "tiny MLP", horizon, task, "accuracy",
                     lambda p: task.loss(p, ev), lambda p: task.accuracy(p, te))


def adam_factory(lr, num_steps):
    return optax.adam(lr)


def sgd_factory(lr, num_steps):
    return optax.sgd(lr)


SMALL = bl.BaselineSettings(tuning_seeds=(1000, 1001), report_seeds=(0, 1, 2),
                            baselines=("adam", "sgdm"),
                            grids={"adam": (1e-3, 1e-2, 1e-1), "sgdm": (1e-3, 1e-2, 1e-1)},
                            long_factor=3)

# ---------------------------------------------------------------------------------------------
# runner


def test_record_steps():
    assert list(record_steps(100)) == list(range(0, 101, 2))
    assert list(record_steps(7, 3)) == [0, 3, 6, 7]
    assert list(record_steps(10)) == list(range(11))
    assert len(record_steps(1000)) == 51


def test_curves_deterministic_and_paired():
    st = digits_suite_task(horizon=13)
    h, s = grid_pairs([1e-2, 3e-2], [0, 1])
    a = run_curves(st, adam_factory, h, s, record_every=5)
    b = run_curves(st, adam_factory, h, s, record_every=5)
    assert list(a.steps) == [0, 5, 10, 13]
    assert a.train_loss.shape == (4, 4) and a.test_metric.shape == (4,)
    np.testing.assert_array_equal(a.train_loss, b.train_loss)
    np.testing.assert_array_equal(a.test_metric, b.test_metric)
    np.testing.assert_array_equal(a.mean_batch_loss, b.mean_batch_loss)
    # same seed -> same initialization (step 0), whatever the learning rate
    assert a.train_loss[0, 0] == a.train_loss[2, 0]
    assert a.train_loss[0, 0] != a.train_loss[1, 0]
    # a run does not depend on its companions in the batch
    alone = run_curves(st, adam_factory, [3e-2], [1], record_every=5)
    np.testing.assert_allclose(alone.train_loss[0], a.train_loss[3], rtol=1e-5)
    assert np.all(np.isfinite(a.train_loss)) and np.all(a.train_loss[:, -1] < a.train_loss[:, 0])


def test_map_batching_matches_vmap_and_convs_are_detected():
    from l2o.tasks.conv import ConvTask

    st = digits_suite_task(horizon=13)
    h, s = grid_pairs([1e-2, 3e-2], [0, 1])
    a = run_curves(st, adam_factory, h, s, record_every=5)  # "auto": vmap for an MLP
    b = run_curves(st, adam_factory, h, s, record_every=5, batching="map")
    np.testing.assert_allclose(a.train_loss, b.train_loss, rtol=1e-5)
    np.testing.assert_allclose(a.test_metric, b.test_metric, atol=1e-6)
    assert choose_batching(st) == "vmap"
    conv = ConvTask(data=st.task.data, channels=(2,), batch_size=4)
    conv_st = SuiteTask("conv", "conv", 5, conv, "loss", lambda p: 0.0, lambda p: 0.0)
    assert choose_batching(conv_st) == "map"
    with pytest.raises(ValueError, match="batching"):
        run_curves(st, adam_factory, [1e-3], [0], batching="pmap")


def test_runner_matches_a_python_loop():
    st = digits_suite_task(horizon=6)
    lr, seed = 0.05, 3
    run = run_curves(st, sgd_factory, [lr], [seed], record_every=4)
    k_init, k_data = seed_keys(seed)

    @jax.jit
    def sgd_step(params, t):
        batch = st.task.sample_batch(jax.random.fold_in(k_data, t))
        loss, g = jax.value_and_grad(st.task.loss)(params, batch)
        new = jax.tree_util.tree_map(lambda p, gi: p - lr * gi, params, g)
        return new, loss, st.train_loss(new)

    params = jax.jit(st.task.init)(k_init)
    records, batch_losses = [float(jax.jit(st.train_loss)(params))], []
    for t in range(6):
        params, loss, train_loss = sgd_step(params, t)
        batch_losses.append(float(loss))
        if t + 1 in (4, 6):
            records.append(float(train_loss))
    np.testing.assert_allclose(run.train_loss[0], records, rtol=1e-5)
    np.testing.assert_allclose(run.mean_batch_loss[0], np.mean(batch_losses), rtol=1e-5)
    np.testing.assert_allclose(run.test_metric[0], float(st.test_metric(params)), atol=1e-6)


def test_divergence_is_recorded_not_raised():
    st = quadratic_suite_task(horizon=40)
    run = run_curves(st, sgd_factory, [1e-2, 1e3], [0, 0])
    assert np.all(np.isfinite(run.train_loss[0]))
    assert not np.all(np.isfinite(run.train_loss[1]))
    assert list(diverged_seeds(run.train_loss)) == [False, True]
    assert bl.run_score(run.train_loss[1]) == math.inf


def test_json_round_trip_keeps_non_finite_as_nan():
    run = RunResult(steps=np.array([0, 1]), train_loss=np.array([[1.0, np.nan], [1.0, np.inf]]),
                    test_metric=np.array([0.5, np.nan]), mean_batch_loss=np.array([1.0, 2.0]),
                    hparams=np.array([1e-3, 1e-3]), seeds=np.array([0, 1]), num_steps=1)
    text = json.dumps(run.to_json(), allow_nan=False)
    back = RunResult.from_json(json.loads(text))
    assert back.train_loss.shape == (2, 2) and np.isnan(back.train_loss[1, 1])
    assert back.where_hparam(1e-3).train_loss.shape == (2, 2)


# ---------------------------------------------------------------------------------------------
# tuning and the cache


def test_select_lr_flags_edges_and_ranks_divergence_last():
    grid = (1e-3, 1e-2, 1e-1)
    pick = bl.select_lr(grid, np.array([[3.0, 3.0], [1.0, math.inf], [2.0, 2.0]]))
    assert pick["lr"] == 1e-1 and pick["lr_at_grid_edge"] == "high"
    pick = bl.select_lr(grid, np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]))
    assert pick["lr"] == 1e-3 and pick["lr_at_grid_edge"] == "low"
    pick = bl.select_lr(grid, np.array([[2.0, 2.0], [1.0, 1.5], [3.0, 3.0]]))
    assert pick["lr"] == 1e-2 and pick["lr_at_grid_edge"] is None and not pick["all_diverged"]
    pick = bl.select_lr(grid, np.full((3, 2), math.inf))
    assert pick["all_diverged"] and pick["lr"] == 1e-3


def test_baseline_grids_are_wide_enough():
    for b in bl.BASELINES.values():
        assert len(b.grid) >= 10 and b.grid == tuple(sorted(b.grid))
    assert bl.BaselineSettings().report_seeds == (0, 1, 2, 3, 4)
    with pytest.raises(ValueError):
        bl.BaselineSettings(tuning_seeds=(0, 1), report_seeds=(1, 2))


@pytest.fixture
def counting_compute(monkeypatch):
    """Replace the baseline computation by a cheap fake that counts its calls."""
    calls = []

    def fake(st, settings=None, log=None):
        calls.append(st.name)
        return {"task": st.name, "horizon": st.horizon, "baselines": {}, "seconds": 0.0}

    monkeypatch.setattr(bl, "compute_baselines", fake)
    return calls


def test_cache_keyed_by_version_fingerprint_and_settings(tmp_path, monkeypatch, counting_compute):
    monkeypatch.setenv(bl.CACHE_DIR_ENV, str(tmp_path))
    st = quadratic_suite_task()
    log = lambda _line: None
    get = lambda **kw: bl.load_or_compute_baselines(st, SMALL, log=log, **{
        "version": "v1", "fingerprint": "a" * 64, **kw})
    first = get()
    assert not first["from_cache"] and counting_compute == ["quad"]
    path = tmp_path / "suite" / "v1" / f"quad-{'a' * 12}.json"
    assert first["cache_path"] == str(path) and path.exists()
    assert get()["from_cache"] and len(counting_compute) == 1
    assert not get(version="v2")["from_cache"] and len(counting_compute) == 2
    assert (tmp_path / "suite" / "v2").is_dir()
    assert not get(fingerprint="b" * 64)["from_cache"] and len(counting_compute) == 3
    # same 12-character prefix, different fingerprint: still recomputed
    assert not get(fingerprint="a" * 63 + "c")["from_cache"] and len(counting_compute) == 4
    other = bl.BaselineSettings(tuning_seeds=(1000, 1001), report_seeds=(0, 1, 2),
                                baselines=("adam",), grids={"adam": (1e-3, 1e-2)})
    assert not bl.load_or_compute_baselines(st, other, version="v1", fingerprint="a" * 64,
                                            log=log)["from_cache"]
    assert len(counting_compute) == 5
    assert not list(path.parent.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_corrupt_cache_is_recomputed_with_a_warning(tmp_path, counting_compute):
    st = quadratic_suite_task()
    kw = {"version": "v1", "fingerprint": "f" * 64, "cache_dir": tmp_path, "log": lambda _: None}
    bl.load_or_compute_baselines(st, SMALL, **kw)
    path = bl.cache_path("quad", "v1", "f" * 64, tmp_path)
    for junk in ("{not json", "[1, 2]", "\xff\xfe"):
        path.write_text(junk)
        with pytest.warns(UserWarning, match="unreadable"):
            again = bl.load_or_compute_baselines(st, SMALL, **kw)
        assert not again["from_cache"]
        assert json.loads(path.read_text())["fingerprint"] == "f" * 64
    assert len(counting_compute) == 4


def test_default_identity_comes_from_the_suite_module(tmp_path, monkeypatch, counting_compute):
    suite_tasks = pytest.importorskip("l2o.suite.tasks")
    st = quadratic_suite_task()
    log = lambda _line: None
    first = bl.load_or_compute_baselines(st, SMALL, cache_dir=tmp_path, log=log)
    fp = suite_tasks.task_fingerprint(st)
    assert first["suite_version"] == suite_tasks.SUITE_VERSION and first["fingerprint"] == fp
    assert bl.load_or_compute_baselines(st, SMALL, cache_dir=tmp_path, log=log)["from_cache"]
    monkeypatch.setattr(suite_tasks, "SUITE_VERSION", "changed-version")
    again = bl.load_or_compute_baselines(st, SMALL, cache_dir=tmp_path, log=log)
    assert not again["from_cache"] and again["suite_version"] == "changed-version"
    assert len(counting_compute) == 2


# ---------------------------------------------------------------------------------------------
# scores


def test_speedup_on_hand_made_curves():
    steps = np.arange(0, 101, 5)  # a "10 N" run with N = 10, recorded every 5 steps
    curve = 100.0 - steps  # loss 100 at step 0, 90 at N, 0 at 10 N
    # reached exactly at record step 30 -> 3
    assert speedup(steps, curve, 70.0, 10) == {"speedup": 3.0, "speedup_reached": True,
                                               "baseline_steps_to_match": 30.0}
    # between record points 25 (75) and 30 (70): interpolated to 28
    assert speedup(steps, curve, 72.0, 10)["speedup"] == pytest.approx(2.8)
    # never reached within 10 N -> 10, flagged
    never = speedup(steps, curve, -1.0, 10)
    assert never["speedup"] == 10.0 and never["speedup_reached"] is False
    # learned ended worse than the baseline at N (95 > 90): baseline needs 5 steps -> 0.5 < 1
    assert speedup(steps, curve, 95.0, 10)["speedup"] == pytest.approx(0.5)
    # learned no better than the initialization: 0; diverged learned: 0
    assert speedup(steps, curve, 100.0, 10)["speedup"] == 0.0
    assert speedup(steps, curve, math.nan, 10)["speedup"] == 0.0
    # a non-finite baseline point never counts as reaching the target
    bad = curve.copy()
    bad[6:] = np.nan
    assert steps_to_reach(steps, bad, 50.0) is None
    # step-wise: a curve that jumps from above to below is interpolated between the two points
    assert steps_to_reach(np.array([0, 10, 20]), np.array([4.0, 3.0, 1.0]), 2.0) == 15.0


def test_iqm_on_known_lists():
    assert iqm([1, 2, 3, 4, 5, 6, 7, 8]) == pytest.approx(4.5)
    assert iqm([1, 2, 3, 100]) == pytest.approx(2.5)
    assert iqm([5.0]) == 5.0
    assert math.isnan(iqm([]))
    rng = np.random.default_rng(0)
    for n in (5, 7, 12, 13):
        x = rng.lognormal(size=n)
        assert iqm(x) == pytest.approx(trim_mean(x, 0.25))


def test_divergence_detection():
    curves = np.array([[1.0, 0.5, 0.2], [1.0, np.nan, 0.1], [1.0, 0.9, 1.5], [1.0, np.inf, 0.5]])
    assert list(diverged_seeds(curves)) == [False, True, True, True]


def _run(curves, test, steps=(0, 5, 10)) -> RunResult:
    curves = np.asarray(curves, dtype=np.float64)
    p = curves.shape[0]
    return RunResult(steps=np.asarray(steps), train_loss=curves,
                     test_metric=np.asarray(test, dtype=np.float64),
                     mean_batch_loss=curves.mean(axis=1), hparams=np.zeros(p),
                     seeds=np.arange(p), num_steps=int(steps[-1]))


def test_task_scores_and_summary():
    learned = _run([[4.0, 2.0, 1.0], [4.0, 2.0, 1.0]], [0.9, 0.8])
    adam = _run([[4.0, 3.0, 2.0], [4.0, 3.0, 2.0]], [0.8, 0.8])
    adam_long = _run([[4.0, 3.0, 2.0, 1.5, 1.0]] * 2, [0.8, 0.8], steps=(0, 5, 10, 15, 20))
    default = _run([[4.0, 3.9, 3.8]] * 2, [0.5, 0.5])
    default_long = _run([[4.0, 3.9, 3.8, 3.7, 3.6]] * 2, [0.5, 0.5], steps=(0, 5, 10, 15, 20))
    s = task_scores("t1", 10, True, learned, {"adam": adam, "adam_default": default},
                    {"adam": adam_long, "adam_default": default_long})
    assert s["learned"]["final_train_loss_mean"] == 1.0
    assert s["learned"]["test_metric_mean"] == pytest.approx(0.85)
    assert s["learned"]["test_metric_std"] == pytest.approx(0.05)
    assert s["vs"]["adam"]["speedup"] == pytest.approx(2.0)
    assert s["vs"]["adam"]["final_loss_ratio"] == pytest.approx(0.5)
    assert s["vs"]["adam"]["beats_on_test"]
    assert s["vs"]["adam_default"]["speedup"] == 2.0
    assert not s["vs"]["adam_default"]["speedup_reached"]
    # a second task where the learned optimizer diverged on one seed
    bad = _run([[4.0, 2.0, 1.0], [4.0, np.nan, np.nan]], [0.9, np.nan])
    s2 = task_scores("t2", 10, True, bad, {"adam": adam, "adam_default": default},
                     {"adam": adam_long, "adam_default": default_long})
    assert s2["learned"]["diverged"] and s2["learned"]["diverged_seeds"] == 1
    assert s2["vs"]["adam"]["speedup"] == 0.0 and not s2["vs"]["adam"]["beats_on_test"]
    summ = suite_summary([s, s2])
    assert summ["iqm_speedup_vs_adam"] == pytest.approx(1.0)
    assert summ["fraction_beats_on_test"] == {"adam": 0.5, "adam_default": 0.5}
    assert summ["median_final_loss_ratio_vs_adam"] is None  # median of 0.5 and inf
    assert summ["divergences"] == 1 and summ["diverged_tasks"] == ["t2"]
    assert suite_summary([s, s, s2])["median_final_loss_ratio_vs_adam"] == pytest.approx(0.5)
    # speedups read the report run's finer records up to N, then the long run's
    fine = _run([[4.0, 3.0, 2.0, 1.9, 1.8]] * 2, [0.8, 0.8], steps=(0, 1, 2, 3, 10))
    coarse = _run([[4.0, 1.8, 1.0]] * 2, [0.8, 0.8], steps=(0, 10, 20))
    s4 = task_scores("t4", 10, True, _run([[4.0, 3.0, 2.5]] * 2, [0.8, 0.8]),
                     {"adam": fine}, {"adam": coarse})
    assert s4["vs"]["adam"]["speedup"] == pytest.approx(0.15)  # 2.5 is met halfway from 1 to 2
    assert task_scores("t4", 10, True, _run([[4.0, 3.0, 1.4]] * 2, [0.8, 0.8]), {"adam": fine},
                       {"adam": coarse})["vs"]["adam"]["speedup"] == pytest.approx(1.5)
    # lower is better for a loss metric
    s3 = task_scores("t3", 10, False, learned, {"adam": adam}, {"adam": adam_long})
    assert not s3["vs"]["adam"]["beats_on_test"]


# ---------------------------------------------------------------------------------------------
# end to end: real baselines, a learned optimizer through the optax bridge, the report


def test_evaluate_on_suite_end_to_end(tmp_path):
    from l2o.optimizers.optax_bridge import as_gradient_transformation
    from l2o.optimizers.registry import make_learned_optimizer

    tasks = [quadratic_suite_task(horizon=20), digits_suite_task(horizon=20)]
    settings = bl.BaselineSettings(tuning_seeds=(1000, 1001), report_seeds=(0, 1, 2),
                                   grids={"adam": (1e-3, 1e-2, 1e-1)}, baselines=("adam",),
                                   long_factor=3)
    lopt = make_learned_optimizer("learned_adam")
    theta = lopt.init(jax.random.PRNGKey(0))  # initialized at Adam(1e-3)
    make = lambda n: as_gradient_transformation(lopt, theta, num_steps=n)
    kw = {"settings": settings, "cache_dir": tmp_path / "cache", "version": "test-v1",
          "fingerprint": lambda st: f"{st.name}-fingerprint".ljust(64, "0"), "seeds": 3,
          "log": lambda _line: None}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no cache warnings on a fresh cache
        result = evaluate_on_suite(make, tasks, out_dir=tmp_path / "out", label="ladam", **kw)
    assert [t["task"] for t in result["tasks"]] == ["quad", "digits"]
    for t in result["tasks"]:
        # learned Adam at its initial θ is default Adam: same seeds, same steps, same losses
        assert t["learned"]["final_train_loss_mean"] == pytest.approx(
            t["baselines"]["adam_default"]["final_train_loss_mean"], rel=1e-4)
        assert t["vs"]["adam_default"]["speedup"] == pytest.approx(1.0, abs=0.05)
        assert set(t["baselines"]) == {"adam", "adam_default"}
        assert t["lrs"]["adam"]["lr"] in SMALL.grid("adam")
        long = t["long_runs"]["adam"]
        assert long["num_steps"] == 60 and len(long["steps"]) == 61
        assert len(t["runs"]["learned"]["steps"]) == 21
    summ = result["summary"]
    assert summ["tasks"] == 2 and summ["divergences"] == 0
    assert summ["iqm_speedup_vs_adam_default"] == pytest.approx(1.0, abs=0.05)
    # the report files
    out = tmp_path / "out"
    report = (out / "report.md").read_text()
    assert "test-v1" in report and "| quad |" in report and "## Summary" in report
    assert "IQM speedup over tuned Adam" in report
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def no_nan(token):
        raise AssertionError(f"non-standard JSON constant {token}")

    data = json.loads((out / "suite.json").read_text(), parse_constant=no_nan)
    assert data["suite_version"] == "test-v1" and len(data["tasks"]) == 2
    # the second evaluation reads the cached baselines and gives the same scores
    again = evaluate_on_suite(lambda n: optax.adam(1e-3), tasks, tasks=["digits"], **kw)
    assert [t["task"] for t in again["tasks"]] == ["digits"]
    assert again["tasks"][0]["baselines"] == result["tasks"][1]["baselines"]
    assert again["tasks"][0]["learned"]["final_train_loss_mean"] == pytest.approx(
        result["tasks"][1]["learned"]["final_train_loss_mean"], rel=1e-4)


def test_compute_baselines_tunes_and_runs_every_baseline():
    st = quadratic_suite_task(horizon=20)
    settings = bl.BaselineSettings(
        tuning_seeds=(1000, 1001, 1002), report_seeds=(0, 1), long_factor=2,
        grids={"adam": (1e-3, 1e-1, 1e1), "adamw_cosine": (1e-3, 1e-1, 1e1),
               "sgdm": (1e-3, 1e-2, 1e3)})
    out = bl.compute_baselines(st, settings, log=lambda _line: None)
    b = out["baselines"]
    assert set(b) == {"adam", "adamw_cosine", "sgdm", "adam_default"}
    assert b["sgdm"]["lr"] == 1e-2 and b["sgdm"]["lr_at_grid_edge"] is None
    assert b["sgdm"]["tuning"]["final_train_loss"][2] == [None] * 3  # lr 1e3 diverged
    assert b["adam"]["lr"] == 1e-1 and b["adam_default"]["lr"] == 1e-3
    for name in b:
        report = RunResult.from_json(b[name]["report"])
        assert list(report.seeds) == [0, 1] and report.num_steps == 20
        np.testing.assert_allclose(report.hparams, b[name]["lr"])
    long = RunResult.from_json(b["adam"]["long"])
    assert long.num_steps == 40 and list(long.steps[:3]) == [0, 1, 2]
    # the long run's first N steps are the report run's (constant learning rate, same seeds)
    report = RunResult.from_json(b["adam"]["report"])
    np.testing.assert_allclose(long.train_loss[:, :21], report.train_loss, rtol=1e-5)
    json.dumps(out, allow_nan=False)


def test_adamw_cosine_accepts_a_traced_lr_and_tiny_horizons():
    params = {"x": jnp.ones(3)}
    for n in (1, 5, 100):
        tx = jax.jit(lambda lr, n=n: bl.adamw_cosine(lr, n).init(params))(jnp.float32(0.1))
        assert tx is not None
    st = quadratic_suite_task(horizon=8)
    run = run_curves(st, bl.adamw_cosine, [1e-2, 1e-1], [0, 0])
    assert np.all(np.isfinite(run.train_loss)) and run.final_train_loss[1] < run.train_loss[1, 0]


# ---------------------------------------------------------------------------------------------
# command line


def test_cli_eval_heldout_scores_a_checkpoint(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import l2o.suite.evaluate as ev
    from l2o.io.checkpoints import save_checkpoint
    from l2o.optimizers.registry import make_learned_optimizer
    from services.cli import app

    lopt = make_learned_optimizer("learned_adam")
    ckpt = save_checkpoint(tmp_path / "run" / "params.ckpt", lopt.init(jax.random.PRNGKey(0)),
                           {"optimizer": {"name": "learned_adam"}, "kind": "params"})
    real = ev.evaluate_on_suite
    seen = {}

    def on_tiny_suite(make, suite, **kw):
        seen.update(suite=suite, **kw)
        tiny = bl.BaselineSettings(tuning_seeds=(1000,), report_seeds=(0, 1),
                                   grids={"adam": (1e-2, 1e-1)}, baselines=("adam",),
                                   long_factor=2)
        kw.pop("tasks")
        return real(make, [quadratic_suite_task(horizon=10)], settings=tiny,
                    cache_dir=tmp_path / "cache", version="cli-test",
                    fingerprint=lambda st: "0" * 64, **kw)

    monkeypatch.setattr(ev, "evaluate_on_suite", on_tiny_suite)
    result = CliRunner().invoke(app, ["eval", str(ckpt), "--suite", "heldout", "--seeds", "2",
                                      "--tasks", "quad, other"])
    assert result.exit_code == 0, result.output
    assert seen["suite"] == "heldout" and seen["tasks"] == ["quad", "other"]
    assert seen["seeds"] == 2
    out = tmp_path / "run" / "suite-heldout"
    assert {p.name for p in out.iterdir()} >= {"report.md", "curves.png", "suite.json"}
    assert "quad" in result.output


def test_module_entry_point_parses_its_arguments(monkeypatch):
    import l2o.suite.__main__ as entry

    calls = []
    monkeypatch.setattr(entry, "precompute_baselines", lambda suite, **kw: calls.append(
        (suite, kw)))
    assert entry.main(["--tasks", "a,b", "--refresh"]) == 0
    assert calls == [("heldout", {"tasks": ["a", "b"], "refresh": True})]
