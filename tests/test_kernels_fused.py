"""lowbit's fused C++ CPU kernels (``fused``): every path against dequantize-then-matmul in float64.

Paths: the GEMV (rows of x 1..8, and 64 in passes of 8; mode 1), the tiled dequantize + microkernel path
(9 and 64 rows; mode 2, prefill), and the automatic choice (mode 0), each on every instruction-set path this CPU can run (AVX-512, AVX2 and
the portable scalar code -- the AVX2 path is exercised on AVX-512 machines too, via the op's isa
argument and via ``LOWBIT_ISA``), on 1 and 2 threads.

Tolerance: ``max|y - y64| <= 1e-4 * max|y64| + 1e-6`` with ``y64 = x.double() @ W.double().T`` and ``W``
the format's own fp32 dequantization.  Every path accumulates in fp32 (the AVX2 GEMV factors scale and
zero point out of each group, see csrc/fused_avx2.cpp); measured <= 5e-6 * max|y64| on these shapes and
up to 8192 inputs, also for inputs with a mean of 3 or 10.  Every path is also bit-identical run to run and (being one fp32 chain per
output, whatever the split over threads) between 1 and 2 threads -- all but the scalar tiled path, which
multiplies its tiles with at::mm.

Skipped, with the reason, where the extension cannot be built (except the tests of that fallback, which
run in subprocesses with the extension switched off or its compiler missing).  Nothing here times anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lowbit import kernels
from lowbit.errors import LowbitError, ShapeError
from lowbit.formats import GroupedInt, OutlierFormat, QuantSpec
from lowbit.kernels import KERNELS, _ext, fused_info
from lowbit.modules import QuantLinear

INFO = fused_info()


@pytest.fixture(autouse=True)
def _needs_extension(request):
    """Everything but the fallback tests needs the extension built."""
    if not INFO["available"] and not request.node.name.startswith("test_fallback_"):
        pytest.skip(f"fused extension unavailable: {INFO['reason']}")


BITS = (2, 3, 4, 8)
# (out, in, group): ragged last groups (576 = 4.5 x 128, 200 = 6 x 32 + 8), per channel, groups that are
# not multiples of 16 (scalar fallback), rows shorter than one block (7x13, 1x1), in % 128 == 64 (576,
# 320), more groups per row than the AVX-512 path converts at once (2304 / 32 = 72)
LAYOUTS = [(64, 576, 128), (40, 512, 32), (24, 256, 64), (33, 576, -1), (20, 200, 32), (16, 1536, 128),
           (7, 13, -1), (7, 13, 8), (1, 1, -1), (12, 72, 24), (16, 320, 64), (8, 2304, 32)]
GEMV_ROWS = (1, 2, 3, 5, 8)
TILED_ROWS = (9, 64)
ISAS = INFO["isas"]                                   # e.g. ['scalar', 'avx2', 'avx512']
CODE = _ext.ISA_CODES


def random_format(out_f, in_f, spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_groups = spec.n_groups(in_f)
    q = torch.randint(0, 2**spec.bits, (out_f, in_f), generator=g).to(torch.uint8)
    scale = (torch.rand(out_f, n_groups, generator=g) * 0.02 + 0.001).half()
    zero = None if spec.symmetric else (torch.rand(out_f, n_groups, generator=g) * spec.maxq).half()
    return GroupedInt.pack(q, scale, zero, spec)


def check_close(y, y64, what):
    assert y.dtype == torch.float32 and y.shape == y64.shape, what
    err = (y.double() - y64).abs().max().item() if y.numel() else 0.0
    tol = 1e-4 * (y64.abs().max().item() if y.numel() else 0.0) + 1e-6
    assert err <= tol, f"{what}: max abs diff {err:.3g} > {tol:.3g}"


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# --- every path, every ISA, against float64 --------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("out_f", "in_f", "group"), LAYOUTS)
def test_paths_match_float64(threads, bits, out_f, in_f, group):
    g = torch.Generator().manual_seed(out_f * in_f + bits)
    xs = {m: torch.randn(m, in_f, generator=g) + (0.5 if m % 2 else 0.0) for m in GEMV_ROWS + TILED_ROWS}
    for symmetric in (False, True):
        fmt = random_format(out_f, in_f, QuantSpec(bits, group, symmetric), seed=bits + symmetric)
        w64 = fmt.dequantize().double()
        plan = _ext.prepare(fmt)
        for m, x in xs.items():
            y64 = x.double() @ w64.T
            modes = (0, 1, 2) if m in (1, 64) else (1,) if m in GEMV_ROWS else (2,)
            for isa in ISAS:
                for mode in modes:
                    what = f"{fmt.spec} {out_f}x{in_f} rows={m} isa={isa} mode={mode}"
                    torch.set_num_threads(1)
                    y1 = _ext.linear(x, plan, mode, CODE[isa])
                    check_close(y1, y64, what)
                    assert torch.equal(y1, _ext.linear(x, plan, mode, CODE[isa])), f"{what}: not bit-identical"
                    torch.set_num_threads(2)
                    y2 = _ext.linear(x, plan, mode, CODE[isa])
                    if isa != "scalar" or mode == 1:          # scalar tiled multiplies with at::mm (BLAS)
                        assert torch.equal(y1, y2), f"{what}: 1 and 2 threads differ"
                    else:
                        check_close(y2, y64, what + " 2 threads")


@pytest.mark.parametrize("bits", BITS)
def test_inputs_with_a_mean(bits):
    """Activations are rarely centred: the AVX2 GEMV's  s * (q.x - z * sum x)  must not lose the result."""
    g = torch.Generator().manual_seed(bits)
    for group in (128, -1):
        fmt = random_format(48, 1536, QuantSpec(bits, group, False), seed=bits)
        w64 = fmt.dequantize().double()
        plan = _ext.prepare(fmt)
        for mean in (3.0, 10.0):
            x = torch.randn(4, 1536, generator=g) + mean
            y64 = x.double() @ w64.T
            for isa in ISAS:
                for mode in (1, 2):
                    check_close(_ext.linear(x, plan, mode, CODE[isa]), y64, f"{fmt.spec} mean={mean} {isa} mode={mode}")


