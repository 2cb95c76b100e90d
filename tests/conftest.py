"""Suite-wide set-up: one JAX compilation cache shared by every process of a test run.

Many tests compile the same programs (the same tiny presets, in the test process, in Ray
actors and in learner subprocesses). JAX's persistent compilation cache lets each program be
compiled once per test run instead of once per process. The cache lives in a fresh directory per
run, so a run never reads programs compiled by an earlier one. The first process of the run (the
pytest-xdist controller, or pytest alone) makes it and sets the variables before JAX is imported;
child processes (the xdist workers, Ray's raylet and its actors, ``python -m learner``) inherit
them, and the process that made it removes it at the end.

``make test`` runs two pytest-xdist workers that take whole files (``--dist loadfile``).
pytest-xdist hands the files out with the most tests first (its ``loadscope`` reordering), not in
collection order, so the order of the files here does not matter.
"""

from __future__ import annotations

import os
import shutil
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="l2o-test-jax-cache-")
    # programs that took at least this long to compile are cached
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
    # a size limit turns on JAX's file lock, so two processes never read a half-written entry
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
    _OWNED_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]
else:
    _OWNED_CACHE = None


def pytest_sessionfinish(session, exitstatus):
    """Remove this run's cache, from the process that made it."""
    if _OWNED_CACHE:
        shutil.rmtree(_OWNED_CACHE, ignore_errors=True)
