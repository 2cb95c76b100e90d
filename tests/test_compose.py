"""docker-compose.yml: no default secrets, nothing published on all interfaces."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

COMPOSE = Path(__file__).resolve().parents[1] / "docker-compose.yml"

#: ``${NAME…}`` as compose interpolates it: NAME and what follows (``:-default``, ``:?error``…).
INTERPOLATION = re.compile(r"\$\{(\w+)([^}]*)\}")
SECRETS = ("L2O_TOKEN", "REDIS_PASSWORD")


def _strings(node: object) -> list[str]:
    """Every string in a parsed YAML tree, keys and values."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def test_compose_has_no_default_secret_and_refuses_to_start_without_one():
    text = COMPOSE.read_text()
    strings = _strings(yaml.safe_load(text))
    uses = [(name, rest) for s in strings for name, rest in INTERPOLATION.findall(s)]
    for secret in SECRETS:
        forms = {rest for name, rest in uses if name == secret}
        assert forms, f"{secret} is not used"
        assert all(rest.startswith(":?") for rest in forms), (secret, forms)
    for s in strings:  # no literal password in a Redis URL or on redis-server's command line
        assert not re.search(r"redis://:[^$@]", s), s
        assert not re.search(r"--requirepass\s+[^\s\"$]", s), s
    assert "change-me" not in text


def test_compose_publishes_ports_on_loopback_only():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    published = {name: [str(p) for p in svc.get("ports", [])] for name, svc in services.items()}
    for name, ports in published.items():
        for port in ports:
            assert port.startswith("127.0.0.1:") and port.count(":") == 2, (name, port)
