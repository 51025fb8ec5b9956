"""Stored weight formats against hand-built bytes: bit packing, GroupedInt layout, bytes, serialization."""

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.errors import CheckpointError, RecipeError, ShapeError
from lowbit.formats import (
    FORMATS,
    GroupedInt,
    QuantSpec,
    format_class,
    format_from_tensors,
    pack_codes,
    packed_row_bytes,
    unpack_codes,
)

BITS = (2, 3, 4, 8)


def u8(rows):
    return torch.tensor(rows, dtype=torch.uint8)


# --- packing: hand-built bytes ---------------------------------------------------------------


def test_pack_4bit_low_nibble_is_even_column():
    assert pack_codes(u8([[1, 2]]), 4).tolist() == [[0x21]]
    assert pack_codes(u8([[0xF, 0x0, 0x3, 0xA]]), 4).tolist() == [[0x0F, 0xA3]]


def test_pack_4bit_odd_column_count_leaves_high_nibble_zero():
    assert pack_codes(u8([[1, 2, 0xF]]), 4).tolist() == [[0x21, 0x0F]]


def test_pack_2bit_column_4k_in_bits_0_1():
    assert pack_codes(u8([[1, 2, 3, 0]]), 2).tolist() == [[0b00111001]]
    # column 4 starts the second byte; the 3 unused code slots of it stay zero
    assert pack_codes(u8([[3, 3, 3, 3, 2]]), 2).tolist() == [[0xFF, 0b10]]


def test_pack_3bit_eight_codes_fill_three_bytes():
    # little-endian bit stream, code j at bits [3j, 3j+3):
    #   sum_j j << 3j = 0 + 8 + 128 + 1536 + 16384 + 163840 + 1572864 + 14680064 = 0xFAC688
    word = sum(j << (3 * j) for j in range(8))
    assert word == 0xFAC688
    assert pack_codes(u8([list(range(8))]), 3).tolist() == [[0x88, 0xC6, 0xFA]]


def test_pack_3bit_short_row_has_zero_high_bits():
    # codes 7, 5, 3: bits 0-2 = 111, bits 3-5 = 101, bits 6-8 = 011 (bit 8 is the high bit of 3, i.e. 0)
    # byte0 = 0b11_101_111 = 0xEF, byte1 = 0x00: nothing above bit 8 is set
    assert packed_row_bytes(3, 3) == 2
    assert pack_codes(u8([[7, 5, 3]]), 3).tolist() == [[0xEF, 0x00]]
    # with code 7 last, bit 8 is set and nothing above it
    assert pack_codes(u8([[0, 0, 7]]), 3).tolist() == [[0b11000000, 0b00000001]]


def test_pack_3bit_second_chunk_follows_first():
    # 9 codes: the first 8 fill 3 bytes; code 8 sits in bits 0-2 of byte 3
    row = [0] * 8 + [5]
    assert pack_codes(u8([row]), 3).tolist() == [[0, 0, 0, 5]]


def test_pack_8bit_is_identity():
    codes = u8([[0, 1, 127, 128, 255], [9, 8, 7, 6, 5]])
    packed = pack_codes(codes, 8)
    assert packed.dtype == torch.uint8
    assert torch.equal(packed, codes)


def test_pack_rows_are_independent():
    # each row is its own bit stream: row 1 does not start where row 0 ended
    packed = pack_codes(u8([[1, 2, 3], [4, 5, 6]]), 3)
    # row 0: 1 | 2<<3 | 3<<6 = 0xD1, bit 8 = 0; row 1: 4 | 5<<3 | 6<<6 = 0x1AC -> 0xAC, 0x01
    assert packed.tolist() == [[0xD1, 0x00], [0xAC, 0x01]]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("cols", [1, 2, 3, 7, 8, 9, 13, 576])
