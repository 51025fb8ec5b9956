"""How compressed weights are stored: layout, exact byte count, (de)serialization."""

from lowbit.formats.base import FORMATS, WeightFormat, format_class, format_from_tensors
from lowbit.formats.grouped import GroupedInt, dequantize_codes, expand_groups
from lowbit.formats.outliers import OutlierFormat  # outlier protection (sparse fp16 side matrix)
from lowbit.formats.packing import pack_codes, packed_row_bytes, unpack_codes
from lowbit.formats.spec import SUPPORTED_BITS, QuantSpec

__all__ = [
    "FORMATS", "WeightFormat", "format_class", "format_from_tensors", "GroupedInt", "dequantize_codes",
    "expand_groups", "pack_codes", "packed_row_bytes", "unpack_codes", "SUPPORTED_BITS", "QuantSpec",
    "OutlierFormat",
]
