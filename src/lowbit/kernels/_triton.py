"""Triton kernels for the grouped_int format on CUDA (``pip install 'lowbit[gpu]'``): ``torch.ops.lowbit.grouped_linear_gpu``.

They read the codes exactly as :class:`~lowbit.formats.GroupedInt` stores them (each row a little-endian bit
stream, see :mod:`lowbit.formats.packing`), so nothing is repacked for the GPU: code ``j`` of a row starts
at bit ``j * bits``; at 2, 4 and 8 bits it lies in one byte, at 3 bits it may straddle two, so the 3-bit
path loads the next byte too.  Scales are the stored fp16 ``(out, G)``; zero points the fp16 ``(out, G)`` of
:meth:`GroupedInt.zero_points` (symmetric formats: none, the fixed ``2**(bits-1)``).  Groups may be ragged
(SmolLM2's 576 columns at group 128) or per channel: the group of column ``k`` is ``k // group_width``.

Two kernels, both accumulating in fp32 and writing no dequantized weight to memory:

* ``_gemv`` (at most 8 rows of ``x``, decode): one program per ``BLOCK_N`` output rows, row of ``x`` and
  share of the input columns; it walks its columns ``BLOCK_K`` at a time, decoding codes into registers,
  and multiplies element-wise (the codes are read once per row of ``x``; later rows hit the cache).  Layers
  with few output rows split the columns into shares (about ``GEMV_PROGRAMS`` programs in all) whose
  partial sums are added afterwards in a fixed order, so results stay bit-identical run to run.
* ``_gemm`` (prefill): one program per ``BLOCK_M x BLOCK_N`` output tile; it decodes a ``BLOCK_N x BLOCK_K``
  tile of the weight into registers and multiplies with ``tl.dot`` in fp32 (``input_precision="ieee"``,
  no TF32 rounding, so the result stays within fp32 accumulation error of the reference kernel).

Block sizes and the split are fixed, not autotuned: no GPU has been lent to the sessions that wrote them, so they are
correct (checked against the reference with Triton's interpreter, ``TRITON_INTERPRET=1``, on CPU tensors:
``tests/test_kernels_triton.py``) but not yet tuned or timed on a device.  ``benchmarks/gpu_kernels.py``
measures them where CUDA is present.

The kernels run on CUDA tensors, or on CPU tensors when Triton's interpreter is on (``TRITON_INTERPRET=1``
set before Triton is imported; tests only).  Importing this module imports Triton (a large import): the
``triton`` kernel of :mod:`lowbit.kernels` imports it when it first prepares a layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

GEMV_MAX_ROWS = 8
GEMV_BLOCK = (16, 128)          # output rows x input columns per GEMV step (untuned: no GPU lent yet)
GEMV_PROGRAMS = 512             # split the columns until a GEMV has about this many programs (H100: 132 SMs)


@triton.jit
def _weight_tile(codes_ptr, scale_ptr, zero_ptr, rows, cols, n_mask, k_mask, row_bytes, n_groups, group_width,
                 BITS: tl.constexpr, HAS_ZERO: tl.constexpr):
    """fp32 (BLOCK_N, BLOCK_K) weight tile for output ``rows`` x input ``cols``, decoded from the packed codes."""
    mask = n_mask[:, None] & k_mask[None, :]
    bit = cols * BITS                                                  # (BLOCK_K,) first bit of each code
    byte = bit >> 3
    ptrs = codes_ptr + rows[:, None].to(tl.int64) * row_bytes + byte[None, :]
    word = tl.load(ptrs, mask=mask, other=0).to(tl.int32)
    if BITS == 3:                                                      # a 3-bit code may reach into the next byte
        nxt = mask & (byte[None, :] + 1 < row_bytes)
        word = word | (tl.load(ptrs + 1, mask=nxt, other=0).to(tl.int32) << 8)
    q = ((word >> (bit & 7)[None, :]) & ((1 << BITS) - 1)).to(tl.float32)
    g_off = rows[:, None].to(tl.int64) * n_groups + (cols // group_width)[None, :]
    scale = tl.load(scale_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
    if HAS_ZERO:
        w = (q - tl.load(zero_ptr + g_off, mask=mask, other=0.0).to(tl.float32)) * scale
    else:                                                              # symmetric: the fixed midpoint
        w = (q - (1 << (BITS - 1))) * scale
    return w


@triton.jit
def _gemv(x_ptr, codes_ptr, scale_ptr, zero_ptr, y_ptr, N, K, k_per_split, row_bytes, n_groups, group_width,
          stride_xm, M, BITS: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    split = tl.program_id(2)                                           # this program's share of the columns
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rows < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    k_begin = split * k_per_split
    for k0 in range(k_begin, k_begin + k_per_split, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        k_mask = cols < K
        x = tl.load(x_ptr + m * stride_xm + cols, mask=k_mask, other=0.0)
        w = _weight_tile(codes_ptr, scale_ptr, zero_ptr, rows, cols, n_mask, k_mask, row_bytes, n_groups,
                         group_width, BITS, HAS_ZERO)
        acc += w * x[None, :]
    tl.store(y_ptr + (split * M + m) * N + rows, tl.sum(acc, axis=1), mask=n_mask)


@triton.jit
def _gemm(x_ptr, codes_ptr, scale_ptr, zero_ptr, y_ptr, M, N, K, row_bytes, n_groups, group_width, stride_xm,
          BITS: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    xs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = xs < M
    n_mask = rows < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        k_mask = cols < K
        x = tl.load(x_ptr + xs[:, None].to(tl.int64) * stride_xm + cols[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = _weight_tile(codes_ptr, scale_ptr, zero_ptr, rows, cols, n_mask, k_mask, row_bytes, n_groups,
                         group_width, BITS, HAS_ZERO)
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    ptrs = y_ptr + xs[:, None].to(tl.int64) * N + rows[None, :]
    tl.store(ptrs, acc, mask=m_mask[:, None] & n_mask[None, :])


def grouped_linear(x: Tensor, codes: Tensor, scale: Tensor, zero: Tensor | None, bits: int, group_width: int,
                   in_features: int) -> Tensor:
    """``x @ W.T`` fp32 (m, out) for fp32 x (m, in) and a grouped_int weight (codes uint8 (out, row bytes), scale
    fp16 (out, G), zero fp16 (out, G) or None for symmetric), ``group_width`` columns per group (the last may be
    shorter)."""
    m, k = x.shape
    n = codes.shape[0]
    if k != in_features:
        raise ValueError(f"lowbit triton kernel: x has {k} columns, the weight {in_features}")
    x = x.contiguous()
    y = torch.empty((m, n), dtype=torch.float32, device=x.device)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.zero_()
    zero_arg = zero if zero is not None else scale                    # any pointer: HAS_ZERO=False never reads it
    common = dict(BITS=bits, HAS_ZERO=zero is not None)
    if m <= GEMV_MAX_ROWS:
        block_n, block_k = GEMV_BLOCK
        n_blocks, k_blocks = triton.cdiv(n, block_n), triton.cdiv(k, block_k)
        # few output rows (576 of them: 36 programs) would leave most of a GPU idle: split the columns too, each
        # share into its own partial sum, added in a fixed order afterwards (deterministic, no atomics)
        splits = max(1, min(k_blocks, GEMV_PROGRAMS // (n_blocks * m)))
        k_per_split = triton.cdiv(k_blocks, splits) * block_k
        splits = triton.cdiv(k, k_per_split)
        out = y if splits == 1 else torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
        _gemv[(n_blocks, m, splits)](x, codes, scale, zero_arg, out, n, k, k_per_split, codes.shape[1],
                                     scale.shape[1], group_width, x.stride(0), m, BLOCK_N=block_n, BLOCK_K=block_k,
                                     **common)
        if splits > 1:
            torch.sum(out, dim=0, out=y)
    else:
        block_m, block_n, block_k = 32, 64, 32
        _gemm[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
            x, codes, scale, zero_arg, y, m, n, k, codes.shape[1], scale.shape[1], group_width, x.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **common)
    return y


@torch.library.custom_op("lowbit::grouped_linear_gpu", mutates_args=())
def grouped_linear_op(x: Tensor, codes: Tensor, scale: Tensor, zero: Tensor | None, bits: int, group_width: int,
                      in_features: int) -> Tensor:
    """The op ``torch.compile`` sees: :func:`grouped_linear`."""
    return grouped_linear(x, codes, scale, zero, bits, group_width, in_features)


@grouped_linear_op.register_fake
def _(x, codes, scale, zero, bits, group_width, in_features):
    return x.new_empty((x.shape[0], codes.shape[0]))
