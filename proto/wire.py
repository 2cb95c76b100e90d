"""The tensor wire format: pytrees as raw little-endian bytes plus a manifest, in chunks.

A tree is flattened (``jax.tree_util.tree_flatten_with_path``) into its leaves; each leaf becomes a
:class:`TensorSpec` (its path as ``jax.tree_util.keystr``, numpy dtype name, shape, sha256 of its
bytes, byte offset and length in the concatenated stream) and its bytes are sent back to back in
chunks of :data:`DEFAULT_CHUNK_BYTES` (small tensors are packed together, large ones split). The
receiver assembles the chunks into one preallocated buffer (:class:`ByteAssembler`, hashing each
tensor as its bytes arrive) and views the tensors out of it without further copies.

Everything here is pure: no gRPC. :func:`manifest_to_proto` and :func:`manifest_from_proto` convert
to and from the ``l2o.v1.TensorSpec`` messages of ``proto/l2o.proto``; :func:`gradient_messages`
and :func:`theta_messages` cut a tree's bytes into its generated ``GradientChunk`` and
``ThetaChunk`` messages.

Errors are :class:`WireError` carrying a :class:`Reason` (the same codes as the proto's ``Reason``
enum), so a server can tell a worker exactly why its gradient was refused.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import jax
import numpy as np

from proto import l2o_pb2

#: Default chunk size (1 MiB); chunks are kept within [MIN_CHUNK_BYTES, MAX_CHUNK_BYTES].
DEFAULT_CHUNK_BYTES = 1 << 20
MIN_CHUNK_BYTES = 256 << 10
MAX_CHUNK_BYTES = 1 << 20


class Reason(IntEnum):
    """Why a gradient was accepted or rejected; mirrors ``l2o.v1.Reason`` value for value."""

    OK = 0
    NAN_OR_INF = 1
    WRONG_SHAPE = 2
    WRONG_TREE = 3
    WRONG_DTYPE = 4
    TOO_LARGE = 5
    STALE = 6
    DUPLICATE = 7
    WRONG_RUN = 8
    BAD_CHECKSUM = 9
    MALFORMED = 10
    STALE_GENERATION = 11
    BUFFER_FULL = 12
    INTERNAL = 13
    STALE_INCARNATION = 14
    STOPPED = 15


class WireError(ValueError):
    """A byte stream or manifest that cannot be (or may not be) decoded, with the reason why."""

    def __init__(self, reason: Reason, detail: str):
        super().__init__(f"{reason.name}: {detail}")
        self.reason = Reason(reason)
        self.detail = detail


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a tree in a byte stream."""

    path: str
    dtype: str
    shape: tuple[int, ...]
    sha256: bytes
    offset: int
    length: int


_SIMPLE_DTYPES = frozenset({
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64",
})


@functools.lru_cache(maxsize=64)
def _known_dtype(name: str) -> np.dtype:
    return wire_dtype(name)


#: Alignment of receive buffers: XLA's CPU client can then use received arrays without a copy.
ALIGN = 64


def aligned_empty(nbytes: int, align: int = ALIGN) -> np.ndarray:
    """An uninitialized uint8 array of ``nbytes`` starting on an ``align``-byte boundary."""
    raw = np.empty(nbytes + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + nbytes]


def wire_dtype(name: str) -> np.dtype:
    """The little-endian numpy dtype called ``name`` on the wire; WRONG_DTYPE if unsupported."""
    if name in _SIMPLE_DTYPES:
        return np.dtype(name).newbyteorder("<")
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    raise WireError(Reason.WRONG_DTYPE, f"unsupported dtype {name!r}")


_PATHS: dict[Any, list[str]] = {}


