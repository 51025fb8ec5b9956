"""auto-round (Intel): SignRound on lowbit's 128 x 512 owt calibration windows.

``AutoRound(model, tokenizer, scheme="W{bits}A16", group_size=g, iters=..., nsamples=128,
seqlen=512, batch_size=8, dataset=<the windows as {input_ids, attention_mask} batches>,
device_map="cpu")`` then ``quantize()``: everything else at auto-round's defaults (symmetric
integer codes, fp16 scales, lr 1/iters, torch.compile on, bf16 autocast on CPU). The quantize
time covers the constructor and ``quantize()``. One exception: on a CPU without native bf16
(AVX2 only: no ``avx512_bf16``/``amx_bf16``) the row passes ``amp=False``, so auto-round tunes in
fp32 as lowbit's calibration does on such a CPU (``lowbit.calibrate.forward_dtype``); PyTorch
emulates bf16 matmuls there, 7.5x slower than fp32, which made a 200-iteration row take many
hours. The row's notes say which was used.

auto-round works in bf16 on CPU: after ``quantize()`` every tensor of the model is bf16 and each
quantized layer holds its fake-quantized bf16 weight, its fp16 ``scale`` and its zero point.
``save_quantized(format="auto_round")`` packs each layer in place into auto-round's torch
``QuantLinear`` (GPTQ layout: ``qweight``/``qzeros`` int32, ``scales`` fp16; the codes are
``clamp(round(W / scale + zp))``): those buffers are what is counted. The evaluated model is the
fp32 model with each quantized layer's weight set to ``scale * (code - zp)`` computed in fp32
from exactly those codes and fp16 scales: the quality of what auto-round stores, with fp32
activations and fp32 embeddings/norms/head like every other row. (auto-round's own CPU
``QuantLinear`` cannot run a layer whose width the group does not divide; the row records
whether the packed model's own forward ran, and checks the reconstruction against it on a layer
where it does.)
"""

from __future__ import annotations

import gc
import shutil
import tempfile

import torch

from .common import Context, RowOutput, Timer, count_storage, first_line


def _dequant(m, bits: int) -> torch.Tensor:
    """fp32 ``scale * (code - zp)`` with the codes auto-round's packer derives from the layer."""
    w = m.weight.detach().float()                                   # (out, in) fake-quantized, bf16 values
    out_f, in_f = w.shape
    g = m.group_size if m.group_size and m.group_size > 0 else in_f
    s = m.scale.float().reshape(out_f, -1).repeat_interleave(g, dim=1)[:, :in_f]
    zp = m.zp
    if isinstance(zp, torch.Tensor):
        zp = zp.float().reshape(out_f, -1).repeat_interleave(g, dim=1)[:, :in_f]
    q = torch.round(w / s + zp).clamp_(0, 2 ** bits - 1)
    return s * (q - zp)


def run(ctx: Context, bits: int, group: int, iters: int) -> RowOutput:
    from auto_round import AutoRound

    iters = ctx.settings.iters or iters
    loaded = ctx.load()
    model, tok, layers = loaded.model, loaded.tokenizer, ctx.layers
    windows = ctx.calibration()
    batch = 8
    from lowbit.cpu import native_bf16
    amp = native_bf16()            # auto-round's own default on CPU is bf16 autocast; fp32 where bf16 is emulated
    data = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in windows.split(batch)]
    with Timer() as t:
        ar = AutoRound(model, tok, scheme=f"W{bits}A16", group_size=group, iters=iters, nsamples=len(windows),
                       seqlen=windows.shape[1], batch_size=batch, dataset=data, device_map="cpu", amp=amp)
        ar.quantize()
    notes = [f"{iters} iterations" + (" (development override)" if ctx.settings.iters else "")]
    if not amp:
        notes.append("tuned in fp32 (amp=False): this CPU has no native bf16, as for lowbit's calibration here")
    missing = [n for n in layers if not hasattr(model.get_submodule(n), "scale")]
    if missing:
        raise RuntimeError(f"auto-round left {len(missing)} decoder layers unquantized, e.g. {missing[0]}")
    sym = bool(getattr(model.get_submodule(next(iter(layers))), "sym", True))
    with torch.no_grad():
        deq = {n: _dequant(model.get_submodule(n), bits) for n in layers}
    tmp = tempfile.mkdtemp(prefix="peers-autoround-")
    try:
        with Timer() as tp:
            ar.save_quantized(tmp, format="auto_round")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    storage = count_storage(model, layers, bits)
    extra = {"iters": iters, "sym": sym, "pack_s": tp.seconds, "amp": amp}
    # the library's own packed CPU forward, and the reconstruction checked against it
    try:
        with torch.no_grad():
            model(input_ids=windows[:1, :16])
        extra["own_forward"] = "ok"
    except Exception as e:                                          # noqa: BLE001 - recorded, not fatal
        extra["own_forward"] = first_line(e)
        notes.append(f"auto-round's packed CPU forward fails: {first_line(e)}")
    for n in layers:
        m = model.get_submodule(n)
        in_f = deq[n].shape[1]
        if in_f % getattr(m, "group_size", in_f) == 0:
            with torch.no_grad():
                own = m(torch.eye(in_f, dtype=torch.float32)).t()  # (out, in) as auto-round dequantizes (fp16)
            extra["check_layer"] = n
            extra["check_max_rel_err"] = float((own - deq[n]).abs().max() / deq[n].abs().max())
            break
    del ar, model, loaded
    gc.collect()
    fresh = ctx.load().model
    with torch.no_grad():
        for n, w in deq.items():
            fresh.get_submodule(n).weight.copy_(w)
    notes.append("evaluated: fp32 model with the stored codes x fp16 scales dequantized in fp32")
    return RowOutput(fresh, t.seconds, storage, notes, extra)
