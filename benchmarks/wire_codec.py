"""Wire codec: the generated protobuf classes vs the hand-written chunk codec they replaced.

Per gradient pushed and per θ fetched, the in-process work of both ends of the wire, without the
network: the sender flattens the tree (hashing every tensor with sha256), builds the header and
serializes the chunk messages; the receiver parses them, checks the manifest against the template
and assembles the bytes (verifying the sha256 of every tensor). The two codecs differ only in how
chunk messages are serialized and parsed:

- ``generated``: ``proto.wire.gradient_messages`` / ``theta_messages`` and the generated
  ``SerializeToString`` / ``FromString`` (what ``learner/server.py`` and ``services/client.py``
  use);
- ``hand``: the hand-written protobuf framing that ``proto/wire.py`` had before (kept below as
  the baseline): chunk messages framed with one copy of the tensor bytes and parsed into
  memoryviews of the received message (chunks inside one tensor are memoryviews of it:
  ``proto.wire.iter_chunk_views``).

Both run in the same process, interleaved, best of ``--repeats``, timed by the wall clock and by
the process's CPU time (the steadier figure on a shared machine); the figures that matter are the
ratio generated / hand and the codec's difference next to the two sha256 passes the path computes
anyway. Sizes: the default job's θ (~100 floats), the LSTM optimizer's (tens of thousands) and 1M
and 4M floats.

    python -m benchmarks.wire_codec [--repeats 7] [--out benchmarks/results/wire_codec.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from proto import l2o_pb2
from proto.wire import (
    DEFAULT_CHUNK_BYTES,
    ByteAssembler,
    TreeTemplate,
    check_manifest,
    flatten_tree,
    gradient_messages,
    iter_chunk_views,
    manifest_from_proto,
    manifest_to_proto,
    theta_messages,
    total_bytes,
)

SIZES = {"default job (~100)": 112, "LSTM (~30k)": 30_000, "1M": 1_000_000, "4M": 4_000_000}


def make_tree(n: int) -> dict[str, Any]:
    """A tree of ``n`` float32 values in three leaves, like a small network."""
    rng = np.random.default_rng(0)
    return {"net": {"w": rng.normal(size=n - 16).astype(np.float32),
                    "b": rng.normal(size=8).astype(np.float32)},
            "out": rng.normal(size=8).astype(np.float32)}


# --- the hand-written codec, as it was in proto/wire.py (the baseline) ---------------------------

def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        bits = value & 0x7F
        value >>= 7
        if not value:
            out.append(bits)
            return bytes(out)
        out.append(bits | 0x80)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def hand_frame(*fields: tuple[int, bytes | memoryview | int | None]) -> bytes:
    """A protobuf message of ``(field_number, value)`` pairs, payloads copied once."""
    parts: list[bytes | memoryview] = []
    for number, value in fields:
        if value is None:
            continue
        if isinstance(value, int):
            if value:
                parts += [_varint(number << 3), _varint(value)]
            continue
        size = len(value) if isinstance(value, bytes) else value.nbytes
        parts += [_varint(number << 3 | 2), _varint(size), value]
    return b"".join(parts)


def hand_parse(message: bytes) -> dict[int, int | memoryview]:
    """The varint and length-delimited fields of a message; payloads as memoryviews (no copy)."""
    buf = memoryview(message)
    out: dict[int, int | memoryview] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        if key & 7 == 0:
            out[key >> 3], pos = _read_varint(buf, pos)
        else:
            length, pos = _read_varint(buf, pos)
            out[key >> 3] = buf[pos:pos + length]
            pos += length
    return out


# --- the two ends of the wire --------------------------------------------------------------------

def gradient_header(manifest: Sequence[Any]) -> l2o_pb2.GradientHeader:
    """The header a worker sends with a gradient of ``manifest``."""
    return l2o_pb2.GradientHeader(
        run_id="bench", theta_version=3, gen_id=0, worker_id="w0", seq=7, estimator="tbptt",
        inner_steps=20, mean_inner_loss=0.5, manifest=manifest_to_proto(manifest),
        total_bytes=total_bytes(manifest))


def assemble(header: Any, datas: Iterator[bytes | memoryview], template: TreeTemplate) -> Any:
    """What the receiver does with a header and its chunks' data (the same for both codecs)."""
    manifest = manifest_from_proto(header.manifest)
    check_manifest(manifest, max_bytes=1 << 30)
    template.check(manifest)
    asm = ByteAssembler(manifest, checked=True)
    for data in datas:
        asm.add(data)
    return asm.finish(like=template)


def push_generated(tree: Any, template: TreeTemplate) -> Any:
    """Send and receive one gradient with the generated classes."""
    manifest, views = flatten_tree(tree)
    sent = [m.SerializeToString()
            for m in gradient_messages(gradient_header(manifest), views, DEFAULT_CHUNK_BYTES)]
    got = [l2o_pb2.GradientChunk.FromString(b) for b in sent]
    return assemble(got[0].header, (c.data for c in got), template)


def push_hand(tree: Any, template: TreeTemplate) -> Any:
    """Send and receive one gradient with the hand-written framing."""
    manifest, views = flatten_tree(tree)
    header = gradient_header(manifest).SerializeToString()
    sent = [hand_frame((1, header if i == 0 else None), (2, data))
            for i, data in enumerate(iter_chunk_views(views, DEFAULT_CHUNK_BYTES))]
    got = [hand_parse(b) for b in sent]
    first = l2o_pb2.GradientHeader.FromString(bytes(got[0][1]))
    return assemble(first, (c.get(2, b"") for c in got), template)


