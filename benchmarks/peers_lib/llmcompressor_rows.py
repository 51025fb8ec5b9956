"""llm-compressor GPTQ: ``oneshot(model, dataset=<lowbit's calibration windows>, recipe=GPTQModifier(...))``.

GPTQModifier defaults (block 128, dampening 0.01, act-order "static" so no g_idx is stored),
one config group on every ``Linear`` but ``lm_head``: int weights, asymmetric groups at 2/3/4
bits (as lowbit's gptq presets), symmetric per channel at 8 bits (``W8A16``). The calibration
set is lowbit's 128 x 512 owt windows as a pre-tokenized ``datasets.Dataset`` (no shuffling).

After ``oneshot`` the model holds fake-quantized fp32 weights plus ``weight_scale`` and
``weight_zero_point``; that model is what is evaluated. The packed form is what llm-compressor
saves (``pack-quantized``: 8 codes per int32, zero points packed too, scales in the model's
dtype, fp32 here): ``ModelCompressor.compress_model`` converts the model in place after the
evaluation, and those tensors are what is counted.

llm-compressor 0.14.0.1 declares ``transformers<=5.17.0``; it is installed with ``--no-deps`` next
to transformers 5.23 (see peers-requirements.txt) and runs on this CPU-only machine.
"""

from __future__ import annotations

import torch

from .common import Context, RowOutput, Timer, count_storage


def run(ctx: Context, bits: int, group: int | None, symmetric: bool) -> RowOutput:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    loaded = ctx.load()
    model, layers = loaded.model, ctx.layers
    windows = ctx.calibration()
    ds = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                            strategy="group" if group else "channel", group_size=group)
    recipe = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                          ignore=["lm_head"])
    with Timer() as t:
        oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(windows),
                max_seq_length=windows.shape[1], shuffle_calibration_samples=False)

    def storage() -> dict:
        from compressed_tensors.compressors import ModelCompressor

        comp = ModelCompressor.from_pretrained_model(model)
        fmt = comp.quantization_config.format if comp is not None and comp.quantization_config else None
        comp.compress_model(model)
        out = count_storage(model, layers, bits)
        out["format"] = str(getattr(fmt, "value", fmt))
        return out

    return RowOutput(model, t.seconds, storage,
                     ["evaluated fake-quantized after oneshot; counted after compress_model (the saved form)"],
                     {"quantization_args": args.model_dump(mode="json")})
