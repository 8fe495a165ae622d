"""What depends on the CPU's instruction set, for the three kinds of x86 CPU these machines have: AVX2 only (AMD
EPYC), AVX-512 without AMX, and AVX-512 with AMX (Intel Xeon). The build choices are checked for all three from their
``/proc/cpuinfo`` flags on any machine; the checks of the build installed here run on whichever CPU this is."""

from __future__ import annotations

import os
import re

import pytest

from peft_ctx import scripts
from peft_ctx.harness import llama_cpp_build as build

AVX2_ONLY = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"})
AVX512 = AVX2_ONLY | {"avx_vnni", "avx512f", "avx512vbmi", "avx512_vnni", "avx512_bf16"}
AMX = AVX512 | {"amx_tile", "amx_int8", "amx_bf16"}
CPUS = {"avx2_only": AVX2_ONLY, "avx512": AVX512, "amx": AMX}


def _switches(args: list[str]) -> dict[str, bool]:
    """``-DGGML_X=ON/OFF`` -> {"GGML_X": True/False}; each ggml option named once."""
    found = [re.fullmatch(r"-D(GGML_\w+)=(ON|OFF)", a) for a in args]
    pairs = [(m.group(1), m.group(2) == "ON") for m in found if m]
    assert len({name for name, _ in pairs}) == len(pairs), args
    return dict(pairs)


@pytest.fixture
def cpu(monkeypatch):
    def use(flags):
        monkeypatch.setattr(build.platform, "machine", lambda: "x86_64")
        monkeypatch.setattr(build, "cpu_flags", lambda: set(flags))

    return use


@pytest.mark.parametrize("kind", list(CPUS))
def test_each_build_enables_what_the_cpu_lists_and_nothing_more(kind, cpu):
    cpu(CPUS[kind])
    for amx in (False, True):
        for name, wanted in build.build_ladder(amx=amx):
            on = _switches(build.cmake_args(wanted))
            assert not on.pop("GGML_NATIVE"), "-march=native built a library that died on another of these machines"
            assert set(on) == set(build.X86_OPTIONS.values())  # every option decided, none left to ggml's defaults
            allowed = {build.X86_OPTIONS[f] for f in wanted if f in CPUS[kind]}
            assert {opt for opt, enabled in on.items() if enabled} == allowed, (kind, name)


def test_avx512_and_amx_are_used_only_where_listed_and_amx_only_when_asked(cpu):
    def enabled(flags, ladder):
        cpu(flags)
        return {opt for opt, v in _switches(build.cmake_args(ladder[0][1])).items() if v}

    assert not any("AVX512" in o or "AMX" in o for o in enabled(AVX2_ONLY, build.build_ladder(amx=True)))
    assert "GGML_AVX512" in enabled(AVX512, build.build_ladder()) and not any(
        "AMX" in o for o in enabled(AVX512, build.build_ladder(amx=True))
    )
    assert not any("AMX" in o for o in enabled(AMX, build.build_ladder()))  # AMX died on one VM: opt-in only
    assert {"GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16"} <= enabled(AMX, build.build_ladder(amx=True))
    # --portable and the ladder's last rung: AVX2 at most, whatever the CPU lists.
    assert enabled(AMX, build.build_ladder(portable=True)) == {build.X86_OPTIONS[f] for f in build.PORTABLE}
    assert build.build_ladder()[-1] == build.build_ladder(portable=True)[0]


def test_the_installed_build_runs_here_with_what_this_cpu_lists():
    if os.environ.get("PEFT_CTX_REQUIRE_ENGINES") != "1":
        pytest.importorskip("llama_cpp", reason="llama-cpp-python is not built here (make install builds it)")
    stamp = build.read_stamp()
    if not stamp:
        pytest.skip("llama-cpp-python was not built by peft_ctx.harness.llama_cpp_build in this venv")
    if build.platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"instruction-set flags are chosen by llama.cpp itself on {build.platform.machine()}")
    ok, info = build.smoke_test(None)
    assert ok, info
    flags = build.cpu_flags()
    # A build this venv made on another CPU is rebuilt by make install (the stamp's flags no longer match).
    assert stamp["requested"] == build.cmake_args(build.build_ladder()[0][1]), "built on another CPU: make install"
    reported = dict(re.findall(r"(\w+) = (\d)", info))
    assert reported.get("AVX2") == "1" if "avx2" in flags else reported.get("AVX2") != "1"
    if stamp["build"] == build.LADDER[0][0]:
        assert (reported.get("AVX512") == "1") == ("avx512f" in flags), info
    assert reported.get("AMX_INT8", "0") == "0" or stamp["build"] == build.WITH_AMX[0]


def _effective_isa() -> str:
    """avx2_only, avx512 or amx: what this CPU lists, as far as oneDNN (torch's bf16 matrix products) may use it."""
    flags = build.cpu_flags()
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if limit.startswith(("SSE", "AVX2", "AVX_")) or limit == "AVX":
        return "avx2_only"
    if "amx_bf16" in flags and not limit.startswith("AVX512"):
        return "amx"
    return "avx512" if "avx512f" in flags else "avx2_only"


def test_auto_dtype_takes_bf16_on_an_amx_cpu_and_fp32_where_bf16_is_emulated(monkeypatch):
    """``--dtype auto`` measures (``scripts.cpu_bf16_speedup``): AMX runs bf16 matrix products ~10x faster than fp32,
    AVX2-only CPUs emulate bf16 (slower than fp32). AVX-512 without AMX lies near the 1.5x bar: not asserted."""
    isa = _effective_isa()
    if isa == "avx512":
        pytest.skip(
            "AVX-512 without AMX: bf16's speed-up is near the 1.5x bar, no side promised (checked on AMX, AVX2)"
        )
    monkeypatch.setattr(scripts.torch.cuda, "is_available", lambda: False)
    speedup = scripts.cpu_bf16_speedup.__wrapped__(size=512, repeats=9)
    expected = "bfloat16" if isa == "amx" else "float32"
    assert (speedup >= scripts.CPU_BF16_MIN_SPEEDUP) == (expected == "bfloat16"), f"{isa}: bf16 {speedup:.2f}x"
