"""A service run whose run directory is on S3: a real S3-compatible server (moto's server mode
on loopback, through s3fs), real local Ray, the embedded Redis in the local directory.

The learner writes its checkpoints to ``s3://…``, the eval workers read them from there and fill
the leaderboard, ``l2o eval`` scores one by its URL, and a second run resumes from the newest
intact full checkpoint in the bucket, skipping a damaged newer one. The S3 credentials are in
the environment only, and never reach an object, a local file or the registry.
"""

from __future__ import annotations

import json
import os
import uuid

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("s3fs")
pytest.importorskip("moto")

from servers import S3_SECRET, s3_server  # noqa: E402

from l2o.io.checkpoints import list_checkpoints  # noqa: E402
from l2o.io.config import config_from_dict  # noqa: E402
from l2o.io.storage import as_path  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bucket():
    """A moto S3 bucket, then a local Ray instance started with its credentials in the
    environment (so its actors have them, as a cluster's nodes would). Its actors share the
    suite's JAX compilation cache (tests/conftest.py), so the second run compiles nothing."""
    if ray.is_initialized():
        pytest.skip("needs a Ray instance started with the S3 credentials in its environment")
    with s3_server() as url:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
        try:
            yield url
        finally:
            ray.shutdown()


def config(bucket: str, local_dir: str, name: str, meta_steps: int):
    return config_from_dict({
        "run_name": name, "run_dir": f"{bucket}/runs", "local_dir": local_dir,
        "meta_steps": meta_steps, "log_every": 5, "checkpoint_every": 5, "time_budget_s": 120,
        "task": {"name": "quadratic"}, "optimizer": {"name": "lstm", "kwargs": {"layers": [8]}},
        "estimator": {"num_tasks": 2, "unroll_length": 5, "num_steps": 20},
        "eval": {"steps": 10, "seeds": 2, "adam_steps_factor": 1,
                 "adam_learning_rates": [0.01, 0.1]},
        "service": {"num_unroll_workers": 1, "num_eval_workers": 1, "worker_num_cpus": 0.5,
                    "eval_idle_ms": 3000},
    })


def test_a_run_on_s3_is_scored_from_there_and_resumes_past_a_damaged_checkpoint(bucket,
                                                                                 tmp_path):
    from typer.testing import CliRunner

    from services.cli import app
    from services.train import run_service

    name, local = f"s3-{uuid.uuid4().hex[:6]}", str(tmp_path / "local")
    first_cfg = config(bucket, local, name, meta_steps=10)
    first = run_service(first_cfg, eval_drain_timeout_s=60)
    run_dir = as_path(f"{bucket}/runs/{name}")
    assert first["final_checkpoint"].startswith(f"{run_dir}/checkpoints/params_")
    full = list_checkpoints(run_dir, "full")
    assert [v for v, _ in full][:2] == [5, 10] and (run_dir / "run_id").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["run_id"] == first["run_id"] and (run_dir / "curves.png").is_file()
    # the eval workers read the checkpoints from the bucket and ranked them
    assert first["checkpoints_scored"] >= 2
    assert first["best_checkpoint"]["checkpoint"].startswith(f"{run_dir}/checkpoints/")
    # only local things stay local: the embedded Redis data and the applied log
    assert not (tmp_path / "local" / name / "checkpoints").exists()
    assert (tmp_path / "local" / name / "applied.jsonl").is_file()

    # `l2o eval URL` and `l2o leaderboard --run-dir LOCAL`
    res = CliRunner().invoke(app, ["eval", str(full[0][1])])
    assert res.exit_code == 0, res.output
    assert "speedup" in res.output.lower()
    res = CliRunner().invoke(app, ["leaderboard", "--run-dir", f"{local}/{name}"])
    assert res.exit_code == 0 and name in res.output, res.output

    # damage the newest full checkpoint; the next run resumes from the one before it
    newest_version, newest = full[-1]
    resumed_version = full[-2][0]
    blob = bytearray(newest.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    newest.write_bytes(bytes(blob))
    second = run_service(config(bucket, local, name, meta_steps=newest_version + 10),
                         eval_drain_timeout_s=60)
    assert second["run_id"] == first["run_id"]
    log = [json.loads(line) for line in
           (tmp_path / "local" / name / "applied.jsonl").read_text().splitlines()]
    renumbered = [e for e in log if e.get("event") == "renumbered"]
    assert [e["from_version"] for e in renumbered] == [resumed_version]
    assert second["version"] > newest_version and newest.read_bytes() == bytes(blob)
    assert max(v for v, _ in list_checkpoints(run_dir, "full")) == second["version"]

    # the S3 secret is in this process's environment only
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == S3_SECRET
    fs = run_dir.fs
    for key in fs.find(run_dir.path):
        assert S3_SECRET.encode() not in fs.cat_file(key), key
    for path in (tmp_path / "local").rglob("*"):
        if path.is_file():
            assert S3_SECRET.encode() not in path.read_bytes(), path
