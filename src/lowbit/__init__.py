"""lowbit: compress trained causal LMs into packed low-bit weights and measure what it costs."""

__version__ = "0.1.0"
