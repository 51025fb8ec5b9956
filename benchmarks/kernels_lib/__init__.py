"""Parts of ``benchmarks/kernels.py``: kernel micro-benchmarks, end-to-end decode, llama.cpp, the report."""
