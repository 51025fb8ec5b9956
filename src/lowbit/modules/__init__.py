"""``nn.Module``s that hold stored weight formats: drop-in replacements for linear layers."""

from lowbit.modules.quant_linear import Footprint, QuantExperts, QuantLinear, footprint, quant_modules

__all__ = ["Footprint", "QuantExperts", "QuantLinear", "footprint", "quant_modules"]
