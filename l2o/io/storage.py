"""Where a run's files live: a local path, a ``file://`` URL, or object storage through fsspec.

A run directory (``run_dir``) may be

- a local path (``runs``, ``/mnt/shared/runs``): a :class:`pathlib.Path`, as before;
- a ``file://`` URL (``file:///mnt/shared/runs``): the same local path;
- any other fsspec URL (``s3://bucket/prefix``, ``gs://…``, ``memory://…``): a
  :class:`upath.UPath` over the protocol's fsspec filesystem (``s3fs`` for ``s3://``), which
  has ``pathlib``'s API (``/``, ``name``, ``parent``, ``iterdir``, ``read_bytes``…).

Credentials never appear in the URL (the config refuses one with a password): fsspec takes them
from the environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for
an S3-compatible server…), so nothing that stores a run directory stores a secret.

Writes are atomic either way (:func:`l2o.io.atomic.atomic_write`): locally a temporary file
renamed over the destination, on object storage one put of the whole object, which readers see
whole or not at all. fsspec and universal_pathlib come with ``l2o[service]``; a local run
directory needs neither.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

#: ``scheme://`` at the start of a location (a Windows drive letter is not one)
_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]+)://")


def scheme_of(location: str | os.PathLike) -> str:
    """The URL scheme of ``location`` (``"s3"``, ``"file"``…), ``""`` for a plain path."""
    m = _SCHEME.match(str(location)) if not isinstance(location, Path) else None
    return m["scheme"].lower() if m else ""


def is_remote(location: Any) -> bool:
    """Whether ``location`` names object storage or another non-local fsspec filesystem."""
    return scheme_of(location) not in ("", "file")


def as_path(location: str | os.PathLike) -> Any:
    """``location`` as a path object: a :class:`~pathlib.Path` for a local path or a
    ``file://`` URL, else a :class:`upath.UPath` on the URL's fsspec filesystem."""
    if isinstance(location, Path):
        return location
    if not isinstance(location, str) and is_remote(location):  # a UPath already
        return location
    text = os.fspath(location)
    scheme = scheme_of(text)
    if scheme == "":
        return Path(text)
    if scheme == "file":
        return Path(unquote(urlsplit(text).path))
    try:
        from upath import UPath
    except ImportError as e:  # the library alone: local run directories only
        raise ImportError(f"a {scheme}:// location needs fsspec and universal_pathlib: "
                          "pip install 'l2o[service]'") from e
    return UPath(text)


def absolute(location: str | os.PathLike) -> Any:
    """:func:`as_path` of ``location``, made absolute when it is local (a URL already is)."""
    path = as_path(location)
    return path if is_remote(path) else path.expanduser().resolve()


def fresh(path: Any) -> Any:
    """``path``, with its filesystem's cached listings dropped when it is remote (fsspec caches
    a listing; another process, the learner, may have written since)."""
    if is_remote(path):
        path.fs.invalidate_cache()
    return path


def put_bytes(path: Any, data: bytes) -> None:
    """Store ``data`` as the object at the remote ``path`` in one put (whole or not at all)."""
    path.fs.pipe_file(path.path, data)


def move_tree(src: Any, dst: Any) -> None:
    """Move the directory ``src`` to ``dst``: a rename locally; on object storage each object
    copied under ``dst``, then the objects under ``src`` removed (not atomic: a rename aside)."""
    if not is_remote(src):
        src.rename(dst)
        return
    fs, prefix = src.fs, src.path.rstrip("/")
    for key in fs.find(prefix):
        fs.copy(key, dst.path.rstrip("/") + key[len(prefix):])
    fs.rm(prefix, recursive=True)
