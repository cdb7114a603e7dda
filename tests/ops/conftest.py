"""Shared by the CPU-kernel tests: a kernel module whose library fails to build, for the duration of a block."""

from __future__ import annotations

import contextlib

import pytest


@pytest.fixture
def failed_build(monkeypatch, caplog):
    """`with failed_build(kernel_lib):` -- inside, the module's `_build` raises as a machine without a compiler
    does, and `available()` is checked to be False with the reason logged; afterwards the kernel is back."""

    @contextlib.contextmanager
    def failing(kernel_lib):
        def no_compiler():
            raise RuntimeError("no C++ compiler (c++ or g++) on PATH")

        monkeypatch.setattr(kernel_lib, "_build", no_compiler)
        kernel_lib.available.cache_clear()
        try:
            with caplog.at_level("WARNING"):
                assert not kernel_lib.available()
            assert "no C++ compiler" in caplog.text
            yield
        finally:
            monkeypatch.undo()
            kernel_lib.available.cache_clear()
        assert kernel_lib.available()

    return failing