def _flatten(tree: Any) -> tuple[list[Any], list[str]]:
    """Leaves and their ``keystr`` paths; paths are cached per tree structure."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    paths = _PATHS.get(treedef)
    if paths is None:
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
        if len(_PATHS) < 256:
            _PATHS[treedef] = paths
    return leaves, paths


def _leaf_bytes(leaf: Any) -> tuple[np.ndarray, memoryview]:
    a = np.asarray(leaf)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    if not a.flags.c_contiguous:
        a = a.copy(order="C")
    return a, memoryview(a.reshape(-1).view(np.uint8))


def flatten_tree(tree: Any) -> tuple[list[TensorSpec], list[memoryview]]:
    """The manifest of ``tree`` and one byte view per leaf (no copy for contiguous arrays)."""
    manifest: list[TensorSpec] = []
    views: list[memoryview] = []
    offset = 0
    for leaf, path in zip(*_flatten(tree), strict=True):
        a, mv = _leaf_bytes(leaf)
        _known_dtype(a.dtype.name)  # refuse dtypes the receiver could not rebuild
        manifest.append(TensorSpec(
            path=path, dtype=a.dtype.name, shape=tuple(a.shape),
            sha256=hashlib.sha256(mv).digest(), offset=offset, length=mv.nbytes,
        ))
        views.append(mv)
        offset += mv.nbytes
    return manifest, views


def _check_chunk_bytes(chunk_bytes: int) -> None:
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(
            f"chunk_bytes must be within [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}], got {chunk_bytes}"
        )


def iter_chunk_views(views: Sequence[memoryview], chunk_bytes: int = DEFAULT_CHUNK_BYTES
                     ) -> Iterator[bytes | memoryview]:
    """Like :func:`iter_chunks`, but chunks lying inside one tensor come as memoryviews (no copy).

    Only chunks that pack several small tensors together are copied (into ``bytes``).
    """
    _check_chunk_bytes(chunk_bytes)
    pending = bytearray()
    for mv in views:
        n, i = mv.nbytes, 0
        if pending:
            take = min(chunk_bytes - len(pending), n)
            pending += mv[:take]
            i = take
            if len(pending) == chunk_bytes:
                yield bytes(pending)
                pending = bytearray()
        while n - i >= chunk_bytes:
            yield mv[i:i + chunk_bytes]
            i += chunk_bytes
        if i < n:
            pending += mv[i:]
    if pending:
        yield bytes(pending)


def iter_chunks(views: Sequence[memoryview], chunk_bytes: int = DEFAULT_CHUNK_BYTES
                ) -> Iterator[bytes]:
    """The concatenation of ``views`` cut into chunks of exactly ``chunk_bytes`` (the last shorter).

    Can be called again on the same views to resend (e.g. after a reconnect) without rehashing.
    """
    for chunk in iter_chunk_views(views, chunk_bytes):
        yield chunk if isinstance(chunk, bytes) else chunk.tobytes()


def encode_tree(tree: Any, chunk_bytes: int = DEFAULT_CHUNK_BYTES
                ) -> tuple[list[TensorSpec], Iterator[bytes]]:
    """``(manifest, chunks)`` of ``tree``: its tensors' raw little-endian bytes and their specs."""
    _check_chunk_bytes(chunk_bytes)
    manifest, views = flatten_tree(tree)
    return manifest, iter_chunks(views, chunk_bytes)


def total_bytes(manifest: Sequence[TensorSpec]) -> int:
    """The length of the byte stream ``manifest`` describes."""
    return sum(s.length for s in manifest)


class TreeTemplate:
    """The paths, shapes, dtypes and structure of a tree, computed once, to check manifests against.

    Build it once per θ (``TreeTemplate(theta)``) and pass it as ``like`` wherever a template is
    taken: checking a manifest against it is then a few list comparisons.
    """

    def __init__(self, tree: Any):
        flat, self.treedef = jax.tree_util.tree_flatten_with_path(tree)
        self.paths = [jax.tree_util.keystr(p) for p, _ in flat]
        self.shapes = [tuple(np.shape(x)) for _, x in flat]
        self.dtypes = [np.dtype(x.dtype if hasattr(x, "dtype") else np.result_type(x)).name
                       for _, x in flat]

    def check(self, manifest: Sequence[TensorSpec]) -> None:
        """Raise :class:`WireError` (WRONG_TREE, WRONG_SHAPE, WRONG_DTYPE) unless it matches."""
        got = [s.path for s in manifest]
        if got != self.paths:
            missing = sorted(set(self.paths) - set(got))[:3]
            extra = sorted(set(got) - set(self.paths))[:3]
            raise WireError(Reason.WRONG_TREE,
                            f"tree paths differ from the expected tree (missing {missing}, "
                            f"unexpected {extra}, {len(got)} leaves vs {len(self.paths)})")
        for s, shape, dtype in zip(manifest, self.shapes, self.dtypes, strict=True):
            if s.shape != shape:
                raise WireError(Reason.WRONG_SHAPE,
                                f"{s.path}: shape {list(s.shape)}, expected {list(shape)}")
            if s.dtype != dtype:
                raise WireError(Reason.WRONG_DTYPE, f"{s.path}: dtype {s.dtype}, expected {dtype}")

    def unflatten(self, leaves: Sequence[Any]) -> Any:
        """A tree of this structure holding ``leaves``."""
        return jax.tree_util.tree_unflatten(self.treedef, list(leaves))


def tree_template(like: Any) -> TreeTemplate | None:
    """``like`` as a :class:`TreeTemplate` (None stays None)."""
    if like is None or isinstance(like, TreeTemplate):
        return like
    return TreeTemplate(like)


