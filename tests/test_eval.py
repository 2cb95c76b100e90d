"""Tests of l2o.evaluation.comparison (curves, Adam sweep, speedup, evaluate) and
l2o.evaluation.plots."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct

from l2o.evaluation import comparison as ev
from l2o.evaluation.plots import plot_curves, plot_meta_loss
from l2o.optimizers.baselines import adam, sgd
from l2o.tasks.base import Task
from l2o.tasks.quadratic import QuadraticFamily

STEPS, SEEDS = 30, 3


@pytest.fixture(scope="module")
def task():
    return QuadraticFamily(dim=5).sample_task(jax.random.PRNGKey(0))


def _optax_loop(task, lr, steps, seeds, key):
    """The reference: a plain Python optax Adam loop, with eval.py's documented seed keys."""
    out = np.zeros((seeds, steps + 1))
    tx = optax.adam(lr)
    for i, k in enumerate(jax.random.split(key, seeds)):
        k_init, _ = jax.random.split(k)
        params = task.init(k_init)
        state = tx.init(params)
        for t in range(steps):
            loss, grads = jax.value_and_grad(task.loss)(params, ())
            out[i, t] = float(loss)
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        out[i, steps] = float(task.loss(params, ()))
    return out


def test_curves_shape_and_initial_loss(task):
    key = jax.random.PRNGKey(1)
    curves = ev.loss_curves(task, sgd(0.01), {}, STEPS, SEEDS, key)
    assert curves.shape == (SEEDS, STEPS + 1)
    for i, k in enumerate(jax.random.split(key, SEEDS)):
        k_init, _ = jax.random.split(k)
        assert curves[i, 0] == pytest.approx(float(task.loss(task.init(k_init), ())), rel=1e-6)
    # Different seeds are different initializations, and training makes progress.
    assert not np.allclose(curves[0], curves[1])
    assert np.all(curves[:, -1] < curves[:, 0])
    # A task without data: the "eval" curves are the same objective.
    np.testing.assert_allclose(
        ev.loss_curves(task, sgd(0.01), {}, STEPS, SEEDS, key, loss_on="eval"), curves, rtol=1e-6)


@struct.dataclass
class _Regression(Task):
    """Least squares on a small dataset, minibatches of 4 (a task *with* data)."""

    x: jax.Array
    y: jax.Array

    def init(self, key):
        return {"w": jax.random.normal(key, (self.x.shape[1],))}

    def sample_batch(self, key):
        i = jax.random.randint(key, (4,), 0, self.x.shape[0])
        return self.x[i], self.y[i]

    def sample_eval_batch(self, key):
        return self.x, self.y

    def loss(self, params, batch):
        x, y = batch
        return jnp.mean((x @ params["w"] - y) ** 2)


def test_batch_and_eval_curves_on_a_data_task():
    kx, ky, key = jax.random.split(jax.random.PRNGKey(5), 3)
    t = _Regression(x=jax.random.normal(kx, (64, 3)), y=jax.random.normal(ky, (64,)))
    on_batch = ev.loss_curves(t, sgd(0.05), {}, STEPS, 2, key)
    on_eval = ev.loss_curves(t, sgd(0.05), {}, STEPS, 2, key, loss_on="eval")
    assert on_batch.shape == on_eval.shape == (2, STEPS + 1)
    assert not np.allclose(on_batch, on_eval)  # minibatch losses differ from full-data ones
    for i, k in enumerate(jax.random.split(key, 2)):
        p0 = t.init(jax.random.split(k)[0])
        assert on_eval[i, 0] == pytest.approx(float(t.loss(p0, (t.x, t.y))), rel=1e-5)
    assert on_eval[:, -1].mean() < on_eval[:, 0].mean()


def test_fixed_adam_matches_optax_loop(task):
    key = jax.random.PRNGKey(2)
    ref = _optax_loop(task, 0.05, STEPS, 2, key)
    np.testing.assert_allclose(ev.loss_curves(task, adam(0.05), {}, STEPS, 2, key), ref,
                               rtol=1e-4, atol=1e-5)
    # The vmapped sweep's curve for that learning rate is the same run.
    sweep = ev.tuned_adam(task, STEPS, 2, key, learning_rates=(1e-3, 0.05))
    np.testing.assert_allclose(sweep.all_curves[1], ref, rtol=1e-4, atol=1e-5)
    # A learned optimizer with a non-empty θ (here: Adam's learning rate) through the interface.
    np.testing.assert_allclose(
        ev.loss_curves(task, ev._AdamLR(), {"lr": jnp.asarray(0.05)}, STEPS, 2, key), ref,
        rtol=1e-4, atol=1e-5)