@pytest.mark.parametrize("bits", BITS)
def test_big_layer_every_isa_two_threads(threads, bits):
    """A layer large enough to be split over threads (GEMV rows and tiles)."""
    torch.set_num_threads(2)
    fmt = random_format(1536, 576, QuantSpec(bits, 128, False), seed=7)
    w64 = fmt.dequantize().double()
    plan = _ext.prepare(fmt)
    for m in (1, 4, 64):
        x = torch.randn(m, 576)
        y64 = x.double() @ w64.T
        ys = [_ext.linear(x, plan, 0, CODE[isa]) for isa in ISAS]
        for isa, y in zip(ISAS, ys):
            check_close(y, y64, f"{fmt.spec} rows={m} isa={isa}")


def test_threads_follow_torch_set_num_threads(threads):
    for n in (1, 2):
        torch.set_num_threads(n)
        assert torch.ops.lowbit.fused_parallel_threads(64) == n


def test_lowbit_isa_env_forces_the_path(monkeypatch):
    fmt = random_format(64, 576, QuantSpec(4, 128, False))
    plan = _ext.prepare(fmt)
    x = torch.randn(3, 576)
    for isa in ISAS:
        monkeypatch.setenv("LOWBIT_ISA", isa)
        assert fused_info()["isa"] == isa
        assert torch.equal(_ext.linear(x, plan), _ext.linear(x, plan, 0, CODE[isa]))
    monkeypatch.setenv("LOWBIT_ISA", "auto")
    assert fused_info()["isa"] == INFO["cpu_isa"]
    monkeypatch.setenv("LOWBIT_ISA", "sse9")
    with pytest.raises(LowbitError, match="LOWBIT_ISA"):
        _ext.linear(x, plan)


def test_fused_info_reports_the_isa():
    assert INFO["available"] and INFO["reason"] is None
    assert INFO["cpu_isa"] in ("avx512", "avxvnni", "avx2", "scalar") and INFO["isas"][0] == "scalar"
    # the fp32 kernels have no AVX-VNNI path: on such a CPU they run AVX2's
    assert INFO["isas"][-1] == ("avx2" if INFO["cpu_isa"] == "avxvnni" else INFO["cpu_isa"])
    if INFO["feature_level"] == "avx512":
        assert INFO["isas"] == ["scalar", "avx2", "avx512"]
        assert INFO["q8_isas"][0] == "avx2" and INFO["q8_isas"][-1] == _ext.q8_isa(_ext.ISA_CODES["auto"])
    # the build key names what the library was compiled for
    key = _ext.build_key()
    assert torch.__version__.replace("+", "_") in key and f"py{sys.version_info[0]}{sys.version_info[1]}" in key
    assert INFO["feature_level"] in key


# --- through kernels.linear / QuantLinear, outliers ------------------------------------------------


@pytest.fixture
def forced(monkeypatch):
    monkeypatch.setenv("LOWBIT_KERNEL", "fused")


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_outliers_through_linear(forced, bits, symmetric):
    base = random_format(96, 576, QuantSpec(bits, 128, symmetric), seed=bits)
    g = torch.Generator().manual_seed(3)
    weight = base.dequantize() + torch.randn(96, 576, generator=g) * 0.05
    mask = torch.rand(96, 576, generator=g) < 0.01
    fmt = OutlierFormat.from_mask(base, mask, weight)
    w64 = fmt.dequantize().double()
    for m in (1, 5, 64):
        x = torch.randn(m, 576, generator=g)
        plans = {}
        check_close(kernels.linear(x, fmt, None, plans), x.double() @ w64.T, f"outliers {base.spec} rows={m}")
        assert "fused" in plans


@pytest.mark.parametrize("rows", [1, 8, 64])
def test_quant_linear_forced_fused(forced, rows):
    fmt = random_format(192, 576, QuantSpec(3, 128, False), seed=4)
    bias = torch.randn(192)
    mod = QuantLinear(fmt, bias)
    x = torch.randn(2, rows, 576)
    y = mod(x)
    assert y.shape == (2, rows, 192)
    check_close(y.reshape(-1, 192), x.reshape(-1, 576).double() @ fmt.dequantize().double().T + bias.double(), "module")
    assert set(mod._plans) - {kernels._BOUND} == {"fused"}
    assert isinstance(mod._plans["fused"], _ext.FusedPlan)
    plan = mod._plans["fused"]
    assert plan.codes.dtype == torch.uint8 and plan.codes.shape == fmt.codes.shape      # same bytes, repacked
    assert mod(x.bfloat16()).dtype == torch.bfloat16
    assert torch.equal(mod(x), y)


@pytest.mark.parametrize("bits", BITS)
def test_int_zero_format_runs_fused(forced, bits):
    """Integer zero points (packed in the checkpoint) reach the kernel as the fp16 zeros they stand for."""
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2**bits, (40, 576), generator=g).to(torch.uint8)
    scale = (torch.rand(40, 5, generator=g) * 0.02 + 0.001).half()
    zero = torch.randint(0, 2**bits, (40, 5), generator=g).half()
    fmt = GroupedInt.pack(q, scale, zero, QuantSpec(bits, 128, False, True))
    plan = _ext.prepare(fmt)
    assert plan.zero.dtype == torch.float16 and torch.equal(plan.zero, zero)
    mod = QuantLinear(fmt, None)
    for m in (1, 5, 64):
        x = torch.randn(m, 576, generator=g)
        check_close(mod(x), x.double() @ fmt.dequantize().double().T, f"int_zero {bits}-bit rows={m}")
    assert set(mod._plans) - {kernels._BOUND} == {"fused"}


def test_gradient_input_falls_back_to_reference(forced):
    fmt = random_format(32, 128, QuantSpec(4, 64, False))
    x = torch.randn(3, 128, requires_grad=True)
    y = kernels.linear(x, fmt, None, {})
    y.sum().backward()
    torch.testing.assert_close(x.grad, fmt.dequantize().sum(0).expand(3, -1))


# --- errors -----------------------------------------------------------------------------------------