def test_packed_row_bytes_formula(bits, cols):
    assert packed_row_bytes(cols, bits) == math.ceil(cols * bits / 8)
    packed = pack_codes(torch.zeros(2, cols, dtype=torch.uint8), bits)
    assert packed.shape == (2, math.ceil(cols * bits / 8))
    assert packed.dtype == torch.uint8


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (5, 576)])
def test_pack_unpack_round_trip(bits, shape):
    g = torch.Generator().manual_seed(bits * 1000 + shape[1])
    codes = torch.randint(0, 2**bits, shape, generator=g).to(torch.uint8)
    packed = pack_codes(codes, bits)
    back = unpack_codes(packed, bits, shape[1])
    assert back.dtype == torch.uint8
    assert torch.equal(back, codes)


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_pack_matches_bitwise_reference(bits):
    """The packed bytes equal a plain per-bit Python construction of the little-endian stream."""
    g = torch.Generator().manual_seed(7)
    codes = torch.randint(0, 2**bits, (3, 11), generator=g).to(torch.uint8)
    want = []
    for row in codes.tolist():
        stream = sum(c << (bits * j) for j, c in enumerate(row))
        want.append([(stream >> (8 * b)) & 0xFF for b in range(math.ceil(len(row) * bits / 8))])
    assert pack_codes(codes, bits).tolist() == want


# --- GroupedInt --------------------------------------------------------------------------------


def random_format(out_f, in_f, spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_groups = spec.n_groups(in_f)
    q = torch.randint(0, 2**spec.bits, (out_f, in_f), generator=g).to(torch.uint8)
    scale = (torch.rand(out_f, n_groups, generator=g) * 0.1 + 0.001).half()
    zero = None if spec.symmetric else (torch.rand(out_f, n_groups, generator=g) * spec.maxq).half()
    if spec.int_zero:
        zero = zero.round()
    return GroupedInt.pack(q, scale, zero, spec), q


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(("in_f", "group", "n_groups"), [(576, 128, 5), (512, 128, 4), (13, -1, 1), (576, -1, 1)])
def test_nbytes_exact(bits, symmetric, in_f, group, n_groups):
    out_f = 6
    spec = QuantSpec(bits, group, symmetric)
    assert spec.n_groups(in_f) == n_groups
    fmt, _ = random_format(out_f, in_f, spec)
    per_group_params = 1 if symmetric else 2                              # scale (+ zero)
    want = out_f * math.ceil(in_f * bits / 8) + 2 * per_group_params * out_f * n_groups
    assert fmt.nbytes() == want
    assert fmt.bits_per_weight() == pytest.approx(8 * want / (out_f * in_f))
    assert fmt.codes.shape == (out_f, math.ceil(in_f * bits / 8))
    assert fmt.scale.shape == (out_f, n_groups)


def test_nbytes_hand_numbers():
    # 3-bit, 576 columns, group 128, asymmetric, 2 rows: codes 2*216, scale+zero 2*2*5*2
    fmt, _ = random_format(2, 576, QuantSpec(3, 128, False))
    assert fmt.nbytes() == 2 * 216 + 2 * 2 * 5 * 2 == 472


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(("in_f", "group"), [(576, 128), (256, 64), (200, 64), (13, -1), (1, -1)])
def test_dequantize_hand_formula(bits, symmetric, in_f, group):
    spec = QuantSpec(bits, group, symmetric)
    fmt, q = random_format(5, in_f, spec, seed=bits)
    assert torch.equal(fmt.unpacked(), q)
    width = in_f if group == -1 else group
    zero = torch.full_like(fmt.scale, 2.0 ** (bits - 1)) if symmetric else fmt.zero
    want = torch.empty(5, in_f)
    for o in range(5):
        for i in range(in_f):
            gi = i // width
            want[o, i] = (float(q[o, i]) - float(zero[o, gi])) * float(fmt.scale[o, gi])
    got = fmt.dequantize()
    assert got.dtype == torch.float32 and got.shape == (5, in_f)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert fmt.dequantize(torch.float16).dtype == torch.float16


def test_ragged_last_group_uses_its_own_scale():
    # 576 columns at group 128: columns 512..575 belong to group 4 (64 wide)
    spec = QuantSpec(4, 128, False)
    q = torch.full((1, 576), 3, dtype=torch.uint8)
    scale = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]]).half()
    zero = torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0]]).half()
    w = GroupedInt.pack(q, scale, zero, spec).dequantize()[0]
    assert w[:128].unique().tolist() == [2.0]
    assert w[384:512].unique().tolist() == [8.0]
    assert w[512:].unique().tolist() == [5.0]                             # (3 - 2) * 5


