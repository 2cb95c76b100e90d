"""Per-step cost of the hierarchical RNN optimizer versus optax Adam and the L2L LSTM.

Same protocol as ``benchmarks/step_cost.py`` (whose helpers it imports): one step is the loss and
gradient of a sigmoid MLP on a batch of 128 random MNIST-shaped examples plus the optimizer update;
``--steps`` steps run in one jitted ``lax.scan``; the three optimizers are timed interleaved in the
same run, and the best of ``--repeats`` calls is kept. Ratios are what to compare: absolute times
depend on the (possibly shared) machine.

    python benchmarks/hrnn_step_cost.py --out benchmarks/results/hrnn_step_cost.json
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

import jax

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
from l2o.optimizers.hierarchical_rnn import HierarchicalRNN  # noqa: E402
from l2o.optimizers.lstm import LSTMLearnedOptimizer  # noqa: E402
from l2o.tasks.mlp import MLPTask  # noqa: E402


def benchmark(repeats: int, steps: int) -> list[dict[str, Any]]:
    """One result row per MLP size, with ms/step of each optimizer and the ratios."""
    kd, kp, kt = jax.random.split(jax.random.PRNGKey(0), 3)
    data = random_mnist(kd)
    optimizers: dict[str, LearnedOptimizer] = {
        "hierarchical_rnn": HierarchicalRNN(), "lstm": LSTMLearnedOptimizer(), "adam": adam(1e-3)}
    rows = []
    for size_name, hidden in SIZES.items():
        task = MLPTask(data=data, hidden_sizes=hidden, activation="sigmoid", batch_size=BATCH)
        params = task.init(kp)
        fns = {}
        for name, lopt in optimizers.items():
            theta = lopt.init(kt)
            state = lopt.opt_fn(theta).init(params, num_steps=steps)
            fns[name] = (functools.partial(_call, make_run(lopt, task, steps), theta, task), state)
        wall, cpu = time_calls(fns, repeats)
        ms = {n: 1e3 * min(t) / steps for n, t in wall.items()}
        rows.append({
            "problem": size_name,
            "num_params": int(sum(p.size for p in jax.tree_util.tree_leaves(params))),
            "batch_size": BATCH,
            "steps_per_call": steps,
            "ms_per_step": ms,
            "cpu_ms_per_step": {n: 1e3 * min(t) / steps for n, t in cpu.items()},
            "ratio_hrnn_over_adam": ms["hierarchical_rnn"] / ms["adam"],
            "ratio_lstm_over_adam": ms["lstm"] / ms["adam"],
            "ratio_hrnn_over_lstm": ms["hierarchical_rnn"] / ms["lstm"],
        })
    return rows


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per optimizer (best kept)")
    ap.add_argument("--steps", type=int, default=50, help="inner steps per jitted call")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/hrnn_step_cost.json"))
    args = ap.parse_args(argv)
    rows = benchmark(args.repeats, args.steps)
    for r in rows:
        ms = r["ms_per_step"]
        print(f"{r['problem']:>20}  hrnn {ms['hierarchical_rnn']:.3f} ms  lstm {ms['lstm']:.3f} ms"
              f"  adam {ms['adam']:.3f} ms  hrnn/adam {r['ratio_hrnn_over_adam']:.2f}×"
              f"  lstm/adam {r['ratio_lstm_over_adam']:.2f}×"
              f"  hrnn/lstm {r['ratio_hrnn_over_lstm']:.2f}×")
    write_result(args.out, "hrnn_step_cost", args.repeats, rows)


if __name__ == "__main__":
    main()
