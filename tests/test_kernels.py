"""Kernels and QuantLinear: every kernel against an independent float64 reference; weights stay packed.

Tolerance (all kernels, random formats): ``max|y_kernel - y| <= 1e-3 * max|y| + 1e-4`` where ``y`` is
computed in float64 from the raw codes. Every kernel accumulates in fp32, so the expected error is a few
fp32 ulps times sqrt(in_features) -- measured <= 3e-6 * max|y| on these shapes for all three kernels.

The aten int8 kernel computes asymmetric formats as ``(q - 128) * s`` plus a per-row offset
``sum(x) * (128 - z) * s``; when ``z`` is far from 128 and ``x`` has a non-zero mean these two terms
cancel, and its error is bounded by the size of the terms, not of ``y`` (see
``test_aten_int8_offset_cancellation_bound``).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit import kernels
from lowbit.errors import LowbitError
from lowbit.formats import GroupedInt, QuantSpec
from lowbit.kernels import KERNELS
from lowbit.modules import QuantExperts, QuantLinear
from lowbit.quantizers import rtn

BITS = (2, 3, 4, 8)
SHAPES = [(1, 1), (1, 8), (7, 13), (576, 576), (192, 576), (1536, 576), (576, 1536), (512, 512)]   # (out, in)
ROWS = (1, 3, 8, 64)


def groups_for(in_f):
    """Group sizes valid for ``in_f``: 32 and 128 (ragged where they do not divide), 8, per-channel."""
    return [-1] + [g for g in (8, 32, 128) if g <= in_f]


def random_format(out_f, in_f, spec, seed=0):
    """A GroupedInt with random codes, scales and (asymmetric) zero points, and its float64 weight by hand."""
    g = torch.Generator().manual_seed(seed)
    n_groups, width = spec.n_groups(in_f), spec.group_width(in_f)
    q = torch.randint(0, 2**spec.bits, (out_f, in_f), generator=g).to(torch.uint8)
    scale = (torch.rand(out_f, n_groups, generator=g) * 0.02 + 0.001).half()
    zero = None if spec.symmetric else (torch.rand(out_f, n_groups, generator=g) * spec.maxq).half()
    if spec.int_zero:
        zero = zero.round()
    z = torch.full_like(scale, 2.0 ** (spec.bits - 1)) if zero is None else zero
    col_group = torch.arange(in_f) // width                               # (in,) group of each column
    w64 = (q.double() - z.double()[:, col_group]) * scale.double()[:, col_group]
    return GroupedInt.pack(q, scale, zero, spec), w64


# the kernels for CPU formats (the GPU's, "triton", where Triton is installed, is tested on CPU tensors with
# Triton's interpreter in tests/test_kernels_triton.py)
CPU_KERNELS = sorted(name for name, k in KERNELS.items() if k.device != "cuda")

# kernels that are not fp32 arithmetic (fused_q8 quantizes x to int8; tests/test_kernels_q8.py checks its
# arithmetic to 1e-4) are held to their documented bound
REL_TOL = {k.name: k.max_rel_error for k in KERNELS.values() if k.max_rel_error}


def check_close(y, y64, what, rel=1e-3):
    assert y.dtype == torch.float32 and y.shape == y64.shape, what
    err = (y.double() - y64).abs().max().item()
    tol = rel * y64.abs().max().item() + 1e-4
    assert err <= tol, f"{what}: max abs diff {err:.3g} > {tol:.3g}"


@pytest.fixture
def forced(monkeypatch):
    def force(name):
        if name is None:
            monkeypatch.delenv("LOWBIT_KERNEL", raising=False)
        else:
            monkeypatch.setenv("LOWBIT_KERNEL", name)
    return force


# --- every kernel against float64 ------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("out_f", "in_f"), SHAPES)
def test_kernels_match_float64_reference(bits, out_f, in_f):
    g = torch.Generator().manual_seed(out_f + in_f)
    xs = {m: torch.randn(m, in_f, generator=g) for m in ROWS}
    n_checked = 0
    for symmetric, int_zero in ((False, False), (True, False), (False, True)):
        for group in groups_for(in_f):
            spec = QuantSpec(bits, group, symmetric, int_zero)
            fmt, w64 = random_format(out_f, in_f, spec, seed=bits)
            for kernel in map(KERNELS.get, CPU_KERNELS):
                if not kernel.supports(fmt):
                    continue
                state = kernel.prepare(fmt)
                for m, x in xs.items():
                    y = kernel.run(x, fmt, state)
                    check_close(y, x.double() @ w64.T, f"{kernel.name} {spec} {out_f}x{in_f} rows={m}",
                                REL_TOL.get(kernel.name, 1e-3))
                    n_checked += 1
    assert n_checked >= 4 * 3 * len(groups_for(in_f))                    # the reference kernel ran everywhere


@pytest.mark.parametrize("name", CPU_KERNELS)
def test_each_kernel_is_exercised(name):
    """Each registered kernel supports at least one format of the shapes above (so the test above covers it)."""
    specs = [QuantSpec(b, g, s) for b in BITS for g in (-1, 32, 128) for s in (False, True)]
    assert any(KERNELS[name].supports(random_format(576, 1536, sp)[0]) for sp in specs)


@pytest.mark.parametrize("name", CPU_KERNELS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_forced_kernel_through_linear_3d_input_and_bias(forced, name, symmetric):
    bits, group = {"aten_int4": (4, 64), "aten_int8": (8, -1)}.get(name, (3, 128))
    fmt, w64 = random_format(192, 576, QuantSpec(bits, group, symmetric), seed=4)
    assert KERNELS[name].supports(fmt)
    forced(name)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 576, generator=g)                                # (batch, seq, in)
    bias = torch.randn(192, generator=g)
    plans = {}
    y = kernels.linear(x, fmt, bias, plans)
    assert y.shape == (2, 5, 192)
    check_close(y.reshape(10, 192), x.reshape(10, 576).double() @ w64.T + bias.double(), name, REL_TOL.get(name, 1e-3))
    assert set(plans) - {kernels._BOUND} == {name}                                            # the forced kernel ran, nothing else
    # half-precision input comes back in its own dtype
    assert kernels.linear(x.bfloat16(), fmt, None, plans).dtype == torch.bfloat16


def test_forced_kernel_falls_back_to_reference_where_unsupported(forced):
    fmt, w64 = random_format(64, 576, QuantSpec(4, 128, False))            # ragged: aten_int4 cannot
    forced("aten_int4")
    plans = {}
    x = torch.randn(3, 576)
    check_close(kernels.linear(x, fmt, None, plans), x.double() @ w64.T, "fallback")
    assert set(plans) - {kernels._BOUND} == {"reference"}


def test_automatic_choice_is_correct(forced):
    """Without LOWBIT_KERNEL the chosen kernel (whichever wins) still gives the right answer."""
    forced(None)
    for spec in (QuantSpec(4, 128, False), QuantSpec(8, -1, True), QuantSpec(8, -1, False), QuantSpec(3, 128, False)):
        fmt, w64 = random_format(192, 512, spec)
        for m in ROWS:
            x = torch.randn(m, 512)
            chosen = kernels.choose(fmt, m, {}).name
            check_close(kernels.linear(x, fmt, None, {}), x.double() @ w64.T, f"auto ({chosen}) {spec} rows={m}",
                        REL_TOL.get(chosen, 1e-3))


def test_choice_is_measured_once_per_machine(forced, monkeypatch, tmp_path):
    """The automatic choice is written to the machine's choices file and read back by a fresh process
    instead of being timed again; a corrupt file is measured again and rewritten, not an error."""
    forced(None)
    path = tmp_path / "choices.json"
    monkeypatch.setenv("LOWBIT_KERNEL_CHOICES", str(path))
    monkeypatch.setattr(kernels, "_CHOICE", {})
    monkeypatch.setattr(kernels, "_CHOICES_LOADED", [None])
    fmt, _ = random_format(192, 512, QuantSpec(4, 128, False))
    monkeypatch.setattr(kernels, "_busy", lambda: True)                 # a busy machine: kept in the process only
    kernels.choose(fmt, 1, {})
    assert not path.exists()
    monkeypatch.setattr(kernels, "_CHOICE", {})
    monkeypatch.setattr(kernels, "_busy", lambda: False)
    first = kernels.choose(fmt, 1, {})
    saved = json.loads(path.read_text())["choices"]
    assert list(saved.values()) == [first.name] and "rows=1" in next(iter(saved))
    # a new process: nothing in memory, the file answers, nothing is timed
    monkeypatch.setattr(kernels, "_CHOICE", {})
    monkeypatch.setattr(kernels, "_CHOICES_LOADED", [None])
    monkeypatch.setattr(kernels, "_time_all", lambda *a, **k: pytest.fail("timed again"))
    assert kernels.choose(fmt, 1, {}) is first
    # corrupt file: measured again and rewritten
    path.write_text("{not json")
    monkeypatch.setattr(kernels, "_CHOICE", {})
    monkeypatch.setattr(kernels, "_CHOICES_LOADED", [None])
    monkeypatch.undo()
    monkeypatch.setenv("LOWBIT_KERNEL_CHOICES", str(path))
    monkeypatch.setattr(kernels, "_busy", lambda: False)
    monkeypatch.setattr(kernels, "_CHOICE", {})
    monkeypatch.setattr(kernels, "_CHOICES_LOADED", [None])
    assert kernels.choose(fmt, 1, {}).name in KERNELS
    assert json.loads(path.read_text())["choices"]


def test_aten_int8_offset_cancellation_bound():
    """Zero points far from 128 and inputs with a mean: error bounded by the magnitude of the summed terms.

    ``|y_k - y| <= (in * 2**-24 + 1e-6) * M`` with ``M = |x| @ |(q - 128) s|.T + |sum x| * |(128 - z) s|``:
    recursive fp32 summation of ``in`` terms errs by at most ~``in * u`` of the sum of their magnitudes.
    (Relative to ``max|y|`` this case measured ~2.5e-3, above the 1e-3 used for random formats.)
    """
    k = KERNELS["aten_int8"]
    torch.manual_seed(0)
    out_f, in_f = 96, 1536
    z = torch.randint(0, 2, (out_f, 1)).float() * 250 + 2                 # zero points 2 or 252
    q = (z + torch.randint(-2, 3, (out_f, in_f))).clamp(0, 255).to(torch.uint8)
    s = (torch.rand(out_f, 1) * 0.02 + 0.001).half()
    fmt = GroupedInt.pack(q, s, z.half(), QuantSpec(8, -1, False))
    assert k.supports(fmt)
    x = torch.randn(8, in_f) + 3
    y64 = x.double() @ fmt.dequantize().double().T
    y = k.run(x, fmt, k.prepare(fmt))
    sf = s.float()
    mag = x.abs() @ ((q.float() - 128).abs() * sf).T + x.sum(-1, keepdim=True).abs() * ((128 - z).abs() * sf).T
    assert ((y.double() - y64).abs() <= (in_f * 2.0**-24 + 1e-6) * mag.double()).all()


def test_supports():
    ragged, _ = random_format(64, 576, QuantSpec(4, 128, False))
    even, _ = random_format(64, 512, QuantSpec(4, 128, False))
    assert not KERNELS["aten_int4"].supports(ragged)
    assert KERNELS["aten_int4"].supports(even)
    assert KERNELS["aten_int4"].supports(random_format(64, 512, QuantSpec(4, 128, True))[0])
    assert not KERNELS["aten_int4"].supports(random_format(64, 512, QuantSpec(3, 128, False))[0])
    assert not KERNELS["aten_int4"].supports(random_format(64, 512, QuantSpec(4, -1, False))[0])   # group 512
    assert not KERNELS["aten_int4"].supports(random_format(7, 512, QuantSpec(4, 128, False))[0])   # out % 16
    assert KERNELS["aten_int8"].supports(random_format(64, 576, QuantSpec(8, -1, False))[0])
    assert KERNELS["aten_int8"].supports(random_format(7, 13, QuantSpec(8, -1, True))[0])
    assert not KERNELS["aten_int8"].supports(random_format(64, 576, QuantSpec(8, 128, False))[0])
    assert not KERNELS["aten_int8"].supports(random_format(64, 576, QuantSpec(4, -1, False))[0])
    assert all(KERNELS["reference"].supports(random_format(1, 8, QuantSpec(b, 8, s))[0])
               for b in BITS for s in (False, True))


def test_unknown_forced_kernel_is_lowbit_error(forced):
    fmt, _ = random_format(16, 64, QuantSpec(4, 32, False))
    forced("nonsense")
    with pytest.raises(LowbitError, match="nonsense"):
        kernels.linear(torch.randn(2, 64), fmt, None, {})
    with pytest.raises(LowbitError, match="reference"):                    # lists what exists
        QuantLinear(fmt)(torch.randn(2, 64))


# --- QuantLinear -------------------------------------------------------------------------------


def quant_linear(out_f=48, in_f=200, spec=QuantSpec(4, 64, False), bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    b = torch.randn(out_f, generator=g) if bias else None
    fmt = rtn(w, spec)
    return QuantLinear(fmt, b), fmt, b


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("spec", [QuantSpec(4, 64, False), QuantSpec(3, 128, True), QuantSpec(8, -1, False)])
def test_quant_linear_equals_dequantized_linear(forced, bias, spec):
    forced("reference")
    m, fmt, b = quant_linear(spec=spec, bias=bias)
    assert (m.out_features, m.in_features) == (48, 200)
    for shape in ((1, 200), (5, 200), (2, 3, 200)):
        x = torch.randn(*shape)
        y = m(x)
        if b is None:
            assert torch.equal(y, F.linear(x, fmt.dequantize()))
        else:
            # the bias is added after the matmul (y = x @ W.T, then + b): exactly that, and F.linear's fused
            # addmm to fp32 rounding
            assert torch.equal(y, F.linear(x, fmt.dequantize()) + b)
            torch.testing.assert_close(y, F.linear(x, fmt.dequantize(), b), rtol=1e-6, atol=1e-6)


def _floating_tensors(obj, seen=None):
    """Every floating-point tensor reachable from ``obj`` through attributes, dicts, lists and tuples."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield obj
        return
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _floating_tensors(v, seen)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from _floating_tensors(v, seen)
    elif isinstance(obj, nn.Module) or dataclasses.is_dataclass(obj):
        for v in vars(obj).values():
            yield from _floating_tensors(v, seen)