def test_symmetric_has_no_zero_and_uses_midpoint():
    spec = QuantSpec(3, -1, True)
    q = u8([[0, 4, 7]])
    fmt = GroupedInt.pack(q, torch.tensor([[0.5]]).half(), None, spec)
    assert fmt.zero is None
    assert set(fmt.tensors()) == {"codes", "scale"}
    assert fmt.zero_points().tolist() == [[4.0]]
    assert fmt.zero_points(torch.tensor([0, 0])).tolist() == [[4.0], [4.0]]
    assert fmt.dequantize().tolist() == [[-2.0, 0.0, 1.5]]


def test_asymmetric_tensors_named():
    fmt, _ = random_format(3, 64, QuantSpec(4, 32, False))
    assert set(fmt.tensors()) == {"codes", "scale", "zero"}
    assert fmt.meta() == {"kind": "grouped_int", "shape": [3, 64], "bits": 4, "group_size": 32, "symmetric": False}
    assert FORMATS["grouped_int"] is GroupedInt


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(("out_f", "in_f", "group"), [(7, 13, -1), (4, 576, 128), (3, 200, 64)])
def test_safetensors_round_trip_bit_exact(tmp_path, bits, symmetric, out_f, in_f, group):
    fmt, _ = random_format(out_f, in_f, QuantSpec(bits, group, symmetric), seed=3)
    path = tmp_path / "w.safetensors"
    save_file(fmt.tensors(), str(path))
    loaded = load_file(str(path))
    back = format_from_tensors(fmt.meta(), loaded)
    assert isinstance(back, GroupedInt)
    assert back.shape == fmt.shape and back.spec == fmt.spec
    assert set(back.tensors()) == set(fmt.tensors())
    for name, t in fmt.tensors().items():
        assert back.tensors()[name].dtype == t.dtype
        assert torch.equal(back.tensors()[name], t)
    assert torch.equal(back.dequantize(), fmt.dequantize())
    assert back.nbytes() == fmt.nbytes()


def test_bad_tensors_raise_shape_error():
    spec = QuantSpec(4, 32, False)
    fmt, _ = random_format(3, 64, spec)
    t = fmt.tensors()
    with pytest.raises(ShapeError, match="codes"):
        GroupedInt(t["codes"][:, :-1], t["scale"], t["zero"], spec, 64)      # too few bytes
    with pytest.raises(ShapeError, match="codes"):
        GroupedInt(t["codes"].to(torch.int8), t["scale"], t["zero"], spec, 64)
    with pytest.raises(ShapeError, match="scale"):
        GroupedInt(t["codes"], t["scale"].float(), t["zero"], spec, 64)
    with pytest.raises(ShapeError, match="scale"):
        GroupedInt(t["codes"], t["scale"][:, :1], t["zero"], spec, 64)
    with pytest.raises(ShapeError, match="zero"):
        GroupedInt(t["codes"], t["scale"], None, spec, 64)                  # asymmetric needs zero
    with pytest.raises(ShapeError, match="zero"):
        GroupedInt(t["codes"], t["scale"], t["zero"][:2], spec, 64)
    with pytest.raises(ShapeError):
        GroupedInt(t["codes"], t["scale"], t["zero"], QuantSpec(4, 32, True), 64)  # symmetric stores none
    with pytest.raises(ShapeError):
        format_from_tensors({**fmt.meta(), "shape": [4, 64]}, t)           # rows disagree with metadata