def check_manifest(manifest: Sequence[TensorSpec], like: Any = None,
                   max_bytes: int | None = None) -> int:
    """Check ``manifest`` is self-consistent (and matches template ``like``); the stream length.

    Raises :class:`WireError`: MALFORMED for overlapping/gapped offsets or a length that does not
    match shape × itemsize, WRONG_DTYPE for an unsupported dtype, TOO_LARGE beyond ``max_bytes``,
    and against ``like`` (a tree or :class:`TreeTemplate`): WRONG_TREE (paths differ),
    WRONG_SHAPE, WRONG_DTYPE.
    """
    offset = 0
    for s in manifest:
        dt = _known_dtype(s.dtype)
        if any(d < 0 for d in s.shape):
            raise WireError(Reason.MALFORMED, f"{s.path}: negative dimension in shape {s.shape}")
        if s.offset != offset:
            raise WireError(Reason.MALFORMED,
                            f"{s.path}: offset {s.offset}, expected {offset}")
        want = math.prod(s.shape) * dt.itemsize
        if s.length != want:
            raise WireError(Reason.MALFORMED, f"{s.path}: {s.length} bytes for "
                                              f"{s.dtype}{list(s.shape)} ({want} expected)")
        if len(s.sha256) != 32:
            raise WireError(Reason.MALFORMED, f"{s.path}: sha256 digest of {len(s.sha256)} bytes")
        offset += s.length
    if max_bytes is not None and offset > max_bytes:
        raise WireError(Reason.TOO_LARGE, f"{offset} bytes exceed the limit of {max_bytes}")
    if like is not None:
        tree_template(like).check(manifest)
    return offset


class ByteAssembler:
    """Collects a stream of chunks into one preallocated buffer, hashing tensors as bytes arrive.

    The manifest is checked for consistency first (MALFORMED otherwise). Never holds more than the
    manifest's declared length: a chunk that would overflow it raises MALFORMED before it is copied.
    """

    def __init__(self, manifest: Sequence[TensorSpec], verify: bool = True,
                 checked: bool = False):
        self.manifest = list(manifest)
        # ``checked``: the caller has run check_manifest on it already
        self.total = total_bytes(self.manifest) if checked else check_manifest(self.manifest)
        # np.empty, unlike bytearray, neither zeroes nor faults in the whole buffer up front
        self.buffer = aligned_empty(self.total)
        self._view = memoryview(self.buffer)
        self.received = 0
        self.verify = verify
        self._tensor = 0  # index of the tensor the next byte belongs to
        self._hashed = 0  # bytes hashed so far
        self._hash = hashlib.sha256()

    def add(self, chunk: bytes | memoryview) -> None:
        """Append ``chunk``; MALFORMED if it goes past the declared length, BAD_CHECKSUM on a
        tensor whose bytes are complete and do not match its digest."""
        n = len(chunk) if isinstance(chunk, bytes) else memoryview(chunk).nbytes
        if self.received + n > self.total:
            raise WireError(Reason.MALFORMED,
                            f"byte stream longer than the {self.total} bytes the manifest declares")
        start = self.received
        # a numpy copy releases the GIL, so several streams can be assembled in parallel
        self.buffer[start:start + n] = np.frombuffer(chunk, np.uint8)
        self.received += n
        if self.verify:
            self._hash_upto(self.received)

    def _hash_upto(self, end: int) -> None:
        m, pos = self.manifest, self._hashed
        while self._tensor < len(m):
            s = m[self._tensor]
            stop = min(end, s.offset + s.length)
            if stop > pos:
                self._hash.update(self._view[pos:stop])
                pos = stop
            if stop < s.offset + s.length:
                break
            if self._hash.digest() != s.sha256:
                raise WireError(Reason.BAD_CHECKSUM, f"{s.path}: sha256 mismatch")
            self._tensor += 1
            self._hash = hashlib.sha256()
        self._hashed = pos

    def finish(self, like: Any = None) -> Any:
        """The decoded tree (with ``like``'s structure if given); MALFORMED if bytes are missing."""
        if self.received != self.total:
            raise WireError(Reason.MALFORMED,
                            f"byte stream ended after {self.received} of {self.total} bytes")
        if self.verify:
            self._hash_upto(self.total)  # zero-length tensors at the end
        template = tree_template(like)
        if template is not None:
            template.check(self.manifest)
        arrays = _views(self.manifest, self.buffer)
        if template is not None:
            return template.unflatten(arrays)
        return unflatten_paths([s.path for s in self.manifest], arrays)


def _views(manifest: Sequence[TensorSpec], buffer: bytes | bytearray | memoryview
           ) -> list[np.ndarray]:
    arrays = []
    for s in manifest:
        dt = _known_dtype(s.dtype)
        arrays.append(np.frombuffer(buffer, dtype=dt, count=s.length // dt.itemsize,
                                    offset=s.offset).reshape(s.shape))
    return arrays