@pytest.mark.parametrize("kernel", [None, "reference", "aten_int4", "aten_int8"])
def test_quant_linear_keeps_weights_packed(forced, kernel):
    spec = QuantSpec(8, -1, False) if kernel == "aten_int8" else QuantSpec(4, 64, False)
    m, _, _ = quant_linear(out_f=64, in_f=256, spec=spec)
    forced(kernel)
    for rows in ROWS:
        m(torch.randn(rows, 256))
    if kernel:
        assert set(m._plans) - {kernels._BOUND} == {kernel}
    big = [t.shape for t in _floating_tensors(m) if t.numel() >= 64 * 256]
    assert big == [], f"a dequantized weight is kept: {big}"
    # the walk does reach the plans: int8's plan holds an (out, in) int8 tensor, not a float one
    if kernel == "aten_int8":
        assert any(isinstance(t, torch.Tensor) and t.dtype == torch.int8 and t.shape == (64, 256)
                   for t in m._plans["aten_int8"])


@pytest.mark.parametrize(("spec", "bias", "keys"), [
    (QuantSpec(4, 64, False), True, {"codes", "scale", "zero", "bias"}),
    (QuantSpec(4, 64, False), False, {"codes", "scale", "zero"}),
    (QuantSpec(3, 128, True), True, {"codes", "scale", "bias"}),
    (QuantSpec(8, -1, True), False, {"codes", "scale"}),
])
def test_state_dict_keys_are_the_stored_tensors(forced, spec, bias, keys):
    forced("reference")
    m, fmt, _ = quant_linear(spec=spec, bias=bias)
    m(torch.randn(2, 200))                                                # plans must not leak into it
    sd = m.state_dict()
    assert set(sd) == keys
    for name, t in fmt.tensors().items():
        assert torch.equal(sd[name], t) and sd[name].dtype == t.dtype
    assert m.nbytes() == fmt.nbytes()


