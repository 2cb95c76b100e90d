"""Meta-training throughput: inner steps per second of L2L + truncated backprop on digits MLPs.

For each number of vmapped inner problems, one meta-step is a truncation of ``--unroll`` inner
steps on every problem, the TBPTT meta-gradient through the LSTM, and the Adam update of θ —
exactly what ``l2o train`` runs (:func:`l2o.training.trainer.meta_step`). The baseline, measured in
the same
run on the same problems, is plain inner training with Adam (no meta-gradient): the ratio is what
meta-training costs per inner step relative to ordinary training.

    python benchmarks/meta_throughput.py --tasks 1 2 4 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
from rich.console import Console
from rich.table import Table

from l2o.estimators import TruncatedBackprop, TruncatedStep
from l2o.io.config import MetaOptimizerConfig, TaskConfig
from l2o.optimizers import adam
from l2o.optimizers.lstm import LSTMLearnedOptimizer
from l2o.training.build import meta_optimizer_from_config, task_family_from_config
from l2o.training.trainer import init_meta_state, meta_step


def _best_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # warm-up: compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def measure(num_tasks: int, unroll: int, calls: int, repeats: int) -> dict[str, float]:
    """Inner steps/s of LSTM meta-training and of plain Adam training on ``num_tasks`` problems."""
    family = task_family_from_config(TaskConfig(name="digits_mlp"))
    meta_tx = meta_optimizer_from_config(MetaOptimizerConfig())
    results = {}
    for label, lopt in (("l2l_tbptt", LSTMLearnedOptimizer()), ("adam_inner", adam(1e-2))):
        est = TruncatedBackprop(TruncatedStep(family, lopt, num_steps=100),
                                num_tasks=num_tasks, unroll_length=unroll)
        state = init_meta_state(lopt.init(jax.random.PRNGKey(0)), meta_tx)
        ws = est.init_worker_state(state.theta, jax.random.PRNGKey(1))
        if label == "l2l_tbptt":
            def run(state=state, ws=ws, est=est):
                s, w = state, ws
                for i in range(calls):
                    s, w, _ = meta_step(est, meta_tx, s, w, jax.random.PRNGKey(i))
                return s
        else:
            unroll_fn = jax.jit(lambda est, th, w, k: est.truncated_step.unroll(
                th, w, k, est.unroll_length))

            def run(state=state, ws=ws, est=est, unroll_fn=unroll_fn):
                w = ws
                for i in range(calls):
                    w, _ = unroll_fn(est, state.theta, w, jax.random.PRNGKey(i))
                return w
        seconds = _best_seconds(run, repeats)
        results[label] = calls * unroll * num_tasks / seconds
    results["ratio_adam_over_l2l"] = results["adam_inner"] / results["l2l_tbptt"]
    return results


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print a table, write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--unroll", type=int, default=20)
    ap.add_argument("--calls", type=int, default=10, help="meta-steps per timed call")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/meta_throughput.json")
    args = ap.parse_args(argv)
    rows = []
    table = Table("vmapped problems", "L2L+TBPTT inner steps/s", "Adam inner steps/s",
                  "Adam / L2L", title="meta-training throughput, digits MLP 64-20-10")
    for n in args.tasks:
        r = measure(n, args.unroll, args.calls, args.repeats)
        rows.append({"num_tasks": n, **r})
        table.add_row(str(n), f"{r['l2l_tbptt']:.0f}", f"{r['adam_inner']:.0f}",
                      f"{r['ratio_adam_over_l2l']:.1f}x")
    Console().print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "meta_throughput", "unroll_length": args.unroll,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "jax": jax.__version__, "backend": jax.default_backend()},
        "results": rows}, indent=2))
    Console().print(f"wrote {out}")


if __name__ == "__main__":
    main()
