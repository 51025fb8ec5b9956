"""Quantize a model larger than comfortable memory: a randomly initialised ~1.5 B-parameter llama.

The model is written once as fp32 safetensors shards (one per block, ~6.5 GB) under
benchmarks/.work/llama-1.5b-random, then quantized with ``lowbit quantize --offload-dir`` in a
fresh process whose own peak RSS (VmHWM) is reported. The whole fp32 model would need 6.5 GB of
memory by itself; the offloaded run holds one block (~240 MB fp32) at a time.

    python benchmarks/offload_demo.py                     # RTN w4g128
    python benchmarks/offload_demo.py --recipe gptq-w4g128 --windows 8
"""

from __future__ import annotations

import _syspath  # noqa: F401 - first: puts this folder last on sys.path (see benchmarks/_syspath.py)
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
CONFIG = dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
              num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)


def write_random_llama(path: Path, seed: int = 0) -> None:
    """Shard by shard, so that creating it never holds more than one block in memory."""
    import torch
    import transformers
    from safetensors.torch import save_file

    if (path / "model.safetensors.index.json").exists():
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = transformers.LlamaConfig(**CONFIG)
    cfg.save_pretrained(tmp)
    g = torch.Generator().manual_seed(seed)
    h, f, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    rnd = lambda *shape: torch.randn(*shape, generator=g) * 0.02  # noqa: E731
    weight_map, n_params = {}, 0

    def shard(name: str, tensors: dict) -> None:
        nonlocal n_params
        save_file(tensors, tmp / name)
        weight_map.update({k: name for k in tensors})
        n_params += sum(t.numel() for t in tensors.values())

    shard("embed.safetensors", {"model.embed_tokens.weight": rnd(cfg.vocab_size, h)})
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shard(f"block-{i:02d}.safetensors", {
            p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(kv, h),
            p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, h),
            p + "mlp.gate_proj.weight": rnd(f, h), p + "mlp.up_proj.weight": rnd(f, h),
            p + "mlp.down_proj.weight": rnd(h, f),
            p + "input_layernorm.weight": torch.ones(h), p + "post_attention_layernorm.weight": torch.ones(h),
        })
    shard("head.safetensors", {"model.norm.weight": torch.ones(h), "lm_head.weight": rnd(cfg.vocab_size, h)})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 4 * n_params},
                                                                  "weight_map": weight_map}))
    # the built-in model's tokenizer (same vocabulary size), so calibration windows can be built
    from lowbit.models import fetch_model
    transformers.AutoTokenizer.from_pretrained(fetch_model("smollm2-135m")).save_pretrained(tmp)
    tmp.rename(path)
    print(f"wrote {path}: {n_params / 1e9:.2f} B parameters")


def count_params(model: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in model.glob("*.safetensors"):
        with safe_open(f, framework="pt") as h:
            total += sum(_prod(h.get_slice(k).get_shape()) for k in h.keys())
    return total


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


CHILD = """
import sys
from lowbit.cli import main
code = main(sys.argv[1:])
with open("/proc/self/status") as f:
    hwm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
print("PEAK_RSS_BYTES", hwm)
sys.exit(code)
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="w4g128", help="preset name")
    ap.add_argument("--windows", type=int, help="calibration windows (x 512 tokens) for methods that need them")
    ap.add_argument("--work", type=Path, default=HERE / ".work")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "offload_demo.json")
    args = ap.parse_args(argv)
    model = args.work / "llama-1.5b-random"
    write_random_llama(model)
    recipe = args.recipe
    if args.windows:                                   # a preset with fewer calibration windows
        import lowbit

        d = lowbit.Recipe.preset(args.recipe).to_dict()
        d["calibration"]["windows"] = args.windows
        recipe = str(args.work / f"{args.recipe}-{args.windows}w.json")
        Path(recipe).write_text(json.dumps(d))
    tag = Path(recipe).stem
    ckpt, off = args.work / f"llama-1.5b-{tag}", args.work / f"offload-{tag}"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, "quantize", str(model), "-r", recipe, "-o", str(ckpt),
                           "--offload-dir", str(off), "--force", "--no-progress"], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        print(proc.stderr[-3000:])
        return proc.returncode
    peak = int(next(l.split()[1] for l in proc.stdout.splitlines() if l.startswith("PEAK_RSS_BYTES")))
    meta = json.loads((ckpt / "lowbit.json").read_text())
    result = {"model": "random llama", "parameters": count_params(model), "fp32_bytes_on_disk": sum(
        p.stat().st_size for p in model.glob("*.safetensors")), "recipe": args.recipe, "peak_rss_bytes": peak,
        "seconds": round(seconds, 1), "bits_per_weight": meta["summary"]["bits_per_weight"],
        "checkpoint_bytes": sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())}
    result["recipe"], result["calibration"] = tag, meta["calibration"]          # None for data-free methods
    done = json.loads(args.out.read_text()) if args.out.exists() else {}
    done[tag] = result                                 # one entry per recipe run
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(done, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
