"""What the command-line entry points share: the error boundary, flag-value parsing with errors that name the
flag, jax's persistent compilation cache, and quiet library logging.

The error boundary: every `launch/*.py` main is decorated with `error_boundary(...)`. An `InputError` (the
library's one error type for bad input, `jaxspec.errors`) ends the command as one line, `error: <message>`,
on stderr with exit status 1, and so does an `OSError` about a file that lies at or under a path the user
named by one of the listed flags (its message names the file). Anything else - a bug, a shape error from
inside JAX - propagates with its traceback.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import textwrap
from collections.abc import Callable, Iterable, Iterator, Mapping

import jax

from jaxspec import zoo
from jaxspec.config import ConfigError
from jaxspec.errors import InputError

# The exit status of a command stopped by bad input (absl's usage errors exit with 1 too).
INPUT_ERROR_STATUS = 1


def _exit_with(message: str, cause: BaseException | None = None):
    """End the command with `error: <message>` on stderr and exit status INPUT_ERROR_STATUS."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(INPUT_ERROR_STATUS) from cause


def _within(filename, root: str) -> bool:
    """Whether path `filename` is `root` or lies under it."""
    try:
        filename, root = os.path.abspath(os.fsdecode(filename)), os.path.abspath(os.fsdecode(root))
    except (TypeError, ValueError):
        return False
    return filename == root or filename.startswith(root.rstrip(os.sep) + os.sep)


def user_error_message(err: BaseException, named_paths: Mapping[str, str] | None = None) -> str | None:
    """The one line a command prints for `err`, or None when `err` is not the user's to fix.

    `named_paths` maps a flag name to the path the user gave it. An InputError is always the user's; an OSError
    is when the file it names lies at or under one of those paths (the line then says which flag named it).
    """
    if isinstance(err, InputError):
        return str(err)
    if isinstance(err, OSError):
        for filename in (err.filename, err.filename2):
            if filename is None:
                continue
            for flag, path in (named_paths or {}).items():
                if path and _within(filename, path):
                    return f"--{flag}={path}: {err}"
    return None


@contextlib.contextmanager
def user_errors(named_paths: Mapping[str, str] | Callable[[], Mapping[str, str]] | None = None) -> Iterator[None]:
    """Run the body; an error that `user_error_message` owns ends the process as `error: <message>` on stderr with
    exit status INPUT_ERROR_STATUS; any other exception propagates unchanged, traceback and all.

    `named_paths`: flag name -> path the user gave (or a function returning that, called only on an OSError)."""
    try:
        yield
    except (InputError, OSError) as err:
        paths = named_paths() if callable(named_paths) else named_paths
        message = user_error_message(err, paths)
        if message is None:
            raise
        _exit_with(message, err)


def flag_paths(names: Iterable[str], flag_values=None) -> dict[str, str]:
    """flag name -> its value, for the string-valued flags of `names` that were given a value (in `flag_values`,
    by default absl's global flags)."""
    from absl import flags

    flag_values = flags.FLAGS if flag_values is None else flag_values
    out = {}
    for name in names:
        value = flag_values[name].value if name in flag_values else None
        if isinstance(value, str) and value:
            out[name] = value
    return out


def error_boundary(*file_flags: str) -> Callable:
    """Decorator of a launch script's `main(argv)`: runs it inside `user_errors`, where the flags `file_flags`
    (e.g. "workdir", "prompts_file") name the paths whose OSErrors are the user's to fix.

        @cli.error_boundary("workdir", "output_json")
        def main(argv): ...
    """
    def decorate(main: Callable) -> Callable:
        @functools.wraps(main)
        def wrapped(argv):
            with user_errors(lambda: flag_paths(file_flags)):
                return main(argv)

        return wrapped

    return decorate


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


LAYER_LIST_FIELDS = ("skip_layers", "skip_ffn")  # method fields that take a set of layers, written like 20-29,31


def parse_method_flag(field: str, value):
    """A decoding method's field as given on the command line -> the value its spec takes: a set of layers from
    '20-29,31' (LAYER_LIST_FIELDS), a MatFormer granularity from one index or one per layer ('0,1,1'),
    anything else as absl parsed it."""
    if field in LAYER_LIST_FIELDS:
        return parse_index_list(field, value)
    if field == "granularity":
        parsed = parse_index_list("granularity", value, ranges=False)
        return parsed[0] if len(parsed) == 1 else parsed
    return value


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


def config_file_problem(argv: list[str], name: str = "config") -> str | None:
    """One line on what is wrong with the config file that --NAME=FILE[:ARG] in argv names: a file that does not
    exist, or an arg its get_config refuses (an InputError); None when it loads or no --NAME is given."""
    value = _config_file_value(argv, name)
    if value is None:
        return None
    path = value.partition(":")[0]
    if not os.path.isfile(path):
        return f"--{name}={value}: config file {path!r} does not exist"
    try:
        _load_config_file(value)
    except InputError as err:
        return f"--{name}={value}: {err}"
    return None


def parse_config_flags(argv: list[str], name: str = "config") -> list[str]:
    """absl's flag parsing (usage on a bad flag), where what is wrong with the config file ends in one line
    instead of a traceback: an override of a key that does not exist (--config.data.pth=...) names it and the
    nearest keys; a config file that does not exist, or an arg its get_config refuses, names the flag. Use as
    `app.run(main, flags_parser=cli.parse_config_flags)`."""
    from absl import flags

    value = _config_file_value(argv, name)
    if value is not None and not os.path.isfile(value.partition(":")[0]):
        _exit_with(config_file_problem(argv, name))
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        message = config_file_problem(argv, name)  # loads the config again, only on this failure
        if message is not None:
            _exit_with(message, err)
        text = str(err)  # then as absl's app.parse_flags_with_usage reports it
        print("FATAL Flags parsing error:" + (f"\n{textwrap.indent(text, '  ')}" if "\n" in text else f" {text}"),
              file=sys.stderr)
        print("Pass --helpshort or --helpfull to see help on flags.", file=sys.stderr, flush=True)
        raise SystemExit(1) from err
    except (AttributeError, KeyError) as err:
        message = unknown_override(argv, name)
        if message is None:
            raise
        _exit_with(message, err)
