"""Checkpoint files: atomic, checksummed, and readable without the code that wrote them.

A checkpoint is one file holding a pytree of arrays (msgpack, via ``flax.serialization``) and a
JSON-compatible metadata dict. The file layout is::

    b"L2OCKPT1" | sha256(payload) (32 bytes) | len(payload) (8 bytes, little-endian) | payload

It is written to a temporary file in the same directory, flushed and ``fsync``-ed, then renamed over
the destination (on object storage: one put of the whole object; a run directory may be a local
path, a ``file://`` URL or an fsspec URL such as ``s3://bucket/prefix``, see
:mod:`l2o.io.storage`), so a reader sees either the old file or the new one, never a partial one. A
truncated or corrupted file raises :class:`CheckpointError` naming the file and what is wrong; a
resume takes the newest checkpoint that reads back intact (:func:`newest_intact_checkpoint`).

The metadata of the files the trainer, the learner, the curriculum and ``l2o.pretrained`` write
follows one schema, :class:`CheckpointMeta`, whose ``kind`` says what the tree holds (see
``design.md``):

- **full** (``kind="full"``): θ and the meta-optimizer state; version, config, counters and the
  writer's run state (the learner's dedup table, the trainer's history and curriculum);
- **params** (``kind="params"``): θ alone, with version, gen id and optimizer, for eval workers and
  users;
- **worker** (``kind="worker"``): the single-machine trainer's inner problems (never θ).

Metadata formats. Format 2 (``format_version: 2``, written since this schema) is validated on
every read: a wrong type, an unknown field or an unknown ``format_version`` raises
:class:`CheckpointError` naming it. Files without ``format_version`` (written before, e.g. the
shipped ``l2o/pretrained/general-v1.ckpt``) are format 1, read by
:meth:`CheckpointMeta.from_stored` with this mapping: the field names are the same; ``kind``
missing means ``"params"`` (a bare θ); ``version`` missing stays unknown (``None``); the trainer's
top-level ``skipped_nonfinite`` becomes ``counters["skipped_nonfinite"]``; keys the schema does not
know are ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import time
from typing import Any, Literal

import jax
import numpy as np
from flax import serialization
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from l2o.io.atomic import atomic_write
from l2o.io.secrets import redacted_config
from l2o.io.storage import as_path, fresh

log = logging.getLogger(__name__)

MAGIC = b"L2OCKPT1"
_HEADER = len(MAGIC) + 32 + 8

#: The metadata format this code writes (files without ``format_version`` are format 1).
FORMAT_VERSION = 2


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupted or of the wrong kind."""


