"""The service across several Ray nodes on one machine (``ray.cluster_utils.Cluster``).

A head node (the learner's, labelled ``l2o-role=head``) and a worker node (labelled
``l2o-role=worker``, with the custom resource ``worker_node``), Ray's token authentication on
with a generated token, an external Redis over TCP with a password, the learner listening on
every interface and advertised at the node IP Ray reports (``service.host: auto``), and the run
directory given as a ``file://`` URL. The config places the unroll workers by custom resource
and the eval workers by node label; each actor reports the Ray node it ran on.
"""

from __future__ import annotations

import json
import secrets
import uuid

import pytest

ray = pytest.importorskip("ray")

from servers import PASSWORD, ExternalRedis, environment  # noqa: E402

from l2o.io.config import config_from_dict  # noqa: E402
from services.redis_server import redis_connection  # noqa: E402
from services.registry import Registry, leaderboard, read_run_id  # noqa: E402

pytestmark = pytest.mark.slow

#: Ray's token authentication, as a cluster runs it (``RAY_AUTH_MODE=token``, the token passed)
RAY_AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node with token auth; ``(head node id, worker node id)``."""
    from ray._private.authentication_test_utils import reset_auth_token_state
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.skip("needs its own Ray cluster, and Ray is already initialized here")
    with environment(RAY_AUTH):
        reset_auth_token_state()  # Ray read its auth mode when imported: read it again
        c = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "labels": {"l2o-role": "head"}, "include_dashboard": False})
        worker = c.add_node(num_cpus=2, resources={"worker_node": 2},
                            labels={"l2o-role": "worker"})
        ray.init(address=c.address, logging_level="WARNING")
        try:
            yield c.head_node.node_id, worker.node_id
        finally:
            ray.shutdown()
            c.shutdown()
    reset_auth_token_state()


def test_a_run_across_nodes_places_each_role_where_its_config_says(cluster, tmp_path,
                                                                   monkeypatch):
    from services.train import run_service

    head, worker = cluster
    redis_srv = ExternalRedis(tmp_path / "redis")
    monkeypatch.setenv("L2O_TOKEN", secrets.token_urlsafe(32))
    cfg = config_from_dict({
        "run_name": f"nodes-{uuid.uuid4().hex[:6]}", "run_dir": f"file://{tmp_path}/runs",
        "meta_steps": 20, "log_every": 5, "checkpoint_every": 5, "time_budget_s": 120,
        "task": {"name": "quadratic"}, "optimizer": {"name": "lstm", "kwargs": {"layers": [8]}},
        "estimator": {"num_tasks": 2, "unroll_length": 5, "num_steps": 20},
        "eval": {"steps": 10, "seeds": 2, "adam_steps_factor": 1,
                 "adam_learning_rates": [0.01, 0.1]},
        "service": {
            "host": "auto", "redis_url": redis_srv.url, "num_unroll_workers": 2,
            "num_eval_workers": 1, "worker_num_cpus": 0.5, "eval_idle_ms": 3000,
            "placement": {"learner": {"label_selector": {"l2o-role": "head"}},
                          "unroll": {"resources": {"worker_node": 1}},
                          "eval": {"label_selector": {"l2o-role": "worker"}}}},
    })
    addresses: list[str] = []
    client, _ = redis_connection(redis_srv.url)

    def progress(_status):
        run_id = read_run_id(cfg.run_path())
        addresses.append(Registry(client, run_id).learner_address() or "")

    try:
        summary = run_service(cfg, progress=progress, eval_drain_timeout_s=60)
        reg = Registry(client, summary["run_id"])

        # the learner on the head, reachable at the node IP Ray reports, not on loopback only
        node_ip = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        assert summary["learner_node"] == head
        assert {a.rsplit(":", 1)[0] for a in addresses if a} == {node_ip[head]}
        # unroll and eval workers on the other node
        assert summary["updates"] >= 20 and len(summary["worker_stats"]) == 2
        assert {s["node_id"] for s in summary["worker_stats"]} == {worker}
        assert {client.hget(reg.key("workers", f"unroll-{i}"), "node_id")
                for i in (0, 1)} == {worker}
        scored = reg.eval_results()
        assert {5, 10, 15, 20} <= set(scored)
        assert {r["node_id"] for r in scored.values()} == {worker}
        assert {r["version"] for r in reg.leaderboard(top=100)} == set(scored)
        assert any(r["run_id"] == reg.run_id for r in leaderboard(client, top=1000))
        # checkpoints in the file:// run directory; the Redis password stored nowhere
        run_dir = tmp_path / "runs" / cfg.run_name
        assert (run_dir / "checkpoints" / "params_00000020.ckpt").is_file()
        assert json.loads((run_dir / "summary.json").read_text())["checkpoints_scored"] >= 4
        assert PASSWORD not in json.dumps(reg.manifest())
    finally:
        redis_srv.stop()
