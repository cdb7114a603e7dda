"""The registry of decoding methods: every module in this package defines one `Method` spec and registers it.

    methods.names()                                  # ('ar', 'draft', 'layerskip', 'lookup', ...)
    spec = methods.make("layerskip", skip_layers=(20, 21), tree="chain:3")
    spec = methods.make("lookup", granularity=0)     # ConfigError: 'lookup' takes no argument 'granularity'

Adding a method is adding one file here, e.g. `methods/echo.py`:

    @methods.register
    @dataclasses.dataclass(frozen=True)
    class Echo(Speculative):
        '''Drafts the root token again at every depth.'''
        name = "echo"
        def build(self, target, **objects):
            return EchoDrafter(self.token_tree()), ()

The CLI (`--method=echo`), `api.generate(method="echo")`, sweep configs and the benchmarks then know it.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

from jaxspec.config import ConfigError
from jaxspec.decoding.method import GENERATE_ARGUMENTS, Method
from jaxspec.errors import InputError

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method spec known by its `name`."""
    shadowed = sorted(GENERATE_ARGUMENTS & ({f.name for f in dataclasses.fields(cls)} | set(cls.objects)))
    if shadowed:
        raise InputError(f"method {cls.name!r}: {shadowed[0]!r} is an argument of api.generate itself, which would "
                         "never reach the method; rename it")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise InputError(f"two decoding methods are named {cls.name!r}: {_REGISTRY[cls.name]} and {cls}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def names() -> tuple[str, ...]:
    _load_all()
    return tuple(sorted(_REGISTRY))


def get(name: str) -> type[Method]:
    _load_all()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown decoding method {name!r}; allowed: {names()}")
    return _REGISTRY[name]


def field_names(name: str) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(get(name)))


def split_arguments(name: str, arguments: dict) -> tuple[dict, dict]:
    """(spec fields, Python objects for `build`) of `arguments`; anything else is an error naming the method."""
    cls = get(name)
    fields = field_names(name)
    unknown = sorted(set(arguments) - set(fields) - set(cls.objects))
    if unknown:
        takes = ", ".join(fields + cls.objects) or "no arguments"
        raise ConfigError(f"method {name!r} takes no argument {unknown[0]!r}; it takes: {takes}")
    return ({k: v for k, v in arguments.items() if k in fields},
            {k: v for k, v in arguments.items() if k in cls.objects})


def make(name: str, **fields) -> Method:
    """The validated spec of method `name` with `fields` (the rest take their defaults)."""
    spec_fields, objects = split_arguments(name, fields)
    if objects:
        raise ConfigError(f"method {name!r}: {sorted(objects)} are Python objects; pass them to "
                          "api.generate or spec.build, not to the spec")
    return get(name)(**spec_fields)
