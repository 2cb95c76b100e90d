"""The learner service: ``python -m learner --config FILE`` or a Ray actor, same code.

:class:`LearnerProcess` builds θ (``l2o.training.build``: the configured learned optimizer's
``init(theta_key(seed))``) and the meta-optimizer, resumes from the newest full checkpoint in the
run directory if there is one, and serves it over gRPC (``learner.server.serve``).

As a process::

    python -m learner --config configs/quadratic.yaml [--run-dir DIR] [--port N]

prints ``learner serving run RUN at HOST:PORT`` and runs until SIGTERM or SIGINT, then writes a
checkpoint and exits 0; a learner that stopped the run (``service.max_failed_updates``
meta-updates in a row failed) prints the error, checkpoints and exits 1. As a Ray actor
(``LearnerActor`` is ``ray.remote(LearnerProcess)``)::

    actor = learner_actor(num_cpus=1, max_restarts=-1).remote(cfg, run_dir, token=token,
                                                              autostart=True)
    address = ray.get(actor.address.remote())

The bearer token comes from ``token=``, else ``$L2O_TOKEN`` (``service.token_env``) or
``service.token_file``; if none is set, a random one is written to ``RUN_DIR/token`` (mode 0600).
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from l2o.io.checkpoints import CheckpointError
from l2o.io.config import ConfigError, TrainConfig, config_from_dict, load_config
from l2o.io.secrets import SecretFile, reveal
from l2o.io.storage import as_path
from learner.server import format_address, serve
from services.auth import TokenError, load_token

log = logging.getLogger(__name__)


#: ``service.host`` value that binds every interface and advertises the node's IP
AUTO_HOST = "auto"


def _bind_host(host: str) -> str:
    """The address to listen on for ``service.host`` (``auto``: every interface)."""
    return "0.0.0.0" if host == AUTO_HOST else host


def _advertised_host(host: str) -> str:
    """The address workers reach a learner listening on ``host`` at: the node IP Ray reports
    (else this host's name resolved) for every interface, the host itself otherwise."""
    if _bind_host(host) not in ("0.0.0.0", "::", "[::]", ""):
        return host
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:
        pass
    return socket.gethostbyname(socket.gethostname())


class LearnerProcess:
    """One run's learner and its gRPC server.

    Args:
        config: the run config (a :class:`TrainConfig`, a dict of one, or a YAML path).
        run_dir: the run directory (default ``config.run_path()``): a local path or a storage
            URL (``s3://…``) for the checkpoints.
        local_dir: the local directory of the applied log and TensorBoard logs (default
            ``config.local_path()`` for the config's own run directory, else ``run_dir``).
        run_id: the run id gradients must carry (default ``config.run_name``).
        host, port: where to listen (default ``config.service.host``/``port``; port 0: any;
            host ``auto``: every interface, advertised at the node IP Ray reports).
        token: the bearer token, or the :class:`~l2o.io.secrets.SecretFile` holding it (default:
            from the config's env var or file, else generated).
        theta: θ to start from instead of building it from ``config.optimizer``.
        on_params_checkpoint: called as ``f(path, version)`` after each params checkpoint.
        on_address: called with ``host:port`` once the server listens (e.g. to register it).
        autostart: start serving in the constructor (so a restarted Ray actor serves again). A
            :class:`~l2o.io.checkpoints.CheckpointError` there (no intact checkpoint to resume
            from) is raised by :meth:`address` instead, so a Ray driver gets it as itself, not
            as a dead actor's traceback.
        allow_no_token: serve without authentication when there is no token (tests only).
    """

    def __init__(self, config: TrainConfig | dict | str | os.PathLike,
                 run_dir: str | os.PathLike | None = None, *, run_id: str | None = None,
                 host: str | None = None, port: int | None = None,
                 token: str | SecretFile | None = None,
                 theta: Any = None,
                 on_params_checkpoint: Callable[[Path, int], None] | None = None,
                 on_address: Callable[[str], None] | None = None,
                 autostart: bool = False, allow_no_token: bool = False,
                 max_workers: int | None = None, local_dir: str | os.PathLike | None = None):
        if isinstance(config, TrainConfig):
            self.config = config
        elif isinstance(config, dict):
            self.config = config_from_dict(config)
        else:
            self.config = load_config(config)
        svc = self.config.service
        self.run_dir = as_path(run_dir) if run_dir is not None else self.config.run_path()
        self.local_dir = Path(local_dir) if local_dir is not None else (
            self.config.local_path() if run_dir is None else self.run_dir)
        self.run_id = run_id or self.config.run_name
        self.host = host if host is not None else svc.host
        self.port = port if port is not None else svc.port
        self.token_path: Path | None = None
        self.token = reveal(token) or load_token(svc.token_env, svc.token_file)
        if self.token is None and not allow_no_token:
            self.token = secrets.token_urlsafe(32)
            self.local_dir.mkdir(parents=True, exist_ok=True)
            self.token_path = self.local_dir / "token"
            fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(self.token + "\n")
        self._theta = theta
        self.on_params_checkpoint = on_params_checkpoint
        self.on_address = on_address
        self.allow_no_token = allow_no_token
        self.max_workers = max_workers
        self.learner: Any = None
        self.server: Any = None
        self._address: str | None = None
        if autostart:
            try:
                self.start()
            except CheckpointError as e:
                log.error("the learner cannot resume: %s", e)

    def _build(self) -> Any:
        import jax  # noqa: F401  (imported here so that a Ray actor imports JAX in the worker)

        from l2o.training.build import (
            learned_optimizer_from_config,
            meta_optimizer_from_config,
            theta_key,
        )
        from learner.core import Learner

        cfg = self.config
        theta = self._theta
        if theta is None:
            theta = learned_optimizer_from_config(cfg.optimizer).init(theta_key(cfg.seed))
        return Learner.resume(
            theta, meta_optimizer_from_config(cfg.meta_optimizer), cfg.service, self.run_dir,
            self.run_id, cfg.checkpoint_every, self.on_params_checkpoint,
            {"optimizer": cfg.optimizer.model_dump(mode="json"), "seed": cfg.seed,
             "config": cfg.model_dump(mode="json")},
            local_dir=self.local_dir,
        )

    def start(self) -> str:
        """Build or resume the learner and serve it; the address workers should use."""
        if self._address is not None:
            return self._address
        self.learner = self._build()
        svc = self.config.service
        self.server, port = serve(self.learner, _bind_host(self.host), self.port, self.token,
                                  svc.tls_cert, svc.tls_key, self.max_workers,
                                  allow_no_token=self.allow_no_token)
        self._address = format_address(_advertised_host(self.host), port)
        if self.on_address is not None:
            self.on_address(self._address)
        return self._address

    def address(self) -> str:
        """``host:port`` of the server (starting it if needed)."""
        return self.start()

    def node_id(self) -> str | None:
        """The id of the Ray node this learner runs on (``None`` outside Ray)."""
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None

    def placement_group_id(self) -> str | None:
        """The Ray placement group this learner was scheduled in (``None`` outside one)."""
        from workers.ray_setup import node_of_this_process

        return node_of_this_process()["placement_group_id"]

    def status(self) -> dict[str, Any]:
        """The learner's figures (see :meth:`learner.core.Learner.status`)."""
        if self.learner is None:
            raise RuntimeError("the learner has not started")
        return self.learner.status()

    def checkpoint(self) -> str:
        """Write full and params checkpoints now; the params checkpoint's path."""
        if self.learner is None:
            raise RuntimeError("the learner has not started")
        return str(self.learner.save_checkpoint()[1])

    def restore_theta(self, path: str, version: int | None = None) -> dict[str, Any]:
        """Adopt the θ of the params checkpoint at ``path`` as a new generation (the curriculum's
        restore of a stage's best, :class:`l2o.training.curriculum.ServiceCurriculum`): version and
        ``gen_id`` go up, buffered gradients are dropped, the meta-optimizer state is fresh. A
        full checkpoint (a population exploit's donor, ``services.tune``) brings its θ *and* its
        meta-optimizer state. ``version``: the θ version the file must hold. The new θ is
        checkpointed at once. Returns ``{"version", "gen_id", "checkpoint"}`` (the new version
        and its params checkpoint)."""
        from l2o.io.checkpoints import load_checkpoint, read_checkpoint

        if self.learner is None:
            raise RuntimeError("the learner has not started")
        _, _, template = self.learner.snapshot()
        opt_state = None
        if read_checkpoint(path)[1].get("kind") == "full":
            tree, meta = load_checkpoint(path, {"theta": template,
                                                "opt_state": self.learner.opt_state})
            tree, opt_state = tree["theta"], tree["opt_state"]
        else:
            tree, meta = load_checkpoint(path, template)
        if version is not None and int(meta.get("version", -1)) != int(version):
            raise CheckpointError(f"{path} holds θ version {meta.get('version')}, not {version}")
        gen_id = self.learner.new_generation(tree, opt_state)
        # checkpoint it at once: a restarted learner resumes from the restored θ
        _, params_path = self.learner.save_checkpoint()
        return {"version": int(read_checkpoint(params_path)[1]["version"]), "gen_id": gen_id,
                "checkpoint": str(params_path)}

    def stop(self, checkpoint: bool = True, grace: float = 2.0) -> dict[str, Any]:
        """Stop serving, stop the learner (checkpointing unless told not to); its final status."""
        if self.server is not None:
            self.server.stop(grace).wait()
            self.server = None
        status: dict[str, Any] = {}
        if self.learner is not None:
            self.learner.stop(checkpoint=checkpoint)
            status = self.learner.status()
        self._address = None
        return status


def learner_actor(**ray_options: Any) -> Any:
    """The Ray actor class of :class:`LearnerProcess` (``ray.remote(**ray_options)`` applied).

    Pass ``max_restarts=-1`` with ``autostart=True`` in the constructor arguments for a learner
    that Ray restarts and that resumes from its run directory by itself.
    """
    import ray

    return ray.remote(**ray_options)(LearnerProcess) if ray_options else ray.remote(LearnerProcess)


def __getattr__(name: str) -> Any:
    """``LearnerActor``: ``ray.remote(LearnerProcess)``, made on first use (Ray imported lazily)."""
    if name == "LearnerActor":
        return learner_actor()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: list[str] | None = None) -> int:
    """The ``python -m learner`` entry point."""
    parser = argparse.ArgumentParser(prog="python -m learner", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the run's YAML config")
    parser.add_argument("--run-dir", help="run directory (default: run_dir/run_name)")
    parser.add_argument("--run-id", help="run id (default: run_name)")
    parser.add_argument("--host", help="listen address (default: service.host)")
    parser.add_argument("--port", type=int, help="port (default: service.port; 0: any)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        proc = LearnerProcess(args.config, args.run_dir, run_id=args.run_id, host=args.host,
                              port=args.port)
        address = proc.start()
    except (ConfigError, CheckpointError, TokenError, ValueError, RuntimeError,
            FileNotFoundError) as e:  # FileNotFoundError: a TLS file
        print(f"error: {e}", file=sys.stderr)
        return 2
    learner = proc.learner
    if learner.resumed_from is not None:
        print(f"resumed from {learner.resumed_from} at version {learner.version}", flush=True)
    if proc.token_path is not None:
        print(f"generated a bearer token in {proc.token_path}", flush=True)
    print(f"learner serving run {proc.run_id} at {address}", flush=True)
    while not stop.wait(1.0) and not learner.fatal_error:
        pass
    status = proc.stop(checkpoint=True)
    print(f"learner stopped at version {status.get('version')}, checkpoint written", flush=True)
    if status.get("fatal_error"):
        print(f"error: {status['fatal_error']}", file=sys.stderr)
        return 1
    return 0

