"""Greedy decode speed: tokens per second after the prompt has been processed.

One untimed warm-up ``generate``, then ``repeats`` timed prefills (a forward over the prompt)
and ``repeats`` timed ``generate`` calls of exactly ``new_tokens`` tokens::

    decode tokens/s (run i) = new_tokens / (generate_s[i] - median(prefill_s))

and the median over runs is reported. ``generate`` spends its first step on the prefill, so the
subtraction leaves the time of the decode loop. EOS is switched off (``eos_token_id=[]``, as
``llama-bench`` ignores it), so every run decodes the same number of tokens; ``min_new_tokens``
would do the same at the price of a ``torch.isin`` over the whole vocabulary per token (0.2-0.6 ms
on SmolLM2, a tenth of a 4-bit decode step).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.evaluate._torch import device_of, eval_mode

log = logging.getLogger("lowbit.evaluate")

DEFAULT_PROMPT = "The history of the printing press begins in the fifteenth century, when"


@dataclass(frozen=True)
class SpeedResult:
    """Median greedy decode throughput of one model on one prompt."""

    decode_tokens_per_s: float
    prefill_s: float  # median seconds of one forward over the prompt
    generate_s: float  # median seconds of one generate call (prefill + decode)
    new_tokens: int  # tokens generated per run (checked equal in every run)
    prompt_tokens: int
    repeats: int
    threads: int  # torch.get_num_threads() during the measurement
    text: str  # decoded continuation of the first timed run, for a sanity look
    first_call_s: float | None = None  # the untimed warm-up generate: compilation of the decode step, if any
    decode_path: str | None = None  # which decode path ran (lowbit.decoding.describe), for a lowbit model

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> SpeedResult:
        """Inverse of ``to_dict``; accepts "inf"/"nan" strings written for non-finite floats."""
        floats = ("decode_tokens_per_s", "prefill_s", "generate_s")
        return cls(**{k: float(v) if k in floats else v for k, v in d.items()})


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def decode_speed(
    model: nn.Module,
    tokenizer,
    prompt: str = DEFAULT_PROMPT,
    new_tokens: int = 64,
    repeats: int = 3,
) -> SpeedResult:
    """Median greedy decode tokens/s of ``model`` continuing ``prompt`` by ``new_tokens`` tokens."""
    if new_tokens < 1 or repeats < 1:
        raise LowbitError(f"decode_speed: new_tokens={new_tokens}, repeats={repeats}; both must be >= 1")
    device = device_of(model)
    inputs = {k: v.to(device) for k, v in tokenizer(prompt, return_tensors="pt").items()}
    prompt_tokens = inputs["input_ids"].shape[1]
    gen_kwargs = {"do_sample": False, "max_new_tokens": new_tokens, "eos_token_id": [],
                  "pad_token_id": _pad_token_id(tokenizer)}
    with torch.inference_mode(), eval_mode([model]):
        first_call_s, _ = _timed(lambda: model.generate(**inputs, **gen_kwargs), device)  # warm-up: allocations,
        # kernel selection, and compilation of the decode step where the model has the lean path (lowbit.decoding)
        model(**inputs, use_cache=True)  # warm-up of the prefill path on its own
        prefill = [_timed(lambda: model(**inputs, use_cache=True), device)[0] for _ in range(repeats)]
        runs = [_timed(lambda: model.generate(**inputs, **gen_kwargs), device) for _ in range(repeats)]

    generated = [out.shape[1] - prompt_tokens for _, out in runs]  # each out: (1, prompt + new)
    if any(g != new_tokens for g in generated):
        raise LowbitError(f"generate produced {generated} new tokens, asked for exactly {new_tokens}; "
                          "check the model's generation_config (stop strings, max_length)")
    prefill_s = statistics.median(prefill)
    generate_s = [s for s, _ in runs]
    # decode time = generate - prefill; where a noisy prefill outlasts a whole generate (tiny models,
    # a busy machine) that difference means nothing, and the run counts its whole generate time:
    # never a faster figure than measured
    decode_s = [g - prefill_s if g > prefill_s else g for g in generate_s]
    if any(g <= prefill_s for g in generate_s):
        log.warning("decode time not separable from prefill (%.4f s) in a generate call of %.4f s; "
                    "counting the whole call", prefill_s, min(generate_s))
    text = tokenizer.decode(runs[0][1][0, prompt_tokens:], skip_special_tokens=True)
    return SpeedResult(
        decode_tokens_per_s=statistics.median([new_tokens / d for d in decode_s]),
        prefill_s=prefill_s,
        generate_s=statistics.median(generate_s),
        new_tokens=new_tokens,
        prompt_tokens=prompt_tokens,
        repeats=repeats,
        threads=torch.get_num_threads(),
        text=text,
        first_call_s=first_call_s,
        decode_path=_decode_path(model),
    )


def _decode_path(model) -> str | None:
    from lowbit.decoding import describe

    try:
        return describe(model)
    except Exception:                       # noqa: BLE001 - a description must never fail a measurement
        return None


def _pad_token_id(tokenizer) -> int | None:
    """The tokenizer's pad id, else its EOS id (generate warns when neither is given)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else getattr(tokenizer, "eos_token_id", None)


def _timed(fn: Callable, device: torch.device) -> tuple[float, object]:
    """(seconds, result) of ``fn()``, synchronizing an accelerator so queued work is counted."""
    _sync(device)
    t0 = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - t0, result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
