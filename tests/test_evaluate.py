"""Evaluation: perplexity, KL/top-1 against a reference, decode speed, memory and result files."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lowbit.errors import DataError, LowbitError, ShapeError
from lowbit.evaluate import (
    SCHEMA_VERSION,
    EvalResult,
    QualityResult,
    SpeedResult,
    decode_speed,
    evaluate_quality,
    markdown_table,
    model_nbytes,
    peak_rss_bytes,
    peak_rss_of_load,
    ratio,
    results_from_json,
    results_to_json,
    speed,
    with_baseline,
    write_results,
)

VOCAB = 128


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def perturbed(model: nn.Module, std: float = 0.05, seed: int = 1) -> nn.Module:
    noisy = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return noisy


def windows(n: int = 3, T: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, T), generator=torch.Generator().manual_seed(seed))


class UniformLM(nn.Module):
    """Zero logits: every token has probability 1/vocab."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, use_cache=False):
        B, T = input_ids.shape
        return SimpleNamespace(logits=torch.zeros(B, T, self.vocab))


class CountingLM(nn.Module):
    """Wraps a model and counts its forward calls."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, **kwargs):
        self.calls += 1
        return self.inner(**kwargs)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer with exactly VOCAB ids, built in memory."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    chars = [chr(c) for c in range(32, 127)] + [chr(c) for c in range(192, 192 + VOCAB - 98)]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    assert len(vocab) == VOCAB
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


# --- quality -------------------------------------------------------------------------------


def test_perplexity_is_exp_of_manual_cross_entropy():
    model, w = tiny_llama(), windows(n=3, T=16)
    with torch.no_grad():
        logits = model(input_ids=w).logits  # (n, T, V)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), w[:, 1:].reshape(-1))
    res = evaluate_quality({"m": model}, w, batch_size=2, progress=False)["m"]
    assert res.perplexity == pytest.approx(math.exp(ce.item()), rel=1e-5)
    assert res.nll == pytest.approx(ce.item(), rel=1e-5)
    assert (res.n_windows, res.seqlen, res.n_tokens) == (3, 16, 3 * 15)
    assert res.kl_mean is None and res.kl_p99 is None and res.top1_agreement is None


def test_uniform_logits_give_perplexity_equal_to_vocab():
    res = evaluate_quality({"u": UniformLM(VOCAB)}, windows(), progress=False)["u"]
    assert res.perplexity == pytest.approx(VOCAB, rel=1e-6)


def test_batch_size_does_not_change_results():
    ref, model, w = tiny_llama(), perturbed(tiny_llama()), windows(n=5)
    a = evaluate_quality({"m": model}, w, reference=ref, batch_size=1, progress=False)["m"]
    b = evaluate_quality({"m": model}, w, reference=ref, batch_size=3, progress=False)["m"]
    assert a.perplexity == pytest.approx(b.perplexity, rel=1e-5)
    assert a.kl_mean == pytest.approx(b.kl_mean, rel=1e-4)
    assert a.top1_agreement == b.top1_agreement


def test_deepcopy_of_reference_has_zero_kl_and_full_agreement():
    ref = tiny_llama()
    res = evaluate_quality({"copy": copy.deepcopy(ref)}, windows(), reference=ref, progress=False)["copy"]
    assert res.kl_mean == pytest.approx(0.0, abs=1e-6)
    assert res.kl_p99 == pytest.approx(0.0, abs=1e-6)
    assert res.top1_agreement == 1.0


def test_perturbed_model_has_positive_kl_and_different_ppl():
    ref = tiny_llama()
    out = evaluate_quality({"ref": ref, "noisy": perturbed(ref, std=0.2)}, windows(), reference=ref,
                           progress=False)
    assert out["ref"].kl_mean == 0.0 and out["ref"].top1_agreement == 1.0
    assert out["noisy"].kl_mean > 1e-3
    assert out["noisy"].kl_p99 >= out["noisy"].kl_mean
    assert out["noisy"].top1_agreement < 1.0
    assert out["noisy"].perplexity != pytest.approx(out["ref"].perplexity, rel=1e-3)


def test_kl_and_top1_match_manual_computation_on_one_window():
    ref, model = tiny_llama(), perturbed(tiny_llama(), std=0.1)
    w = windows(n=1, T=24)
    with torch.no_grad():
        logp_ref = ref(input_ids=w).logits[0, :-1].float().log_softmax(-1)  # (T-1, V)
        logp = model(input_ids=w).logits[0, :-1].float().log_softmax(-1)
    # kl_div(input=log Q, target=log P) = sum P (log P - log Q) = KL(P_ref || P_model)
    kl = F.kl_div(logp, logp_ref, log_target=True, reduction="none").sum(-1).double()  # (T-1,)
    res = evaluate_quality({"m": model}, w, reference=ref, progress=False)["m"]
    assert res.kl_mean == pytest.approx(kl.mean().item(), rel=1e-4)
    assert res.kl_p99 == pytest.approx(torch.quantile(kl, 0.99).item(), rel=1e-4)
    agree = (logp.argmax(-1) == logp_ref.argmax(-1)).double().mean().item()
    assert res.top1_agreement == pytest.approx(agree)


def test_reference_forward_runs_once_per_batch_and_is_shared():
    ref = CountingLM(tiny_llama())
    models = {"ref": ref, "a": perturbed(ref.inner), "b": perturbed(ref.inner, seed=2), "c": UniformLM(VOCAB)}
    evaluate_quality(models, windows(n=5), reference=ref, batch_size=2, progress=False)
    assert ref.calls == 3  # ceil(5 / 2) batches, although "ref" is also one of the models


def test_restores_training_mode():
    model = tiny_llama().train()
    evaluate_quality({"m": model}, windows(n=1), progress=False)
    assert model.training and all(m.training for m in model.modules())


@pytest.mark.parametrize("bad, error", [
    (torch.zeros(4, dtype=torch.long), DataError),  # 1-D
    (torch.zeros(2, 1, dtype=torch.long), DataError),  # too short to predict anything
    (torch.zeros(2, 8), DataError),  # float ids
    (torch.full((1, 8), VOCAB), ShapeError),  # id beyond the vocabulary
])
def test_bad_windows_are_rejected(bad, error):
    with pytest.raises(error):
        evaluate_quality({"u": UniformLM(VOCAB)}, bad, progress=False)


def test_vocab_mismatch_with_reference_is_rejected():
    with pytest.raises(ShapeError, match="vocabulary"):
        evaluate_quality({"u": UniformLM(VOCAB + 1)}, windows(), reference=UniformLM(VOCAB), progress=False)


# --- speed ---------------------------------------------------------------------------------


def fake_timed(fn, device):
    """Stands in for speed._timed: generate 'takes' 1.0 s, a prefill forward 0.25 s; no clock read."""
    out = fn()
    return (1.0 if isinstance(out, torch.Tensor) else 0.25), out


def test_decode_speed_generates_exactly_new_tokens(monkeypatch):
    monkeypatch.setattr(speed, "_timed", fake_timed)
    model, tok = tiny_llama(), char_tokenizer()
    generated = []
    original = model.generate

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        generated.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    model.generate = spy
    res = decode_speed(model, tok, prompt="Hello there", new_tokens=5, repeats=2)
    assert generated == [5, 5, 5]  # warm-up + 2 timed runs, all exactly new_tokens
    assert isinstance(res, SpeedResult)
    assert (res.new_tokens, res.repeats, res.prompt_tokens) == (5, 2, len("Hello there"))
    assert (res.generate_s, res.prefill_s) == (1.0, 0.25)
    assert res.decode_tokens_per_s == pytest.approx(5 / (1.0 - 0.25))
    assert res.threads == torch.get_num_threads()
    assert isinstance(res.text, str)
    assert json.loads(json.dumps(res.to_dict())) == res.to_dict()


def test_decode_speed_counts_whole_generate_when_prefill_is_not_shorter(monkeypatch):
    monkeypatch.setattr(speed, "_timed", lambda fn, device: (0.5, fn()))
    res = decode_speed(tiny_llama(), char_tokenizer(), new_tokens=2, repeats=1)
    assert res.decode_tokens_per_s == pytest.approx(2 / 0.5)          # never faster than measured


def test_ratio():
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None and ratio(1.0, None) is None and ratio(1.0, 0.0) is None


# --- memory --------------------------------------------------------------------------------


def test_model_nbytes_counts_tied_weights_once():
    model = tiny_llama()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert model_nbytes(model) == params + buffers
    tied = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    tied[1].weight = tied[0].weight
    view = nn.Module()
    view.register_buffer("a", torch.zeros(6))
    view.register_buffer("b", view.a.view(2, 3))  # same storage, another tensor object
    assert model_nbytes(tied) == 10 * 4 * 4
    assert model_nbytes(view) == 6 * 4


def test_peak_rss_bytes_is_plausible():
    assert 10 * 2**20 < peak_rss_bytes() < 2**40


TINY_LOADER = """
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers, Regex
assert spec == "tiny"
tk = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "H": 2, "e": 3, "l": 4, "o": 5}, unk_token="<unk>"))
tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>")
model = LlamaForCausalLM(LlamaConfig(vocab_size=6, hidden_size=16, intermediate_size=32,
    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).eval()
"""


def test_peak_rss_of_load_measures_a_child_process():
    rss = peak_rss_of_load("tiny", new_tokens=3, loader_code=TINY_LOADER, timeout=120)
    assert 50 * 2**20 < rss < 2**40  # the child imported torch and transformers


def test_peak_rss_of_load_failure_reports_last_stderr_line():
    with pytest.raises(LowbitError, match="failed.*RuntimeError: no such model 'x'"):
        peak_rss_of_load("x", loader_code="raise RuntimeError(f'no such model {spec!r}')", timeout=60)


# --- results -------------------------------------------------------------------------------


def sample_results() -> list[EvalResult]:
    q = QualityResult(perplexity=10.0, nll=math.log(10.0), kl_mean=0.0, kl_p99=0.0, top1_agreement=1.0,
                      n_windows=4, seqlen=16, n_tokens=60)
    q4 = QualityResult(perplexity=10.5, nll=math.log(10.5), kl_mean=0.01234, kl_p99=0.1, top1_agreement=0.9512,
                       n_windows=4, seqlen=16, n_tokens=60)
    s = SpeedResult(decode_tokens_per_s=20.0, prefill_s=0.1, generate_s=3.3, new_tokens=64, prompt_tokens=12,
                    repeats=3, threads=2, text="hi")
    s4 = SpeedResult(decode_tokens_per_s=30.0, prefill_s=0.1, generate_s=2.2, new_tokens=64, prompt_tokens=12,
                     repeats=3, threads=2, text="ho")
    corpus = {"name": "wikitext2", "seqlen": 16, "n_windows": 4}
    return [
        EvalResult(name="fp32", model="smollm2-135m", quality=q, speed=s, total_bytes=540_000_000,
                   bits_per_weight=32.0, peak_rss_bytes=900_000_000, corpus=corpus),
        EvalResult(name="w4", model="/tmp/w4", quality=q4, speed=s4, bits_per_weight=4.25,
                   quantized_bytes=50_000_000, total_bytes=120_000_000, corpus=corpus),
        EvalResult(name="bare", model="/tmp/bare"),
    ]


def test_with_baseline_computes_speed_ratio():
    out = with_baseline(sample_results(), "fp32")
    assert [r.speed_ratio for r in out] == [1.0, 1.5, None]
    assert all(r.baseline == "fp32" for r in out)
    with pytest.raises(LowbitError, match="known: fp32, w4, bare"):
        with_baseline(sample_results(), "bf16")


def test_markdown_table_headers_values_and_missing():
    table = markdown_table(with_baseline(sample_results(), "fp32"))
    lines = table.strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["model", "bits/weight", "size MB", "PPL", "ΔPPL % vs baseline", "KL mean", "top-1 %",
                      "decode tok/s", "speed × baseline", "peak RSS MB"]
    assert len(lines) == 2 + 3
    w4 = [c.strip() for c in lines[3].strip("|").split("|")]
    assert w4 == ["w4", "4.25", "120.0", "10.50", "+5.00", "0.0123", "95.1", "30.0", "1.50", "–"]
    bare = [c.strip() for c in lines[4].strip("|").split("|")]
    assert bare[0] == "bare" and set(bare[1:]) == {"–"}


def test_json_round_trips_and_is_strict():
    results = with_baseline(sample_results(), "fp32")
    diverged = QualityResult(perplexity=math.inf, nll=math.inf, kl_mean=None, kl_p99=None, top1_agreement=None,
                             n_windows=1, seqlen=16, n_tokens=15)
    results.append(EvalResult(name="broken", model="x", quality=diverged))
    doc = results_to_json(results, meta={"command": "lowbit eval"})
    text = json.dumps(doc, allow_nan=False)
    doc2 = json.loads(text)
    assert doc2["schema_version"] == SCHEMA_VERSION == 1
    assert set(doc2["versions"]) >= {"torch", "transformers", "lowbit"}
    assert doc2["threads"] == torch.get_num_threads() and doc2["meta"] == {"command": "lowbit eval"}
    assert results_from_json(doc2) == results


def test_write_results_writes_both_files(tmp_path):
    results = with_baseline(sample_results(), "fp32")
    write_results(results, {"k": 1}, tmp_path / "out" / "eval.json", tmp_path / "out" / "eval.md")
    assert results_from_json(json.loads((tmp_path / "out" / "eval.json").read_text())) == results
    assert (tmp_path / "out" / "eval.md").read_text() == markdown_table(results)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["eval.json", "eval.md"]


class FixedLM(nn.Module):
    """Returns the same logits row (V,) at every position."""

    def __init__(self, row: torch.Tensor):
        super().__init__()
        self.row = row

    def forward(self, input_ids, use_cache=False):
        B, T = input_ids.shape
        return SimpleNamespace(logits=self.row.expand(B, T, -1).clone())


def test_kl_handles_zero_reference_probabilities():
    """A token with P_ref = 0 contributes 0 to the KL sum (not 0 * -inf = nan)."""
    ref = FixedLM(torch.tensor([math.log(2.0), 0.0, -math.inf, 0.0]))  # P_ref = (1/2, 1/4, 0, 1/4)
    model = FixedLM(torch.tensor([0.0, 0.0, -math.inf, math.log(2.0)]))  # Q = (1/4, 1/4, 0, 1/2)
    w = torch.tensor([[0, 1, 3, 0]])
    res = evaluate_quality({"m": model}, w, reference=ref, progress=False)["m"]
    expected = 1 / 2 * math.log(2.0) + 1 / 4 * math.log(1.0) + 1 / 4 * math.log(0.5)
    assert res.kl_mean == pytest.approx(expected, rel=1e-5)
    assert res.top1_agreement == 0.0  # argmax 0 vs 3
