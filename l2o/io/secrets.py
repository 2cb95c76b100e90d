"""Keeping secrets out of what is stored or shown: Redis URL passwords and bearer tokens.

A config may carry a Redis URL with a password (``service.redis_url``); the bearer token itself
never belongs in a config, but a field named for one (``token``, ``auth_token``…) may hold it.
Whatever is written for others to read (checkpoint metadata, the Redis run manifest,
``l2o status``, log lines) goes through :func:`redact_url` or :func:`redacted_config` first. A
run that needs the real URL takes it from its config file or ``$REDIS_URL``, never from a stored
copy.

Handing a secret to another process (a Ray actor) goes by file, never by value: the value would
sit in the actor's creation arguments, and a secret in a runtime env's ``env_vars`` is shown by
Ray's dashboard and state API. :func:`write_secret` stores it in a file only its owner can read
and returns a :class:`SecretFile`, which pickles to the path alone; the receiving process calls
:func:`reveal`. :func:`secret_from_env` reads ``$NAME``, else the file named by ``$NAME_FILE``
(``L2O_TOKEN_FILE``, ``REDIS_URL_FILE``): how a secret reaches a Ray job without a value in its
runtime env.

This module is part of the library (no ``services`` import), so the library and the service both
use it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

#: what a secret is replaced with
MASK = "***"

#: query parameters of a URL that hold a password (``unix:///run/redis.sock?password=…``)
_SECRET_QUERY = frozenset({"password", "pass", "token"})

#: in free text: the password of a URL's user info, and a ``password=`` query parameter
_TEXT_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*:)\S*@")
_TEXT_QUERY_PASSWORD = re.compile(r"([?&](?:password|pass|token)=)[^&\s]+", re.IGNORECASE)

#: field names whose values are secrets (also any name ending in ``_`` + one of these)
_SECRET_NAMES = ("token", "password", "secret")


def redact_url(url: str | None) -> str:
    """``url`` with its password (in the user info or a ``password=`` query parameter) replaced
    by ``***``, the user name kept; safe to log and to store. Text with URLs in it (an error
    message) gets the same done to each URL.

    >>> redact_url("redis://user:secret@host:6379/0")
    'redis://user:***@host:6379/0'
    >>> redact_url("unix:///run/redis.sock?db=0&password=secret")
    'unix:///run/redis.sock?db=0&password=***'
    """
    if not url:
        return str(url)
    if any(c.isspace() for c in url):  # text around a URL, e.g. an error message
        return _TEXT_QUERY_PASSWORD.sub(rf"\g<1>{MASK}", _TEXT_USERINFO.sub(rf"\g<1>{MASK}@", url))
    try:
        parts = urlsplit(url)
        has_password = parts.password is not None
    except ValueError:
        return "<unparseable redis url>"
    netloc = parts.netloc
    if has_password:
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = f"{userinfo.split(':', 1)[0]}:{MASK}@{hostport}"
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(k.lower() in _SECRET_QUERY for k, _ in pairs):
        query = urlencode([(k, MASK if k.lower() in _SECRET_QUERY else v) for k, v in pairs],
                          safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    # by hand: urlunsplit drops the "//" of a unix:// URL with no host
    return (f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
            + (f"#{parts.fragment}" if parts.fragment else ""))


def _is_secret_field(name: str) -> bool:
    """Whether a config field called ``name`` holds a secret itself (``token``,
    ``auth_token``, ``password``…); ``token_env`` and ``token_file`` only say where one is."""
    name = name.lower()
    return any(name == s or name.endswith(f"_{s}") for s in _SECRET_NAMES)


def redacted_config(config: Any) -> Any:
    """A copy of ``config`` (a dict as ``model_dump(mode="json")`` gives it, lists and nested
    dicts included) with every secret redacted: fields named for a secret (``token``,
    ``…_password``…) become ``***``; URLs (fields named ``…url``, any string with ``://``) go
    through :func:`redact_url`. Other values are returned as they are; ``config`` is not
    modified."""
    if isinstance(config, dict):
        return {k: _redacted_field(str(k), v) for k, v in config.items()}
    if isinstance(config, list | tuple):
        items = [redacted_config(v) for v in config]
        return tuple(items) if isinstance(config, tuple) else items
    if isinstance(config, str) and "://" in config:
        return redact_url(config)
    return config


def _redacted_field(name: str, value: Any) -> Any:
    if value is None:
        return None
    if _is_secret_field(name) and isinstance(value, str | bytes):
        return MASK
    if isinstance(value, str) and name.lower().endswith("url"):
        return redact_url(value)
    return redacted_config(value)


@dataclass(frozen=True)
class SecretFile:
    """A secret passed by the path of the file holding it: only ``path`` is pickled, logged or
    shown; :meth:`read` (or :func:`reveal`) gives the value."""

    path: str

    def read(self) -> str:
        """The secret: the file's text, surrounding whitespace stripped (an empty or missing file
        raises ``ValueError`` naming the path)."""
        try:
            value = Path(self.path).read_text().strip()
        except OSError as e:
            raise ValueError(f"cannot read the secret file {self.path}: {e.strerror}") from None
        if not value:
            raise ValueError(f"the secret file {self.path} is empty")
        return value


def write_secret(path: str | os.PathLike, value: str) -> SecretFile:
    """Store ``value`` in ``path`` (mode 0600, its directory 0700, written atomically); the
    :class:`SecretFile` to hand over instead of the value."""
    from l2o.io.atomic import atomic_write  # noqa: PLC0415 - only writers need it

    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    with atomic_write(path, "w") as f:  # a mkstemp file: mode 0600
        f.write(value + "\n")
    return SecretFile(str(path))


def reveal(secret: str | SecretFile | None) -> str | None:
    """The value of ``secret``: read from its file when it is a :class:`SecretFile`."""
    return secret.read() if isinstance(secret, SecretFile) else secret


def secret_from_env(name: str) -> str | None:
    """``$name``, else the content of the file ``$name_FILE`` names; ``None`` if neither is
    set."""
    value = os.environ.get(name, "").strip()
    if value:
        return value
    path = os.environ.get(f"{name}_FILE", "").strip()
    return SecretFile(path).read() if path else None
