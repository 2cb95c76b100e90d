"""A held-out suite evaluation sharded over the eval pool: real local Ray, real (embedded) Redis.

Slow (marked ``slow``, about a minute on 2 CPU cores): the pool's eval workers import JAX and
compile each task's runs. Three cheap ``heldout`` tasks, reduced baseline settings and a
temporary baseline cache keep it short. The Ray and Redis fixtures are ``test_service``'s.
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from test_service import ray_local, redis_url  # noqa: E402, F401 - the shared fixtures

import l2o  # noqa: E402
from l2o.suite.baselines import BaselineSettings  # noqa: E402
from services.redis_server import redis_connection  # noqa: E402
from services.registry import SUITE_JOB, Registry, checkpoint_id  # noqa: E402
from workers.eval_worker import (  # noqa: E402
    SuiteJobSpec,
    assemble_from_registry,
    create_eval_worker,
    evaluate_on_suite_with_pool,
)

pytestmark = pytest.mark.slow

CKPT = Path(l2o.__file__).parent / "pretrained" / "general-v1.ckpt"
TASKS = ["iris_mlp", "logistic_regression", "rosenbrock"]
TINY = BaselineSettings(tuning_seeds=(1000,), report_seeds=(0, 1), baselines=("adam",),
                        grids={"adam": (1e-2, 1e-1)}, long_factor=2)
SEEDS = 2


def quiet(_line: str) -> None:
    """A log that drops its lines."""


def numbers_equal(a, b) -> bool:
    """Whether two JSON-like values are equal, NaN equal to NaN (wall times, ``seconds``,
    excepted)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(numbers_equal(a[k], b[k]) for k in a
                                            if k != "seconds")
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(numbers_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


@pytest.fixture
def registry(redis_url):  # noqa: F811 - the imported fixture
    """A fresh pool run (no training config) in the module's Redis, deleted afterwards."""
    client, _ = redis_connection(redis_url)
    reg = Registry(client, f"suite-test-{uuid.uuid4().hex[:8]}", eval_max_deliveries=3,
                   eval_idle_ms=5000)
    reg.write_manifest(None, kind="suite-eval")
    yield reg
    reg.delete_run()


def test_suite_jobs_on_the_registry(registry):
    """Enqueue → claim → parse → store → collect; a permanent failure dead-letters at once."""
    from l2o.suite.tasks import SUITE_VERSION

    ids = registry.enqueue_suite_eval(str(CKPT), "heldout", SUITE_VERSION, ["a", "b"], seeds=3,
                                      label="gen", settings=TINY.to_json(), cache_dir="/c")
    assert list(ids) == ["a", "b"]
    job = registry.claim_eval("probe", block_ms=0)
    assert job.kind == SUITE_JOB and job.fields["task"] == "a"
    spec = SuiteJobSpec.from_fields(job.fields)
    ckpt = checkpoint_id(str(CKPT))
    assert (spec.checkpoint_id, spec.seeds, spec.label, spec.cache_dir) == (ckpt, 3, "gen", "/c")
    assert spec.settings == TINY.to_json()
    registry.store_suite_result(ckpt, "heldout", "a", {"result": {"task": "a"}, "job": {}})
    registry.ack_eval(job)
    assert set(registry.suite_results(ckpt, "heldout", ["a", "b"])) == {"a"}
    job = registry.claim_eval("probe", block_ms=0)
    assert registry.fail_eval(job, "BadJob: task 'b' is unknown", permanent=True)
    assert registry.suite_failures(ckpt, "heldout")["b"]["deliveries"] == "1"
    assert registry.evals_outstanding() == 0
    assert assemble_from_registry(registry, ckpt, "heldout", ["a", "b"]) is None


def test_pool_shards_the_suite_and_matches_in_process(tmp_path, redis_url):  # noqa: F811
    """2 eval workers score 3 tasks; the assembled result equals the in-process one."""
    from l2o.optimizers.optax_bridge import as_gradient_transformation
    from l2o.suite.evaluate import evaluate_on_suite
    from l2o.suite.tasks import SUITE_VERSION
    from l2o.training.job import load_theta

    cache, out = tmp_path / "cache", tmp_path / "out"
    pooled = evaluate_on_suite_with_pool(CKPT, "heldout", 2, tasks=TASKS, seeds=SEEDS,
                                         settings=TINY, cache_dir=cache, out_dir=out,
                                         redis_url=redis_url, worker_num_cpus=1.0,
                                         timeout_s=300, log_line=quiet)
    assert [t["task"] for t in pooled["tasks"]] == TASKS
    assert pooled["suite"] == "heldout" and pooled["suite_version"] == SUITE_VERSION
    assert pooled["seeds"] == [0, 1] and pooled["label"] == CKPT.name
    jobs = pooled["pool"]["jobs"]
    assert set(jobs) == set(TASKS) and all(j["deliveries"] == 1 for j in jobs.values())
    # sharded: both workers took jobs (each waits on the stream before the jobs are queued)
    assert {j["consumer"] for j in jobs.values()} == {"eval-0", "eval-1"}
    # the workers computed the baselines into the on-disk cache
    assert not any(j["baselines_from_cache"] for j in jobs.values())
    assert len(list((cache / "suite" / SUITE_VERSION).glob("*.json"))) == len(TASKS)
    assert {p.name for p in out.iterdir()} >= {"report.md", "curves.png", "suite.json"}
    assert json.loads((out / "suite.json").read_text())["summary"]["tasks"] == len(TASKS)

    # anyone can assemble the result again from Redis
    client, _ = redis_connection(redis_url)
    reg = Registry(client, pooled["pool"]["run_id"])
    again = assemble_from_registry(reg, pooled["pool"]["checkpoint_id"], "heldout", TASKS)
    assert again["summary"] == pooled["summary"] and again["tasks"] == pooled["tasks"]

    # the in-process evaluation (baselines now from the cache) gives the same numbers
    lopt, theta, _ = load_theta(CKPT)
    ref = evaluate_on_suite(lambda n: as_gradient_transformation(lopt, theta, num_steps=n),
                            "heldout", tasks=TASKS, seeds=SEEDS, settings=TINY, cache_dir=cache,
                            label=CKPT.name, log=quiet)
    ref = json.loads(json.dumps(ref, default=str))  # the pooled results went through JSON
    assert numbers_equal(pooled["summary"], ref["summary"])
    for mine, theirs in zip(pooled["tasks"], ref["tasks"], strict=True):
        for key in ("learned", "baselines", "vs", "runs", "lrs"):
            assert numbers_equal(mine[key], theirs[key]), (mine["task"], key)
    assert pooled["baseline_settings"] == ref["baseline_settings"]


def test_bad_suite_jobs_are_dead_lettered_with_a_clear_message(tmp_path, registry, redis_url):  # noqa: F811
    """Unknown task, unreadable checkpoint, other suite version, a checkpoint job in a
    suite-only pool: each dead-lettered at its first delivery; the worker keeps going."""
    from l2o.suite.tasks import SUITE_VERSION

    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    kw = {"seeds": SEEDS, "label": "x", "settings": TINY.to_json()}
    registry.enqueue_suite_eval(str(CKPT), "heldout", SUITE_VERSION, ["no_such_task"], **kw)
    registry.enqueue_suite_eval(str(junk), "heldout", SUITE_VERSION, ["rosenbrock"], **kw)
    registry.enqueue_suite_eval(str(CKPT), "heldout", "heldout-v0", ["rosenbrock"], **kw)
    registry.enqueue_eval(str(CKPT), 500)
    registry.set_status("done")  # the worker drains the queue and returns
    worker = create_eval_worker(registry.run_id, redis_url, "eval-bad", num_cpus=0.5,
                                max_restarts=0)
    try:
        stats = ray.get(worker.run.remote(), timeout=180)
    finally:
        ray.kill(worker, no_restart=True)

    assert (stats["failed"], stats["dead_lettered"], stats["scored"]) == (4, 4, 0)
    assert registry.evals_outstanding() == 0
    dead = registry.dead_letters()
    assert [d["deliveries"] for d in dead] == ["1"] * 4
    errors = {(d.get("task"), d["path"], d.get("suite_version")): d["error"] for d in dead}
    unknown = errors[("no_such_task", str(CKPT), SUITE_VERSION)]
    assert unknown.startswith("BadJob:") and "'no_such_task'" in unknown
    assert "unknown suite task" in unknown
    unreadable = errors[("rosenbrock", str(junk), SUITE_VERSION)]
    assert "unreadable" in unreadable and str(junk) in unreadable
    assert "heldout-v0" in errors[("rosenbrock", str(CKPT), "heldout-v0")]
    assert "only suite-task jobs" in errors[(None, str(CKPT), None)]
    assert set(registry.suite_failures(checkpoint_id(str(CKPT)), "heldout")) == {
        "no_such_task", "rosenbrock"}


def test_cli_eval_pool_runs_the_pool(tmp_path, monkeypatch):
    """``l2o eval CKPT --suite heldout --pool N`` hands the tasks to the pool function."""
    from typer.testing import CliRunner

    import workers.eval_worker as ew
    from l2o.suite.evaluate import assemble_suite_result
    from services.cli import app

    seen = {}

    def fake_pool(checkpoint, suite, num_workers, **kw):
        seen.update(checkpoint=checkpoint, suite=suite, num_workers=num_workers, **kw)
        return assemble_suite_result([], suite, "v", kw["label"], kw["seeds"])

    monkeypatch.setattr(ew, "evaluate_on_suite_with_pool", fake_pool)
    runner = CliRunner()
    result = runner.invoke(app, ["eval", str(CKPT), "--suite", "heldout", "--pool", "3",
                                 "--tasks", "iris_mlp,rosenbrock", "--seeds", "2",
                                 "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (seen["suite"], seen["num_workers"], seen["tasks"], seen["seeds"]) == (
        "heldout", 3, ["iris_mlp", "rosenbrock"], 2)
    assert seen["out_dir"] == tmp_path and seen["label"] == CKPT.name
    bad = runner.invoke(app, ["eval", str(CKPT), "--suite", "l2o-scale", "--pool", "2"])
    assert bad.exit_code == 2 and "--suite heldout" in bad.output
