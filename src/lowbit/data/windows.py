"""Cut a tokenized text into fixed-length windows for evaluation and calibration.

The text is tokenized once, whole, with no special tokens (a fast tokenizer does ~600k chars in
well under a second). Windows never overlap:

    eval_windows:         |--0--|--1--|--2--|...|-n-1-|  (unused tail)      consecutive from token 0
    calibration_windows:  |g0|--0--|g1|--1--|...|g(n-1)|-n-1-|  (tail)       random gaps g_i >= 0
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.errors import DataError


def token_ids(tokenizer, text: str) -> Tensor:
    """The whole text's token ids, no special tokens added. (T,) int64."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(tokenizer, text: str, seqlen: int = 512, n: int = 64) -> Tensor:
    """The first ``n`` consecutive non-overlapping windows of ``seqlen`` tokens. (n, seqlen) int64."""
    ids = token_ids(tokenizer, text)                       # (T,)
    _check_fits(ids.numel(), seqlen, n, "evaluation")
    return ids[: n * seqlen].view(n, seqlen)               # (n, seqlen)


def calibration_windows(tokenizer, text: str, seqlen: int = 512, n: int = 128, seed: int = 0) -> Tensor:
    """``n`` non-overlapping windows at random offsets, in text order; same seed, same windows.

    The ``slack = T - n*seqlen`` unused tokens are spread as random gaps: draw n sorted offsets in
    [0, slack]; window i starts at ``offset_i + i*seqlen``, so consecutive starts differ by at
    least ``seqlen`` and the last window ends at or before T. (n, seqlen) int64.
    """
    ids = token_ids(tokenizer, text)                       # (T,)
    _check_fits(ids.numel(), seqlen, n, "calibration")
    slack = ids.numel() - n * seqlen
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, slack + 1, (n,), generator=gen).sort().values    # (n,) non-decreasing
    starts = offsets + torch.arange(n) * seqlen                                  # (n,)
    return ids[starts[:, None] + torch.arange(seqlen)]                          # (n, seqlen)


def _check_fits(n_tokens: int, seqlen: int, n: int, purpose: str) -> None:
    if seqlen < 1 or n < 1:
        raise DataError(f"{purpose} windows need seqlen >= 1 and n >= 1, got seqlen={seqlen}, n={n}")
    fit = n_tokens // seqlen
    if fit < n:
        raise DataError(f"text has {n_tokens} tokens: only {fit} {purpose} windows of {seqlen} tokens fit, "
                        f"{n} requested; use a longer text, n <= {fit}, or a shorter seqlen")