def test_load_state_dict_replaces_weights_and_plans(forced):
    forced(None)                                                          # automatic choice, with plans
    a, fmt_a, b_a = quant_linear(out_f=64, in_f=512, spec=QuantSpec(4, 128, False), seed=1)
    b, _, _ = quant_linear(out_f=64, in_f=512, spec=QuantSpec(4, 128, False), seed=2)
    x = torch.randn(3, 512)
    y_b_before = b(x)
    b.load_state_dict(a.state_dict())
    y = b(x)
    assert not torch.allclose(y, y_b_before)
    chosen = kernels.choose(fmt_a, 3, {}).name
    check_close(y, F.linear(x.double(), fmt_a.dequantize().double(), b_a.double()), "after load_state_dict",
                REL_TOL.get(chosen, 1e-4))
    # into an empty module built from the metadata
    forced("reference")
    e = QuantLinear.empty(a.meta, bias=True)
    e.load_state_dict(a.state_dict())
    assert torch.equal(e(x), a(x))


def test_to_same_dtype_and_device_keeps_it_working(forced):
    forced("reference")
    m, fmt, b = quant_linear()
    x = torch.randn(4, 200)
    y = m(x)
    m.to("cpu")
    assert torch.equal(m(x), y)


def test_to_float32_keeps_it_working(forced):
    forced("reference")
    m, fmt, b = quant_linear()
    x = torch.randn(4, 200)
    y = m(x)
    m.to(torch.float32)
    assert torch.equal(m(x), y)


