"""Checkpoint files: atomic, checksummed, and readable without the code that wrote them.

A checkpoint is one file holding a pytree of arrays (msgpack, via ``flax.serialization``) and a
JSON-compatible metadata dict. The file layout is::

    b"L2OCKPT1" | sha256(payload) (32 bytes) | len(payload) (8 bytes, little-endian) | payload

It is written to a temporary file in the same directory, flushed and ``fsync``-ed, then renamed over
the destination, so a reader sees either the old file or the new one, never a partial one. A
truncated or corrupted file raises :class:`CheckpointError` naming the file and what is wrong.

Two kinds are written by trainers and the learner (see ``design.md``):

- **full** (``kind="full"``): θ, meta-optimizer state, version, RNG key, config and counters;
- **params** (``kind="params"``): θ, version and gen id, for eval workers and users.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization

from l2o.io.atomic import atomic_write

MAGIC = b"L2OCKPT1"
_HEADER = len(MAGIC) + 32 + 8


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupted or of the wrong kind."""


def _to_numpy(tree: Any) -> Any:
    return jax.tree_util.tree_map(np.asarray, tree)


def save_checkpoint(path: str | os.PathLike, tree: Any, metadata: dict | None = None) -> Path:
    """Write ``tree`` (a pytree of arrays) and ``metadata`` to ``path`` atomically."""
    path = Path(path)
    state = {"tree": serialization.to_state_dict(_to_numpy(tree)), "metadata": metadata or {}}
    payload = serialization.msgpack_serialize(state)
    digest = hashlib.sha256(payload).digest()
    with atomic_write(path) as f:
        f.write(MAGIC + digest + len(payload).to_bytes(8, "little") + payload)
        f.flush()
        os.fsync(f.fileno())
    return path


def read_checkpoint(path: str | os.PathLike) -> tuple[Any, dict]:
    """The raw ``(state_dict tree, metadata)`` of a checkpoint, after verifying its checksum."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    data = path.read_bytes()
    if len(data) < _HEADER or not data.startswith(MAGIC):
        raise CheckpointError(f"checkpoint {path} is not an l2o checkpoint (bad header)")
    digest, length = data[len(MAGIC):len(MAGIC) + 32], int.from_bytes(data[_HEADER - 8:_HEADER],
                                                                      "little")
    payload = data[_HEADER:]
    if len(payload) != length:
        raise CheckpointError(
            f"checkpoint {path} is truncated: {len(payload)} of {length} payload bytes"
        )
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {path} is corrupted: sha256 mismatch")
    try:
        state = serialization.msgpack_restore(payload)
    except Exception as e:  # a payload that passed the checksum but does not decode
        raise CheckpointError(f"checkpoint {path} does not decode: {e}") from e
    return state["tree"], dict(state.get("metadata") or {})


def load_checkpoint(path: str | os.PathLike, target: Any = None) -> tuple[Any, dict]:
    """``(tree, metadata)`` from ``path``; with ``target``, the tree takes ``target``'s structure.

    A tree whose structure or shapes differ from ``target`` raises :class:`CheckpointError`.
    """
    raw, metadata = read_checkpoint(path)
    if target is None:
        return raw, metadata
    try:
        tree = serialization.from_state_dict(target, raw)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"checkpoint {path} does not match the expected structure: {e}") from e
    for want, got in zip(jax.tree_util.tree_leaves(target), jax.tree_util.tree_leaves(tree),
                         strict=True):
        if np.shape(want) != np.shape(got):
            raise CheckpointError(
                f"checkpoint {path}: array of shape {np.shape(got)} where {np.shape(want)} expected"
            )
    return tree, metadata


_NUMBERED = re.compile(r"^(?P<kind>[a-z]+)_(?P<step>\d+)\.ckpt$")


def checkpoint_path(run_dir: str | os.PathLike, kind: str, step: int) -> Path:
    """Where a checkpoint of ``kind`` (``"full"``, ``"params"``, …) at ``step`` lives."""
    return Path(run_dir) / "checkpoints" / f"{kind}_{step:08d}.ckpt"


def list_checkpoints(run_dir: str | os.PathLike, kind: str) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint of ``kind`` in ``run_dir``, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    found = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = _NUMBERED.match(p.name)
            if m and m["kind"] == kind:
                found.append((int(m["step"]), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike, kind: str = "full") -> Path | None:
    """The newest checkpoint of ``kind`` in ``run_dir``, or ``None``."""
    found = list_checkpoints(run_dir, kind)
    return found[-1][1] if found else None
