"""Bit packing of unsigned integer codes, row by row.

Each row is a little-endian bit stream: code ``j`` of a row occupies bits
``[j*bits, (j+1)*bits)`` of that row's bytes, so for 4 bits the low nibble holds the
even column, for 2 bits column ``4k`` sits in bits 0-1 of byte ``k``, and for 3 bits
eight codes fill three bytes. A row takes exactly ``ceil(cols * bits / 8)`` bytes; the
unused high bits of its last byte are zero.

    bits  codes/chunk  bytes/chunk
      2        4            1
      3        8            3
      4        2            1
      8        1            1
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _chunk(bits: int) -> tuple[int, int]:
    """(codes, bytes) of the smallest whole-byte chunk for ``bits``-wide codes."""
    lcm = math.lcm(8, bits)
    return lcm // bits, lcm // 8


def packed_row_bytes(cols: int, bits: int) -> int:
    return -(-cols * bits // 8)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes (rows, cols), each < 2**bits  ->  uint8 (rows, ceil(cols*bits/8))."""
    rows, cols = codes.shape
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    per, nbytes = _chunk(bits)
    n_chunks = -(-cols // per)
    dev = codes.device
    c = torch.zeros(rows, n_chunks * per, dtype=torch.int32, device=dev)
    c[:, :cols] = codes.to(torch.int32)
    c = c.view(rows, n_chunks, per)                                   # (rows, chunks, per)
    shifts = torch.arange(per, dtype=torch.int32, device=dev) * bits
    word = (c << shifts).sum(-1, dtype=torch.int32)                   # (rows, chunks) <= 24 bits
    byte_shifts = torch.arange(nbytes, dtype=torch.int32, device=dev) * 8
    out = ((word[..., None] >> byte_shifts) & 0xFF).to(torch.uint8)  # (rows, chunks, nbytes)
    return out.view(rows, n_chunks * nbytes)[:, : packed_row_bytes(cols, bits)].contiguous()


def unpack_codes(packed: Tensor, bits: int, cols: int) -> Tensor:
    """uint8 (rows, ceil(cols*bits/8))  ->  uint8 codes (rows, cols)."""
    rows, nb = packed.shape
    if bits == 8:
        return packed[:, :cols]
    if 8 % bits == 0:                                                 # 2, 4: whole codes per byte
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (rows, bytes, per)
        return codes.view(rows, -1)[:, :cols]
    per, nbytes = _chunk(bits)
    n_chunks = -(-nb // nbytes)
    b = torch.zeros(rows, n_chunks * nbytes, dtype=torch.int32, device=packed.device)
    b[:, :nb] = packed
    b = b.view(rows, n_chunks, nbytes)
    word = b[..., 0]
    for j in range(1, nbytes):
        word = word | (b[..., j] << (8 * j))                         # (rows, chunks)
    codes = (word.unsqueeze(-1) >> (torch.arange(per, dtype=torch.int32, device=packed.device) * bits)) & ((1 << bits) - 1)
    return codes.to(torch.uint8).view(rows, -1)[:, :cols]
