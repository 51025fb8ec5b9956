"""Perplexity and, against a reference model, KL divergence and top-1 agreement.

Each window of ``T`` tokens is scored on its own (no carried context): position ``t`` predicts
token ``t + 1``, so a window yields ``T - 1`` predictions::

    window   w0  w1  w2  ...  w(T-2)  w(T-1)
    predicts w1  w2  w3  ...  w(T-1)     -      -> T - 1 scored tokens per window

    ppl            = exp(mean over scored tokens of -log P_model(next token))
    kl per token   = sum_v P_ref(v) * (log P_ref(v) - log P_model(v))      # KL(P_ref || P_model)
    top1_agreement = fraction of scored tokens where argmax P_ref == argmax P_model

These are the quantities llama.cpp's ``llama-perplexity --kl-divergence`` prints as "Mean KLD",
"99.0% KLD" and "Same top p", with one difference: llama.cpp scores only the second half of each
context, lowbit scores every position. Numbers are therefore comparable within lowbit, not
digit for digit with llama.cpp.

The reference runs once per batch of windows and its log-probabilities are shared by every
model; logits never outlive their batch (vocab 49152 x 512 positions x 4 B = 100 MB a window).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.errors import DataError, LowbitError, ShapeError
from lowbit.evaluate._torch import device_of, eval_mode


@dataclass(frozen=True)
class QualityResult:
    """Quality of one model on a set of windows; KL fields are None without a reference."""

    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, nats
    kl_mean: float | None
    kl_p99: float | None
    top1_agreement: float | None  # fraction in [0, 1]
    n_windows: int
    seqlen: int
    n_tokens: int  # scored tokens = n_windows * (seqlen - 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> QualityResult:
        """Inverse of ``to_dict``; accepts "inf"/"nan" strings written for non-finite floats."""
        floats = ("perplexity", "nll", "kl_mean", "kl_p99", "top1_agreement")
        return cls(**{k: (None if v is None else float(v)) if k in floats else v for k, v in d.items()})


@dataclass(frozen=True)
class _RefBatch:
    """What the reference contributes to one batch, computed once and shared by all models."""

    logp: Tensor  # fp32 (B, T-1, V) log P_ref
    p: Tensor  # fp32 (B, T-1, V) P_ref
    p_zero: Tensor | None  # bool (B, T-1, V) P_ref == 0 (terms of the KL sum that are 0); None if none
    top1: Tensor  # long (B, T-1)


@dataclass(frozen=True)
class _TokenScores:
    """Per-token scores of one model on one batch, flattened, on CPU."""

    nll: Tensor  # fp32 (B*(T-1),)
    kl: Tensor | None  # fp32 (B*(T-1),)
    agree: Tensor | None  # bool (B*(T-1),)


def evaluate_quality(
    models: Mapping[str, nn.Module],
    windows: Tensor,
    reference: nn.Module | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> dict[str, QualityResult]:
    """Perplexity of every model over ``windows`` (n, T); with ``reference``, also KL and top-1.

    A model that *is* the reference object (identity, not equality) reuses the reference's
    forward, so it costs nothing extra and gets KL = 0, top-1 = 1. Models are put in eval mode
    for the run and restored afterwards.
    """
    windows = _check_inputs(models, windows, batch_size)
    n, T = windows.shape
    scores: dict[str, list[_TokenScores]] = {name: [] for name in models}
    todo = [*models.values()] + ([reference] if reference is not None else [])
    with torch.inference_mode(), eval_mode(todo), tqdm(
        total=n, unit="window", desc="quality", disable=not progress
    ) as bar:
        for start in range(0, n, batch_size):
            batch = windows[start : start + batch_size]  # (B, T)
            ref = None if reference is None else _reference_batch(_logprobs(reference, batch, "reference"))
            for name, model in models.items():
                logp = ref.logp if model is reference else _logprobs(model, batch, name)
                scores[name].append(_score(logp, batch[:, 1:], ref, name))
                del logp
            del ref
            bar.update(len(batch))
    return {name: _summarize(s, n_windows=n, seqlen=T) for name, s in scores.items()}


def _check_inputs(models: Mapping[str, nn.Module], windows: Tensor, batch_size: int) -> Tensor:
    if not models:
        raise LowbitError("evaluate_quality got no models; pass a dict {name: model}")
    if not isinstance(windows, Tensor) or windows.dim() != 2:
        shape = tuple(windows.shape) if isinstance(windows, Tensor) else type(windows).__name__
        raise DataError(f"windows must be a 2-D token tensor (n, seqlen), got {shape}")
    if windows.dtype.is_floating_point or windows.dtype.is_complex or windows.dtype == torch.bool:
        raise DataError(f"windows must hold integer token ids, got dtype {windows.dtype}")
    n, T = windows.shape
    if n < 1 or T < 2:
        raise DataError(f"windows has shape ({n}, {T}); need at least 1 window of at least 2 tokens")
    if batch_size < 1:
        raise LowbitError(f"batch_size={batch_size}; use a positive integer")
    if int(windows.min()) < 0:
        raise DataError(f"windows holds a negative token id ({int(windows.min())}); check the tokenizer")
    return windows.long()


def _logprobs(model: nn.Module, batch: Tensor, name: str) -> Tensor:
    """fp32 log-softmax of the model's predictions for positions 0..T-2: (B, T-1, V)."""
    out = model(input_ids=batch.to(device_of(model)), use_cache=False)
    logits = getattr(out, "logits", None)
    if not isinstance(logits, Tensor):
        raise LowbitError(f"model {name!r} returned {type(out).__name__} without a .logits tensor; "
                          "pass a causal LM (e.g. a transformers *ForCausalLM)")
    B, T = batch.shape
    if logits.dim() != 3 or logits.shape[:2] != (B, T):
        raise ShapeError(f"model {name!r} returned logits of shape {tuple(logits.shape)} for input "
                         f"({B}, {T}); expected ({B}, {T}, vocab)")
    return logits[:, :-1].float().log_softmax(dim=-1)  # (B, T-1, V)


