"""Shared fixtures: tiny random models of every supported family, a tiny tokenizer, saved model dirs."""

from __future__ import annotations

import json
import os

# without a GPU, lowbit's Triton kernels (where Triton is installed) run on CPU tensors in Triton's interpreter
# (tests/test_kernels_triton.py); it must be on before anything imports Triton, which transformers may do
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch
import transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers

# loaded checkpoints decode eagerly in tests (compiling each model's decode step would take most of the
# suite's time); tests/test_decoding.py turns the compiled path on where it tests it
os.environ.setdefault("LOWBIT_COMPILE", "0")
# kernel choices stay in the test process, not in the user's cache (test_kernels.py tests the file)
os.environ.setdefault("LOWBIT_KERNEL_CHOICES", "off")
# decode tests compare with fp32 at fp32 tolerances: the int8-activation kernel (on by default on AVX2-only CPUs,
# lowbit.kernels.int8_activations) stays out of the automatic choice unless a test asks for it (test_kernels_q8.py)
os.environ.setdefault("LOWBIT_INT8_ACT", "0")

VOCAB = 256
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               bos_token_id=1, eos_token_id=2)

# model_type -> config; sizes are tiny but shaped like the real thing (GQA, MoE routing, Conv1D)
FAMILY_CONFIGS = {
    "llama": lambda: T.LlamaConfig(**_COMMON, tie_word_embeddings=True),
    "mistral": lambda: T.MistralConfig(**_COMMON, sliding_window=None),
    "qwen2": lambda: T.Qwen2Config(**_COMMON),
    "qwen3": lambda: T.Qwen3Config(**_COMMON, head_dim=16),
    "gemma": lambda: T.GemmaConfig(**_COMMON, head_dim=16),
    "gemma2": lambda: T.Gemma2Config(**_COMMON, head_dim=16),
    "gemma3_text": lambda: T.Gemma3TextConfig(**_COMMON, head_dim=16),
    "phi3": lambda: T.Phi3Config(**_COMMON, pad_token_id=0),
    "opt": lambda: T.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                               word_embed_proj_dim=64, max_position_embeddings=256, bos_token_id=1, eos_token_id=2),
    "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                 bos_token_id=1, eos_token_id=2),
    "mixtral": lambda: T.MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(**_COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                          shared_expert_intermediate_size=64, decoder_sparse_step=1),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(**_COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                          head_dim=16, decoder_sparse_step=1),
    "olmoe": lambda: T.OlmoeConfig(**_COMMON, num_experts=4, num_experts_per_tok=2),
}
FAMILIES = sorted(FAMILY_CONFIGS)


def tiny_model(family: str, seed: int = 0) -> T.PreTrainedModel:
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(FAMILY_CONFIGS[family]()).eval()


def tiny_tokenizer() -> T.PreTrainedTokenizerFast:
    """Word-level: 'w<i>' -> id i, with <unk>=0, <s>=1, </s>=2."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_text(n_words: int = 20000, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"w{i}" for i in torch.randint(3, VOCAB, (n_words,), generator=g).tolist())


def assert_save_reload_generate(model, report, ids, path) -> dict:
    """Save ``model``, reload it: logits bit-exact, it generates, and lowbit.json's bytes are what is stored.

    Returns the checkpoint's ``lowbit.json``.
    """
    from lowbit import checkpoint
    from lowbit.modules import footprint

    with torch.no_grad():
        out = model(ids).logits
    path = checkpoint.save(model, tiny_tokenizer(), path, report)
    loaded = checkpoint.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, out)                     # bit-exact round trip
    gen = loaded.generate(ids[:1, :4], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert gen.shape == (1, 9)
    meta = json.loads((path / "lowbit.json").read_text())
    assert meta["summary"]["quantized_bytes"] == footprint(loaded).quantized_bytes == report.nbytes
    assert meta["summary"]["bits_per_weight"] == pytest.approx(report.bits_per_weight)
    return meta


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def tiny_model_dir(tmp_path_factory):
    """Save a tiny model of ``family`` (with tokenizer) as a Hugging Face directory; returns its path."""

    def make(family: str = "llama"):
        path = tmp_path_factory.mktemp(f"hf-{family}")
        tiny_model(family).save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
        return path

    return make


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(tiny_text())
    return path
