"""User-facing errors. The CLI prints ``str(err)`` on one line and exits with status 2."""


class LowbitError(Exception):
    """A mistake the user can fix; the message says what was wrong and what to do."""


class RecipeError(LowbitError):
    """An invalid recipe: unknown key, unsupported bit width, bad pattern."""


class ShapeError(LowbitError):
    """A tensor whose shape does not fit the format or layer it is meant for."""


class ModelSourceError(LowbitError):
    """A model path, GGUF file or built-in name that cannot be resolved or loaded."""


class UnsupportedArchitectureError(LowbitError):
    """A model family lowbit has no adapter for."""


class CheckpointError(LowbitError):
    """A checkpoint that is missing, corrupt, truncated, or would be overwritten."""


class DataError(LowbitError):
    """A corpus or text file that cannot be fetched, read or tokenized into enough windows."""


class WeightValueError(LowbitError):
    """A weight holding NaN or Inf."""
