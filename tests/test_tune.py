"""Population search with Ray Tune (``services/tune.py``): real local Ray and Tune, the learner
behind gRPC, an embedded Redis server.

One small PBT experiment (a population of 3 on cheap quadratics) is shared by the module: while
it runs, one trial's learner is killed. The tests then read what it left: exploits, the summary,
the leaderboard, the retried trial, and a resume of the finished experiment.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.tune")

from l2o.io.config import ConfigError, config_from_dict, preset  # noqa: E402


def _config(tmp: Path, **tune_fields: object):
    data = preset("tune-quadratic").model_dump(mode="json")
    data.update(run_dir=str(tmp), run_name="pop", seed=1)
    data["estimator"].update(num_tasks=4, num_steps=40)
    data["eval"].update(steps=30, seeds=2, adam_learning_rates=[0.03, 0.3])
    data["tune"].update({"population": 3, "perturbation_interval": 3,
                         "max_updates_per_trial": 18, "quantile_fraction": 0.34,
                         "resample_probability": 0.0, "max_failures": 3, **tune_fields})
    data["tune"]["search_space"]["estimator.unroll_length"] = {"kind": "uniform", "low": 4,
                                                               "high": 12}
    return config_from_dict(data)


def _kill_one_learner(run_dir: Path, last_interval: int, stop: threading.Event,
                      killed: dict) -> None:
    """Kill the learner of a trial that has just exploited another (it is training on the
    adopted θ). Not earlier: a trial killed while it leads the population restarts for seconds,
    the others finish meanwhile on a quiet machine, and PBT is left nobody to exploit."""
    import ray

    from services.tune import REPORTS_FILE, read_jsonl
    from workers.ray_setup import actor_name

    def reports_left(trial_id: str) -> int:
        reports = read_jsonl(run_dir / "trials" / trial_id / REPORTS_FILE)
        return last_interval - (reports[-1]["interval"] if reports else 0)

    while not stop.wait(0.1):
        id_file = run_dir / "run_id"
        exploited = sorted(p.parent.name for p in (run_dir / "trials").glob("*/exploits.jsonl"))
        if not id_file.exists() or not exploited:
            continue
        for trial_id in exploited:
            if reports_left(trial_id) < 2:  # killed after its last report, it would not retry
                continue
            name = actor_name(f"{id_file.read_text().strip()}/{trial_id}", "learner")
            try:  # Ray restarts it: a new incarnation, which the trial reports as a failure
                ray.kill(ray.get_actor(name), no_restart=False)
            except ValueError:  # that trial has finished
                continue
            killed.update(trial=trial_id, time=time.time())
            return


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    import ray

    from services.tune import experiment_cpus, reports_per_trial, run_tune
    from workers.ray_setup import connect_ray

    cfg = _config(tmp_path_factory.mktemp("tune"))
    started = connect_ray(experiment_cpus(cfg))
    killed: dict = {}
    stop = threading.Event()
    killer = threading.Thread(target=_kill_one_learner, daemon=True,
                              args=(cfg.run_path(), reports_per_trial(cfg.tune), stop, killed))
    killer.start()
    try:
        summary = run_tune(cfg, verbose=0)
    finally:
        stop.set()
        killer.join(5)
    yield cfg, summary, killed
    if started:
        ray.shutdown()


def _trials(cfg) -> dict[str, Path]:
    return {p.name: p for p in (cfg.run_path() / "trials").iterdir()}


def _lines(path: Path) -> list[dict]:
    from services.tune import read_jsonl

    return read_jsonl(path)


def test_an_exploit_adopts_the_donors_theta_as_a_new_generation(experiment):
    from l2o.io.checkpoints import read_checkpoint

    cfg, summary, _ = experiment
    trials = _trials(cfg)
    exploits = [e for d in trials.values() for e in _lines(d / "exploits.jsonl")]
    assert exploits and summary["exploits"] == len(exploits)
    for e in exploits:
        donor_full, _ = read_checkpoint(e["donor_checkpoint"])
        donor_params, _ = read_checkpoint(trials[e["donor"]] / "checkpoints" /
                                          f"params_{e['donor_version']:08d}.ckpt")
        after, meta = read_checkpoint(e["params_after"])
        for x, y, z in zip(_leaves(donor_full["theta"]), _leaves(donor_params), _leaves(after),
                           strict=True):
            np.testing.assert_array_equal(x, z)
            np.testing.assert_array_equal(y, z)
        assert e["gen_after"] > e["gen_before"] and meta["gen_id"] == e["gen_after"]
        assert e["old_generation_push"] == "STALE_GENERATION"


def _leaves(tree) -> list[np.ndarray]:
    import jax

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_summary_names_the_best_trial_whose_checkpoint_loads_and_matches_the_leaderboard(
        experiment):
    from l2o.optimizers.optax_bridge import as_gradient_transformation
    from l2o.training.job import load_theta
    from services import redis_server
    from services.registry import leaderboard

    cfg, summary, _ = experiment
    on_disk = json.loads((cfg.run_path() / "tune_summary.json").read_text())
    assert on_disk["best_trial"] == summary["best_trial"] in _trials(cfg)
    assert (cfg.run_path() / "pbt.png").stat().st_size > 0
    assert on_disk["best_schedule"] and {"meta_updates", "meta_optimizer.learning_rate"} <= set(
        on_disk["best_schedule"][0])
    lopt, theta, meta = load_theta(on_disk["best_checkpoint"])
    assert int(meta["version"]) == on_disk["best_version"]
    as_gradient_transformation(lopt, theta)
    client, _ = redis_server.redis_connection(
        None, data=redis_server.run_data_dir(cfg.run_path()), reuse_running=True)
    try:
        rows = {(r["run_id"], r["version"]): r["score"] for r in leaderboard(client, top=1000)}
    finally:
        redis_server.shutdown_embedded()
    key = (f"{on_disk['experiment']}/{on_disk['best_trial']}", on_disk["best_version"])
    assert rows[key] == pytest.approx(on_disk["best_score"])
    assert on_disk["best_score"] == min(r["score"] for t in on_disk["trials"]
                                        for r in t["reports"])


def test_a_trial_whose_learner_was_killed_is_retried_and_the_experiment_finishes(experiment):
    from services.tune import reports_per_trial

    cfg, summary, killed = experiment
    assert killed, "no learner was killed"
    starts = _lines(_trials(cfg)[killed["trial"]] / "attempts.jsonl")
    assert any(s["time"] > killed["time"] and s["checkpoint_of"] for s in starts)
    for row in summary["trials"]:
        assert row["error"] is None
        assert row["meta_updates"] >= cfg.tune.max_updates_per_trial
        # every trial (its lineage, through exploits) reports once per interval to the budget
        assert row["reports"][-1]["interval"] == reports_per_trial(cfg.tune) == 6


def test_each_trials_learner_and_workers_run_in_that_trials_placement_group(experiment):
    cfg, _, _ = experiment
    firsts = []
    for trial_dir in _trials(cfg).values():
        for attempt in _lines(trial_dir / "attempts.jsonl"):
            groups = attempt["placement_groups"]
            assert groups["trial"] is not None
            assert groups["learner"] == groups["trial"]
            assert groups["unroll"] == [groups["trial"]] * cfg.service.num_unroll_workers
        firsts.append(_lines(trial_dir / "attempts.jsonl")[0]["placement_groups"]["trial"])
    assert len(set(firsts)) == len(firsts) == cfg.tune.population


def test_resume_does_not_restart_finished_trials(experiment):
    from services.tune import run_tune

    cfg, summary, _ = experiment
    before = {t: len(_lines(d / "attempts.jsonl")) for t, d in _trials(cfg).items()}
    again = run_tune(cfg, resume=True, verbose=0)
    assert {t: len(_lines(d / "attempts.jsonl")) for t, d in _trials(cfg).items()} == before
    assert again["best_trial"] == summary["best_trial"]


def test_an_interrupted_experiment_resumes_without_restarting_its_finished_trial(tmp_path):
    """``python -m services.tune`` interrupted (SIGINT) while the second of two trials (one at a
    time) runs; ``--resume`` finishes it from its checkpoint and leaves the first one alone."""
    import os
    import signal
    import subprocess
    import sys

    import yaml

    # twenty reports a trial (a few seconds): the interrupt lands well inside the second trial
    cfg = _config(tmp_path, scheduler="none", population=2, max_concurrent_trials=1,
                  max_updates_per_trial=60)
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "services.tune", "--config", str(path)]
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        # the second trial has reported twice (so Tune has its first report's checkpoint): the
        # first is finished, the second under way
        while not [p for p in (cfg.run_path() / "trials").glob("*_00001/reports.jsonl")
                   if len(p.read_text().splitlines()) >= 2]:
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the second trial never reported"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    trials = _trials(cfg)
    assert len(trials) == 2
    first, second = sorted(trials)
    assert len(_lines(trials[first] / "attempts.jsonl")) == 1
    assert len(_lines(trials[first] / "reports.jsonl")) == 20
    assert 2 <= len(_lines(trials[second] / "reports.jsonl")) < 20, "not interrupted half-way"
    done = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(_lines(trials[first] / "attempts.jsonl")) == 1  # not started again
    resumed = _lines(trials[second] / "attempts.jsonl")
    assert len(resumed) == 2 and resumed[-1]["checkpoint_of"] == second
    summary = json.loads((cfg.run_path() / "tune_summary.json").read_text())
    for row in summary["trials"]:
        assert row["error"] is None and row["reports"][-1]["interval"] == 20


def test_a_bad_tune_field_is_refused_with_its_dotted_name(tmp_path):
    from typer.testing import CliRunner

    from services.cli import app
    from services.tune import make_scheduler

    space = {"meta_optimizer.learning_rate": {"kind": "loguniform", "low": 1e-4, "high": 1e-2}}
    for bad, name in [
        ({"search_space": {"meta_optimizer.lr": space["meta_optimizer.learning_rate"]}},
         "tune.search_space.meta_optimizer.lr"),
        ({"search_space": {"meta_optimizer.learning_rate": {"kind": "uniform", "low": 0,
                                                            "high": 1}}},
         "tune.search_space.meta_optimizer.learning_rate"),
        ({"search_space": {"estimator.unroll_length": {"kind": "loguniform", "low": 5,
                                                       "high": 2}}},
         "tune.search_space.estimator.unroll_length"),
        ({"scheduler": "hyperband"}, "tune.scheduler"),
        ({"quantile_fraction": 0.9}, "tune.quantile_fraction"),
    ]:
        with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
            config_from_dict({"tune": bad})
    cfg = config_from_dict({"tune": {"scheduler": "pb2", "search_space": {
        **space, "estimator.unroll_length": {"kind": "choice", "values": [5, 10]}}}})
    with pytest.raises(ConfigError, match=r"tune\.search_space\.estimator\.unroll_length"):
        make_scheduler(cfg.tune)
    kinds = {name: type(make_scheduler(config_from_dict(
        {"tune": {"scheduler": name, "search_space": space}}).tune)).__name__
        for name in ("pbt", "pb2", "asha", "none")}
    assert kinds == {"pbt": "PopulationBasedTraining", "pb2": "PB2",
                     "asha": "AsyncHyperBandScheduler", "none": "NoneType"}
    out = CliRunner().invoke(app, ["tune", "--set", "tune.population=0",
                                   "--set", f"run_dir={tmp_path}"])
    assert out.exit_code == 2 and "tune.population" in out.output
