"""Inner-step throughput of the meta-gradient estimators, relative to plain Adam training.

Measures inner steps per second of

- PES with the per-parameter MLP learned optimizer (registry name ``mlp``) at truncation 50 with
  1, 4 and 8 vmapped inner problems, counting the steps of the ``+`` and ``−`` runs separately
  (one truncation = ``2 · 50 · N`` inner steps);
- truncated backprop with the same optimizer at truncation 20 with 1 and 8 problems;
- plain Adam (optax) training one problem, in the same run: the ratios are estimator throughput
  over Adam throughput.

The inner problem is an MLP 64-32-10 (ReLU) on scikit-learn's digits, batch 128. Each
configuration is compiled by a warm-up call, then the best of ``--repeats`` timed blocks of
``compute_gradient_estimate`` calls (each block ``block_until_ready``-ed) is kept; the estimators
run with the worker state carried from call to call, as a worker does. Reference figures measured
for learned_optimization on the machine of the issue are recorded beside ours.

    python benchmarks/estimator_throughput.py --out benchmarks/results/estimator_throughput.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import jax
import optax

from l2o.estimators import PES, TruncatedBackprop, TruncatedStep
from l2o.optimizers.registry import make_learned_optimizer
from l2o.tasks.registry import make_task_family

#: learned_optimization on the issue's machine (inner steps/s), for comparison
REFERENCE = {"pes_trunc50": {"1": 2105, "4": 2962, "8": 3254},
             "tbptt_trunc20": {"1": 408, "8": 458}}


def _time_blocks(fn, repeats: int, min_block_s: float) -> tuple[float, int]:
    """Best seconds per call of ``fn`` over ``repeats`` blocks lasting at least ``min_block_s``."""
    fn()  # compile / warm up
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-6)
    calls = max(1, int(min_block_s / one))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best, calls


def bench_estimator(est, theta, repeats: int, min_block_s: float, steps_per_call: int
                    ) -> dict[str, Any]:
    """Inner steps per second of ``est`` carrying its worker state between calls."""
    holder = {"ws": est.init_worker_state(theta, jax.random.PRNGKey(0)), "i": 0}

    def call():
        holder["i"] += 1
        g, holder["ws"], m = est.compute_gradient_estimate(theta, holder["ws"],
                                                           jax.random.PRNGKey(holder["i"]))
        jax.block_until_ready(g)

    t_compile = time.perf_counter()
    call()
    t_compile = time.perf_counter() - t_compile
    sec, calls = _time_blocks(call, repeats, min_block_s)
    return {"inner_steps_per_s": steps_per_call / sec, "s_per_truncation": sec,
            "inner_steps_per_truncation": steps_per_call, "calls_per_block": calls,
            "first_call_s": t_compile}


def bench_adam(family, steps: int, repeats: int, min_block_s: float) -> dict[str, Any]:
    """Steps per second of optax Adam training one problem (a ``lax.scan`` of ``steps``)."""
    task = family.task(family.sample(jax.random.PRNGKey(0)))
    tx = optax.adam(1e-3)

    @functools.partial(jax.jit, donate_argnums=(0,))
    def run(carry, key):
        def body(c, k):
            params, opt_state = c
            loss, grads = jax.value_and_grad(task.loss)(params, task.sample_batch(k))
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        return jax.lax.scan(body, carry, jax.random.split(key, steps))

    params = task.init(jax.random.PRNGKey(1))
    holder = {"c": (params, tx.init(params)), "i": 0}

    def call():
        holder["i"] += 1
        holder["c"], losses = run(holder["c"], jax.random.PRNGKey(holder["i"]))
        jax.block_until_ready(losses)

    sec, calls = _time_blocks(call, repeats, min_block_s)
    return {"inner_steps_per_s": steps / sec, "steps_per_call": steps, "calls_per_block": calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="mlp", help="learned optimizer registry name")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-block-s", type=float, default=0.4)
    parser.add_argument("--pes-tasks", default="1,4,8")
    parser.add_argument("--tbptt-tasks", default="1,8")
    parser.add_argument("--out", default="benchmarks/results/estimator_throughput.json")
    args = parser.parse_args()

    family = make_task_family("digits_mlp_relu", hidden_sizes=(32,), batch_size=128)
    lopt = make_learned_optimizer(args.optimizer)
    theta = lopt.init(jax.random.PRNGKey(0))
    ts = TruncatedStep(family=family, learned_opt=lopt, num_steps=1000)
    results: dict[str, Any] = {"pes_trunc50": {}, "tbptt_trunc20": {}}

    adam_before = bench_adam(family, 50, args.repeats, args.min_block_s)
    for n in [int(x) for x in args.pes_tasks.split(",") if x]:
        est = PES(ts, num_tasks=n, unroll_length=50, std=0.01)
        results["pes_trunc50"][str(n)] = bench_estimator(est, theta, args.repeats,
                                                         args.min_block_s, 2 * 50 * n)
        print(f"PES  K=50 N={n}: {results['pes_trunc50'][str(n)]['inner_steps_per_s']:.0f} "
              "inner steps/s", flush=True)
    for n in [int(x) for x in args.tbptt_tasks.split(",") if x]:
        est = TruncatedBackprop(ts, num_tasks=n, unroll_length=20)
        results["tbptt_trunc20"][str(n)] = bench_estimator(est, theta, args.repeats,
                                                           args.min_block_s, 20 * n)
        print(f"TBPTT K=20 N={n}: {results['tbptt_trunc20'][str(n)]['inner_steps_per_s']:.0f} "
              "inner steps/s", flush=True)
    adam_after = bench_adam(family, 50, args.repeats, args.min_block_s)
    adam = max(adam_before["inner_steps_per_s"], adam_after["inner_steps_per_s"])
    print(f"Adam: {adam:.0f} steps/s", flush=True)
    for group in results.values():
        for entry in group.values():
            entry["ratio_to_adam"] = entry["inner_steps_per_s"] / adam
    for name, ref in REFERENCE.items():
        for n, value in ref.items():
            if n in results[name]:
                results[name][n]["learned_optimization"] = value
                results[name][n]["speedup_vs_learned_optimization"] = (
                    results[name][n]["inner_steps_per_s"] / value)

    out = {
        "benchmark": "estimator_throughput",
        "task": "digits MLP 64-32-10 relu, batch 128",
        "optimizer": args.optimizer,
        "adam_steps_per_s": adam,
        "adam_runs": [adam_before, adam_after],
        **results,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "jax": jax.__version__, "backend": jax.default_backend(),
                    "load_avg": os.getloadavg()},
        "repeats": args.repeats,
        "min_block_s": args.min_block_s,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
