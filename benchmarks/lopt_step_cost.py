"""Per-step cost of the per-parameter MLP learned optimizers versus optax Adam.

Optimizers: ``mlp`` (:class:`~l2o.optimizers.mlp_lopt.MLPLOpt`), ``factored_mlp``, ``rnn_mlp``,
the L2L LSTM for reference, and optax Adam, all timed in the same run, interleaved, on the
784-20-10 and 784-128-128-10 sigmoid MLPs at batch 128 (random data shaped like MNIST). One step is
loss and gradient of the MLP plus the optimizer update; ``--steps`` of them run in one jitted
``lax.scan``; the best of ``--repeats`` calls is kept (helpers from ``benchmarks/step_cost.py``).

Also reported: optimizer state bytes per parameter, i.e. the bytes of the optimizer state minus
those of the parameters it holds, divided by the number of parameters.

    python benchmarks/lopt_step_cost.py --repeats 5 --out benchmarks/results/lopt_step_cost.json
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

import jax
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_cost import (  # noqa: E402
    BATCH,
    SIZES,
    _call,
    make_run,
    random_mnist,
    time_calls,
    write_result,
)

from l2o.optimizers import adam  # noqa: E402
from l2o.optimizers.base import LearnedOptimizer  # noqa: E402
from l2o.optimizers.factored_mlp import FactoredMLPLOpt  # noqa: E402
from l2o.optimizers.lstm import LSTMLearnedOptimizer  # noqa: E402
from l2o.optimizers.mlp_lopt import MLPLOpt  # noqa: E402
from l2o.optimizers.rnn_mlp import RNNMLPLOpt  # noqa: E402
from l2o.tasks.mlp import MLPTask  # noqa: E402

LEARNED = ("mlp", "factored_mlp", "rnn_mlp", "lstm")


def tree_bytes(tree: Any) -> int:
    """Total bytes of the array leaves of ``tree``."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))


def state_bytes_per_param(lopt: LearnedOptimizer, theta: Any, params: Any) -> float:
    """Bytes of optimizer state (excluding the parameters it holds) per parameter."""
    state = lopt.opt_fn(theta).init(params)
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    return (tree_bytes(state) - tree_bytes(state.params)) / n


def optimizers() -> dict[str, LearnedOptimizer]:
    """The optimizers compared, by name."""
    return {"mlp": MLPLOpt(), "factored_mlp": FactoredMLPLOpt(), "rnn_mlp": RNNMLPLOpt(),
            "lstm": LSTMLearnedOptimizer(), "adam": adam(1e-3)}


def benchmark(repeats: int, steps: int, names: tuple[str, ...] | None = None) -> list[dict]:
    """One result row per MLP size."""
    rows = []
    kd, kp, kt = jax.random.split(jax.random.PRNGKey(0), 3)
    data = random_mnist(kd)
    opts = optimizers()
    if names:
        opts = {n: o for n, o in opts.items() if n in names or n == "adam"}
    for size_name, hidden in SIZES.items():
        task = MLPTask(data=data, hidden_sizes=hidden, activation="sigmoid", batch_size=BATCH)
        params = task.init(kp)
        n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
        fns, state_bytes = {}, {}
        for name, lopt in opts.items():
            theta = lopt.init(kt)
            run = make_run(lopt, task, steps)
            state = lopt.opt_fn(theta).init(params, num_steps=steps)
            fns[name] = (functools.partial(_call, run, theta, task), state)
            state_bytes[name] = state_bytes_per_param(lopt, theta, params)
        wall, cpu = time_calls(fns, repeats)
        ms = {n: 1e3 * min(t) / steps for n, t in wall.items()}
        cpu_ms = {n: 1e3 * min(t) / steps for n, t in cpu.items()}
        rows.append({
            "problem": size_name,
            "num_params": int(n_params),
            "batch_size": BATCH,
            "steps_per_call": steps,
            "ms_per_step": ms,
            "cpu_ms_per_step": cpu_ms,
            "all_ms_per_step": {n: [1e3 * x / steps for x in t] for n, t in wall.items()},
            "ratio_over_adam": {n: ms[n] / ms["adam"] for n in ms if n != "adam"},
            "cpu_ratio_over_adam": {n: cpu_ms[n] / cpu_ms["adam"] for n in cpu_ms if n != "adam"},
            "state_bytes_per_param": state_bytes,
        })
    return rows


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per optimizer (best kept)")
    ap.add_argument("--steps", type=int, default=50, help="inner steps per jitted call")
    ap.add_argument("--only", nargs="*", choices=LEARNED, help="time only these (and Adam)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/lopt_step_cost.json"))
    args = ap.parse_args(argv)

    rows = benchmark(args.repeats, args.steps, tuple(args.only) if args.only else None)

    table = Table(title=f"Per-step cost vs Adam, batch {BATCH} "
                        f"(best of {args.repeats} × {args.steps} steps)")
    for col in ("problem", "optimizer", "ms/step", "× Adam", "CPU × Adam", "state B/param"):
        table.add_column(col, justify="left" if col in ("problem", "optimizer") else "right")
    for r in rows:
        for name, ms in r["ms_per_step"].items():
            ratio = r["ratio_over_adam"].get(name, 1.0)
            cpu_ratio = r["cpu_ratio_over_adam"].get(name, 1.0)
            table.add_row(r["problem"], name, f"{ms:.3f}", f"{ratio:.2f}×", f"{cpu_ratio:.2f}×",
                          f"{r['state_bytes_per_param'][name]:.1f}")
    Console().print(table)

    write_result(args.out, "lopt_step_cost", args.repeats, rows)


if __name__ == "__main__":
    main()
