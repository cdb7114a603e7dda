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
