"""The int8-activation kernel (``fused_q8``: AVX-512 VNNI or AVX2, :func:`lowbit.kernels._ext.linear_q8`).

Its arithmetic is modelled exactly here: x quantized per 32 columns of the first ``P = in - in % 64``
(scale absmax / 127, round half to even), integer products summed per 32-column block, each block
scaled by its x scale and its group's weight scale, minus ``s * z * sum(xhat)`` per group, the sum of the
dequantized x -- so the result is ``W @ xhat`` -- and the last ``in % 64`` columns in fp32.  The kernel must match that model to fp32 rounding
(``1e-4 * max|y|``) and stay within ``2e-2 * max|y|`` of the exact fp32 product (what int8 activations
cost; measured <= 1e-2 on these random layers).  Bit-identical run to run and on 1 or 2 threads.
Every path the CPU runs is tested (AVX2 also on an AVX-512 VNNI CPU, forced by the isa argument).
Skipped where the CPU has no AVX2 or the extension cannot be built.  Nothing is timed.
"""

from __future__ import annotations

import pytest
import torch
from test_kernels_fused import random_format

from lowbit import kernels
from lowbit.formats import QuantSpec
from lowbit.kernels import KERNELS, _ext
from lowbit.modules import QuantLinear

pytestmark = pytest.mark.skipif(not _ext.q8_available(), reason="no AVX2 or no fused extension here")
# the int8 paths this CPU runs: AVX2 (vpmaddubsw), and AVX-VNNI and AVX-512 VNNI where present
Q8_ISAS = _ext.fused_info()["q8_isas"] if _ext.q8_available() else []

# (out, in, group): ragged last group (576 at 128), per channel, in % 64 != 0 (tail in fp32), in < 64,
# in % 128 == 64 (half 4-bit block), groups of 64 and 256, the head's shape class
LAYOUTS = [(64, 576, 128), (33, 576, -1), (24, 600, 128), (7, 13, -1), (16, 320, 64), (8, 1536, 256),
           (40, 256, 64), (96, 576, -1)]
# layout 2's super-chunks of 512 columns: none (in < 512), one and a tail chunk, three and no tail, two and a
# 4-bit half block; groups of 64, 192 (lanes of one super-chunk in three groups), 1024 (a group over two
# super-chunks and the tail) and per channel; an fp32 tail (in % 64 != 0) after them; the longest rest (7 chunks,
# 3 whole 4-bit blocks and a half, groups of 64: the rest's group 14 past the super-chunk's first)
SUPER_LAYOUTS = [(64, 576, 128), (21, 1536, 192), (9, 1088, 1024), (12, 1536, -1), (10, 1120, 64), (5, 640, 128),
                 (6, 960, 64)]
# both paths read both repack layouts
PATH_LAYOUTS = [(isa, layout) for isa in Q8_ISAS for layout in (1, 2)]


def q8_model(x: torch.Tensor, fmt) -> torch.Tensor:
    """The kernel's arithmetic in float64 from its int8 inputs (see the module docstring)."""
    out_f, in_f = fmt.shape
    P = in_f - in_f % 64
    w = fmt.dequantize().double()
    m = x.shape[0]
    xb = x[:, :P].reshape(m, P // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    # 127 / amax divided in fp32, as the kernel (``127.0 / tensor`` is a reciprocal times 127 in torch: 1 ulp off,
    # enough to move a near-tie of x * inv to the other integer)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    xq = torch.round(xb * inv).clamp(-127, 127).double()
    xhat = (xq * (amax / 127.0).double()).reshape(m, P)
    return xhat @ w[:, :P].T + x[:, P:].double() @ w[:, P:].T


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("isa", "layout"), PATH_LAYOUTS)
@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize(("out_f", "in_f", "group"), sorted(set(LAYOUTS + SUPER_LAYOUTS)))
def test_q8_matches_its_model_and_fp32(threads, isa, layout, bits, out_f, in_f, group):
    code = _ext.ISA_CODES[isa]
    g = torch.Generator().manual_seed(out_f + in_f + bits)
    for symmetric in (False, True):
        fmt = random_format(out_f, in_f, QuantSpec(bits, group, symmetric), seed=bits + symmetric)
        plan = _ext.prepare(fmt, layout=layout)
        w64 = fmt.dequantize().double()
        for m in (1, 2, 3, 8, 11):
            x = torch.randn(m, in_f, generator=g) + (0.5 if m % 2 else 0.0)
            x[0, : min(32, in_f)] = 0.0                                      # an all-zero block: scale 0
            torch.set_num_threads(1)
            y = _ext.linear_q8(x, plan, isa=code)
            what = f"{isa} layout {layout} {fmt.spec} {out_f}x{in_f} rows={m}"
            ref = q8_model(x, fmt)
            scale = ref.abs().max().item() + 1e-6
            assert (y.double() - ref).abs().max().item() <= 1e-4 * scale, what + ": differs from the q8 model"
            exact = x.double() @ w64.T
            assert (y.double() - exact).abs().max().item() <= 2e-2 * scale, what + ": too far from fp32"
            assert torch.equal(y, _ext.linear_q8(x, plan, isa=code)), what + ": not bit-identical"
            torch.set_num_threads(2)
            assert torch.equal(y, _ext.linear_q8(x, plan, isa=code)), what + ": 1 and 2 threads differ"