@pytest.mark.parametrize("kernel", [None, "reference", "aten_int4"])
def test_bit_identical_run_to_run(forced, kernel):
    forced(kernel)
    m, _, _ = quant_linear(out_f=64, in_f=512, spec=QuantSpec(4, 128, False))
    x = torch.randn(8, 512)
    assert torch.equal(m(x), m(x))


# --- QuantExperts ------------------------------------------------------------------------------


def test_quant_experts_match_manual_loop(forced):
    forced("reference")
    torch.manual_seed(0)
    n_experts, hidden, inter, tokens, top_k = 3, 64, 32, 10, 2
    gate_up, down = [], []
    for _ in range(n_experts):
        gate_up.append(QuantLinear(rtn(torch.randn(2 * inter, hidden) * 0.1, QuantSpec(4, 32, False))))
        down.append(QuantLinear(rtn(torch.randn(hidden, inter) * 0.1, QuantSpec(4, 32, False))))
    experts = QuantExperts(gate_up, down, nn.SiLU())
    x = torch.randn(tokens, hidden)
    idx = torch.stack([torch.randperm(n_experts)[:top_k] for _ in range(tokens)])   # (tokens, k), distinct
    weights = torch.softmax(torch.randn(tokens, top_k), -1)

    want = torch.zeros(tokens, hidden)
    for t in range(tokens):
        for k in range(top_k):
            e = int(idx[t, k])
            h = F.linear(x[t], gate_up[e].fmt.dequantize())
            gate, up = h[:inter], h[inter:]
            want[t] += weights[t, k] * F.linear(F.silu(gate) * up, down[e].fmt.dequantize())
    got = experts(x, idx, weights)
    assert got.shape == (tokens, hidden)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # an expert no token is routed to contributes nothing
    only0 = torch.zeros(tokens, 1, dtype=torch.long)
    torch.testing.assert_close(experts(x, only0, torch.ones(tokens, 1)),
                               F.linear(F.silu(F.linear(x, gate_up[0].fmt.dequantize())[:, :inter])
                                        * F.linear(x, gate_up[0].fmt.dequantize())[:, inter:],
                                        down[0].fmt.dequantize()), rtol=1e-5, atol=1e-5)
    assert set(experts.state_dict()) == {f"{p}.{e}.{n}" for p in ("gate_up_proj", "down_proj")
                                         for e in range(n_experts) for n in ("codes", "scale", "zero")}
