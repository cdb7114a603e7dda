"""Which CPU kernels JAXSPEC_CPU_KERNELS allows: all, none, or those named; an unknown name is an error that
names it."""

from __future__ import annotations

import pytest

from jaxspec.errors import InputError
from jaxspec.ops import cpu_build

pytestmark = pytest.mark.skipif(not cpu_build.cpu_has_avx2_fma(), reason="the CPU kernels need x86-64 with AVX2/FMA")


@pytest.mark.parametrize("setting,allowed", [
    (None, cpu_build.KERNELS), ("1", cpu_build.KERNELS), ("0", ()),
    ("cached_attention", ("cached_attention",)), (" small_rows_matmul , cached_attention", cpu_build.KERNELS),
])
def test_the_setting_allows_the_named_kernels(monkeypatch, setting, allowed):
    if setting is None:
        monkeypatch.delenv("JAXSPEC_CPU_KERNELS", raising=False)
    else:
        monkeypatch.setenv("JAXSPEC_CPU_KERNELS", setting)
    assert tuple(k for k in cpu_build.KERNELS if cpu_build.enabled(k)) == allowed


@pytest.mark.parametrize("setting,match", [("attention", "unknown: .'attention'."), (",", "comma-separated")])
def test_a_bad_setting_is_named(monkeypatch, setting, match):
    monkeypatch.setenv("JAXSPEC_CPU_KERNELS", setting)
    with pytest.raises(InputError, match=f"JAXSPEC_CPU_KERNELS={setting!r}.*{match}"):
        cpu_build.enabled("cached_attention")
