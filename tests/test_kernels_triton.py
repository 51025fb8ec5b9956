"""The Triton (GPU) kernels, run on CPU tensors by Triton's interpreter (``TRITON_INTERPRET=1``).

The interpreter executes the same kernel source the GPU compiles, with numpy, so these tests check the
kernels' arithmetic, masks, bit extraction and group indexing on every format; they do not check GPU code
generation or speed (``benchmarks/gpu_kernels.py`` does that where CUDA is present).  Skipped where Triton
is not installed (``pip install 'lowbit[gpu]'``; CI installs no Triton, about 1 GB).  Shapes stay small:
the interpreter runs one program at a time (576 x 576 at one row takes about 0.4 s).

Tolerance as in tests/test_kernels.py: ``max|y - y64| <= 1e-3 * max|y64| + 1e-4`` against float64 from the
raw codes; fp32 accumulation gives a few ulps (measured <= 5e-7 relative).
"""

from __future__ import annotations

import os

import pytest
import torch

from lowbit import kernels
from lowbit.formats import OutlierFormat, QuantSpec
from lowbit.kernels import KERNELS
from lowbit.modules import QuantLinear
from test_kernels import check_close, forced, random_format  # noqa: F401 - forced: a fixture

pytestmark = pytest.mark.skipif("triton" not in KERNELS, reason="Triton is not installed (pip install 'lowbit[gpu]')")

BITS = (2, 3, 4, 8)
SHAPES = [(1, 1), (7, 13), (33, 576)]              # (out, in); 576: SmolLM2's width, ragged at group 128
ROWS = (1, 3, 8, 40)                               # up to 8: the GEMV kernel; 40: the tl.dot tile kernel


@pytest.fixture(scope="module")
def interpreted():
    """lowbit's Triton module, run by Triton's interpreter: tests/conftest.py turns it on, before anything imports
    Triton, on machines without an NVIDIA GPU (it cannot be turned on later: Triton's own helpers are defined
    when it is imported)."""
    if os.environ.get("TRITON_INTERPRET", "").strip() in ("", "0"):
        pytest.skip("Triton's interpreter is off (a GPU machine: test_triton_on_cuda runs the kernels there)")
    from lowbit.kernels import _triton

    return _triton


@pytest.mark.parametrize("bits", BITS)
def test_triton_matches_float64_reference(interpreted, bits):
    kernel = KERNELS["triton"]
    g = torch.Generator().manual_seed(bits)
    n_checked = 0
    for out_f, in_f in SHAPES:
        xs = {m: torch.randn(m, in_f, generator=g) for m in ROWS}
        for symmetric, int_zero in ((False, False), (True, False), (False, True)):
            for group in [-1] + [gs for gs in (8, 32, 128) if gs <= in_f]:
                spec = QuantSpec(bits, group, symmetric, int_zero)
                fmt, w64 = random_format(out_f, in_f, spec, seed=bits + out_f)
                assert kernel.supports(fmt)
                state = kernel.prepare(fmt)
                for m, x in xs.items():
                    y = kernel.run(x, fmt, state)
                    assert y.dtype == torch.float32 and y.shape == (m, out_f)
                    check_close(y, x.double() @ w64.T, f"triton {spec} {out_f}x{in_f} rows={m}")
                    n_checked += 1
    assert n_checked == len(ROWS) * 3 * sum(1 + sum(gs <= i for gs in (8, 32, 128)) for _, i in SHAPES)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize(("rows", "programs"), [(1, 1), (1, 512), (3, 512), (33, 512)])
def test_triton_smollm2_shape_and_run_to_run(interpreted, monkeypatch, bits, rows, programs):
    """576 x 576 at group 128 (ragged last group of 64): the GEMV with its columns whole (programs=1) and split
    in shares (the default), and the tile kernel; two calls give identical bits."""
    monkeypatch.setattr(interpreted, "GEMV_PROGRAMS", programs)
    fmt, w64 = random_format(576, 576, QuantSpec(bits, 128, False, True), seed=7)
    x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(3))
    kernel = KERNELS["triton"]
    state = kernel.prepare(fmt)
    y = kernel.run(x, fmt, state)
    check_close(y, x.double() @ w64.T, f"triton 576x576 {bits}-bit rows={rows}")
    assert torch.equal(y, kernel.run(x, fmt, state))


def test_triton_through_quant_linear_with_bias_and_outliers(interpreted, forced):
    """Forced on CPU tensors: a QuantLinear (3-D input, bias) and an outlier layer (the sparse product added)
    give the reference kernel's result."""
    fmt, _ = random_format(48, 576, QuantSpec(3, 128, False), seed=2)
    g = torch.Generator().manual_seed(5)
    bias = torch.randn(48, generator=g)
    x = torch.randn(2, 5, 576, generator=g)
    weight = torch.randn(48, 576, generator=g) * 0.05
    mask = torch.rand(48, 576, generator=g) < 0.01
    for f in (fmt, OutlierFormat.from_mask(fmt, mask, weight)):
        forced("reference")
        ref = QuantLinear(f, bias)(x)
        forced("triton")
        layer = QuantLinear(f, bias)
        y = layer(x)
        assert kernels.choose(f.base if isinstance(f, OutlierFormat) else f, 10, {}).name == "triton"
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)


