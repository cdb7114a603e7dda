"""What the command-line entry points share: flag-value parsing with errors that name the flag, jax's
persistent compilation cache, and quiet library logging."""

from __future__ import annotations

import logging
import os

import jax

from jaxspec import zoo
from jaxspec.config import ConfigError


def enable_compilation_cache(directory: str | None = None) -> str:
    """Turn on jax's persistent compilation cache (default: <cache root>/xla), so a second process reuses
    the executables the first compiled. Returns the directory; "" turns it off."""
    directory = os.path.join(zoo.cache_root(), "xla") if directory is None else directory
    if directory:
        os.makedirs(directory, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return directory


def quiet_libraries() -> None:
    """Checkpoint restores and saves log every file at INFO; a command prints its own results only."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in ("orbax", "absl", "jax._src.compilation_cache"):
        logging.getLogger(name).setLevel(logging.WARNING)


def parse_index_list(flag: str, value: str | list[str] | tuple, ranges: bool = True) -> tuple[int, ...]:
    """'20-29,31' (or absl's list of pieces) -> (20, ..., 29, 31), sorted, duplicates dropped; with
    ranges=False, '0,1,1' -> (0, 1, 1) as given (a value per position).

    Any piece that is not an index (or an ascending range) raises a ConfigError naming `flag`.
    """
    pieces = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    expected = "comma-separated indices and ranges such as 20-29,31" if ranges else "comma-separated indices"
    out: list[int] = []
    for piece in (p.strip() for p in pieces):
        if not piece:
            continue
        lo, sep, hi = piece.partition("-") if ranges else (piece, "", "")
        try:
            first, last = int(lo), int(hi if sep else lo)
        except ValueError:
            raise ConfigError(f"--{flag}={','.join(map(str, pieces))!r}: {piece!r} is not an index"
                              f"{' or a range' if ranges else ''}; expected {expected}") from None
        if first < 0 or last < first:
            raise ConfigError(f"--{flag}: {piece!r} must be non-negative{' and ascending (like 20-29)' * ranges}")
        out.extend(range(first, last + 1))
    return tuple(sorted(set(out))) if ranges else tuple(out)


def _config_file_value(argv: list[str], name: str) -> str | None:
    """The value of --NAME=FILE[:ARG] (or --NAME FILE[:ARG]) in argv, the last one given."""
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def _load_config_file(value: str):
    """get_config(arg) of a config file given as FILE[:ARG], as ml_collections' config flags load it."""
    import importlib.util

    path, _, arg = value.partition(":")
    spec = importlib.util.spec_from_file_location("_jaxspec_config_file", path)
    if spec is None or not os.path.isfile(path):
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def unknown_override(argv: list[str], name: str = "config") -> str | None:
    """For the first --NAME.a.b=VALUE in argv whose key path is not in the config file's config: one line
    naming the key, the nearest keys of its section and all of them; None when every override names a key."""
    from jaxspec.config import nearest_keys

    value = _config_file_value(argv, name)
    if value is None:
        return None
    config = _load_config_file(value)
    if config is None:
        return None
    for arg in argv:
        if not arg.startswith(f"--{name}."):
            continue
        path = arg[len(name) + 3:].split("=", 1)[0]
        node, walked = config, name
        for part in path.split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if part not in keys:
                return (f"--{name}.{path}: {value} has no key {walked}.{part}{nearest_keys(part, keys)}"
                        + (f"; keys of {walked}: {', '.join(sorted(map(str, keys)))}" if keys
                           else f" ({walked} is a value, not a section)"))
            node, walked = node[part], f"{walked}.{part}"
    return None


def parse_config_flags(argv: list[str], name: str = "config") -> list[str]:
    """absl's flag parsing (usage on a bad flag), where an override of a config key that does not exist
    (--config.data.pth=...) ends in one line naming it and the nearest keys, instead of ml_collections'
    traceback. Use as `app.run(main, flags_parser=cli.parse_config_flags)`."""
    from absl import app

    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as err:
        message = unknown_override(argv, name)
        if message is None:
            raise
        raise SystemExit(message) from err
