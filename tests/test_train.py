"""Truncated backprop, the single-machine trainer, checkpoints and configs."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_tree_equal

from l2o.io.checkpoints import (
    FORMAT_VERSION,
    CheckpointError,
    CheckpointMeta,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from l2o.io.config import (
    ConfigError,
    config_from_dict,
    estimator_config,
    load_config,
    optimizer_config,
)
from l2o.tasks.quadratic import QuadraticFamily
from l2o.training.build import estimator_from_config, learned_optimizer_from_config
from l2o.training.trainer import Trainer


def quadratic_config(tmp_path, **overrides):
    base = {
        "run_name": "t",
        "run_dir": str(tmp_path),
        "seed": 3,
        "meta_steps": 8,
        "log_every": 2,
        "checkpoint_every": 4,
        "task": {"name": "quadratic", "kwargs": {"dim": 4}},
        "optimizer": {"name": "lstm"},
        "estimator": {"num_tasks": 4, "unroll_length": 5, "num_steps": 20},
        "meta_optimizer": {"learning_rate": 3e-3},
    }
    base.update(overrides)
    return config_from_dict(base)


@pytest.mark.parametrize("opt_name", ["learned_adam", "lstm"])
def test_tbptt_gradient_matches_finite_differences(opt_name):
    """With second derivatives on, TBPTT is the exact gradient of the truncation's meta-loss."""
    lopt = learned_optimizer_from_config(optimizer_config(name=opt_name))
    est = estimator_from_config(
        estimator_config(num_tasks=2, unroll_length=4, num_steps=10, second_derivatives=True),
        QuadraticFamily(dim=3), lopt)
    with jax.enable_x64(True):
        to64 = lambda t: jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), t)
        theta = to64(lopt.init(jax.random.PRNGKey(0)))
        states = to64(est.init_worker_state(theta, jax.random.PRNGKey(1)))
        key = jax.random.PRNGKey(2)
        loss = lambda th: est.meta_loss(th, states, key)[0]
        grad = jax.grad(loss)(theta)
        leaves, treedef = jax.tree_util.tree_flatten(theta)
        rng = np.random.default_rng(0)
        direction = treedef.unflatten([jnp.asarray(rng.normal(size=x.shape)) for x in leaves])
        eps = 1e-5
        shift = lambda s: jax.tree_util.tree_map(lambda t, d: t + s * eps * d, theta, direction)
        fd = (loss(shift(1.0)) - loss(shift(-1.0))) / (2 * eps)
        analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree_util.tree_leaves(grad),
                                                       jax.tree_util.tree_leaves(direction)))
        assert abs(float(analytic)) > 1e-8
        np.testing.assert_allclose(float(analytic), float(fd), rtol=1e-4, atol=1e-8)


def test_inner_gradients_are_constants_without_second_derivatives():
    """Without second derivatives the estimate differs from the exact derivative."""
    lopt = learned_optimizer_from_config(optimizer_config(name="learned_adam"))
    family = QuadraticFamily(dim=3)
    grads = []
    for second in (False, True):
        est = estimator_from_config(estimator_config(num_tasks=2, unroll_length=4, num_steps=10,
                                                    second_derivatives=second), family, lopt)
        theta = lopt.init(jax.random.PRNGKey(0))
        states = est.init_worker_state(theta, jax.random.PRNGKey(1))
        g, _, _ = est.compute_gradient_estimate(theta, states, jax.random.PRNGKey(2))
        grads.append(np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g)]))
    assert np.all(np.isfinite(grads[0])) and np.all(np.isfinite(grads[1]))
    assert not np.allclose(grads[0], grads[1])


def test_inner_problems_reset_at_horizon():
    lopt = learned_optimizer_from_config(optimizer_config(name="learned_adam"))
    est = estimator_from_config(estimator_config(num_tasks=3, unroll_length=4, num_steps=6),
                                QuadraticFamily(dim=3), lopt)
    theta = lopt.init(jax.random.PRNGKey(0))
    ws = est.init_worker_state(theta, jax.random.PRNGKey(1))
    steps, resets = [], []
    for i in range(3):
        _, ws, metrics = est.compute_gradient_estimate(theta, ws, jax.random.PRNGKey(10 + i))
        steps.append(np.asarray(ws.step))
        resets.append(int(metrics["resets"]))
    # 4 steps, then 2 more + reset + 2 (step 2), then 4 more (step 6)
    assert [s.tolist() for s in steps] == [[4] * 3, [2] * 3, [6] * 3]
    assert resets == [0, 3, 0]


