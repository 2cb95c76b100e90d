"""GPU placement: JAX on the GPU, and Ray actors that ask for a GPU share computing on it.

These run only where JAX sees a GPU (they are skipped on the CPU-only CI machine). Run them on a
GPU node with ``pytest tests/test_gpu.py``; the figures they print are where each part computed.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not _has_gpu(), reason="no GPU visible to JAX")]


def test_single_machine_trainer_computes_on_the_gpu(tmp_path):
    from l2o.io.config import preset
    from l2o.training.trainer import Trainer

    cfg = preset("default").model_copy(update={"meta_steps": 20, "time_budget_s": None,
                                               "log_every": 10, "checkpoint_every": 20})
    trainer = Trainer(cfg, run_dir=tmp_path)
    history = trainer.train()
    devices = {d.platform for leaf in jax.tree_util.tree_leaves(trainer.state.theta)
               for d in leaf.devices()}
    assert jax.default_backend() == "gpu"
    assert devices == {"gpu"}
    assert trainer.step == 20
    assert all(np.isfinite(h["meta_loss"]) for h in history)


@pytest.fixture(scope="module")
def ray_with_gpu():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False,
                 logging_level="WARNING")
    yield ray
    if started:
        ray.shutdown()


def test_actor_placement_follows_its_gpu_request(ray_with_gpu):
    """An actor asking for half a GPU computes on it; one asking for none stays on the CPU."""
    ray = ray_with_gpu
    from workers.unroll import actor_options, placement

    @ray.remote
    class Probe:
        def where(self) -> dict:
            x = jax.numpy.ones((256, 256))
            return {**placement(), "result_device": str(next(iter((x @ x).devices())))}

    on_gpu = Probe.options(**actor_options(1, 0.5, add_repo_to_path=True)).remote()
    on_cpu = Probe.options(**actor_options(1, 0.0, add_repo_to_path=True)).remote()
    gpu_where, cpu_where = ray.get([on_gpu.where.remote(), on_cpu.where.remote()])
    print("gpu actor:", gpu_where, "\ncpu actor:", cpu_where)
    assert gpu_where["jax_backend"] == "gpu" and gpu_where["ray_gpu_ids"]
    assert "cuda" in gpu_where["result_device"].lower() or "gpu" in gpu_where["result_device"]
    assert cpu_where["jax_backend"] == "cpu" and not cpu_where["ray_gpu_ids"]


def test_service_unroll_workers_run_on_the_gpu(ray_with_gpu, tmp_path):
    """The whole service with two unroll workers and an eval worker sharing the GPU."""
    from l2o.io.config import config_from_dict
    from services.redis_server import EmbeddedRedis
    from services.train import run_service

    cfg = config_from_dict({
        "run_name": "gpu-service", "run_dir": str(tmp_path), "meta_steps": 12,
        "time_budget_s": None, "log_every": 4, "checkpoint_every": 6,
        "estimator": {"num_tasks": 4, "unroll_length": 10, "num_steps": 40},
        "eval": {"steps": 40, "seeds": 4},
        "service": {"num_unroll_workers": 2, "num_eval_workers": 1, "worker_num_gpus": 0.3,
                    "max_staleness": 2},
    })
    srv = EmbeddedRedis(os.path.join(str(tmp_path), "redis"))
    try:
        summary = run_service(cfg, redis_url=srv.url)
    finally:
        srv.stop()
    print("worker placement:", [(s["worker_id"], s["jax_backend"], s["ray_gpu_ids"])
                                for s in summary["worker_stats"]])
    assert summary["updates"] >= cfg.meta_steps
    assert len(summary["worker_stats"]) == 2
    assert all(s["jax_backend"] == "gpu" and s["ray_gpu_ids"] for s in summary["worker_stats"])
    assert summary["eval"] is not None and np.isfinite(summary["eval"]["learned_final_loss"])
