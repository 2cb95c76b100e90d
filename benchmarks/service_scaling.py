"""Meta-updates per second of the real service with 1 and 2 unroll workers (scaling ratio).

Each run goes through ``services.train.run_service`` exactly as ``l2o train`` does: local Ray,
embedded Redis, the gRPC learner actor and N ``UnrollWorker`` actors, on the same config: the
``l2l-quadratic`` preset (its truncations are large enough that the workers, not the learner,
set the pace), without eval workers or a final evaluation. The rate is measured in steady state,
from the first poll at or past ``--warmup`` updates to the last poll, so actor start-up and
compilation are left out (a persistent JAX compilation cache shared by all actors keeps the
second run from recompiling). ``scaling = rate(2 workers) / rate(1 worker)``; with
``batch_size = 1`` the ideal is 2, bounded by the cores available (this host's count is recorded)
and by stale drops.

    python benchmarks/service_scaling.py [--updates 120] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def bench_config(workers: int, updates: int, run_dir: str) -> dict[str, Any]:
    """The ``l2l-quadratic`` preset (128 quadratics, truncations of 20 steps) as a service run
    with ``workers`` unroll workers, no eval workers and no checkpoints along the way."""
    from l2o.io.config import deep_merge, preset

    base = preset("l2l-quadratic").model_dump(mode="json")
    return deep_merge(base, {
        "run_name": f"scaling-{workers}w-{uuid.uuid4().hex[:6]}",
        "run_dir": run_dir,
        "meta_steps": updates,
        "log_every": 10,
        "checkpoint_every": 100_000,
        "service": {"num_unroll_workers": workers, "num_eval_workers": 0, "batch_size": 1,
                    "max_staleness": 2, "worker_num_cpus": 1.0},
    })


def measure(workers: int, updates: int, warmup: int, run_dir: str) -> dict[str, Any]:
    """One run; its steady-state meta-updates per second and counters."""
    from l2o.io.config import config_from_dict
    from services.train import run_service

    cfg = config_from_dict(bench_config(workers, updates, run_dir))
    polls: list[tuple[float, int]] = []

    def progress(st: dict[str, Any]) -> None:
        polls.append((time.monotonic(), int(st["updates"])))

    summary = run_service(cfg, progress=progress, final_eval=False, poll_s=0.05)
    steady = [(t, u) for t, u in polls if u >= warmup]
    if len(steady) >= 2 and steady[-1][0] > steady[0][0]:
        rate = (steady[-1][1] - steady[0][1]) / (steady[-1][0] - steady[0][0])
        window = (steady[-1][1] - steady[0][1], steady[-1][0] - steady[0][0])
    else:
        rate, window = float("nan"), (0, 0.0)
    return {
        "workers": workers,
        "updates_per_second": rate,
        "measured_updates": window[0],
        "measured_seconds": round(window[1], 3),
        "updates": summary["updates"],
        "gradients_accepted": summary["gradients_accepted"],
        "gradients_dropped_stale": summary["gradients_dropped_stale"],
        "gradients_rejected": summary["gradients_rejected"],
        "wall_seconds": summary["wall_seconds"],
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--updates", type=int, default=120, help="meta-updates per run")
    p.add_argument("--warmup", type=int, default=20, help="updates left out of the rate")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/service_scaling.json")
    args = p.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix="l2o-scaling-")
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tmp, "jax_cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    import ray

    cpus = os.cpu_count() or 1
    ray.init(num_cpus=max(cpus, 3), include_dashboard=False, logging_level="WARNING")
    try:
        runs = [measure(w, args.updates, args.warmup, os.path.join(tmp, "runs"))
                for w in (1, 2)]
    finally:
        ray.shutdown()
    r1, r2 = runs[0]["updates_per_second"], runs[1]["updates_per_second"]
    result = {
        "benchmark": "service_scaling",
        "config": {"preset": "l2l-quadratic", **bench_config(0, args.updates, "")["estimator"]},
        "runs": runs,
        "scaling_ratio": r2 / r1 if r1 and r1 == r1 else float("nan"),
        "host": {"cpus": cpus, "platform": platform.platform(), "python": sys.version.split()[0]},
        "note": "steady-state meta-updates/s through the real service (local Ray, gRPC, Redis); "
                "workers get 1 logical CPU each; on a host with fewer cores than workers + "
                "learner the ratio is bounded by the cores, not the service.",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for r in runs:
        print(f"{r['workers']} worker(s): {r['updates_per_second']:.2f} meta-updates/s "
              f"({r['measured_updates']} updates in {r['measured_seconds']} s; "
              f"{r['gradients_dropped_stale']} stale drops)")
    print(f"scaling ratio (2 vs 1): {result['scaling_ratio']:.2f}  -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