def test_checkpoint_round_trip(tmp_path):
    tree = {"a": jnp.arange(5.0), "b": [jnp.ones((2, 3)), jnp.zeros((), jnp.int32)]}
    path = save_checkpoint(tmp_path / "x.ckpt", tree, {"version": 7, "note": "hi"})
    loaded, meta = load_checkpoint(path, tree)
    assert meta == {"version": 7, "note": "hi"}
    for want, got in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(want), got)


def test_damaged_checkpoints_give_clear_errors(tmp_path):
    tree = {"a": jnp.arange(1000.0)}
    path = save_checkpoint(tmp_path / "x.ckpt", tree, {"version": 1})
    good = path.read_bytes()
    (tmp_path / "trunc.ckpt").write_bytes(good[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path / "trunc.ckpt", tree)
    bad = bytearray(good)
    bad[-50] ^= 0xFF
    (tmp_path / "bad.ckpt").write_bytes(bytes(bad))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(tmp_path / "bad.ckpt", tree)
    (tmp_path / "junk.ckpt").write_bytes(b"hello")
    with pytest.raises(CheckpointError, match="not an l2o checkpoint"):
        load_checkpoint(tmp_path / "junk.ckpt")
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(path, {"a": jnp.zeros(3)})
    assert path.read_bytes() == good  # reading never touches the file


def test_checkpoint_metadata_round_trips_in_one_schema(tmp_path):
    meta = CheckpointMeta(kind="full", version=5, gen_id=2, run_id="r", seed=1,
                          optimizer={"name": "lstm", "kwargs": {}}, config={"seed": 1},
                          counters={"applied": 4}, dedup={"w": [3, [2, 3]]},
                          history=[{"step": 2, "meta_loss": 0.5}], best_eval=float("inf"),
                          curriculum={"stage": 0, "best_version": None})
    path = save_checkpoint(tmp_path / "x.ckpt", {"a": jnp.ones(2)}, meta)
    _, stored = read_checkpoint(path)
    assert stored["format_version"] == FORMAT_VERSION == 2 and stored == meta.to_dict()
    assert "service" not in stored  # fields left None are not stored
    assert CheckpointMeta.from_stored(stored, path) == meta
    params = meta.for_params(eval_final_loss=1.5).to_dict()
    assert params["kind"] == "params" and params["eval_final_loss"] == 1.5
    assert not {"counters", "dedup", "history", "best_eval", "curriculum"} & set(params)


def test_trainer_and_learner_write_the_same_schema(tmp_path):
    import optax

    from l2o.io.config import ServiceConfig
    from learner.core import Learner

    trainer = Trainer(quadratic_config(tmp_path / "t", meta_steps=2, checkpoint_every=2))
    trainer.train()
    learner = Learner({"w": np.ones(3, np.float32)}, optax.sgd(0.1), ServiceConfig(),
                      tmp_path / "l", "run-l", extra_metadata={"seed": 4}, tensorboard=False,
                      start=False)
    full, params = learner.save_checkpoint()
    written = [(path, read_checkpoint(path)[1]) for path in (
        full, params, *(checkpoint_path(trainer.run_dir, kind, 2)
                        for kind in ("full", "params", "worker")))]
    for path, stored in written:
        meta = CheckpointMeta.from_stored(stored, path)
        assert meta.format_version == 2 and meta.saved_at is not None, path
    kinds = {path.name: CheckpointMeta.from_stored(m, path) for path, m in written}
    assert kinds["full_00000000.ckpt"].run_id == "run-l"
    assert kinds["full_00000002.ckpt"].counters == {"skipped_nonfinite": 0}
    assert kinds["worker_00000002.ckpt"].kind == "worker"
    with pytest.raises(ValueError, match="bogus"):  # the learner's extra fields are checked
        Learner({"w": np.ones(3, np.float32)}, optax.sgd(0.1), ServiceConfig(), tmp_path / "l",
                "run-l", extra_metadata={"bogus": 1}, tensorboard=False, start=False)


def test_format_1_checkpoints_still_load(tmp_path):
    """Metadata written before ``format_version`` existed (format 1) loads, mapped."""
    pretrained = Path(__file__).resolve().parents[1] / "l2o" / "pretrained" / "general-v1.ckpt"
    meta = CheckpointMeta.from_stored(read_checkpoint(pretrained)[1], pretrained)
    assert (meta.format_version, meta.kind, meta.version, meta.name) == (
        1, "params", 500, "general-v1")
    cfg = quadratic_config(tmp_path)
    trainer = Trainer(cfg)
    trainer.train(num_steps=2)
    # the full checkpoint as the trainer wrote it before this schema: no format_version, the
    # non-finite count at the top level, an optimizer config in python form, unknown keys
    old = {"kind": "full", "version": 2, "gen_id": 0, "seed": cfg.seed,
           "optimizer": cfg.optimizer.model_dump(), "config": cfg.model_dump(mode="json"),
           "skipped_nonfinite": 3, "history": trainer.history, "evaluations": [],
           "best_eval": None, "curriculum": None, "note": "ignored"}
    path = checkpoint_path(trainer.run_dir, "full", 2)
    save_checkpoint(path, {"theta": trainer.state.theta, "opt_state": trainer.state.opt_state},
                    old)
    resumed = Trainer(cfg)
    assert resumed.restore() and resumed.step == 2 and resumed.skipped_nonfinite == 3
    assert resumed.history == trainer.history


def test_an_unknown_format_or_a_bad_field_is_refused_by_name(tmp_path):
    cfg = quadratic_config(tmp_path)
    trainer = Trainer(cfg)
    trainer.train(num_steps=2)
    path = latest_checkpoint(trainer.run_dir, "full")
    tree, stored = read_checkpoint(path)
    cases = [({**stored, "format_version": 99}, r"'format_version' is 99"),
             ({**stored, "version": "two"}, r"field 'version'"),
             ({**stored, "colour": "red"}, r"field 'colour'"),
             ({k: v for k, v in stored.items() if k != "kind"}, r"field 'kind'")]
    for bad, message in cases:
        save_checkpoint(path, tree, bad)
        with pytest.raises(CheckpointError, match=message):
            read_checkpoint(path)
        with pytest.raises(CheckpointError, match=message):
            Trainer(cfg).restore()


def test_resume_matches_straight_run(tmp_path):
    straight = Trainer(quadratic_config(tmp_path / "a"))
    straight.train()
    half = Trainer(quadratic_config(tmp_path / "b"))
    half.train(num_steps=4)
    resumed = Trainer(quadratic_config(tmp_path / "b"))
    assert resumed.restore()
    assert resumed.step == 4
    resumed.train()
    assert resumed.step == straight.step == 8
    for a, b in zip(jax.tree_util.tree_leaves(straight.state.theta),
                    jax.tree_util.tree_leaves(resumed.state.theta)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_corrupted_checkpoint_leaves_trainer_untouched(tmp_path):
    cfg = quadratic_config(tmp_path)
    trainer = Trainer(cfg)
    trainer.train(num_steps=4)
    path = latest_checkpoint(trainer.run_dir, "full")
    assert path == checkpoint_path(trainer.run_dir, "full", 4)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    fresh = Trainer(cfg)
    before = jax.tree_util.tree_leaves(fresh.state.theta)
    with pytest.raises(CheckpointError, match="truncated"):
        fresh.restore()
    assert fresh.step == 0
    assert_tree_equal(before, fresh.state.theta)


def test_meta_training_lowers_meta_loss_on_quadratics(tmp_path):
    cfg = quadratic_config(
        tmp_path, meta_steps=300, log_every=50, checkpoint_every=1000,
        task={"name": "quadratic", "kwargs": {"dim": 10}},
        estimator={"num_tasks": 16, "unroll_length": 10, "num_steps": 50},
        meta_optimizer={"learning_rate": 1e-2},
    )
    history = Trainer(cfg).train()
    first, last = history[0]["meta_loss"], history[-1]["meta_loss"]
    assert np.isfinite(last)
    assert last < 0.7 * first, (first, last)


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"estimator\.unroll_length"):
        config_from_dict({"estimator": {"unroll_length": "twenty"}})
    with pytest.raises(ConfigError, match=r"meta_optimizer\.learning_rat"):
        config_from_dict({"meta_optimizer": {"learning_rat": 0.1}})
    f = tmp_path / "c.yaml"
    f.write_text("seed: 1\nbogus_field: 2\n")
    with pytest.raises(ConfigError, match="bogus_field"):
        load_config(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_cli_overrides_are_typed_validated_and_named_when_wrong():
    from l2o.io.config import apply_overrides, preset

    cfg = apply_overrides(preset("default"), ["estimator.num_tasks=13", "time_budget_s=null",
                                              "eval.adam_learning_rates=[0.1, 0.01]"])
    assert cfg.estimator.num_tasks == 13 and cfg.time_budget_s is None
    assert cfg.eval.adam_learning_rates == [0.1, 0.01]
    assert preset("default").estimator.num_tasks != 13  # the preset itself is untouched
    with pytest.raises(ConfigError, match=r"estimator\.nope"):
        apply_overrides(preset("default"), ["estimator.nope=1"])
    with pytest.raises(ConfigError, match=r"estimator\.num_tasks"):
        apply_overrides(preset("default"), ["estimator.num_tasks=abc"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides(preset("default"), ["estimator.num_tasks"])


@pytest.mark.parametrize("name", ["../../x", "a/b", "a\\b", "..", ".hidden", "-x", "a b",
                                  "x:y", "a*", "a?", "[a]", "{a}", "", "x" * 101])
def test_a_run_name_that_is_no_safe_file_or_key_name_is_refused(name):
    with pytest.raises(ConfigError, match="run_name"):
        config_from_dict({"run_name": name})


def test_a_redis_url_with_a_bad_scheme_is_refused_without_echoing_it():
    from l2o.io.config import apply_overrides, preset

    for url in ("redis//x", "http://user:s3cret@x"):
        with pytest.raises(ConfigError, match=r"service\.redis_url") as info:
            config_from_dict({"service": {"redis_url": url}})
        assert "s3cret" not in str(info.value)
        with pytest.raises(ConfigError, match=r"service\.redis_url") as info:
            apply_overrides(preset("default"), [f"service.redis_url={url}"])
        assert "s3cret" not in str(info.value)
    assert config_from_dict({"service": {"redis_url": "unix:///tmp/r.sock"}}).service.redis_url


def test_cli_options_are_validated_and_name_the_field(tmp_path):
    """``--meta-steps -5``, ``--run-name ../../x`` and a missing TLS file end with a one-line error
    naming the field, before anything runs; so does a malformed ``$REDIS_URL`` (no Ray is started
    for it)."""
    from typer.testing import CliRunner

    from services.cli import app

    runner = CliRunner()
    base = ["train", "--run-dir", str(tmp_path)]
    for args, field in ((["--meta-steps", "-5"], "meta-steps"),
                        (["--meta-steps", "0", "--local"], "meta-steps"),
                        (["--run-name", "../../x", "--local"], "run_name"),
                        (["--set", "meta_steps=-5", "--local"], "meta_steps"),
                        (["--set", "service.redis_url=redis//x"], "service.redis_url"),
                        (["--set", "service.tls_cert=c.pem"], "tls_key"),
                        (["--set", f"service.tls_cert={tmp_path}/c.pem", "--set",
                          f"service.tls_key={tmp_path}/k.pem"], "service.tls_cert")):
        res = runner.invoke(app, base + args, env={"COLUMNS": "200"})
        assert res.exit_code == 2, res.output
        assert field in res.output and "Traceback" not in res.output
    for cmd in (["eval", "x.ckpt", "--steps", "-1"], ["eval", "x.ckpt", "--pool", "-1"],
                ["leaderboard", "--top", "0"]):
        assert runner.invoke(app, cmd).exit_code == 2
    assert list(tmp_path.iterdir()) == []  # nothing was started
    res = runner.invoke(app, base + ["--run-name", "bad-url"], env={"REDIS_URL": "http://x",
                                                                      "COLUMNS": "200"})
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert lines and "Redis URL" in lines[0] and "Traceback" not in res.output


def test_service_refuses_a_run_whose_actors_cannot_all_be_placed():
    from l2o.io.config import apply_overrides, preset
    from services.train import check_resources

    cfg = apply_overrides(preset("default"), ["service.num_unroll_workers=2",
                                              "service.num_eval_workers=1",
                                              "service.worker_num_gpus=0.5"])
    with pytest.raises(RuntimeError, match=r"needs 1\.5 GPUs; the Ray cluster has 1"):
        check_resources(cfg, {"CPU": 16.0, "GPU": 1.0})
    with pytest.raises(RuntimeError, match="need 4 logical CPUs"):
        check_resources(cfg, {"CPU": 2.0, "GPU": 2.0})
    check_resources(cfg, {"CPU": 4.0, "GPU": 1.5})  # fits exactly
    check_resources(cfg, {"CPU": 1.0}, strict=False)  # a cluster we did not start: only a warning


def test_placement_per_role_is_validated_and_counted():
    from l2o.io.config import apply_overrides, preset
    from services.train import check_resources, needed_resources

    cfg = apply_overrides(preset("default"), [
        "service.placement.learner={num_cpus: 2, label_selector: {l2o-role: head}}",
        "service.placement.unroll={num_gpus: 0.5, resources: {gpu_node: 1}}",
        "service.placement.eval.resources={gpu_node: 0.5}"])
    assert cfg.service.ray_options("learner") == {
        "num_cpus": 2.0, "num_gpus": 0.0, "label_selector": {"l2o-role": "head"}}
    assert cfg.service.ray_options("unroll") == {"num_cpus": 1.0, "num_gpus": 0.5,
                                                 "resources": {"gpu_node": 1.0}}
    assert needed_resources(cfg) == {"CPU": 5.0, "GPU": 1.0, "gpu_node": 2.5}
    with pytest.raises(RuntimeError, match=r"2\.5 of the custom resource 'gpu_node'.*has 2"):
        check_resources(cfg, {"CPU": 8.0, "GPU": 1.0, "gpu_node": 2.0})
    check_resources(cfg, {"CPU": 5.0, "GPU": 1.0, "gpu_node": 2.5})
    for override, field in [("service.placement.unroll.resources={GPU: 1}",
                             "service.placement.unroll.resources: .*num_cpus/num_gpus"),
                            ("service.placement.eval.num_cpus=0",
                             "service.placement.eval.num_cpus"),
                            ("service.placement.learner.labels={a: b}",
                             "service.placement.learner.labels")]:
        with pytest.raises(ConfigError, match=field):
            apply_overrides(cfg, [override])


def test_the_written_out_default_config_is_the_default_job():
    from pathlib import Path

    from l2o.io.config import load_config, preset

    written = load_config(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")
    assert written == preset("default")


def test_a_field_of_another_estimator_or_optimizer_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"estimator\.std: not a field of estimator 'tbptt'"):
        config_from_dict({"estimator": {"name": "tbptt", "std": 0.1}})
    with pytest.raises(ConfigError, match=r"estimator\.es_advance.*es\b"):
        config_from_dict({"estimator": {"name": "pes", "es_advance": "positive"}})
    with pytest.raises(ConfigError, match=r"estimator: unknown estimator 'nope'; known: es"):
        config_from_dict({"estimator": {"name": "nope"}})
    with pytest.raises(ConfigError, match=r"optimizer\.kwargs\.nonsense"):
        config_from_dict({"optimizer": {"name": "lstm", "kwargs": {"nonsense": 1}}})
    with pytest.raises(ConfigError, match=r"optimizer\.kwargs\.layers"):
        config_from_dict({"optimizer": {"name": "lstm", "kwargs": {"layers": "wide"}}})
    # kwargs are dumped as given, so a config round-trips through its YAML/JSON form
    cfg = config_from_dict({"optimizer": {"name": "lstm", "kwargs": {"layers": [8]}}})
    assert cfg.model_dump(mode="json")["optimizer"] == {"name": "lstm", "kwargs": {"layers": [8]}}
    assert config_from_dict(cfg.model_dump()) == cfg


def test_overrides_switch_the_estimator_and_the_optimizer():
    from l2o.io.config import apply_overrides, preset

    cfg = apply_overrides(preset("default"), ["estimator.name=tbptt"])
    assert cfg.estimator.name == "tbptt" and cfg.estimator.num_tasks == 8  # shared fields stay
    assert cfg.estimator.horizon_min == 50 and not hasattr(cfg.estimator, "std")
    cfg = apply_overrides(preset("default"),
                          ["estimator.name=es", "estimator.es_advance=unperturbed"])
    assert cfg.estimator.std == 0.02 and cfg.estimator.es_advance == "unperturbed"
    with pytest.raises(ConfigError, match=r"estimator\.std"):
        apply_overrides(preset("default"), ["estimator.name=tbptt", "estimator.std=0.1"])
    cfg = apply_overrides(preset("l2l-cifar-multi"), ["optimizer.name=learned_adam"])
    assert cfg.optimizer.name == "learned_adam" and cfg.optimizer.kwargs.given() == {}


def test_every_preset_is_a_described_yaml_file():
    from pathlib import Path

    from l2o.io.config import PRESETS, PRESETS_DIR, preset, preset_description

    assert {p.stem for p in PRESETS_DIR.glob("*.yaml")} == set(PRESETS) and "default" in PRESETS
    for name in PRESETS:
        assert preset_description(name), name
        assert preset(name).run_name
    root = Path(__file__).resolve().parents[1]
    assert (root / "configs" / "presets").resolve() == PRESETS_DIR.resolve()
    # extends: a variant is its base with its own fields merged over it
    assert preset("l2o-scale-hessian").eval == preset("l2o-scale").eval


def test_cli_presets_lists_names_and_descriptions():
    from typer.testing import CliRunner

    from services.cli import app

    result = CliRunner().invoke(app, ["presets"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "description" in result.output and "{" not in result.output  # a table, not JSON
    assert "l2o-scale-enhanced" in result.output
    assert "L2O-Scale with the curriculum" in result.output


def test_cli_eval_reproduces_the_eval_of_the_runs_summary(tmp_path):
    """``l2o eval`` on a checkpoint of a tiny ``train --local`` run, without options, scores θ as
    the run did: the same task, key, seeds, Adam grid and summary keys as its summary.json."""
    import json

    import yaml
    from typer.testing import CliRunner

    from l2o.training.job import load_theta
    from services.cli import app

    cfg = quadratic_config(tmp_path, meta_steps=2, checkpoint_every=2,
                           eval={"steps": 5, "seeds": 2})
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--local", "--config", str(tmp_path / "tiny.yaml")])
    assert res.exit_code == 0, res.output
    run = json.loads((cfg.run_path() / "summary.json").read_text())
    assert run["eval"]["steps"] == 5 and run["eval"]["learned_final_loss"] is not None
    for kind in ("params", "full"):
        out = tmp_path / f"eval-{kind}"
        res = runner.invoke(app, ["eval", str(latest_checkpoint(cfg.run_path(), kind)),
                                  "--out", str(out)])
        assert res.exit_code == 0, res.output
        assert json.loads((out / "summary.json").read_text())["eval"] == run["eval"], kind
    # `l2o select` reads the run's evaluation family from its full checkpoint
    res = runner.invoke(app, ["select", str(cfg.run_path()), "--num-tasks", "1", "--steps", "5",
                              "--seeds", "2", "--out", str(tmp_path / "chosen.ckpt")])
    assert res.exit_code == 0, res.output
    chosen = json.loads((tmp_path / "chosen.selection.json").read_text())
    assert chosen["validation_task"] == cfg.eval_task().model_dump(mode="json")
    assert load_theta(tmp_path / "chosen.ckpt")[2]["selection"]["chosen"] == chosen["chosen"]
