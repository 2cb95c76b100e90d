"""Learned optimizers shipped inside the package, ready for your own optax training loop.

::

    import optax
    from l2o import pretrained

    tx = optax.chain(optax.clip_by_global_norm(1.0), pretrained.load("general-v4", num_steps=1000))
    opt_state = tx.init(params)
    updates, opt_state = tx.update(grads, opt_state, params)   # params are required
    params = optax.apply_updates(params, updates)

Each optimizer is two files in this folder: ``NAME.ckpt`` (θ, an l2o params checkpoint with its
optimizer config in the metadata) and ``NAME.json`` (how it was trained and its held-out suite
results; see ``docs/pretrained.md``). Loading needs JAX, optax and flax only: no Ray, gRPC or Redis.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import optax

from l2o.optimizers.base import LearnedOptimizer
from l2o.types import MetaParams

_HERE = Path(__file__).resolve().parent

#: The optimizer :func:`load` gives without a name: the newest recipe's (``general-v1`` to
#: ``general-v3`` stay, as they were shipped, for reproducibility).
DEFAULT = "general-v4"


def names() -> list[str]:
    """The names of the shipped optimizers."""
    return sorted(p.stem for p in _HERE.glob("*.ckpt"))


def _path(name: str, suffix: str) -> Path:
    if name not in names():
        raise ValueError(f"unknown pretrained optimizer {name!r}; known: {', '.join(names())}")
    return _HERE / f"{name}{suffix}"


def info(name: str) -> dict[str, Any]:
    """The model card's data of ``name``: training config and command, suite results."""
    path = _path(name, ".json")
    return json.loads(path.read_text()) if path.is_file() else {}


@functools.lru_cache(maxsize=8)
def load_theta(name: str) -> tuple[LearnedOptimizer, MetaParams]:
    """``(learned optimizer, θ)`` of the shipped optimizer ``name``."""
    from l2o.training.job import load_theta as load_checkpoint_theta

    lopt, theta, _ = load_checkpoint_theta(_path(name, ".ckpt"))
    return lopt, theta


def load(name: str = DEFAULT, num_steps: int | None = None
         ) -> optax.GradientTransformationExtraArgs:
    """The shipped optimizer ``name`` as an optax transformation.

    ``num_steps`` is the number of steps you plan to train for: the learned step-size schedule
    spans it (warm-up, then decay). ``None`` keeps the peak step size throughout. ``update``
    must be given ``params``.
    """
    lopt, theta = load_theta(name)
    as_optax = getattr(lopt, "as_optax", None)
    if as_optax is not None:
        return as_optax(theta, num_steps)
    from l2o.optimizers.optax_bridge import as_gradient_transformation

    return as_gradient_transformation(lopt, theta, num_steps=num_steps)


def export(checkpoint: str | Path, name: str, card: dict[str, Any],
           folder: str | Path = _HERE) -> Path:
    """Write θ of a run's checkpoint as the shipped optimizer ``name`` (``NAME.ckpt`` and
    ``NAME.json``, the model card's data) into ``folder``; the checkpoint's path.

    Only θ and the optimizer config are kept: no service settings, run ids or addresses.
    """
    from l2o.io.checkpoints import CheckpointError, CheckpointMeta, read_checkpoint, save_checkpoint

    raw, stored_meta = read_checkpoint(checkpoint)
    meta = CheckpointMeta.from_stored(stored_meta, checkpoint)
    if meta.optimizer is None:
        raise CheckpointError(f"checkpoint {checkpoint} does not say which optimizer it holds")
    stored = raw["theta"] if meta.kind == "full" else raw
    folder = Path(folder)
    path = save_checkpoint(folder / f"{name}.ckpt", stored,
                           CheckpointMeta(kind="params", optimizer=meta.optimizer,
                                          version=meta.version, name=name))
    (folder / f"{name}.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    load_theta.cache_clear()
    return path