def test_sweep_picks_lowest_final_and_skips_divergence(task):
    lrs = (1e-4, 1e-3, 1e-2, 1e-1, 3e-1, 1e30)
    sweep = ev.tuned_adam(task, STEPS, SEEDS, jax.random.PRNGKey(3), learning_rates=lrs,
                          final_window=3)
    assert sweep.learning_rates == lrs
    assert sweep.all_curves.shape == (len(lrs), SEEDS, STEPS + 1)
    finals = np.array(sweep.final_losses)
    assert not np.isfinite(finals[-1])  # lr = 1e30 diverges (NaN/inf) ...
    assert sweep.best_lr != 1e30  # ... and is not picked
    j = int(np.nanargmin(np.where(np.isfinite(finals), finals, np.nan)))
    assert sweep.best_lr == lrs[j]
    assert sweep.best.final_loss == pytest.approx(finals[j])
    assert sweep.best.final_loss == pytest.approx(ev.final_loss(sweep.all_curves[j], 3))
    assert sweep.best.final_loss < finals[0]  # tuning mattered: the tiny lr barely moves
    np.testing.assert_allclose(sweep.best.mean, sweep.all_curves[j].mean(axis=0))


def test_speedup_synthetic():
    n, x = 50, 0.1
    learned = np.linspace(1.0, x, n + 1)  # reaches x at step n
    adam_curve = np.linspace(1.0, x, 2 * n + 1)  # reaches x at step 2n
    adam_curve = np.concatenate([adam_curve, np.full(20, x / 2)])
    sp = ev.speedup(learned, adam_curve)
    assert sp.reached and sp.adam_steps_to_match == 2 * n
    assert sp.speedup == pytest.approx(2.0)
    # Adam faster: reaches x at step n / 2.
    sp = ev.speedup(learned, np.linspace(1.0, x, n // 2 + 1))
    assert sp.reached and sp.speedup == pytest.approx(0.5)
    # Never reached within 3n steps: a flagged lower bound 3n / n.
    sp = ev.speedup(learned, np.linspace(1.0, 2 * x, 3 * n + 1))
    assert not sp.reached and sp.lower_bound and sp.adam_steps_to_match is None
    assert sp.speedup == pytest.approx(3.0)
    assert str(sp).startswith(">")
    # Diverging Adam (NaN) never matches; a [seeds, T] array is averaged over seeds.
    sp = ev.speedup(np.stack([learned, learned]), np.full(2 * n, np.nan))
    assert not sp.reached
    # window=3: target is the mean of the learned curve's last 3 entries; Adam's trailing
    # 3-mean reaches it two steps after Adam's raw curve passes the same value.
    x = 0.125  # exact in binary, so means of equal entries are exact
    flat = np.concatenate([np.linspace(1.0, x, n + 1), np.full(10, x)])
    sp = ev.speedup(np.concatenate([np.linspace(1.0, x, n - 1), [x, x]]), flat, window=3)
    assert sp.target_loss == x
    assert sp.adam_steps_to_match == n + 2 and sp.speedup == pytest.approx((n + 2) / n)


def test_evaluate_json_and_plots(task, tmp_path):
    res = ev.evaluate(task, adam(0.05), {}, steps=STEPS, seeds=2, key=jax.random.PRNGKey(4),
                      adam_learning_rates=(1e-3, 1e-2, 5e-2, 1e-1, 3e-1))
    json.dumps(res, allow_nan=False)  # plain, strictly JSON-serializable values
    for k in ("task", "steps", "seeds", "learned_final_loss", "adam_final_loss", "adam_best_lr",
              "speedup", "speedup_reached", "adam_steps_to_match"):
        assert k in res
    assert res["task"] == task.name and res["steps"] == STEPS
    assert all(len(res[k]) == STEPS + 1 for k in ev.CURVE_KEYS)
    # Adam(0.05) is in the grid, so the tuned Adam is at least as good as the "learned" one.
    assert res["adam_final_loss"] <= res["learned_final_loss"] * (1 + 1e-5)
    assert res["speedup"] <= 1.0 + 1e-9 and math.isfinite(res["speedup"])
    assert set(ev.summary(res)) == set(res) - set(ev.CURVE_KEYS)

    out = plot_curves(res, tmp_path / "sub" / "curves.png")
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 1000
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temp file left behind
    out = plot_meta_loss([{"step": i, "meta_loss": 1.0 / (i + 1)} for i in range(40)],
                         tmp_path / "meta.png")
    assert out.stat().st_size > 1000
