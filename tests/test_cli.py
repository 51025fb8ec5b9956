"""The command line: the happy path on a tiny model, and every bad input gives one line and status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from lowbit.cli import main


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(capsys, args, match):
    code, out, err = run(capsys, *args)
    assert code == 2, (out, err)
    lines = [l for l in err.splitlines() if l.startswith("lowbit: error:")]
    assert len(lines) == 1 and match in lines[0], err
    assert "Traceback" not in err


@pytest.fixture
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture
def checkpoint_dir(capsys, model_dir, tmp_path):
    out = tmp_path / "ck"
    code, stdout, err = run(capsys, "quantize", str(model_dir), "-r", "w4g64", "-o", str(out), "--no-progress")
    assert code == 0, err
    assert "bits/weight" in stdout
    return out


def test_quantize_info_eval(capsys, checkpoint_dir, model_dir, corpus_file, tmp_path):
    code, out, _ = run(capsys, "info", str(checkpoint_dir), "--layers")
    assert code == 0 and "bits/weight" in out and "model.layers.1.mlp.down_proj" in out
    code, out, _ = run(capsys, "info", str(checkpoint_dir), "--json")
    assert json.loads(out)["summary"]["quantized_layers"] == 14
    js = tmp_path / "r.json"
    code, out, err = run(capsys, "eval", str(checkpoint_dir), "--reference", str(model_dir), "--corpus", str(corpus_file),
                         "--seqlen", "32", "--windows", "4", "--new-tokens", "4", "--no-memory", "--json", str(js))
    assert code == 0, err
    assert "| model |" in out and "ck" in out
    doc = json.loads(js.read_text())
    rows = {r["name"]: r for r in doc["results"]}
    assert rows["ck"]["quality"]["kl_mean"] > 0 and rows[model_dir.name]["quality"]["kl_mean"] == 0
    summary = json.loads((checkpoint_dir / "lowbit.json").read_text())["summary"]
    assert rows["ck"]["bits_per_weight"] == pytest.approx(summary["bits_per_weight"])
    # 4-bit codes + fp16 scale and zero per group of 64 (96-wide rows: a ragged group of 32 too)
    w = {64: 4 + 32 / 64, 96: 4 + 64 / 96}
    meta_layers = json.loads((checkpoint_dir / "lowbit.json").read_text())["layers"].values()
    expect = sum(w[l["format"]["shape"][1]] * l["weights"] for l in meta_layers) / sum(l["weights"] for l in meta_layers)
    assert summary["bits_per_weight"] == pytest.approx(expect)


def test_help_has_examples(capsys):
    for cmd in ("fetch", "quantize", "eval", "info"):
        code, out, _ = run(capsys, cmd, "--help")
        assert code == 0 and "Example: lowbit" in out


def test_missing_path(capsys, tmp_path):
    assert_user_error(capsys, ["quantize", str(tmp_path / "nope"), "-o", str(tmp_path / "o")], "does not exist")


def test_text_file_renamed_gguf(capsys, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text("this is not a model\n")
    assert_user_error(capsys, ["quantize", str(fake), "-o", str(tmp_path / "o")], "not a GGUF file")
    assert not (tmp_path / "o").exists()


def test_unknown_recipe_key_and_bits(capsys, model_dir, tmp_path):
    assert_user_error(capsys, ["quantize", str(model_dir), "-r", "w5", "-o", str(tmp_path / "o")], "unknown recipe")
    bad = tmp_path / "bad.yaml"
    bad.write_text("bits: 4\ngroup_sise: 64\n")
    assert_user_error(capsys, ["quantize", str(model_dir), "-r", str(bad), "-o", str(tmp_path / "o")], "group_sise")
    bad.write_text("bits: 5\n")
    assert_user_error(capsys, ["quantize", str(model_dir), "-r", str(bad), "-o", str(tmp_path / "o")], "bits=5")
    assert not (tmp_path / "o").exists()


def test_existing_output(capsys, model_dir, checkpoint_dir):
    assert_user_error(capsys, ["quantize", str(model_dir), "-o", str(checkpoint_dir)], "--force")
    code, _, err = run(capsys, "quantize", str(model_dir), "-r", "w8", "-o", str(checkpoint_dir), "--force", "--no-progress")
    assert code == 0, err


def test_corrupt_and_truncated_checkpoint(capsys, checkpoint_dir):
    f = checkpoint_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    assert_user_error(capsys, ["info", str(checkpoint_dir)], "truncated")
    assert_user_error(capsys, ["eval", str(checkpoint_dir), "--no-speed", "--no-memory"], "truncated")
    f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert_user_error(capsys, ["info", str(checkpoint_dir)], "sha256")


def test_nan_weight(capsys, tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 5] = float("inf")
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    assert_user_error(capsys, ["quantize", str(tmp_path / "m"), "-o", str(tmp_path / "o")], "NaN or Inf")
    assert not (tmp_path / "o").exists()


def test_unknown_command_and_fetch_name(capsys):
    assert_user_error(capsys, ["frobnicate"], "No such command")
    assert_user_error(capsys, ["fetch", "gpt-17"], "unknown name")


def test_console_script_exit_status(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lowbit.cli", "info", str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"lowbit: error: {tmp_path / 'missing'} does not exist"]
