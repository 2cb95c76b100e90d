"""Choosing the θ a run ships (``l2o.evaluation.selection``, ``l2o select``): the average of
checkpoints, the validation score, and the chosen θ written back as a loadable checkpoint."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2o.evaluation.selection import (
    DIVERGED_RATIO,
    averaged_theta,
    geometric_mean,
    loss_ratio,
    select_theta,
    write_selection,
)
from l2o.io.checkpoints import CheckpointMeta, checkpoint_path, save_checkpoint
from l2o.io.config import TaskConfig, optimizer_config


def test_average_ratio_and_geometric_mean():
    a = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
    b = {"w": 3 * jnp.ones((2, 3)), "b": jnp.full(3, 4.0)}
    avg = averaged_theta([a, b])
    np.testing.assert_allclose(avg["w"], 2.0)
    np.testing.assert_allclose(avg["b"], 2.0)
    with pytest.raises(ValueError):
        averaged_theta([])
    assert loss_ratio(0.5, 2.0) == 0.25
    assert loss_ratio(None, 2.0) == loss_ratio(float("nan"), 1.0) == DIVERGED_RATIO
    assert loss_ratio(1e9, 1.0) == DIVERGED_RATIO
    with pytest.raises(ValueError, match="positive"):
        loss_ratio(-0.1, 1.0)
    assert geometric_mean([0.25, 4.0]) == pytest.approx(1.0)


def _run_with_checkpoints(tmp_path, thetas):
    cfg = optimizer_config(name="normalized_mlp")
    run_dir = tmp_path / "run"
    for version, theta in thetas:
        meta = CheckpointMeta(kind="params", version=version, optimizer=cfg.model_dump(mode="json"))
        save_checkpoint(checkpoint_path(run_dir, "params", version), theta, meta)
    return cfg, run_dir


def test_selection_scores_candidates_and_writes_a_loadable_choice(tmp_path):
    from flax import serialization

    from l2o.io.checkpoints import list_checkpoints
    from l2o.training.job import load_theta

    lopt = optimizer_config(name="normalized_mlp").build()
    good = lopt.init(jax.random.PRNGKey(0))
    # a θ whose every weight is blown up: its steps are wild, it cannot beat the untouched one
    bad = jax.tree_util.tree_map(lambda x: 50.0 * x, good)
    _, run_dir = _run_with_checkpoints(tmp_path, [(10, serialization.to_state_dict(bad)),
                                                  (20, serialization.to_state_dict(good))])
    paths = [p for _, p in list_checkpoints(run_dir, "params")]
    result = select_theta(paths, TaskConfig(name="quadratic", kwargs={"dim": 4}), last=2,
                          average=2, num_tasks=2, steps=20, seeds=2,
                          adam_learning_rates=(1e-2, 1e-1))
    names = [r["candidate"] for r in result["candidates"]]
    assert names == ["params_00000010.ckpt", "params_00000020.ckpt", "average of the last 2"]
    scores = {r["candidate"]: r["score"] for r in result["candidates"]}
    assert all(len(r["ratios"]) == 2 for r in result["candidates"])
    assert scores["params_00000020.ckpt"] < scores["params_00000010.ckpt"]
    assert result["chosen"] != "params_00000010.ckpt"
    # the chosen θ is the named candidate's: the checkpoint's, or the average of both
    want = good if result["chosen"] == "params_00000020.ckpt" else averaged_theta([bad, good])
    for x, y in zip(jax.tree_util.tree_leaves(result["chosen_theta"]),
                    jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)

    out = write_selection(result, tmp_path / "chosen.ckpt")
    _, theta, meta = load_theta(out)
    chosen = result["chosen_theta"]
    for x, y in zip(jax.tree_util.tree_leaves(theta), jax.tree_util.tree_leaves(chosen),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert meta["selection"]["chosen"] == result["chosen"]
    assert meta["version"] == max(result["chosen_versions"])
    table = json.loads(out.with_suffix(".selection.json").read_text())
    assert table["chosen"] == result["chosen"] and "chosen_theta" not in table