def fetch_generated(tree: Any, template: TreeTemplate) -> Any:
    """Serve and receive θ once with the generated classes."""
    manifest, views = flatten_tree(tree)
    header = l2o_pb2.ThetaHeader(run_id="bench", version=3, gen_id=0,
                                 manifest=manifest_to_proto(manifest),
                                 total_bytes=total_bytes(manifest))
    sent = [m.SerializeToString() for m in theta_messages(3, header, views, DEFAULT_CHUNK_BYTES)]
    got = [l2o_pb2.ThetaChunk.FromString(b) for b in sent]
    return assemble(got[0].header, (c.data for c in got), template)


def fetch_hand(tree: Any, template: TreeTemplate) -> Any:
    """Serve and receive θ once with the hand-written framing."""
    manifest, views = flatten_tree(tree)
    header = l2o_pb2.ThetaHeader(run_id="bench", version=3, gen_id=0,
                                 manifest=manifest_to_proto(manifest),
                                 total_bytes=total_bytes(manifest)).SerializeToString()
    sent = [hand_frame((2, 3), (3, header if i == 0 else None), (4, data))
            for i, data in enumerate(iter_chunk_views(views, DEFAULT_CHUNK_BYTES))]
    got = [hand_parse(b) for b in sent]
    first = l2o_pb2.ThetaHeader.FromString(bytes(got[0][3]))
    return assemble(first, (c.get(4, b"") for c in got), template)


def sha256_twice(tree: Any, template: TreeTemplate) -> None:
    """The two sha256 passes of the path (sender hashes, receiver verifies), alone."""
    for _ in range(2):
        for leaf in (tree["net"]["w"], tree["net"]["b"], tree["out"]):
            hashlib.sha256(memoryview(leaf).cast("B")).digest()


def best_ms(fns: dict[str, Callable[[], Any]], repeats: int, budget_s: float
            ) -> dict[str, dict[str, float]]:
    """Best per-call wall-clock and process CPU time of each function in ms (``{"wall": …,
    "cpu": …}``); calls interleaved so that all see the same load."""
    loops = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        loops[name] = max(1, int(budget_s / repeats / max(time.perf_counter() - t0, 1e-6)))
    best = {clock: dict.fromkeys(fns, float("inf")) for clock in ("wall", "cpu")}
    for _ in range(repeats):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(loops[name]):
                fn()
            w1, c1 = time.perf_counter(), time.process_time()
            best["wall"][name] = min(best["wall"][name], (w1 - w0) / loops[name] * 1e3)
            best["cpu"][name] = min(best["cpu"][name], (c1 - c0) / loops[name] * 1e3)
    return best


def measure(n: int, repeats: int, budget_s: float) -> dict[str, Any]:
    """Both codecs and the sha256 alone for a tree of ``n`` floats: times, and per clock the
    ratio generated / hand and the difference over the sha256 time."""
    tree = make_tree(n)
    template = TreeTemplate(tree)
    for fn in (push_generated, push_hand, fetch_generated, fetch_hand):
        got = fn(tree, template)
        assert np.array_equal(got["net"]["w"], tree["net"]["w"]), fn.__name__
    fns = {name: (lambda f=f: f(tree, template)) for name, f in [
        ("push_generated", push_generated), ("push_hand", push_hand),
        ("fetch_generated", fetch_generated), ("fetch_hand", fetch_hand),
        ("sha256_x2", sha256_twice)]}
    times = best_ms(fns, repeats, budget_s)
    row: dict[str, Any] = {"floats": n, "bytes": 4 * n, "ms": times}
    for clock, ms in times.items():
        for way in ("push", "fetch"):
            gen, hand = ms[f"{way}_generated"], ms[f"{way}_hand"]
            row[f"{clock}_{way}_ratio"] = gen / hand  # generated over hand
            row[f"{clock}_{way}_extra_over_sha256"] = (gen - hand) / ms["sha256_x2"]
    return row


def print_table(rows: dict[str, dict[str, Any]], clock: str) -> None:
    """One table of ``rows`` for ``clock`` ("cpu" or "wall")."""
    print(f"{clock} ms per gradient / θ (ratio: generated over hand; extra: (generated - hand) "
          "over the two sha256 passes)")
    print(f"{'θ':>20} {'push gen':>9} {'hand':>8} {'ratio':>6} {'extra':>6} {'fetch gen':>10} "
          f"{'hand':>8} {'ratio':>6} {'extra':>6} {'sha256×2':>9}")
    for name, r in rows.items():
        ms = r["ms"][clock]
        print(f"{name:>20} {ms['push_generated']:>9.3f} {ms['push_hand']:>8.3f} "
              f"{r[f'{clock}_push_ratio']:>6.2f} {r[f'{clock}_push_extra_over_sha256']:>6.2f} "
              f"{ms['fetch_generated']:>10.3f} {ms['fetch_hand']:>8.3f} "
              f"{r[f'{clock}_fetch_ratio']:>6.2f} {r[f'{clock}_fetch_extra_over_sha256']:>6.2f} "
              f"{ms['sha256_x2']:>9.3f}")


def main(argv: list[str] | None = None) -> int:
    """Measure every size, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget-s", type=float, default=1.0,
                        help="about how long each function runs per size")
    parser.add_argument("--out", default="benchmarks/results/wire_codec.json")
    args = parser.parse_args(argv)
    rows = {name: measure(n, args.repeats, args.budget_s) for name, n in SIZES.items()}
    for clock in ("cpu", "wall"):
        print_table(rows, clock)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "wire_codec", "rows": rows, "repeats": args.repeats,
        "chunk_bytes": DEFAULT_CHUNK_BYTES,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
