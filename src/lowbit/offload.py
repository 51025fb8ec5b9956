"""A run's working directory: finished blocks on disk, so a long run can resume and a big model
never has to sit in memory whole.

    offload/
      progress.json            fingerprint of the run (recipe, source, calibration) and, per finished
                               block, its layer records; rewritten atomically after each block
      block-0007.safetensors   block 7's tensors after quantization (full names)
      inputs-NNNN.pt           the calibration activations entering block NNNN + 1

``progress.json`` is written last, so a run killed at any moment resumes from the last block it
recorded; the saved activations make the resumed run bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.cache import atomic_file
from lowbit.errors import LowbitError

PROGRESS = "progress.json"


def fingerprint(**parts) -> str:
    """A stable hash of the JSON-able parts that decide a run's result."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Offload:
    dir: Path

    def __post_init__(self):
        self.dir = Path(self.dir)

    # -- progress ------------------------------------------------------------------------
    def progress(self) -> dict | None:
        f = self.dir / PROGRESS
        return json.loads(f.read_text()) if f.is_file() else None

    def resume_point(self, fp: str) -> int:
        """Number of blocks already finished by a run with fingerprint ``fp`` (0 for a new run)."""
        prog = self.progress()
        if prog is None:
            self.dir.mkdir(parents=True, exist_ok=True)   # created when a run starts, not on a bad source
            self._write_progress({"fingerprint": fp, "blocks": []})
            return 0
        if prog["fingerprint"] != fp:
            raise LowbitError(f"{self.dir} holds a run with another recipe, model or calibration; "
                              "use another --offload-dir or delete this one")
        return len(prog["blocks"])

    def records(self, i: int) -> dict:
        return self.progress()["blocks"][i]["layers"]

    def block_seconds(self, i: int) -> float:
        """Wall time the run that finished block ``i`` spent on it (0 where it was not recorded)."""
        return float(self.progress()["blocks"][i].get("seconds", 0.0))

    def _write_progress(self, prog: dict) -> None:
        with atomic_file(self.dir / PROGRESS) as tmp:
            tmp.write_text(json.dumps(prog, indent=1))

    # -- blocks ----------------------------------------------------------------------------
    def block_file(self, i: int) -> Path:
        return self.dir / f"block-{i:04d}.safetensors"

    def inputs_file(self, i: int) -> Path:
        """The calibration activations entering block ``i + 1`` (written when block ``i`` finishes)."""
        return self.dir / f"inputs-{i:04d}.pt"

    def save_block(self, i: int, prefix: str, block: nn.Module, layers: dict, inputs: list | None,
                   fp_inputs: list | None = None, seconds: float | None = None) -> None:
        """Record block ``i`` as finished: its tensors, the next block's inputs (the quantized model's and,
        for learned rounding, the full-precision model's), then the progress entry; then drop the
        previous block's inputs. Each file is complete before the progress entry names it, so a
        run killed at any point resumes from consistent files."""
        state = {f"{prefix}.{k}": v.detach().contiguous() for k, v in block.state_dict().items()}
        with atomic_file(self.block_file(i)) as tmp:
            save_file(state, tmp)
        if inputs is not None:
            with atomic_file(self.inputs_file(i)) as tmp:
                torch.save({"inputs": [_to_plain(x) for x in inputs],
                            "fp_inputs": None if fp_inputs is None else [_to_plain(x) for x in fp_inputs]}, tmp)
        prog = self.progress()
        if len(prog["blocks"]) != i:
            raise LowbitError(f"{self.dir}: progress records {len(prog['blocks'])} blocks, expected {i}; "
                              "two runs share this --offload-dir?")
        entry = {"name": prefix, "file": self.block_file(i).name, "layers": layers}
        if seconds is not None:
            entry["seconds"] = round(seconds, 3)           # wall time of this block (a resumed run adds them up)
        prog["blocks"].append(entry)
        self._write_progress(prog)
        if i > 0:
            self.inputs_file(i - 1).unlink(missing_ok=True)

    def load_block(self, i: int, block: nn.Module, prefix: str) -> None:
        """Fill ``block`` (already holding the right quantized modules) with its saved tensors."""
        state = load_file(self.block_file(i))
        n = len(prefix) + 1
        block.load_state_dict({k[n:]: v for k, v in state.items()}, strict=True, assign=True)

    def load_inputs(self, start: int) -> tuple[list[dict], list[dict] | None]:
        """The activations entering block ``start`` (quantized model's, full-precision model's or None)."""
        d = torch.load(self.inputs_file(start - 1), weights_only=True)
        return d["inputs"], d["fp_inputs"]

    def files(self) -> list[Path]:
        return [self.dir / b["file"] for b in self.progress()["blocks"]]


    def clear(self) -> None:
        """Delete what this run wrote (and the directory, if nothing else is in it)."""
        for f in [self.dir / PROGRESS, *self.dir.glob("inputs-[0-9][0-9][0-9][0-9].pt"),
                  *self.dir.glob("block-[0-9][0-9][0-9][0-9].safetensors")]:
            f.unlink(missing_ok=True)
        try:
            self.dir.rmdir()
        except OSError:
            pass


def _to_plain(inp) -> dict:
    return {"hidden": inp.hidden, "args": inp.args, "kwargs": inp.kwargs}
