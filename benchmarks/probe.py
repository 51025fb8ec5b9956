"""Probe one recipe: quantize SmolLM2 with a recipe dict and score it exactly as benchmarks/peers.py scores a row
(same 32 wiki windows, same KL/top-1 against fp32). A development tool for choosing presets.
usage: python benchmarks/probe.py NAME 'JSON recipe dict'     (appends to benchmarks/.work/probe.jsonl; skips names already there)
example: python benchmarks/probe.py w3-scaling '{"method":"rtn","bits":3,"group_size":128,"int_zero":true,"learned":{"iters":50,"scaling":true}}'"""
import json, sys, time, logging
from pathlib import Path
import _syspath  # noqa: F401 - first: puts this folder last on sys.path (see benchmarks/_syspath.py)
import torch
import lowbit
from lowbit.recipe import Recipe
from lowbit.evaluate.quality import evaluate_quality
from peers_lib.common import Context, Settings

out = Path(__file__).resolve().parent / ".work" / "probe.jsonl"
out.parent.mkdir(exist_ok=True)
name, spec = sys.argv[1], json.loads(sys.argv[2])
if out.exists() and any(json.loads(l)["name"] == name for l in out.read_text().splitlines()):
    print("done before:", name); sys.exit(0)
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
ctx = Context(Settings())
recipe = Recipe.from_dict(spec, name=name)
t0 = time.time()
q = lowbit.quantize(ctx.load(), recipe, progress=True)
qs = time.time() - t0
with torch.no_grad():
    res = evaluate_quality({name: q.model}, windows=ctx.eval_windows(), reference=ctx.load().model, progress=False)[name].to_dict()
rec = {"name": name, "recipe": spec, "bits": q.report.bits_per_weight, "quantize_s": qs,
       "ppl": res["perplexity"], "kl": res["kl_mean"], "top1": res["top1_agreement"]}
print(rec)
with out.open("a") as f:
    f.write(json.dumps(rec) + "\n")
