"""PBT vs random search vs the single default config, on one fixed total budget of meta-updates.

For each task preset (``l2l-quadratic`` and ``l2l-digits`` by default) three experiments go through
``services.tune.run_tune`` exactly as ``l2o tune`` does (local Ray, embedded Redis, a learner and
one unroll worker per trial, each checkpoint scored on the preset's eval task against tuned Adam):

- ``pbt``: a population of ``--population`` trials, PBT over the meta learning rate and the
  truncation length, ``--updates`` meta-updates per trial;
- ``random``: the same population and search space, no scheduler (random search);
- ``default``: one trial with the preset's own hyperparameters and ``population × updates``
  meta-updates, so all three spend the same total budget.

Each row is the best validation score the experiment reached (learned / tuned-Adam final loss on
the eval task, lower is better), the number of PBT exploits and the wall time. Evaluation is cut
down (``--eval-steps``, 3 seeds) so that the whole benchmark fits a few minutes per experiment.

    python benchmarks/tune_search.py [--population 3] [--updates 12] [--interval 4]
                                     [--presets l2l-quadratic l2l-digits] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SPACE = {"meta_optimizer.learning_rate": {"kind": "loguniform", "low": 1e-3, "high": 1e-1},
         "estimator.unroll_length": {"kind": "uniform", "low": 5, "high": 25}}


def experiment_config(preset_name: str, arm: str, args: argparse.Namespace,
                      run_dir: str) -> Any:
    """The config of one arm (``pbt``, ``random`` or ``default``) on ``preset_name``."""
    from l2o.io.config import config_from_dict, deep_merge, preset

    base = preset(preset_name).model_dump(mode="json")
    population = 1 if arm == "default" else args.population
    updates = args.population * args.updates if arm == "default" else args.updates
    space = SPACE if arm != "default" else {
        key: {"kind": "choice", "values": [_get(base, key)]} for key in SPACE}
    data = deep_merge(base, {
        "run_name": f"{preset_name}-{arm}", "run_dir": run_dir, "seed": args.seed,
        "estimator": {"num_tasks": min(16, base["estimator"].get("num_tasks", 16))},
        "eval": {"steps": args.eval_steps, "seeds": 3, "adam_steps_factor": 2,
                 "adam_learning_rates": [1e-3, 1e-2, 3e-2, 1e-1, 3e-1]},
        "service": {"num_unroll_workers": 1, "worker_num_cpus": 0.5},
        "tune": {"scheduler": "pbt" if arm == "pbt" else "none", "population": population,
                 "perturbation_interval": args.interval, "max_updates_per_trial": updates,
                 "quantile_fraction": 0.34 if population >= 3 else 0.5, "seed": args.seed,
                 "search_space": space}})
    return config_from_dict(data, f"{preset_name}/{arm}")


def _get(data: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        data = data[part]
    return data


def run_arm(preset_name: str, arm: str, args: argparse.Namespace, run_dir: str
            ) -> dict[str, Any]:
    """One experiment; its best score, exploits and wall time."""
    from services.tune import run_tune

    cfg = experiment_config(preset_name, arm, args, run_dir)
    t0 = time.monotonic()
    summary = run_tune(cfg, verbose=0)
    return {"preset": preset_name, "arm": arm, "population": cfg.tune.population,
            "updates_per_trial": cfg.tune.max_updates_per_trial,
            "total_updates": sum(r["meta_updates"] for r in summary["trials"]),
            "best_score": summary["best_score"], "best_hparams": summary["best_hparams"],
            "exploits": summary["exploits"], "wall_s": round(time.monotonic() - t0, 1)}


def main() -> int:
    """Run every arm on every preset; print a table, write JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["l2l-quadratic", "l2l-digits"])
    p.add_argument("--population", type=int, default=3)
    p.add_argument("--updates", type=int, default=12, help="meta-updates per PBT/random trial")
    p.add_argument("--interval", type=int, default=4)
    p.add_argument("--eval-steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" /
                   "tune_search.json")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as run_dir:
        for name in args.presets:
            for arm in ("pbt", "random", "default"):
                rows.append(run_arm(name, arm, args, run_dir))
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'preset':16} {'arm':8} {'best score':>10} {'exploits':>8} {'updates':>8} "
          f"{'wall s':>7}")
    for r in rows:
        print(f"{r['preset']:16} {r['arm']:8} {r['best_score']:10.4f} {r['exploits']:8d} "
              f"{r['total_updates']:8d} {r['wall_s']:7.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "tune_search", "host": platform.node(), "cpus": os.cpu_count(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows},
        indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
