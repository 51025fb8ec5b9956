"""Model sources and (later) architecture adapters."""

from lowbit.models.sources import (
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    BuiltinModel,
    LoadedModel,
    SourceInfo,
    fetch_model,
    load_model,
    resolve_source,
)

__all__ = ["BUILTIN_MODELS", "DEFAULT_MODEL", "BuiltinModel", "LoadedModel", "SourceInfo", "fetch_model", "load_model", "resolve_source"]
