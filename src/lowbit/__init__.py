"""lowbit: compress trained causal LMs into packed low-bit weights and measure what it costs.

Public API::

    q = lowbit.quantize("smollm2-135m", "w4g128")    # load + quantize in memory
    lowbit.save(q, "out/smollm2-w4g128")
    model = lowbit.load("out/smollm2-w4g128")          # an ordinary transformers model
    lowbit.evaluate(["out/smollm2-w4g128"], reference="smollm2-135m")
"""

__version__ = "0.1.0"

from lowbit import evaluate  # noqa: E402  (a callable package: lowbit.evaluate(...) runs evaluate_specs)
from lowbit.api import Quantized, load, load_model, quantize, save  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.recipe import Recipe  # noqa: E402


__all__ = ["Quantized", "Recipe", "LowbitError", "evaluate", "load", "load_model", "quantize", "save", "__version__"]