class CheckpointMeta(BaseModel):
    """The metadata of a checkpoint, the same schema for every writer.

    Fields a writer has nothing to say about stay ``None`` and are not stored.
    """

    model_config = ConfigDict(extra="forbid")

    format_version: Literal[1, 2] = FORMAT_VERSION
    kind: Literal["full", "params", "worker"]
    #: θ's version: meta-updates applied (required; ``None`` only in format-1 files without it)
    version: int | None
    gen_id: int = 0
    run_id: str | None = None
    seed: int | None = None
    #: the learned optimizer's config (``OptimizerConfig``, JSON form): what θ parameterizes
    optimizer: dict[str, Any] | None = None
    #: the run's ``TrainConfig`` (JSON form) and, from the learner, its ``ServiceConfig``
    config: dict[str, Any] | None = None
    service: dict[str, Any] | None = None
    #: the shipped optimizer's name (``l2o.pretrained``)
    name: str | None = None
    #: how ``l2o select`` chose this θ: the candidate and the versions it averages
    selection: dict[str, Any] | None = None
    saved_at: float | None = Field(default_factory=time.time)
    # a best-θ checkpoint: its score, the horizon it was scored at and the curriculum stage
    eval_final_loss: float | None = None
    eval_steps: int | None = None
    stage: int | None = None
    # run state (full checkpoints): counters, and the learner's and the trainer's tables
    updates: int | None = None
    counters: dict[str, int] | None = None
    rejected_by_reason: dict[str, int] | None = None
    dedup: dict[str, Any] | None = None
    history: list[dict[str, Any]] | None = None
    evaluations: list[dict[str, Any]] | None = None
    best_eval: float | None = None
    curriculum: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The stored form: every field that is not ``None``, values as they are."""
        values = {name: getattr(self, name) for name in type(self).model_fields}
        return {name: v for name, v in values.items() if v is not None}

    def for_params(self, **updates: Any) -> CheckpointMeta:
        """The metadata of the params checkpoint beside this (full) one: ``kind="params"`` and
        without the run-state tables, which only a resumed writer needs; plus ``updates``."""
        tables = dict.fromkeys(("counters", "rejected_by_reason", "dedup", "history",
                                "evaluations", "best_eval", "curriculum"))
        return self.model_copy(update={**tables, "kind": "params", **updates})

    @classmethod
    def from_stored(cls, metadata: dict[str, Any], path: str | os.PathLike) -> CheckpointMeta:
        """Validate the stored ``metadata`` of the file at ``path`` (format 1 mapped as the module
        docstring says); :class:`CheckpointError` naming the bad field otherwise."""
        fmt = metadata.get("format_version", 1)
        if fmt == 1 and not isinstance(fmt, bool):
            data = _from_format_1(metadata)
        elif fmt == FORMAT_VERSION and not isinstance(fmt, bool):
            data = metadata
        else:
            raise CheckpointError(
                f"checkpoint {path}: metadata field 'format_version' is {fmt!r}, a format this "
                f"l2o does not read (it reads 1, i.e. no format_version, and {FORMAT_VERSION})")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            problems = "; ".join(f"field {'.'.join(map(str, err['loc']))!r}: {err['msg']}"
                                 for err in e.errors())
            raise CheckpointError(f"checkpoint {path}: bad metadata: {problems}") from e


def _from_format_1(metadata: dict[str, Any]) -> dict[str, Any]:
    """Format-1 metadata in format-2 terms (the mapping of the module docstring)."""
    data = {k: v for k, v in metadata.items() if k in CheckpointMeta.model_fields}
    data.update(format_version=1, kind=metadata.get("kind", "params"),
                version=metadata.get("version"), saved_at=metadata.get("saved_at"))
    if "skipped_nonfinite" in metadata:
        data["counters"] = {**(metadata.get("counters") or {}),
                            "skipped_nonfinite": metadata["skipped_nonfinite"]}
    return data


def _to_numpy(tree: Any) -> Any:
    return jax.tree_util.tree_map(np.asarray, tree)


def save_checkpoint(path: str | os.PathLike, tree: Any,
                    metadata: CheckpointMeta | dict | None = None) -> Any:
    """Write ``tree`` (a pytree of arrays) and ``metadata`` to ``path`` atomically.

    Trainers and the learner pass a :class:`CheckpointMeta`; a plain dict is stored as it is.
    Either way secrets are redacted first (:func:`l2o.io.secrets.redacted_config`: the Redis
    URL's password, tokens), so a checkpoint can be handed to anyone; a resumed run takes its
    Redis URL from its config file or ``$REDIS_URL``, never from a checkpoint.
    """
    path = as_path(path)
    if isinstance(metadata, CheckpointMeta):
        metadata = metadata.to_dict()
    state = {"tree": serialization.to_state_dict(_to_numpy(tree)),
             "metadata": redacted_config(metadata or {})}
    payload = serialization.msgpack_serialize(state)
    digest = hashlib.sha256(payload).digest()
    with atomic_write(path) as f:  # flushed and fsync-ed, or one put of the whole object
        f.write(MAGIC + digest + len(payload).to_bytes(8, "little") + payload)
    return path


def read_checkpoint(path: str | os.PathLike) -> tuple[Any, dict]:
    """The raw ``(state_dict tree, metadata)`` of a checkpoint, after verifying its checksum.

    Metadata carrying a ``format_version`` is validated against :class:`CheckpointMeta`.
    """
    path = as_path(path)
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        raise CheckpointError(f"checkpoint {path} does not exist") from None
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
    metadata = dict(state.get("metadata") or {})
    if "format_version" in metadata:
        CheckpointMeta.from_stored(metadata, path)
    return state["tree"], metadata


def load_checkpoint(path: str | os.PathLike, target: Any = None) -> tuple[Any, dict]:
    """``(tree, metadata)`` from ``path``; with ``target``, the tree takes ``target``'s structure.

    A tree whose structure or shapes differ from ``target`` raises :class:`CheckpointError`.
    """
    raw, metadata = read_checkpoint(path)
    return (raw if target is None else _fit(path, raw, target)), metadata


def _fit(path: str | os.PathLike, raw: Any, target: Any) -> Any:
    """The state-dict ``raw`` read from ``path`` in ``target``'s structure, shapes checked."""
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
    return tree


def load_run_checkpoint(path: str | os.PathLike, target: Any, kind: str | None = None,
                        ) -> tuple[Any, CheckpointMeta]:
    """``(tree, metadata)`` as :func:`load_checkpoint` gives them, the metadata validated: of
    ``kind`` when given, and recording θ's version (what a resumed run continues from)."""
    tree, raw = load_checkpoint(path, target)
    return tree, _run_meta(path, raw, kind)


def _run_meta(path: str | os.PathLike, raw: dict, kind: str | None) -> CheckpointMeta:
    """The stored metadata ``raw`` of ``path`` validated as :func:`load_run_checkpoint` says."""
    meta = CheckpointMeta.from_stored(raw, path)
    if kind is not None and meta.kind != kind:
        raise CheckpointError(f"checkpoint {path} is not a {kind} checkpoint (kind {meta.kind!r})")
    if meta.version is None:
        raise CheckpointError(f"checkpoint {path}: metadata field 'version' is missing")
    return meta


_NUMBERED = re.compile(r"^(?P<kind>[a-z]+)_(?P<step>\d+)\.ckpt$")


def checkpoint_path(run_dir: str | os.PathLike, kind: str, step: int) -> Any:
    """Where a checkpoint of ``kind`` (``"full"``, ``"params"``, …) at ``step`` lives (a
    :class:`~pathlib.Path`, or a ``UPath`` in a remote run directory)."""
    return as_path(run_dir) / "checkpoints" / f"{kind}_{step:08d}.ckpt"


def list_checkpoints(run_dir: str | os.PathLike, kind: str) -> list[tuple[int, Any]]:
    """``(step, path)`` of every checkpoint of ``kind`` in ``run_dir``, oldest first (listed
    afresh: a remote listing is never taken from fsspec's cache)."""
    folder = fresh(as_path(run_dir) / "checkpoints")
    found = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = _NUMBERED.match(p.name)
            if m and m["kind"] == kind:
                found.append((int(m["step"]), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike, kind: str = "full") -> Any:
    """The newest checkpoint of ``kind`` in ``run_dir``, or ``None``."""
    found = list_checkpoints(run_dir, kind)
    return found[-1][1] if found else None


@dataclasses.dataclass(frozen=True)
class IntactCheckpoint:
    """The newest checkpoint of a kind that reads back intact, as a resume uses it."""

    path: Any  # a Path, or a UPath in a remote run directory
    tree: Any
    meta: CheckpointMeta
    #: the newer files of the same kind that were skipped as damaged (left in place)
    skipped: tuple[Any, ...] = ()


def newest_intact_checkpoint(run_dir: str | os.PathLike, target: Any, kind: str = "full",
                             ) -> IntactCheckpoint | None:
    """The newest checkpoint of ``kind`` in ``run_dir`` that reads back intact (checksum,
    decoding, metadata schema, as :func:`load_run_checkpoint` checks them), its tree in
    ``target``'s structure; ``None`` when there is no checkpoint of ``kind`` at all.

    A newer file that is damaged is skipped with a warning naming it and why; it is neither
    deleted nor changed (a writer that reaches its step again renames it first:
    :func:`set_aside`). When every file is damaged, :class:`CheckpointError` names the directory
    and the files tried. An intact file that does not fit ``target`` (another optimizer's θ) is
    not damage: its :class:`CheckpointError` is raised at once.
    """
    skipped: list[Any] = []
    for _, path in reversed(list_checkpoints(run_dir, kind)):
        try:
            raw, stored = read_checkpoint(path)
            meta = _run_meta(path, stored, kind)
        except CheckpointError as e:
            log.warning("resume skips a damaged checkpoint, left as it is: %s", e)
            skipped.append(path)
            last_error = e
            continue
        return IntactCheckpoint(path, _fit(path, raw, target), meta, tuple(skipped))
    if skipped:
        raise CheckpointError(
            f"no intact {kind} checkpoint in {as_path(run_dir) / 'checkpoints'} (tried "
            f"{', '.join(p.name for p in skipped)}); the oldest: {last_error}") from last_error
    return None


def set_aside(path: str | os.PathLike, damaged: list[Any]) -> Any:
    """Before a writer reuses the name ``path``: if it is one of ``damaged`` (the files a resume
    skipped, :attr:`IntactCheckpoint.skipped`), rename it to ``path.damaged`` (numbered if that
    exists) and drop it from ``damaged``. The new name, or ``None`` when nothing was moved."""
    path = as_path(path)
    if path not in damaged:
        return None
    damaged.remove(path)
    if not path.exists():
        return None
    aside = path.with_name(f"{path.name}.damaged")
    n = 1
    while aside.exists():
        aside, n = path.with_name(f"{path.name}.damaged{n}"), n + 1
    path.rename(aside)  # on object storage: a copy, then the old object removed
    log.warning("kept the damaged checkpoint %s as %s before writing its step again", path,
                aside.name)
    return aside