def decode_tree(manifest: Sequence[TensorSpec], chunks: Iterable[bytes], like: Any = None,
                *, max_bytes: int | None = None, verify: bool = True) -> Any:
    """The tree encoded as ``(manifest, chunks)`` by :func:`encode_tree`.

    With ``like`` (a template tree or :class:`TreeTemplate`) the manifest must match its paths,
    shapes and dtypes and the result has its structure. Raises :class:`WireError` with the
    specific reason: WRONG_TREE, WRONG_SHAPE, WRONG_DTYPE, TOO_LARGE (beyond ``max_bytes``),
    MALFORMED (stream too short/long, inconsistent manifest), BAD_CHECKSUM.
    """
    template = tree_template(like)
    check_manifest(manifest, like=template, max_bytes=max_bytes)
    asm = ByteAssembler(manifest, verify=verify)
    for chunk in chunks:
        asm.add(chunk)
    return asm.finish(like=template)


_TOKEN = re.compile(
    r"""\.(?P<attr>[A-Za-z_]\w*)|\[(?P<key>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|-?\d+)\]"""
)


def parse_path(path: str) -> list[str | int]:
    """The keys of a ``keystr`` path: ``"['a'][0].b"`` → ``['a', 0, 'b']``.

    Raises :class:`WireError` (MALFORMED) for a path it cannot parse.
    """
    keys: list[str | int] = []
    pos = 0
    while pos < len(path):
        m = _TOKEN.match(path, pos)
        if m is None:
            raise WireError(Reason.MALFORMED, f"cannot parse tree path {path!r} at {pos}")
        keys.append(m["attr"] if m["attr"] is not None else ast.literal_eval(m["key"]))
        pos = m.end()
    return keys


def unflatten_paths(paths: Sequence[str], leaves: Sequence[Any]) -> Any:
    """A tree of nested dicts (lists where the keys are 0..n-1) with ``leaves`` at ``paths``."""
    if len(paths) == 1 and paths[0] == "":
        return leaves[0]
    root: dict = {}
    for path, leaf in zip(paths, leaves, strict=True):
        keys = parse_path(path)
        if not keys:
            raise WireError(Reason.MALFORMED, "an empty tree path beside other paths")
        node = root
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise WireError(Reason.MALFORMED, f"tree path {path!r} goes through a leaf")
        if keys[-1] in node:
            raise WireError(Reason.MALFORMED, f"tree path {path!r} appears twice")
        node[keys[-1]] = leaf

    def listify(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        out = {k: listify(v) for k, v in node.items()}
        if out and all(isinstance(k, int) for k in out) and sorted(out) == list(range(len(out))):
            return [out[i] for i in range(len(out))]
        return out

    return listify(root)


def manifest_to_proto(manifest: Sequence[TensorSpec]) -> list[l2o_pb2.TensorSpec]:
    """``l2o.v1.TensorSpec`` messages for ``manifest``."""
    return [l2o_pb2.TensorSpec(path=s.path, dtype=s.dtype, shape=list(s.shape), sha256=s.sha256,
                               offset=s.offset, length=s.length) for s in manifest]


def manifest_from_proto(specs: Iterable[Any]) -> list[TensorSpec]:
    """:class:`TensorSpec` values from ``l2o.v1.TensorSpec`` messages."""
    return [TensorSpec(path=s.path, dtype=s.dtype, shape=tuple(int(d) for d in s.shape),
                       sha256=bytes(s.sha256), offset=int(s.offset), length=int(s.length))
            for s in specs]


def _flag_first(chunks: Iterable[bytes]) -> Iterator[tuple[bool, bytes]]:
    """``(is_first, chunk)`` for each chunk; a single ``(True, b"")`` when there are none."""
    first = True
    for data in chunks:
        yield first, data
        first = False
    if first:
        yield True, b""


def gradient_messages(header: l2o_pb2.GradientHeader, views: Sequence[memoryview],
                      chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[l2o_pb2.GradientChunk]:
    """The ``GradientChunk`` messages of one gradient: its bytes in chunks, ``header`` on the
    first (a gradient without bytes is one message carrying only the header)."""
    for first, data in _flag_first(iter_chunks(views, chunk_bytes)):
        yield l2o_pb2.GradientChunk(header=header if first else None, data=data)


def theta_messages(version: int, header: l2o_pb2.ThetaHeader, views: Sequence[memoryview],
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[l2o_pb2.ThetaChunk]:
    """The ``ThetaChunk`` messages of θ at ``version``: its bytes in chunks, ``header`` on the
    first (a θ without bytes is one message carrying only the header)."""
    for first, data in _flag_first(iter_chunks(views, chunk_bytes)):
        yield l2o_pb2.ThetaChunk(version=version, header=header if first else None, data=data)
