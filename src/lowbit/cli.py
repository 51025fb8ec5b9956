"""The ``lowbit`` command line: fetch, quantize, eval, info. Parses and calls the public API only."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

import click

from lowbit.errors import CheckpointError, LowbitError

echo = click.echo


@click.group(help="Compress causal LMs into packed low-bit weights and measure what it costs.\n\n"
                  "Example: lowbit quantize smollm2-135m --recipe w4g128 -o out/smollm2-w4g128")
@click.version_option(package_name="lowbit")
def app() -> None:
    pass


@app.command(epilog="Example: lowbit fetch smollm2-135m")
@click.argument("names", nargs=-1)
def fetch(names: tuple[str, ...]) -> None:
    """Fetch built-in models and corpora (NAMES; default: the default model) into the local cache.

    The cache is $LOWBIT_CACHE, else ~/.cache/lowbit. A model name also fetches every
    built-in corpus (wiki, owt, essays). A second fetch is a no-op.
    """
    from lowbit.data import BUILTIN_CORPORA, fetch_corpus
    from lowbit.models import BUILTIN_MODELS, DEFAULT_MODEL, fetch_model

    names = list(names) or [DEFAULT_MODEL]
    unknown = [n for n in names if n not in BUILTIN_MODELS and n not in BUILTIN_CORPORA]
    if unknown:
        raise LowbitError(f"unknown name(s) {', '.join(unknown)}; models: {', '.join(BUILTIN_MODELS)}; "
                          f"corpora: {', '.join(BUILTIN_CORPORA)}")
    corpora = [n for n in names if n in BUILTIN_CORPORA]
    for name in names:
        if name in BUILTIN_MODELS:
            echo(f"{name}: {fetch_model(name)}")
            corpora = list(BUILTIN_CORPORA)
    for name in dict.fromkeys(corpora):
        echo(f"{name}: {fetch_corpus(name)}")


@app.command(epilog="Example: lowbit quantize smollm2-135m --recipe w3g128 -o out/smollm2-w3g128")
@click.argument("source")
@click.option("--recipe", "-r", default="w4g128", show_default=True,
              help="Preset (w8, w4g128, w4g64, w3g128, w2g64; gptq-, awq-, ar- with w4g128, w3g128, w2g64; "
                   "ar-...-fast; best-w4, best-w3, best-w2: see the README's Recipes) or a YAML/JSON recipe file")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="Checkpoint directory to write")
@click.option("--head", help="Override the recipe's head: int8 (head and token embeddings as 8-bit codes, one "
                             "fp16 scale per row; a tied pair stored once) or none (full precision)")
@click.option("--force", is_flag=True, help="Replace an existing output directory")
@click.option("--offload-dir", type=click.Path(path_type=Path),
              help="Record each finished block here: rerunning the same command resumes after the last one, "
                   "and a safetensors model is read block by block (memory: about one block)")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar per block")
def quantize(source: str, recipe: str, output: Path, head: str | None, force: bool, offload_dir: Path | None,
             progress: bool) -> None:
    """Quantize SOURCE (a built-in name, a Hugging Face model directory or a .gguf file) into a packed
    checkpoint, written under a temporary name and renamed when complete."""
    import lowbit

    rec = lowbit.Recipe.resolve(recipe)                      # fail on a bad recipe before loading anything
    if head is not None:
        rec = dataclasses.replace(rec, head=head)            # validated like the recipe's own key
    if output.exists() and not force:
        raise CheckpointError(f"{output} already exists; choose another output or pass --force to overwrite it")
    q = lowbit.quantize(source, rec, progress=progress, offload_dir=offload_dir)
    path = q.save(output, force=force)
    r = q.report
    head_note = "" if r.head is None else (f"; head {r.head.mode} {r.head.bits_per_weight:.3f} bits/weight, "
                                           f"{r.head.nbytes / 2**20:.1f} MiB" + (" (tied)" if r.head.tied else ""))
    echo(f"wrote {path}: {len(r.layers)} layers, {r.bits_per_weight:.3f} bits/weight, "
         f"{r.nbytes / 2**20:.1f} MiB quantized weights{head_note}, {r.total_seconds:.1f} s"
         + (f" ({r.earlier_seconds:.1f} s of it in an earlier, interrupted run)" if r.earlier_seconds else ""))


@app.command("eval", epilog="Example: lowbit eval out/smollm2-w4g128 --reference smollm2-135m --corpus wiki")
@click.argument("models", nargs=-1, required=True)
@click.option("--reference", help="Full-precision model: KL divergence, top-1 agreement and the speed baseline")
@click.option("--corpus", default="wiki", show_default=True, help="Built-in corpus (wiki, owt, essays) or a text file")
@click.option("--seqlen", default=512, show_default=True, type=click.IntRange(min=2), help="Tokens per window")
@click.option("--windows", default=64, show_default=True, type=click.IntRange(min=1), help="Non-overlapping windows")
@click.option("--speed/--no-speed", default=True, help="Measure greedy decode tokens/s")
@click.option("--memory/--no-memory", default=True, help="Measure peak RSS of a process that loads and generates")
@click.option("--new-tokens", default=64, show_default=True, type=click.IntRange(min=1),
              help="Tokens generated for the speed measurement")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the results as JSON here")
@click.option("--md", "md_out", type=click.Path(path_type=Path), help="Write the Markdown table here")
def eval_(models, reference, corpus, seqlen, windows, speed, memory, new_tokens, json_out, md_out) -> None:
    """Evaluate MODELS (checkpoints or sources): perplexity, KL divergence and top-1 agreement to the
    reference, bits per weight, bytes, peak memory and decode speed as a ratio to the reference."""
    import lowbit

    results = lowbit.evaluate(list(models), reference=reference, corpus=corpus, seqlen=seqlen, windows=windows,
                              speed=speed, memory=memory, new_tokens=new_tokens, json_path=json_out, md_path=md_out)
    echo(results.table)


@app.command(epilog="Example: lowbit info out/smollm2-w4g128 --layers")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--layers", is_flag=True, help="List every quantized layer")
@click.option("--json", "as_json", is_flag=True, help="Print lowbit.json as is")
@click.option("--verify/--no-verify", default=True, help="Check the tensor files' sha256")
def info(path: Path, layers: bool, as_json: bool, verify: bool) -> None:
    """Describe the checkpoint at PATH: source, recipe, bits per weight, bytes, files."""
    from lowbit import checkpoint

    meta = checkpoint.read_meta(path)
    if verify:
        checkpoint.verify(path, meta)
    if as_json:
        echo(json.dumps(meta, indent=2))
        return
    s, rec, src = meta["summary"], meta["recipe"], meta["source"]
    disk = sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
    echo("\n".join([
        f"checkpoint      {path}" + ("  (checksums ok)" if verify else ""),
        f"source          {src.get('spec', '?')} ({src.get('kind', '?')}, sha256 {src.get('sha256', '?')[:16]}…)",
        f"model type      {meta['model_type']}",
        f"recipe          {rec['name']}: {rec['method']} {rec['bits']}-bit group {rec['group_size']} "
        f"{'symmetric' if rec['symmetric'] else 'asymmetric'}"
        f"{', integer zeros' if rec.get('int_zero') else ''}",
        f"quantized       {s['quantized_layers']} layers, {s['quantized_weights']:,} weights, "
        f"{s['quantized_bytes']:,} bytes",
        f"bits/weight     {s['bits_per_weight']:.4f}  (codes + scales + zeros, all included)",
        *([_head_line(meta["head"], s)] if meta.get("head") else []),
        f"whole model     {s['total_tensor_bytes']:,} tensor bytes; {disk:,} bytes on disk",
        "versions        " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"created         {meta['created']}",
    ]))
    if layers:
        echo(f"\n{'layer':<48} {'shape':>12} {'bits':>4} {'group':>5} {'bytes':>10} {'bits/w':>7}")
        for name, r in meta["layers"].items():
            f = r["format"]
            f = {**f.get("base", f), "shape": f["shape"]}                 # outlier formats wrap a base
            echo(f"{name:<48} {'x'.join(map(str, f['shape'])):>12} {f['bits']:>4} {f['group_size']:>5} "
                 f"{r['nbytes']:>10,} {r['bits_per_weight']:>7.3f}")


def _head_line(head: dict, summary: dict) -> str:
    tied = " (tied embeddings read its codes)" if head["tied"] else ""
    return (f"head            {head['mode']}: {', '.join(head['layers'])}{tied}, {summary['head_bytes']:,} bytes, "
            f"{summary['head_bits']:.4f} bits/weight")


def main(argv: list[str] | None = None) -> int:
    """Entry point; the console script exits with its return value.

    A LowbitError or a usage error prints one line (what is wrong, what to do) and gives status 2.
    """
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    for noisy in ("transformers", "httpx", "huggingface_hub", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()              # "Loading weights" bars for sub-second loads
    except ImportError:
        pass
    try:
        app.main(args=argv, prog_name="lowbit", standalone_mode=False)
    except LowbitError as e:
        echo(f"lowbit: error: {e}", err=True)
        return 2
    except click.exceptions.NoArgsIsHelpError as e:
        echo(e.format_message(), err=True)
        return 2
    except click.UsageError as e:
        echo(f"lowbit: error: {e.format_message()} (see --help)", err=True)
        return 2
    except click.ClickException as e:
        echo(f"lowbit: error: {e.format_message()}", err=True)
        return 2
    except (click.Abort, KeyboardInterrupt):
        echo("lowbit: interrupted", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
