"""Per-step cost of the L2L LSTM optimizer versus optax Adam on MNIST-shaped MLPs.

One "step" is what inner training does each iteration: loss and gradient of the MLP on a batch of
128, then the optimizer update. ``steps`` of them run inside one jitted ``lax.scan``; each call is
timed with ``block_until_ready``, after a warm-up call, and the best of ``--repeats`` calls is kept.
The LSTM and Adam are timed in the same run, interleaved, so that both see the same machine load.
The JSON also records process CPU time per step (summed over threads), a steadier figure when the
machine is shared; the table reports wall-clock time.

    python benchmarks/step_cost.py --repeats 5 --out benchmarks/results/step_cost.json

The inner problems are :class:`l2o.tasks.mlp.MLPTask` (sigmoid) on random data shaped like MNIST
(28×28 inputs, 10 classes): the cost does not depend on the values.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from rich.console import Console
from rich.table import Table

from l2o.optimizers import adam
from l2o.optimizers.base import LearnedOptimizer
from l2o.optimizers.lstm import LSTMLearnedOptimizer
from l2o.tasks.datasets import Dataset, make_dataset
from l2o.tasks.mlp import MLPTask

SIZES: dict[str, tuple[int, ...]] = {"mlp-784-20-10": (20,), "mlp-784-128-128-10": (128, 128)}
BATCH = 128
NUM_EXAMPLES = 4096


def random_mnist(key: jax.Array, n: int = NUM_EXAMPLES) -> Dataset:
    """Random data shaped like MNIST: ``n`` 28×28×1 images in [0, 1], 10 classes."""
    kx, ky = jax.random.split(key)
    x = np.asarray(jax.random.uniform(kx, (n, 28, 28)))
    y = np.asarray(jax.random.randint(ky, (n,), 0, 10))
    return make_dataset(x, y, x[:256], y[:256], name="random_mnist", scale=1.0, num_classes=10)


def make_run(learned_opt: LearnedOptimizer, task: MLPTask, steps: int) -> Callable:
    """A jitted ``(state, theta, task, key) -> (state, losses)`` running ``steps`` inner steps."""

    def step(opt, task, state, key):
        batch = task.sample_batch(key)
        loss, grads = jax.value_and_grad(task.loss)(opt.params(state), batch)
        return opt.update(state, grads, loss=loss), loss

    @jax.jit
    def run(state, theta, task, key):
        opt = learned_opt.opt_fn(theta)
        return jax.lax.scan(lambda s, k: step(opt, task, s, k), state,
                            jax.random.split(key, steps))

    return run


def time_calls(fns: dict[str, tuple[Callable, Any]],
               repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process-CPU seconds per call of each ``fn(state, key)``, interleaved, after one
    warm-up call each."""
    states = {}
    for name, (fn, state) in fns.items():
        state, _ = fn(state, jax.random.PRNGKey(0))
        jax.block_until_ready(state)
        states[name] = state
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        for name, (fn, _) in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            states[name], losses = fn(states[name], jax.random.PRNGKey(r + 1))
            jax.block_until_ready((states[name], losses))
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


def _call(run: Callable, theta: Any, task: MLPTask, state: Any, key: jax.Array) -> Any:
    return run(state, theta, task, key)


def benchmark(repeats: int, steps: int) -> list[dict[str, Any]]:
    """Measure every MLP size; one result row per size."""
    rows = []
    kd, kp, kt = jax.random.split(jax.random.PRNGKey(0), 3)
    data = random_mnist(kd)
    optimizers: dict[str, LearnedOptimizer] = {"lstm": LSTMLearnedOptimizer(), "adam": adam(1e-3)}
    for size_name, hidden in SIZES.items():
        task = MLPTask(data=data, hidden_sizes=hidden, activation="sigmoid", batch_size=BATCH)
        params = task.init(kp)
        n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
        fns = {}
        for name, lopt in optimizers.items():
            theta = lopt.init(kt)
            run = make_run(lopt, task, steps)
            state = lopt.opt_fn(theta).init(params, num_steps=steps)
            fns[name] = (functools.partial(_call, run, theta, task), state)
        times, cpu = time_calls(fns, repeats)
        ms = {name: 1e3 * min(t) / steps for name, t in times.items()}
        rows.append({
            "problem": size_name,
            "num_params": int(n_params),
            "batch_size": BATCH,
            "steps_per_call": steps,
            "ms_per_step": ms,
            "all_ms_per_step": {n: [1e3 * x / steps for x in t] for n, t in times.items()},
            # process CPU time (all threads): less sensitive to other load on a shared machine
            "cpu_ms_per_step": {n: 1e3 * min(t) / steps for n, t in cpu.items()},
            "ratio_lstm_over_adam": ms["lstm"] / ms["adam"],
        })
    return rows


def write_result(out: Path, name: str, repeats: int, rows: list[dict[str, Any]]) -> None:
    """Write a step-cost benchmark's rows and the machine they ran on as JSON to ``out``."""
    result = {
        "benchmark": name,
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "repeats": repeats,
        "results": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per optimizer (best kept)")
    ap.add_argument("--steps", type=int, default=50, help="inner steps per jitted call")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/step_cost.json"))
    args = ap.parse_args(argv)

    rows = benchmark(args.repeats, args.steps)

    title = f"Per-step cost, batch {BATCH} (best of {args.repeats} × {args.steps} steps)"
    table = Table(title=title)
    for col in ("problem", "params", "LSTM ms/step", "Adam ms/step", "LSTM / Adam"):
        table.add_column(col, justify="left" if col == "problem" else "right")
    for r in rows:
        table.add_row(r["problem"], f"{r['num_params']:,}", f"{r['ms_per_step']['lstm']:.3f}",
                      f"{r['ms_per_step']['adam']:.3f}", f"{r['ratio_lstm_over_adam']:.1f}×")
    Console().print(table)

    write_result(args.out, "step_cost", args.repeats, rows)


if __name__ == "__main__":
    main()
