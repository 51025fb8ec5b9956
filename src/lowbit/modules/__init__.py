"""``nn.Module``s that hold stored weight formats: drop-in replacements for linear layers and token embeddings."""

from lowbit.modules.embedding import QuantEmbedding
from lowbit.modules.quant_linear import (
    Footprint,
    QuantExperts,
    QuantLinear,
    footprint,
    quant_modules,
)

__all__ = ["Footprint", "QuantEmbedding", "QuantExperts", "QuantLinear", "footprint", "quant_modules"]
