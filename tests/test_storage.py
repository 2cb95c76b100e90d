"""Run directories on shared storage: local paths, ``file://`` and a real S3-compatible server.

The S3 part talks to moto's server mode over loopback HTTP through s3fs (``tests/servers.py``),
the way a cluster's learner and eval workers talk to S3 or MinIO.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from l2o.io.atomic import atomic_write, write_json
from l2o.io.checkpoints import (
    CheckpointError,
    CheckpointMeta,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    newest_intact_checkpoint,
    read_checkpoint,
    save_checkpoint,
    set_aside,
)
from l2o.io.config import ConfigError, config_from_dict
from l2o.io.storage import as_path, fresh, is_remote, move_tree

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from servers import S3_SECRET, s3_server  # noqa: E402

TREE = {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3), "b": jnp.ones(3, jnp.float32)}


def meta(version: int) -> CheckpointMeta:
    return CheckpointMeta(kind="full", version=version, run_id="r-1",
                          config={"service": {"redis_url": "redis://:pw@h:1/0"}})


@pytest.fixture(scope="module")
def bucket():
    """A bucket on a moto S3 server for the module (credentials in the environment)."""
    with s3_server() as url:
        yield url


def test_locations_name_their_filesystem(tmp_path):
    assert as_path("runs/x") == Path("runs/x") and not is_remote("runs/x")
    assert as_path(f"file://{tmp_path}/r") == tmp_path / "r" and not is_remote(f"file://{tmp_path}")
    s3 = as_path("s3://bucket/prefix") / "checkpoints"
    assert is_remote(s3) and str(s3) == "s3://bucket/prefix/checkpoints"
    cfg = config_from_dict({"run_dir": f"file://{tmp_path}", "run_name": "a"})
    assert cfg.run_path() == tmp_path / "a" and cfg.local_path() == tmp_path / "a"
    cfg = config_from_dict({"run_dir": "s3://bucket/runs", "run_name": "a",
                            "local_dir": str(tmp_path)})
    assert str(cfg.run_path()) == "s3://bucket/runs/a" and cfg.local_path() == tmp_path / "a"


@pytest.mark.parametrize("run_dir, message", [
    ("s3://AKIA:topsecret@bucket/runs", "must not hold credentials"),
    ("file://relative/runs", "absolute path"),
    ("s3:///", "needs a bucket"),
    (" ", "give a path"),
])
def test_a_bad_run_dir_is_named_and_never_echoed(run_dir, message):
    with pytest.raises(ConfigError, match=message) as e:
        config_from_dict({"run_dir": run_dir})
    assert "run_dir:" in str(e.value) and "topsecret" not in str(e.value)


def test_a_local_write_is_all_or_nothing(tmp_path):
    path = tmp_path / "sub" / "x.json"
    write_json(path, {"a": 1})
    with pytest.raises(RuntimeError), atomic_write(path, "w") as f:
        f.write('{"half"')
        raise RuntimeError("writer died")
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]  # no temporary file left


def test_an_object_write_is_all_or_nothing(bucket):
    path = as_path(f"{bucket}/atomic/x.json")
    assert write_json(path, {"a": 1}) == path
    with pytest.raises(RuntimeError), atomic_write(path, "w") as f:
        f.write('{"half"')
        raise RuntimeError("writer died")
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]


def test_checkpoints_on_s3_round_trip_checksummed_and_redacted(bucket):
    run = f"{bucket}/roundtrip/run"
    for v in (1, 2):
        save_checkpoint(checkpoint_path(run, "full", v), TREE, meta(v))
    assert [s for s, _ in list_checkpoints(run, "full")] == [1, 2]
    newest = latest_checkpoint(run, "full")
    assert str(newest) == f"{run}/checkpoints/full_00000002.ckpt"
    raw, stored = read_checkpoint(str(newest))
    np.testing.assert_array_equal(raw["w"], np.asarray(TREE["w"]))
    assert stored["config"]["service"]["redis_url"] == "redis://:***@h:1/0"
    blob = newest.read_bytes()
    assert b"pw@" not in blob and S3_SECRET.encode() not in blob
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(f"{run}/checkpoints/full_00000009.ckpt")


def test_a_damaged_object_is_refused_and_skipped_on_resume(bucket):
    run = f"{bucket}/damaged/run"
    for v in (1, 2, 3):
        save_checkpoint(checkpoint_path(run, "full", v), TREE, meta(v))
    two, three = checkpoint_path(run, "full", 2), checkpoint_path(run, "full", 3)
    data = bytearray(three.read_bytes())
    data[-1] ^= 0xFF
    three.write_bytes(bytes(data))  # a flipped byte
    two.write_bytes(two.read_bytes()[:-5])  # cut short
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        read_checkpoint(three)
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(two)
    found = newest_intact_checkpoint(run, TREE, "full")
    assert found.meta.version == 1 and [p.name for p in found.skipped] == [
        "full_00000003.ckpt", "full_00000002.ckpt"]
    damaged = list(found.skipped)
    aside = set_aside(three, damaged)  # a writer reaching step 3 again keeps the damaged object
    assert aside.name == "full_00000003.ckpt.damaged" and aside.is_file()
    assert not three.exists() and damaged == [two]


def test_a_listing_sees_objects_another_writer_put(bucket):
    from s3fs import S3FileSystem

    run = f"{bucket}/listing/run"
    save_checkpoint(checkpoint_path(run, "params", 1), TREE, meta(1).for_params())
    assert len(list_checkpoints(run, "params")) == 1  # fsspec now caches this listing
    other = S3FileSystem(skip_instance_cache=True)  # another process: the learner
    other.pipe_file(str(checkpoint_path(run, "params", 2).path),
                    checkpoint_path(run, "params", 1).read_bytes())
    assert [s for s, _ in list_checkpoints(run, "params")] == [1, 2]


def test_a_run_directory_on_s3_is_moved_aside_whole(bucket):
    src, dst = as_path(f"{bucket}/aside/run"), as_path(f"{bucket}/aside/run.old")
    write_json(src / "checkpoints" / "a.json", {"a": 1})
    write_json(src / "run_id", "x")
    move_tree(src, dst)
    assert not fresh(src).exists()
    assert sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file()) == [
        "checkpoints/a.json", "run_id"]