@pytest.mark.skipif("avxvnni" not in Q8_ISAS, reason="no AVX-VNNI here")
@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize(("out_f", "in_f", "group"), [(64, 576, 128), (16, 1536, 64), (24, 600, -1), (8, 1024, 256)])
def test_avxvnni_sums_what_avx2_sums(threads, bits, out_f, in_f, group):
    """The AVX-VNNI path's int32 dot products are exact, as AVX2's int16 pair sums are, and every later step is the
    same code: at 2-4 bits both give the same bits, in layouts 1 and 2.  8-bit codes stay unsigned with AVX-VNNI
    (AVX2 recentres them to q - 128), so there the sums differ by the zero point's rounding only."""
    g = torch.Generator().manual_seed(bits * in_f)
    fmt = random_format(out_f, in_f, QuantSpec(bits, group, bits == 8), seed=bits)
    x = torch.randn(3, in_f, generator=g)
    for layout in (1, 2):
        plan = _ext.prepare(fmt, layout=layout)
        avx2, vnni = (_ext.linear_q8(x, plan, isa=_ext.ISA_CODES[i]) for i in ("avx2", "avxvnni"))
        if bits == 8:
            torch.testing.assert_close(vnni, avx2, rtol=1e-5, atol=1e-5 * avx2.abs().max().item())
        else:
            assert torch.equal(vnni, avx2), f"{fmt.spec} {out_f}x{in_f} layout {layout}"


def test_q8_kernel_offered_only_for_its_formats(monkeypatch):
    k = KERNELS.get("fused_q8")
    monkeypatch.delenv("LOWBIT_INT8_ACT", raising=False)
    # by default wherever a q8 path runs (VNNI or AVX2): there it is the faster decode kernel
    assert k is not None and k.available() == (_ext.q8_isa() is not None) == kernels.int8_activations()
    monkeypatch.setenv("LOWBIT_INT8_ACT", "auto")
    assert k.available() == (_ext.q8_isa() is not None)
    monkeypatch.setenv("LOWBIT_INT8_ACT", "1")
    assert k.available()
    assert k.supports(random_format(8, 576, QuantSpec(4, 128, False)))
    assert k.supports(random_format(8, 576, QuantSpec(8, -1, True)))
    assert not k.supports(random_format(8, 576, QuantSpec(4, 32, False)))    # groups below 64 columns
    assert k.max_rows == 8                                                   # never the prefill's kernel
    assert k.max_rel_error == 2e-2                                           # the bound tested above
    monkeypatch.setenv("LOWBIT_INT8_ACT", "0")
    assert not k.available()


def test_quant_linear_through_q8(monkeypatch):
    monkeypatch.setenv("LOWBIT_KERNEL", "fused_q8")
    fmt = random_format(48, 576, QuantSpec(4, 128, False))
    layer = QuantLinear(fmt, bias=torch.randn(48))
    x = torch.randn(3, 576)
    y = layer(x)
    ref = q8_model(x, fmt) + layer.bias.double()
    assert (y.double() - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    xs = torch.randn(20, 576)                                                # more rows than it takes: fine
    assert torch.allclose(layer(xs).double(), q8_model(xs, fmt) + layer.bias.double(), rtol=0, atol=1e-3)


def test_bad_group_is_a_clear_error():
    fmt = random_format(8, 576, QuantSpec(4, 32, False))
    plan = _ext.prepare(fmt, layout=1)
    with pytest.raises(Exception, match="multiple of 64"):
        _ext.linear_q8(torch.randn(1, 576), plan)
    kernels.KERNELS["fused"]                                                 # the fp32 kernel still covers it