def test_triton_rejects_mismatched_width(interpreted):
    fmt, _ = random_format(8, 64, QuantSpec(4, 32, False), seed=1)
    with pytest.raises(ValueError, match="64"):
        interpreted.grouped_linear(torch.randn(1, 63), fmt.codes, fmt.scale, fmt.zero_points(), 4, 32, 64)


def test_triton_op_fake_and_schema(interpreted):
    """The custom op's schema, fake (shape) implementation and eager result agree (``torch.library.opcheck``)."""
    fmt, _ = random_format(16, 40, QuantSpec(2, 16, False), seed=3)
    args = (torch.randn(2, 40), fmt.codes, fmt.scale, fmt.zero_points(), 2, 16, 40)
    torch.library.opcheck(torch.ops.lowbit.grouped_linear_gpu.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_triton_never_chosen_for_cpu_formats_automatically(monkeypatch):
    """Without CUDA the automatic choice leaves the GPU kernel out, interpreter or not."""
    monkeypatch.setenv("LOWBIT_KERNEL_CHOICES", "off")
    monkeypatch.delenv("LOWBIT_KERNEL", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fmt, _ = random_format(64, 576, QuantSpec(4, 128, False), seed=1)
    assert KERNELS["triton"].supports(fmt)                      # forcing it would run it
    if not torch.cuda.is_available():
        assert not KERNELS["triton"].available()
        assert kernels.choose(fmt, 1, {}).name != "triton"
        assert kernels.choose(fmt, 64, {}).name != "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not KERNELS["triton"].supports(fmt)                  # CPU tensors without the interpreter


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", BITS)
def test_triton_on_cuda(bits):
    """On a GPU (never in CI): the compiled kernels against float64, GEMV and tile sizes, ragged groups."""
    if os.environ.get("TRITON_INTERPRET", "").strip() not in ("", "0"):
        pytest.skip("the interpreter is on")
    kernel = KERNELS["triton"]
    for out_f, in_f in [(7, 13), (576, 576), (1536, 576), (576, 1536), (49152, 576)]:
        for spec in (QuantSpec(bits, 128, False, True), QuantSpec(bits, 64, True), QuantSpec(bits, -1, False)):
            fmt, w64 = random_format(out_f, in_f, spec, seed=bits)
            fmt = type(fmt)(*(t.cuda() if isinstance(t, torch.Tensor) else t
                              for t in (fmt.codes, fmt.scale, fmt.zero, fmt.spec, fmt.in_features)))
            assert kernel.supports(fmt) and kernels.choose(fmt, 1, {}).name in ("triton", "reference")
            state = kernel.prepare(fmt)
            for m in (1, 8, 64):
                x = torch.randn(m, in_f, generator=torch.Generator().manual_seed(m))
                y = kernel.run(x.cuda(), fmt, state).cpu()
                check_close(y, x.double() @ w64.T, f"cuda triton {spec} {out_f}x{in_f} rows={m}")


def test_triton_generates_the_reference_tokens(interpreted, forced, tmp_path, monkeypatch):
    """A saved tiny llama (4-bit g64) loaded and run with every layer forced onto the Triton kernels: the
    logits match the reference kernel's and greedy generate() gives the same tokens."""
    import lowbit
    from conftest import tiny_model, tiny_tokenizer
    from lowbit import checkpoint
    from lowbit.pipeline import quantize_model
    from lowbit.recipe import Recipe

    model = tiny_model("llama")
    report = quantize_model(model, Recipe.resolve("w4g64"), progress=False)     # 96-wide rows: a ragged group
    checkpoint.save(model, tiny_tokenizer(), tmp_path / "q", report, {"spec": "tiny"})
    ids = torch.randint(3, 200, (1, 7), generator=torch.Generator().manual_seed(0))
    out = {}
    calls = []
    monkeypatch.setattr(type(KERNELS["triton"]), "run", lambda self, x, fmt, st, _run=type(KERNELS["triton"]).run:
                        calls.append(fmt.shape) or _run(self, x, fmt, st))
    for name in ("reference", "triton"):
        forced(name)
        loaded = lowbit.load(tmp_path / "q", compile=False)
        with torch.no_grad():
            logits = loaded(ids).logits
        tokens = loaded.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        out[name] = logits, tokens
    # per forward and decoder layer: q/k/v (one shared call), o, gate/up (one shared call), down; 7 forwards
    assert len(calls) == 7 * 4 * loaded.config.num_hidden_layers
    torch.testing.assert_close(out["triton"][0], out["reference"][0], rtol=1e-4, atol=1e-4)
    assert torch.equal(out["triton"][1], out["reference"][1])
