"""Evaluation: perplexity, KL and top-1 against a reference, decode speed, memory, results."""

from lowbit.evaluate.memory import model_nbytes, peak_rss_bytes, peak_rss_of_load
from lowbit.evaluate.quality import QualityResult, evaluate_quality
from lowbit.evaluate.result import (
    SCHEMA_VERSION,
    EvalResult,
    markdown_table,
    results_from_json,
    results_to_json,
    with_baseline,
    write_results,
)
from lowbit.evaluate.speed import DEFAULT_PROMPT, SpeedResult, decode_speed, ratio

__all__ = [
    "DEFAULT_PROMPT",
    "SCHEMA_VERSION",
    "EvalResult",
    "QualityResult",
    "SpeedResult",
    "decode_speed",
    "evaluate_quality",
    "markdown_table",
    "model_nbytes",
    "peak_rss_bytes",
    "peak_rss_of_load",
    "ratio",
    "results_from_json",
    "results_to_json",
    "with_baseline",
    "write_results",
]


class _CallableModule(__import__("types").ModuleType):
    """``lowbit.evaluate`` is both this package and the public function ``lowbit.evaluate(...)``."""

    def __call__(self, *args, **kwargs):
        from lowbit.evaluate.run import evaluate_specs

        return evaluate_specs(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallableModule
