"""Ray set-up shared by the driver (``services.train``) and the actor factories of ``workers``.

Connecting the driver to Ray (:func:`connect_ray`), whether it is a submitted job
(:func:`submitted_job_id`) and where such a job may keep its results
(:func:`job_run_dir_problem`), naming actors (:func:`actor_name`), sizing them, placing them and
sizing their JAX (:func:`actor_options`, :func:`jax_env`), whether the job ships its code to the
actors (:func:`ships_code`), and where a process runs and computes
(:func:`node_of_this_process`, :func:`placement`). Ray is imported only when a function needs it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

_REPO_ROOT = str(Path(__file__).resolve().parents[1])


def connect_ray(min_cpus: float, address: str | None = None) -> bool:
    """Connect to (or start) Ray for actors that need ``min_cpus`` logical CPUs in all; whether
    this call started a local instance.

    ``address`` or ``$RAY_ADDRESS`` selects a cluster (``"auto"``: the local ``ray start``
    cluster); otherwise a private local instance with at least ``min_cpus`` logical CPUs is
    started. A Ray instance that another driver started with ``ray.init()`` is never joined
    implicitly: it goes away when that driver ends, taking this run's actors with it. One already
    initialized in this process is used as is.
    """
    import ray

    if ray.is_initialized():
        return False
    addr = address or os.environ.get("RAY_ADDRESS")
    if addr:
        ray.init(address=addr, logging_level=logging.WARNING)
        return False
    cpus = max(os.cpu_count() or 1, math.ceil(min_cpus))
    gpus = None
    ray.init(address="local", num_cpus=cpus, num_gpus=gpus, include_dashboard=False,
             logging_level=logging.WARNING)
    return True


#: Set by Ray's job supervisor for the entrypoint of a ``ray job submit`` job: its runtime env
#: and metadata, as JSON.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def submitted_job_id() -> str | None:
    """The submission id when this process is the entrypoint of a ``ray job submit`` job, else
    None (read from the environment Ray's job supervisor gives the entrypoint)."""
    try:
        metadata = json.loads(os.environ.get(JOB_CONFIG_ENV) or "{}").get("metadata") or {}
        return metadata.get("job_submission_id")
    except (ValueError, AttributeError):  # not JSON, or not the supervisor's objects
        return None


def job_run_dir_problem(run_dir: str) -> str | None:
    """Why ``run_dir`` cannot hold the results of this process, or None.

    A job sent with ``ray job submit`` runs in a directory Ray chooses (with ``--working-dir``,
    an unpacked copy of it in Ray's session folder, shared by every job from the same tree), so
    a relative run directory would hide the run's summary, checkpoints and plots there. Such a job
    needs an absolute ``run_dir`` (or a storage URI).
    """
    job = submitted_job_id()
    if job is None or "://" in run_dir or Path(run_dir).is_absolute():
        return None
    return (f"run_dir: {run_dir!r} is relative, and this is Ray job {job}, running in "
            f"{Path.cwd()} (a directory Ray chose): give an absolute --run-dir on storage you "
            "can read (on a cluster of several nodes, one every node shares)")


def ships_code() -> bool:
    """Whether the Ray job ships this code to its workers (``--working-dir`` / ``py_modules``)."""
    import ray

    try:
        env = ray.get_runtime_context().runtime_env or {}
    except Exception:  # noqa: BLE001 - old Ray or no context: assume not
        return False
    return bool(env.get("working_dir") or env.get("py_modules"))


def actor_name(run_id: str, role: str) -> str:
    """The Ray actor name of ``role`` (``learner``, ``unroll-0``, ``eval-1``…) in run ``run_id``."""
    return f"l2o:{run_id}:{role}"


def jax_env(num_cpus: float, num_gpus: float = 0.0) -> dict[str, str]:
    """Environment variables that size JAX/XLA to an actor with ``num_cpus`` and ``num_gpus``.

    XLA's CPU thread pools get ``ceil(num_cpus)`` threads (so N actors on N cores do not
    oversubscribe them); with a fractional GPU (actors sharing a device) preallocation is off; with
    no GPU at all JAX is kept on the CPU. A persistent compilation cache set in the driver's
    environment (``JAX_COMPILATION_CACHE_DIR``) is shared with the actor.
    """
    threads = max(1, math.ceil(num_cpus))
    flags = os.environ.get("XLA_FLAGS", "")
    flags = " ".join(f for f in flags.split()
                     if "multi_thread_eigen" not in f and "intra_op_parallelism" not in f)
    extra = f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} " \
            f"intra_op_parallelism_threads={threads}"
    env = {
        "XLA_FLAGS": f"{flags} {extra}".strip(),
        "OMP_NUM_THREADS": str(threads),
        "OPENBLAS_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
    }
    for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                 "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"):
        if os.environ.get(name):  # share the driver's persistent compilation cache
            env[name] = os.environ[name]
    if num_gpus <= 0:
        env["JAX_PLATFORMS"] = os.environ.get("L2O_WORKER_JAX_PLATFORMS", "cpu")
    if num_gpus < 1:  # a share of a GPU (or none): never grab most of a device's memory
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    return env


#: The service's own settings (timeouts and deadlines; no secrets) passed on from the driver's
#: environment to every actor.
SERVICE_ENV = ("L2O_RPC_TIMEOUT_S", "L2O_REDIS_CONNECT_TIMEOUT_S", "L2O_REDIS_SOCKET_TIMEOUT_S",
               "L2O_REDIS_OUTAGE_S")


def actor_options(num_cpus: float, num_gpus: float = 0.0, *,
                  add_repo_to_path: bool = False, resources: dict[str, float] | None = None,
                  label_selector: dict[str, str] | None = None) -> dict[str, Any]:
    """``.options(...)`` for an l2o actor: resources plus a runtime env from :func:`jax_env`
    and the driver's :data:`SERVICE_ENV` settings.

    ``add_repo_to_path`` puts this checkout on the actor's ``PYTHONPATH`` (a local Ray started by
    the driver; on a cluster ``ray job submit --working-dir .`` ships the code instead).
    ``resources`` (custom Ray resources) and ``label_selector`` (node labels) place the actor
    (``service.placement`` of the config: :meth:`l2o.io.config.ServiceConfig.ray_options`).
    """
    env = {**jax_env(num_cpus, num_gpus),
           **{k: os.environ[k] for k in SERVICE_ENV if os.environ.get(k)}}
    if add_repo_to_path:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    opts: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus,
                            "runtime_env": {"env_vars": env}}
    if resources:
        opts["resources"] = dict(resources)
    if label_selector:
        opts["label_selector"] = dict(label_selector)
    return opts


def node_of_this_process() -> dict[str, str | None]:
    """The Ray node this process runs on: ``node_id``, ``node_ip`` and the
    ``placement_group_id`` it was scheduled in (``None`` outside Ray or a placement group)."""
    import ray

    if not ray.is_initialized():
        return {"node_id": None, "node_ip": None, "placement_group_id": None}
    context = ray.get_runtime_context()
    return {"node_id": context.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "placement_group_id": context.get_placement_group_id()}


def placement() -> dict[str, Any]:
    """Where this process computes: its Ray node (:func:`node_of_this_process`), JAX's backend
    and devices, and the GPUs Ray assigned it."""
    import jax
    import ray

    try:
        gpu_ids = [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []
    except Exception:  # noqa: BLE001 - outside a Ray worker
        gpu_ids = []
    return {**node_of_this_process(), "jax_backend": jax.default_backend(),
            "jax_devices": [str(d) for d in jax.devices()],
            "ray_gpu_ids": gpu_ids,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
