"""The Redis password and the bearer token never reach a checkpoint, the Redis run manifest or
``l2o status --json``: one redaction (``l2o.io.secrets``) applied wherever they are stored."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import optax
import pytest
from typer.testing import CliRunner

from l2o.io.checkpoints import read_checkpoint, save_checkpoint
from l2o.io.config import ServiceConfig, config_from_dict
from l2o.io.secrets import redact_url, redacted_config
from l2o.training.trainer import Trainer
from learner.core import Learner

SECRET = "s3cret"
URL = f"redis://:{SECRET}@127.0.0.1:1/0"


def test_redact_url_hides_passwords():
    assert redact_url("redis://user:hunter2@db:6380/1") == "redis://user:***@db:6380/1"
    assert redact_url("rediss://:hunter2@db/0") == "rediss://:***@db/0"
    assert "hunter2" not in redact_url("redis://default:hunter2@db")
    assert redact_url("unix:///tmp/x/redis.sock") == "unix:///tmp/x/redis.sock"


def test_redact_url_covers_sockets_queries_and_odd_urls():
    assert redact_url(f"unix://:{SECRET}@/run/redis.sock") == "unix://:***@/run/redis.sock"
    assert (redact_url(f"unix:///run/redis.sock?db=0&password={SECRET}")
            == "unix:///run/redis.sock?db=0&password=***")
    assert redact_url("redis://user@db/0") == "redis://user@db/0"  # no password: unchanged
    assert redact_url("redis://:p%40ss@db/0") == "redis://:***@db/0"
    assert redact_url(redact_url(URL)) == redact_url(URL) == "redis://:***@127.0.0.1:1/0"
    assert SECRET not in redact_url(f"redis://[::1:{SECRET}")
    assert redact_url(None) == "None" and redact_url("") == ""
    text = f"cannot reach {URL}: refused (unix:///s.sock?db=0&password={SECRET} too)"
    assert redact_url(text) == ("cannot reach redis://:***@127.0.0.1:1/0: refused "
                                "(unix:///s.sock?db=0&password=*** too)")


def test_redacted_config_redacts_urls_and_tokens_only():
    config = {"seed": 3, "service": {"redis_url": URL, "token_env": "L2O_TOKEN",
                                     "token_file": "/run/token", "tls_key": None},
              "extra": [{"token": "abc", "auth_token": "def", "password": "ghi"}, URL]}
    out = redacted_config(config)
    assert out["service"] == {"redis_url": "redis://:***@127.0.0.1:1/0", "token_env": "L2O_TOKEN",
                              "token_file": "/run/token", "tls_key": None}
    assert out["extra"] == [{"token": "***", "auth_token": "***", "password": "***"},
                            "redis://:***@127.0.0.1:1/0"]
    assert out["seed"] == 3 and config["service"]["redis_url"] == URL  # a copy
    assert redacted_config({"last_error": f"cannot reach {URL}"}) == {
        "last_error": "cannot reach redis://:***@127.0.0.1:1/0"}


def run_config(run_dir: Path):
    return config_from_dict({
        "run_name": "secret", "run_dir": str(run_dir), "seed": 0, "meta_steps": 2,
        "log_every": 1, "checkpoint_every": 1, "evaluation_period": 2, "evaluation_epochs": 1,
        "task": {"name": "quadratic", "kwargs": {"dim": 2}}, "optimizer": {"name": "learned_adam"},
        "estimator": {"num_tasks": 1, "unroll_length": 2, "num_steps": 4},
        "eval": {"steps": 4, "seeds": 1}, "service": {"redis_url": URL}})


def test_trainer_checkpoints_hold_no_redis_password(tmp_path):
    cfg = run_config(tmp_path)
    trainer = Trainer(cfg)
    trainer.train()
    files = sorted((trainer.run_dir / "checkpoints").glob("*.ckpt"))
    assert {p.name.split("_")[0] for p in files} >= {"full", "params", "worker", "best.ckpt"}
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path
    _, meta = read_checkpoint(files[0])
    assert meta["config"]["service"]["redis_url"] == "redis://:***@127.0.0.1:1/0"
    resumed = Trainer(cfg)  # the real URL comes from the config, not from the checkpoint
    assert resumed.restore() and resumed.cfg.service.redis_url == URL


def test_learner_checkpoints_hold_no_redis_password(tmp_path):
    cfg = run_config(tmp_path)
    theta = {"w": np.ones(3, np.float32)}
    learner = Learner(theta, optax.sgd(0.1), cfg.service, tmp_path, "secret",
                      extra_metadata={"config": cfg.model_dump(mode="json")},
                      tensorboard=False, start=False)
    full, params = learner.save_checkpoint()
    for path in (full, params):
        assert SECRET.encode() not in path.read_bytes(), path
    assert read_checkpoint(full)[1]["service"]["redis_url"] == "redis://:***@127.0.0.1:1/0"
    resumed = Learner.resume(theta, optax.sgd(0.1), cfg.service, tmp_path, "secret",
                             tensorboard=False, start=False)
    assert resumed.resumed_from == full and resumed.config.redis_url == URL


def test_plain_dict_metadata_is_redacted_too(tmp_path):
    path = save_checkpoint(tmp_path / "x.ckpt", {"w": np.zeros(2)},
                           {"note": "hi", "redis_url": URL, "token": "abc"})
    assert SECRET.encode() not in path.read_bytes() and b"abc" not in path.read_bytes()
    assert read_checkpoint(path)[1] == {"note": "hi", "redis_url": "redis://:***@127.0.0.1:1/0",
                                        "token": "***"}


# --- the Redis run manifest and `l2o status --json` (a real, embedded Redis) -----------------

@pytest.fixture
def registry():
    from services.redis_server import EmbeddedRedis, redis_connection
    from services.registry import Registry

    # its own server, stopped after: this process's embedded one is for the runs of other tests
    srv = EmbeddedRedis()
    try:
        client, url = redis_connection(srv.url)
        yield Registry(client, f"test-{uuid.uuid4().hex[:8]}"), url
    finally:
        srv.stop()


def status_json(url: str, run_id: str) -> str:
    from services.cli import app

    res = CliRunner().invoke(app, ["status", run_id, "--redis-url", url, "--json"])
    assert res.exit_code == 0, res.output
    return res.output


def test_manifest_and_status_hold_no_redis_password(registry):
    reg, url = registry
    config = ServiceConfig(redis_url=URL).model_dump(mode="json")
    reg.write_manifest({"service": config}, run_dir="/tmp/x", redis=URL)
    raw = reg.r.get(reg.key("manifest"))
    assert SECRET not in str(raw)
    assert reg.manifest()["config"]["service"]["redis_url"] == "redis://:***@127.0.0.1:1/0"
    reg.set_status("running")
    out = status_json(url, reg.run_id)
    assert SECRET not in out
    assert json.loads(out)["config"]["service"]["redis_url"] == "redis://:***@127.0.0.1:1/0"


def test_status_redacts_a_manifest_written_in_plaintext(registry):
    """A manifest from before redaction (or written by other code) is redacted when shown."""
    reg, url = registry
    reg.r.set(reg.key("manifest"), json.dumps({"config": {"service": {"redis_url": URL}},
                                               "created_at": 0.0}))
    out = status_json(url, reg.run_id)
    assert SECRET not in out and "redis://:***@127.0.0.1:1/0" in out


# --- secrets handed to other processes by file ---------------------------------------------

def test_secrets_are_handed_over_by_a_private_file(tmp_path, monkeypatch):
    """A token or a Redis URL with a password goes to actors as the path of a 0600 file: the
    pickled argument holds the path, never the value; the environment's ``*_FILE`` variables
    are read the same way, and a missing file is named."""
    import os
    import pickle

    from l2o.io.secrets import SecretFile, reveal, secret_from_env
    from services.auth import TokenError, load_token
    from services.train import hand_over

    run_dir = tmp_path / "run"
    token = hand_over(run_dir, "token", "tok-" + SECRET)
    url = hand_over(run_dir, "redis_url", URL)
    plain = hand_over(run_dir, "redis_url_plain", "unix:///tmp/r.sock")
    assert plain == "unix:///tmp/r.sock"  # nothing secret in it: passed as it is
    for ref, value in ((token, "tok-" + SECRET), (url, URL)):
        assert isinstance(ref, SecretFile) and reveal(ref) == value
        assert SECRET.encode() not in pickle.dumps(ref) and SECRET not in repr(ref)
        assert os.stat(ref.path).st_mode & 0o777 == 0o600
    assert os.stat(run_dir / "secrets").st_mode & 0o777 == 0o700
    monkeypatch.delenv("L2O_TOKEN", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("L2O_TOKEN_FILE", token.path)
    monkeypatch.setenv("REDIS_URL_FILE", url.path)
    assert load_token() == "tok-" + SECRET and secret_from_env("REDIS_URL") == URL
    monkeypatch.setenv("L2O_TOKEN_FILE", str(tmp_path / "nope"))
    with pytest.raises(TokenError, match="L2O_TOKEN_FILE.*nope"):
        load_token()