def _reference_batch(logp: Tensor) -> _RefBatch:
    p = logp.exp()  # (B, T-1, V)
    p_zero = p == 0  # fp32 underflow below log p = -103.9, or a -inf logit
    return _RefBatch(logp=logp, p=p, p_zero=p_zero if p_zero.any() else None, top1=logp.argmax(dim=-1))


def _score(logp: Tensor, targets: Tensor, ref: _RefBatch | None, name: str) -> _TokenScores:
    """Per-token NLL, and with a reference, KL(P_ref || P_model) and top-1 agreement."""
    V = logp.shape[-1]
    targets = targets.to(logp.device)  # (B, T-1)
    if int(targets.max()) >= V:
        raise ShapeError(f"windows hold token id {int(targets.max())} but model {name!r} has only {V} "
                         "logits; tokenize the corpus with this model's tokenizer")
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    if ref is None:
        return _TokenScores(nll=nll.flatten().cpu(), kl=None, agree=None)
    if ref.logp.shape != logp.shape:
        raise ShapeError(f"model {name!r} predicts over {V} tokens but the reference over "
                         f"{ref.logp.shape[-1]}; compare models that share a vocabulary")
    diff = ref.logp.to(logp.device) - logp  # (B, T-1, V) log P_ref - log P_model
    if ref.p_zero is not None:
        diff.masked_fill_(ref.p_zero.to(logp.device), 0.0)  # 0 * log(0 / q) = 0, not 0 * -inf = nan
    kl = diff.mul_(ref.p.to(logp.device)).sum(dim=-1)  # (B, T-1)
    agree = logp.argmax(dim=-1) == ref.top1.to(logp.device)  # (B, T-1)
    return _TokenScores(nll=nll.flatten().cpu(), kl=kl.flatten().cpu(), agree=agree.flatten().cpu())


def _summarize(scores: list[_TokenScores], n_windows: int, seqlen: int) -> QualityResult:
    nll = torch.cat([s.nll for s in scores]).double()  # (n*(T-1),)
    mean_nll = float(nll.mean())
    kl_mean = kl_p99 = top1 = None
    if scores[0].kl is not None:
        kl = torch.cat([s.kl for s in scores]).double()
        kl_mean = float(kl.mean())
        kl_p99 = float(np.percentile(kl.numpy(), 99.0))  # linear interpolation between ranks
        top1 = float(torch.cat([s.agree for s in scores]).double().mean())
    return QualityResult(
        perplexity=_exp(mean_nll),
        nll=mean_nll,
        kl_mean=kl_mean,
        kl_p99=kl_p99,
        top1_agreement=top1,
        n_windows=n_windows,
        seqlen=seqlen,
        n_tokens=nll.numel(),
    )


def _exp(x: float) -> float:
    """math.exp that returns inf instead of raising on overflow (a diverged model)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf
