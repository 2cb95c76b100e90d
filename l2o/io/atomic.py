"""Writing a file so that readers never see it half written: a temporary file, then a rename;
on object storage (:mod:`l2o.io.storage`), one put of the whole object."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from l2o.io.storage import as_path, is_remote, put_bytes


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on success it is flushed, ``fsync``-ed
    and replaces ``path`` (``os.replace``), on an exception it is removed and ``path`` is left as
    it was. A remote ``path`` (``s3://…``) is written from memory in one put on success, and not
    at all on an exception."""
    path = as_path(path)
    if is_remote(path):
        buffer: IO[Any] = io.BytesIO() if "b" in mode else io.StringIO()
        yield buffer
        data = buffer.getvalue()
        put_bytes(path, data if isinstance(data, bytes) else data.encode())
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, data: Any, *, indent: int = 2) -> Any:
    """Write ``data`` as indented JSON to ``path`` (local or remote) atomically; the path."""
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=indent)
    return as_path(path)