def test_corrupt_codes_shape_is_lowbit_error():
    fmt = random_format(64, 576, QuantSpec(4, 128, False))
    fmt.codes = fmt.codes[:, :-1]                          # bypasses the format's own check, like a corrupt load
    with pytest.raises(ShapeError, match=r"codes.*64x576.*\(64, 288\).*\(64, 287\)"):
        KERNELS["fused"].prepare(fmt)
    fmt = random_format(64, 576, QuantSpec(4, 128, False))
    fmt.scale = fmt.scale[:, :4]
    with pytest.raises(LowbitError, match=r"scale.*\(64, 5\)"):
        KERNELS["fused"].prepare(fmt)


def test_corrupt_plan_and_wrong_input_are_lowbit_errors():
    fmt = random_format(64, 576, QuantSpec(2, 64, True))
    plan = _ext.prepare(fmt)
    with pytest.raises(ShapeError, match=r"x must be float32 \(rows, 576\).*\(3, 512\)"):
        _ext.linear(torch.randn(3, 512), plan)
    bad = _ext.FusedPlan(plan.codes[:-1], plan.scale, plan.zero, plan.bits, plan.group_size, 576, 64)
    with pytest.raises(ShapeError, match=r"scale.*\(63, 9\).*\(64, 9\)"):
        _ext.linear(torch.randn(3, 576), bad)
    bad = _ext.FusedPlan(plan.codes[:, :100], plan.scale, plan.zero, plan.bits, plan.group_size, 576, 64)
    with pytest.raises(ShapeError, match=r"codes.*\(64, 144\).*\(64, 100\)"):
        _ext.linear(torch.randn(3, 576), bad)


# --- torch.compile / fake tensors ------------------------------------------------------------------


def test_ops_have_fake_implementations():
    fmt = random_format(48, 256, QuantSpec(4, 64, False))
    plan = _ext.prepare(fmt)
    x = torch.randn(4, 256)
    args = (x, plan.codes, plan.scale, plan.zero, 4, 64, 256, 0, 0)
    torch.library.opcheck(torch.ops.lowbit.grouped_linear.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.lowbit.grouped_repack.default, (fmt.codes, 4, 256),
                          test_utils=("test_schema", "test_faketensor"))

    def f(x):
        return torch.ops.lowbit.grouped_linear(x, plan.codes, plan.scale, plan.zero, 4, 64, 256) * 2

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x), rtol=0, atol=0)


# --- the extension switched off or unbuildable: reference results, one warning ------------------------

_CHILD = textwrap.dedent("""
    import warnings, torch
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        from lowbit import kernels
        from lowbit.formats import GroupedInt, QuantSpec
        q = torch.randint(0, 16, (32, 128), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
        fmt = GroupedInt.pack(q, torch.full((32, 1), 0.01).half(), torch.full((32, 1), 7.5).half(), QuantSpec(4, -1))
        x = torch.randn(3, 128)
        y = kernels.linear(x, fmt, None, {})
        y = kernels.linear(x, fmt, None, {})
        assert torch.equal(y, torch.nn.functional.linear(x, fmt.dequantize())), "not the reference result"
    mine = [w for w in caught if "lowbit" in str(w.message)]
    print("AVAILABLE", kernels.fused_info()["available"], "WARNINGS", len(mine))
    for w in mine:
        print("WARNING", str(w.message).splitlines()[0])
""")


def _run_child(tmp_path, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("LOWBIT_NO_EXT", "LOWBIT_ISA")}
    full.update({"LOWBIT_CACHE": str(tmp_path / "cache"), "LOWBIT_KERNEL": "fused", **env})
    out = subprocess.run([sys.executable, "-c", _CHILD], env=full, capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_fallback_no_ext_env_disables_it(tmp_path):
    out = _run_child(tmp_path, LOWBIT_NO_EXT="1")
    assert "AVAILABLE False WARNINGS 0" in out
    assert not (tmp_path / "cache" / "ext").exists()


def test_fallback_failed_build_warns_once(tmp_path):
    out = _run_child(tmp_path, CXX=str(tmp_path / "no-such-compiler"))
    assert "AVAILABLE False WARNINGS 1" in out, out
    assert "fused CPU kernels unavailable" in out