def test_unknown_kind_is_checkpoint_error():
    with pytest.raises(CheckpointError, match="nope"):
        format_from_tensors({"kind": "nope", "shape": [1, 8]}, {})
    with pytest.raises(CheckpointError, match="grouped_int"):                # lists the known kinds
        format_class({"shape": [1, 8]})


def test_bad_grouped_metadata_is_checkpoint_error():
    with pytest.raises(CheckpointError):
        GroupedInt.empty({"kind": "grouped_int", "shape": [2, 8]})          # no bits/group_size/symmetric


@pytest.mark.parametrize("bits", [0, 1, 5, 6, 7, 16])
def test_unsupported_bits_is_recipe_error(bits):
    with pytest.raises(RecipeError, match=f"bits={bits}"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("group", [0, 4, -2, 7])
def test_bad_group_size_is_recipe_error(group):
    with pytest.raises(RecipeError, match="group_size"):
        QuantSpec(group_size=group)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(("in_f", "group", "n_groups"), [(576, 128, 5), (64, -1, 1)])
def test_empty_has_right_shapes(bits, symmetric, in_f, group, n_groups):
    meta = {"kind": "grouped_int", "shape": [9, in_f], "bits": bits, "group_size": group, "symmetric": symmetric}
    fmt = format_class(meta).empty(meta)
    assert isinstance(fmt, GroupedInt)
    assert fmt.shape == (9, in_f)
    assert fmt.codes.shape == (9, math.ceil(in_f * bits / 8)) and fmt.codes.dtype == torch.uint8
    assert fmt.scale.shape == (9, n_groups) and fmt.scale.dtype == torch.float16
    if symmetric:
        assert fmt.zero is None
    else:
        assert fmt.zero.shape == (9, n_groups) and fmt.zero.dtype == torch.float16
    assert fmt.meta() == meta
    # an empty format is a valid target for from_tensors with the same meta
    assert format_from_tensors(meta, fmt.tensors()).shape == (9, in_f)


def test_missing_tensor_is_lowbit_error():
    from lowbit.errors import LowbitError

    meta = {"kind": "grouped_int", "shape": [2, 8], "bits": 4, "group_size": -1, "symmetric": False}
    with pytest.raises(LowbitError):
        format_from_tensors(meta, {"scale": torch.zeros(2, 1, dtype=torch.float16)})


# --- integer zero points (int_zero) ------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(("in_f", "group", "n_groups"), [(576, 128, 5), (512, 64, 8), (13, -1, 1)])
def test_int_zero_nbytes_and_layout(bits, in_f, group, n_groups):
    out_f = 6
    fmt, _ = random_format(out_f, in_f, QuantSpec(bits, group, False, True))
    zero_row = math.ceil(n_groups * bits / 8)                              # zeros packed like codes
    assert fmt.zero.dtype == torch.uint8 and fmt.zero.shape == (out_f, zero_row)
    assert fmt.nbytes() == out_f * math.ceil(in_f * bits / 8) + 2 * out_f * n_groups + out_f * zero_row


def test_int_zero_hand_numbers():
    # 3-bit, 576 columns, group 128, 2 rows: codes 2*216, fp16 scales 2*5*2, five 3-bit zeros in 2 bytes a row
    fmt, _ = random_format(2, 576, QuantSpec(3, 128, False, True))
    assert fmt.nbytes() == 2 * 216 + 2 * 5 * 2 + 2 * 2 == 456
    q = torch.full((1, 576), 5, dtype=torch.uint8)
    zero = torch.tensor([[0.0, 1.0, 2.0, 3.0, 7.0]])
    fmt = GroupedInt.pack(q, torch.ones(1, 5).half(), zero, QuantSpec(3, 128, False, True))
    assert fmt.zero.tolist() == [[0 | 1 << 3 | 2 << 6, (2 >> 2) | 3 << 1 | 7 << 4]]     # little-endian bit stream
    assert fmt.zero_points().dtype == torch.float16 and fmt.zero_points().tolist() == zero.tolist()
    w = fmt.dequantize()[0]
    assert w[:128].unique().tolist() == [5.0] and w[512:].unique().tolist() == [-2.0]


@pytest.mark.parametrize("bits", BITS)
def test_int_zero_round_trip_and_meta(tmp_path, bits):
    fmt, q = random_format(4, 200, QuantSpec(bits, 64, False, True), seed=5)
    assert fmt.meta()["int_zero"] is True
    path = tmp_path / "w.safetensors"
    save_file(fmt.tensors(), str(path))
    back = format_from_tensors(fmt.meta(), load_file(str(path)))
    assert back.spec == fmt.spec and torch.equal(back.zero, fmt.zero)
    assert torch.equal(back.dequantize(), fmt.dequantize()) and torch.equal(back.unpacked(), q)
    assert torch.equal(fmt.rows(1, 3).dequantize(), fmt.dequantize()[1:3])
    pick = torch.tensor([3, 0, 3])                                         # the rows an embedding gathers
    assert torch.equal(fmt.zero_points(pick), fmt.zero_points()[pick])
    empty = GroupedInt.empty(fmt.meta())
    assert {n: (t.shape, t.dtype) for n, t in empty.tensors().items()} == \
        {n: (t.shape, t.dtype) for n, t in fmt.tensors().items()}


def test_fp16_zero_meta_has_no_int_zero_key():
    """Checkpoints written before int_zero existed read back unchanged, and new fp16-zero ones look the same."""
    fmt, _ = random_format(3, 64, QuantSpec(4, 32, False))
    assert "int_zero" not in fmt.meta()
    assert format_from_tensors(fmt.meta(), fmt.tensors()).spec.int_zero is False


def test_int_zero_bad_values_and_specs():
    spec = QuantSpec(2, -1, False, True)
    q = u8([[0, 1, 2, 3]])
    with pytest.raises(ShapeError, match="integers"):
        GroupedInt.pack(q, torch.ones(1, 1).half(), torch.tensor([[1.5]]).half(), spec)
    with pytest.raises(ShapeError, match="integers"):
        GroupedInt.pack(q, torch.ones(1, 1).half(), torch.tensor([[4.0]]).half(), spec)      # beyond maxq
    with pytest.raises(ShapeError):                                                       # fp16 zeros where packed are due
        GroupedInt(pack_codes(q, 2), torch.ones(1, 1).half(), torch.ones(1, 1).half(), spec, 4)
    with pytest.raises(RecipeError, match="asymmetric"):
        QuantSpec(4, 128, True, True)
    with pytest.raises(RecipeError):
        QuantSpec(4, 128, False, 1)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("int_zero", [False, True])
def test_formats_compute_on_the_device_of_their_tensors(bits, int_zero):
    """Packing, unpacking and dequantizing allocate on the tensors' own device (a model moved to a GPU keeps
    working on the reference path): checked on the meta device, where a CPU allocation would fail to mix."""
    spec = QuantSpec(bits, 128, False, int_zero)
    q = torch.randint(0, 2**bits, (16, 576), dtype=torch.uint8)
    zero = torch.randint(0, 2**bits, (16, 5)).half()
    fmt = GroupedInt.pack(q, torch.rand(16, 5).half(), zero, spec)
    meta = GroupedInt(*(t.to("meta") if isinstance(t, torch.Tensor) else t
                        for t in (fmt.codes, fmt.scale, fmt.zero, fmt.spec, fmt.in_features)))
    for t in (meta.unpacked(), meta.zero_points(), meta.dequantize(), pack_codes(q.to("meta"), bits)):
        assert t.device.type == "meta"
    assert meta.dequantize().shape == (16, 576)
