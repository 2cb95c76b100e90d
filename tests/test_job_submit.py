"""``ray job submit`` as the README documents it, from a fresh home directory.

A real ``ray start --head`` (token authentication on, the token generated into the new home by
``ray get-auth-token --generate`` and never printed) on free non-default ports, in a temporary
``HOME`` and a short ``RAY_TMPDIR`` (unix socket paths are limited to ~107 bytes). One instance
for the module, stopped by ending its own ``ray start --block`` process group: ``ray stop`` would
end every Ray instance on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import matplotlib
import pytest

pytest.importorskip("ray")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: A tiny run of the L2L quadratic preset: one unroll worker, no eval worker, a short final eval.
TINY = ["--preset", "l2l-quadratic", "--meta-steps", "3",
        "--set", "estimator.num_tasks=4", "--set", "estimator.num_steps=10",
        "--set", "estimator.unroll_length=5", "--set", "optimizer.kwargs.layers=[8]",
        "--set", "checkpoint_every=2", "--set", "eval.steps=10", "--set", "eval.seeds=2",
        "--set", "eval.adam_learning_rates=[0.01]", "--set", "service.num_unroll_workers=1",
        "--set", "service.num_eval_workers=0", "--set", "service.worker_num_cpus=0.5"]
#: Ports of a Ray head, each given explicitly so that nothing lands on a default.
PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port",
              "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
              "--runtime-env-agent-port", "--metrics-export-port", "--node-manager-port",
              "--object-manager-port")


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on loopback now."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class RayHead:
    """A ``ray start --head --block`` of this module: its environment, address and CLI."""

    def __init__(self, home: Path, temp: Path) -> None:
        ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
        self.dashboard = f"http://127.0.0.1:{ports['--dashboard-port']}"
        # up: the GCS (as KubeRay's submitter waits for it) and the node (as compose and KubeRay
        # probe it), both answering without the token
        self.health = (f"{self.dashboard}/api/gcs_healthz",
                       f"http://127.0.0.1:{ports['--dashboard-agent-listen-port']}/api/healthz")
        self.l2o_token = uuid.uuid4().hex  # the cluster's own secret, set where `ray start` runs
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RAY_", "REDIS_URL", "L2O_TOKEN"))}
        self.env = {**env, "HOME": str(home), "RAY_TMPDIR": str(temp), "RAY_AUTH_MODE": "token",
                    "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
                    "RAY_API_SERVER_ADDRESS": self.dashboard, "L2O_TOKEN": self.l2o_token,
                    # matplotlib's font cache from the usual home: not rebuilt in the new one
                    "MPLCONFIGDIR": env.get("MPLCONFIGDIR") or matplotlib.get_cachedir()}
        # the README's recipe: a token in ~/.ray/auth_token, readable by its owner only
        self.ray("bash", "-c", "umask 077 && ray get-auth-token --generate >/dev/null")
        self.token = (home / ".ray" / "auth_token").read_text().strip()
        self.log = temp / "ray-start.log"
        flags = [str(a) for kv in ports.items() for a in kv]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address",
                 "127.0.0.1", "--num-cpus", "2", "--disable-usage-stats", "--temp-dir",
                 str(temp), *flags], env=self.env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        self._wait_up(120.0)

    def _wait_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {self.log.read_text()[-2000:]}")
            try:
                for url in self.health:  # an HTTP error status raises
                    urllib.request.urlopen(url, timeout=2).close()
                return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the Ray head did not come up: {self.log.read_text()[-2000:]}")

    def ray(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A command in the head's environment, from the repository root (``ray …`` on PATH)."""
        out = subprocess.run(list(args), env=self.env, cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        if check and out.returncode != 0:
            raise AssertionError(f"{args} exited {out.returncode}: {out.stdout}{out.stderr}")
        return out

    def stop(self) -> None:
        """End the ``ray start --block`` process (it stops its Ray), then its process group."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # this instance's leftovers only
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    temp = Path(tempfile.mkdtemp(prefix="l2o-rj-", dir="/tmp"))
    head = RayHead(home, temp)
    yield head
    head.stop()
    shutil.rmtree(temp, ignore_errors=True)


def submit(head: RayHead, job_id: str, *entrypoint: str, wait: bool
           ) -> subprocess.CompletedProcess:
    """``ray job submit --working-dir . -- ENTRYPOINT`` as the README has it."""
    return head.ray("ray", "job", "submit", "--submission-id", job_id, "--working-dir", ".",
                    *([] if wait else ["--no-wait"]), "--", *entrypoint, check=False)


def status(head: RayHead, job_id: str) -> str:
    out = head.ray("ray", "job", "status", job_id)
    return out.stdout + out.stderr


def test_job_runs_in_a_fresh_home_and_writes_where_told(head, tmp_path):
    """The job succeeds with token auth on; its log ends with the absolute results location,
    the results are there, and neither the Ray token nor the l2o token is ever shown."""
    assert oct((Path(head.env["HOME"]) / ".ray" / "auth_token").stat().st_mode & 0o777) == \
        "0o600"
    # `l2o train` (the CLI's code) with the default relative run_dir: refused, as it would land
    # in Ray's copy of the working dir
    relative = f"rel-{uuid.uuid4().hex[:6]}"
    submit(head, relative, "python", "-m", "services.cli", "train", "--preset", "l2l-quadratic",
           "--meta-steps", "1", wait=False)
    job = f"l2o-{uuid.uuid4().hex[:6]}"
    runs = tmp_path / "runs"
    sent = submit(head, job, "python", "-m", "services.train", *TINY, "--run-name", "tiny",
                  "--run-dir", str(runs), wait=True)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert f"Job '{job}' succeeded" in status(head, job)
    logs = head.ray("ray", "job", "logs", job).stdout
    last = [line for line in logs.splitlines() if line.strip()][-1]
    assert last.startswith(f"results in {runs / 'tiny'} "), last
    summary = json.loads((runs / "tiny" / "summary.json").read_text())
    assert summary["updates"] >= 3 and summary["mode"] == "service"
    assert list((runs / "tiny" / "checkpoints").glob("params_*.ckpt"))

    deadline = time.monotonic() + 120
    while f"Job '{relative}' failed" not in (refused := status(head, relative)):
        assert "succeeded" not in refused and time.monotonic() < deadline, refused
        time.sleep(0.5)
    refusal = head.ray("ray", "job", "logs", relative).stdout
    assert "run_dir: 'runs' is relative" in refusal and "absolute --run-dir" in refusal
    listing = head.ray("ray", "job", "list").stdout
    assert job in listing and relative in listing
    for shown in (logs, refusal, listing, sent.stdout, sent.stderr, head.log.read_text()):
        assert head.token not in shown and head.l2o_token not in shown


@pytest.mark.parametrize("job_config", [
    None, "not json", "[]", json.dumps({"metadata": []}), json.dumps({"metadata": {}}),
    json.dumps({"metadata": {"job_submission_id": "raysubmit_x"}})])
def test_only_a_submitted_job_needs_an_absolute_run_dir(monkeypatch, job_config):
    """What Ray's job supervisor sets tells a submitted job; only there is `runs` refused."""
    from l2o.io.config import ConfigError
    from services.train import arg_parser, config_from_args
    from workers.ray_setup import JOB_CONFIG_ENV, job_run_dir_problem, submitted_job_id

    if job_config is None:
        monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    else:
        monkeypatch.setenv(JOB_CONFIG_ENV, job_config)
    job = submitted_job_id()
    assert job == ("raysubmit_x" if job_config and "raysubmit_x" in job_config else None)
    for fine in ("/abs/runs", "s3://bucket/runs", "file:///abs/runs"):
        assert job_run_dir_problem(fine) is None
    args = arg_parser().parse_args(["--preset", "l2l-quadratic", "--run-dir", "runs"])
    if job is None:
        assert job_run_dir_problem("runs") is None
        assert config_from_args(args).run_dir == "runs"
    else:
        with pytest.raises(ConfigError, match=r"run_dir: 'runs' is relative, and this is Ray job "
                                              r"raysubmit_x.*absolute --run-dir"):
            config_from_args(args)
