"""Registries of configurable kinds (estimators, learned optimizers, learned update rules).

A kind is a pydantic config class with a ``name: Literal["…"]`` field that knows how to build its
object; its module registers it with :meth:`Registry.register` at import. A registry imports every
module of its packages before it answers, so a new kind is one new module: no list to extend.
:func:`config_union` turns registries into the discriminated union a config section is validated
against, which refuses any field the chosen kind does not declare.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    create_model,
    model_serializer,
)

V = TypeVar("V")


class StrictConfig(BaseModel):
    """A config model that refuses unknown fields (so a misspelt key names itself)."""

    model_config = ConfigDict(extra="forbid", frozen=False)


def kind_name(config_cls: type[BaseModel]) -> str:
    """The registered name of ``config_cls``: the default of its ``name`` field."""
    field = config_cls.model_fields.get("name")
    if field is None or not isinstance(field.default, str):
        raise TypeError(f"{config_cls.__name__} needs a field name: Literal['…'] = '…'")
    return field.default


class Registry(Mapping[str, V], Generic[V]):
    """Names of one kind → what each builds (``V``), with each name's config class.

    ``packages`` are imported module by module on first use, so that their modules register.
    """

    def __init__(self, kind: str, packages: tuple[str, ...]):
        self.kind = kind
        self.packages = packages
        self._entries: dict[str, tuple[type[BaseModel], V]] = {}
        self._discovered = False

    def register(self, config_cls: type[BaseModel], value: V) -> None:
        """Register ``config_cls`` under its ``name`` (see :func:`kind_name`), building ``value``.

        Raises ``ValueError`` if the name is taken by something else (registering the same
        definition again, as a reloaded module does, replaces it).
        """
        name = kind_name(config_cls)
        known = self._entries.get(name)
        where = lambda v: (getattr(v, "__module__", None), getattr(v, "__qualname__", None))
        if known is not None and where(known[1]) != where(value):
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = (config_cls, value)

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        for package in self.packages:
            pkg = importlib.import_module(package)
            for info in pkgutil.iter_modules(pkg.__path__, package + "."):
                importlib.import_module(info.name)

    def config_class(self, name: str) -> type[BaseModel]:
        """The config class registered as ``name``."""
        self._discover()
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self))}")
        return self._entries[name][0]

    def __getitem__(self, name: str) -> V:
        self._discover()
        return self._entries[name][1]

    def __iter__(self) -> Iterator[str]:
        self._discover()
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        self._discover()
        return len(self._entries)


def config_union(default: str, *registries: Registry[Any]) -> Any:
    """The pydantic type of a config section: one of the registered config classes, chosen by
    the ``name`` field (``default`` when absent)."""
    classes = {name: reg.config_class(name) for reg in registries for name in reg}

    def tag(value: Any) -> str | None:
        if isinstance(value, dict):
            return value.get("name", default)
        return getattr(value, "name", None)

    members = tuple(Annotated[cls, Tag(name)] for name, cls in classes.items())
    kinds = " or ".join(reg.kind for reg in registries)
    return Annotated[Union[members],  # noqa: UP007 (a runtime tuple of members)
                     Discriminator(tag, custom_error_type="unknown_kind",
                                   custom_error_message=f"unknown {kinds}; known: "
                                                        f"{', '.join(sorted(classes))}")]


def owners(field: str, *registries: Registry[Any]) -> list[str]:
    """The names, over ``registries``, whose config class declares ``field``."""
    return sorted(name for reg in registries for name in reg
                  if field in reg.config_class(name).model_fields)


def _as_lists(value: Any) -> Any:
    """``value`` with tuples as lists, as YAML gave them (checkpoint metadata packs lists)."""
    if isinstance(value, list | tuple):
        return [_as_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_lists(v) for k, v in value.items()}
    return value


class Kwargs(StrictConfig):
    """The keyword arguments of a constructor; dumps only the ones given."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    @model_serializer(mode="wrap")
    def _given_only(self, handler: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        return {k: _as_lists(v) for k, v in handler(self).items() if k in self.model_fields_set}

    def given(self) -> dict[str, Any]:
        """The validated keyword arguments that were given (constructor defaults for the rest)."""
        return {k: getattr(self, k) for k in self.model_fields_set}


class ConstructorConfig(StrictConfig):
    """``{name, kwargs}``: a registered constructor and its validated keyword arguments."""

    constructor: ClassVar[Callable[..., Any]]
    name: str
    kwargs: Kwargs

    def build(self) -> Any:
        """The object the constructor makes from ``kwargs``."""
        return type(self).constructor(**self.kwargs.given())


def constructor_config(name: str, ctor: Callable[..., Any]) -> type[ConstructorConfig]:
    """A config class ``{name: Literal[name], kwargs: {...}}`` whose kwargs model has one field
    per parameter of ``ctor`` (its annotation and default)."""
    fields: dict[str, Any] = {}
    for p in inspect.signature(ctor, eval_str=True).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        annotation = Any if p.annotation is p.empty else p.annotation
        fields[p.name] = (annotation, ... if p.default is p.empty else p.default)
    title = "".join(part.title() for part in name.split("_"))
    kwargs_model = create_model(f"{title}Kwargs", __base__=Kwargs, **fields)
    config_cls = create_model(f"{title}Config", __base__=ConstructorConfig,
                              name=(Literal[name], name),
                              kwargs=(kwargs_model, Field(default_factory=kwargs_model)))
    config_cls.constructor = ctor
    return config_cls


C = TypeVar("C", bound=Callable[..., Any])


class ConstructorRegistry(Registry[Callable[..., V]]):
    """A registry of constructors configured as ``{name, kwargs}`` (see
    :func:`constructor_config`)."""

    def constructor(self, name: str) -> Callable[[C], C]:
        """Decorator: register a constructor (class or function) as ``name``."""
        def deco(ctor: C) -> C:
            self.register(constructor_config(name, ctor), ctor)
            return ctor

        return deco

    def make(self, name: str, **kwargs: Any) -> V:
        """The object registered as ``name``, built with ``kwargs``.

        Raises ``ValueError`` for an unknown name (listing the known ones) and ``TypeError``
        naming the constructor for keyword arguments it does not accept.
        """
        config_cls = self.config_class(name)
        try:
            cfg = config_cls(name=name, kwargs=kwargs)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}"
                                 for x in e.errors())
            raise TypeError(f"bad arguments for {self.kind} {name!r}: {problems}") from None
        return cfg.build()
