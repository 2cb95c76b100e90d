"""The image, the compose file and the KubeRay manifests, checked without a container runtime.

``docker-compose.yml`` against the Compose Specification's schema and ``deploy/kuberay/`` against
KubeRay's CRD schemas (vendored in ``deploy/schemas/``, see its README); no default secret,
nothing published on all interfaces; and everything they and ``deploy/Dockerfile`` name (files
copied, files read in the image, ``python -m`` modules, configs) is in the build context.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
KUBERAY = ROOT / "deploy" / "kuberay"
SCHEMAS = ROOT / "deploy" / "schemas"

#: ``${NAME…}`` as compose interpolates it: NAME and what follows (``:-default``, ``:?error``…).
INTERPOLATION = re.compile(r"\$\{(\w+)([^}]*)\}")
SECRETS = ("L2O_TOKEN", "REDIS_PASSWORD", "RAY_AUTH_TOKEN")
#: Environment variables that hold a secret: never a literal value in a manifest.
SECRET_ENV = ("L2O_TOKEN", "REDIS_URL", "RAY_AUTH_TOKEN")
#: The manifests' kinds and their CRD schemas.
CRDS = {"RayCluster": "ray.io_rayclusters.v1.json", "RayJob": "ray.io_rayjobs.v1.json"}
DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def _strings(node: object) -> list[str]:
    """Every string in a parsed YAML tree, keys and values."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def manifests() -> list[dict[str, Any]]:
    return [doc for path in sorted(KUBERAY.glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifest(kind: str) -> dict[str, Any]:
    (doc,) = [m for m in manifests() if m["kind"] == kind]
    return doc


def pod_specs(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The pod spec of the head (``head``) and of each worker group, by group name."""
    spec = cluster["spec"]
    return {"head": spec["headGroupSpec"]["template"]["spec"],
            **{g["groupName"]: g["template"]["spec"] for g in spec["workerGroupSpecs"]}}


# ------------------------------------------------------------------------------------------------
# The image: what deploy/Dockerfile copies where


def dockerfile_copies() -> list[tuple[str, str]]:
    """``(source in the build context, destination in the image)`` of each ``COPY`` from the
    context (not ``--from`` another stage), relative destinations against the ``WORKDIR``."""
    workdir, copies = PurePosixPath("/"), []
    for line in DOCKERFILE.read_text().splitlines():
        words = line.split()
        if words[:1] == ["FROM"]:  # a new stage starts at the root
            workdir = PurePosixPath("/")
        elif words[:1] == ["WORKDIR"]:
            workdir = workdir / words[1]
        elif words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            *sources, dest = [w for w in words[1:] if not w.startswith("--")]
            copies += [(src, str(workdir / dest)) for src in sources]
    return copies


def in_context(image_path: str) -> Path:
    """The build-context file that the image has at ``image_path`` (from the last ``COPY`` that
    covers it); fails when none does."""
    for src, dest in reversed(dockerfile_copies()):
        if image_path == dest.rstrip("/"):
            return ROOT / src
        if dest.endswith("/") and image_path.startswith(dest):
            return ROOT / src / image_path[len(dest):]
    raise AssertionError(f"{image_path} is not in the image (no COPY puts it there)")


def test_dockerfile_copies_exist_and_hold_every_package():
    copies = dockerfile_copies()
    for src, _ in copies:
        assert (ROOT / src).exists(), f"COPY {src}: not in the build context"
    pyproject = (ROOT / "pyproject.toml").read_text()
    include = re.search(r"include = \[([^]]*)\]", pyproject).group(1)
    packages = {p.strip(' "*') for p in include.split(",")}
    assert packages <= {src for src, _ in copies}, "the wheel's packages are all copied"
    assert {"pyproject.toml", "README.md"} <= {src for src, _ in copies}


def test_dockerfile_installs_a_wheel_with_the_service_extra_as_a_non_root_user():
    text = DOCKERFILE.read_text()
    assert "pip install -e" not in text and "--editable" not in text
    assert re.search(r"pip wheel .*--wheel-dir /wheels \.", text)
    assert '[service]"' in text
    users = re.findall(r"^USER (\S+)", text, flags=re.M)
    assert users and users[-1] not in ("root", "0")
    stages = re.findall(r"^FROM \S+ AS (\w+)", text, flags=re.M)
    assert {"cpu", "cuda"} <= set(stages) and stages[-1] == "cpu"  # the default target: CPU
    cuda = text[text.index("AS cuda"):text.index("AS cpu")]
    assert "jax[cuda12]" in cuda


def test_dockerfile_ray_matches_the_manifests():
    ray_version = re.search(r"ARG RAY_VERSION=(\S+)", DOCKERFILE.read_text()).group(1)
    assert manifest("RayCluster")["spec"]["rayVersion"] == ray_version


# ------------------------------------------------------------------------------------------------
# What the compose file and the manifests run


def commands() -> list[list[str]]:
    """Every command line the compose file and the manifests run in the image."""
    out = []
    for svc in compose()["services"].values():
        for key in ("entrypoint", "command"):
            if isinstance(svc.get(key), list) and "build" in svc:
                out.append(svc[key])
        test = (svc.get("healthcheck") or {}).get("test")
        if test and test[0] == "CMD":
            out.append(test[1:])
    out.append(shlex.split(manifest("RayJob")["spec"]["entrypoint"]))
    return out


def test_every_module_and_file_they_run_is_in_the_image():
    from l2o.io.config import load_config

    run = commands()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.*)$", DOCKERFILE.read_text(),
                                      flags=re.M).group(1))
    scripts = re.search(r"\[project\.scripts\]\n(\w+) =", (ROOT / "pyproject.toml").read_text())
    assert entrypoint == [scripts.group(1)]  # the console script the wheel installs
    # what they run in the image: python, or ray (the service extra installs it)
    assert {c[0] for c in run} <= {"python", "ray"}
    modules = [c[c.index("-m") + 1] for c in run if c[0] == "python" and "-m" in c]
    assert {"services.train", "learner", "learner.health"} <= set(modules)
    packages = {src for src, _ in dockerfile_copies()}
    for module in modules:
        assert module.split(".")[0] in packages, f"{module}: its package is not in the image"
        spec = importlib.util.find_spec(module)
        assert spec is not None and Path(spec.origin).is_relative_to(ROOT), module
    configs = [c[c.index("--config") + 1] for c in run if "--config" in c]
    assert configs
    for path in configs:
        load_config(in_context(path))  # there, and a valid config


def test_the_rayjob_entrypoint_is_a_valid_run_on_the_shared_volume():
    from services.train import arg_parser, config_from_args

    words = shlex.split(manifest("RayJob")["spec"]["entrypoint"])
    assert words[:3] == ["python", "-m", "services.train"]
    args = arg_parser().parse_args(words[3:])
    image_config = str(args.config)
    args.config = in_context(image_config)
    cfg = config_from_args(args)
    assert cfg.service.host == "auto"  # workers in other pods reach the learner
    run_dir = PurePosixPath(cfg.run_dir)
    assert run_dir.is_absolute()
    for group, pod in pod_specs(manifest("RayCluster")).items():
        mounts = {m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert any(run_dir.is_relative_to(m) for m in mounts), f"{group}: no volume at {run_dir}"


# ------------------------------------------------------------------------------------------------
# docker-compose.yml


def test_compose_file_is_valid_by_the_compose_specification():
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    jsonschema.Draft7Validator(schema).validate(compose())
    misspelt = copy.deepcopy(compose())
    misspelt["services"]["redis"]["helthcheck"] = misspelt["services"]["redis"]["healthcheck"]
    with pytest.raises(jsonschema.ValidationError, match="helthcheck"):
        jsonschema.Draft7Validator(schema).validate(misspelt)
    for svc in compose()["services"].values():
        if "build" in svc:
            assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]) == DOCKERFILE


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
        assert not re.search(r"(redis-cli|--pass)\S*\s+-a\s", s), s
    assert "change-me" not in text


def test_compose_publishes_ports_on_loopback_only():
    services = compose()["services"]
    published = {name: [str(p) for p in svc.get("ports", [])] for name, svc in services.items()}
    for name, ports in published.items():
        for port in ports:
            assert port.startswith("127.0.0.1:") and port.count(":") == 2, (name, port)


def test_compose_services_have_health_checks_and_wait_for_them():
    services = compose()["services"]
    for name, svc in services.items():
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no health check"
    assert "redis-cli ping" in " ".join(services["redis"]["healthcheck"]["test"])
    assert services["learner"]["healthcheck"]["test"][1:4] == ["python", "-m", "learner.health"]
    for name, needs in (("ray-head", "redis"), ("ray-worker", "ray-head")):
        assert services[name]["depends_on"][needs] == {"condition": "service_healthy"}


def test_compose_learner_and_ray_are_reachable_on_the_compose_network():
    services = compose()["services"]
    learner = services["learner"]["entrypoint"]
    assert learner[learner.index("--host") + 1] == "0.0.0.0"
    assert learner[learner.index("--port") + 1] in services["learner"]["expose"]
    for name in ("ray-head", "ray-worker"):  # Ray's own token auth on every node
        assert services[name]["environment"]["RAY_AUTH_MODE"] == "token"
    # the documented job binds the learner on every interface of its container
    assert "--set service.host=auto" in COMPOSE.read_text()


# ------------------------------------------------------------------------------------------------
# deploy/kuberay


def strict(schema: Any) -> Any:
    """``schema`` with unknown fields refused wherever it lists an object's fields and does not
    ask to keep unknown ones (as ``kubectl apply`` with strict field validation does)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_manifest_is_valid_by_the_kuberay_crd(kind):
    doc = manifest(kind)
    assert doc["apiVersion"] == "ray.io/v1"
    assert DNS_1123.fullmatch(doc["metadata"]["name"])
    schema = strict(json.loads((SCHEMAS / CRDS[kind]).read_text()))
    jsonschema.Draft4Validator(schema).validate(doc)


def test_strict_crd_schema_refuses_a_misspelt_field():
    doc = copy.deepcopy(manifest("RayCluster"))
    doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["envFrm"] = []
    schema = strict(json.loads((SCHEMAS / CRDS["RayCluster"]).read_text()))
    with pytest.raises(jsonschema.ValidationError, match="envFrm"):
        jsonschema.Draft4Validator(schema).validate(doc)


def test_kuberay_secrets_come_from_a_secret_and_ray_auth_is_on():
    cluster = manifest("RayCluster")
    assert cluster["spec"]["authOptions"]["mode"] == "token"
    head_env = {e["name"]: e for c in pod_specs(cluster)["head"]["containers"]
                for e in c.get("env", [])}
    for name in ("REDIS_URL", "L2O_TOKEN"):  # the job's driver runs on the head
        assert head_env[name]["valueFrom"]["secretKeyRef"]["key"] == name
    for pod in pod_specs(cluster).values():
        for env in (e for c in pod["containers"] for e in c.get("env", [])):
            assert not (env["name"] in SECRET_ENV and "value" in env), env["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True
    assert manifest("RayJob")["spec"]["clusterSelector"]["ray.io/cluster"] == \
        cluster["metadata"]["name"]


def test_kuberay_gpu_group_asks_for_gpus_with_preallocation_off():
    (gpu,) = [p for g, p in pod_specs(manifest("RayCluster")).items() if g == "gpu"]
    (container,) = gpu["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert container["image"].endswith(":cuda")  # the Dockerfile's cuda target
