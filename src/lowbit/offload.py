"""A run's working directory: finished blocks on disk, so a long run can resume and a big model
never has to sit in memory whole.

    offload/
      progress.json            fingerprint of the run (recipe, source, calibration) and, per finished
                               block, its layer records; rewritten atomically after each block
      block-0007.safetensors   block 7's tensors after quantization (full names)
      inputs.pt                the calibration activations entering the next block

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

    def _write_progress(self, prog: dict) -> None:
        with atomic_file(self.dir / PROGRESS) as tmp:
            tmp.write_text(json.dumps(prog, indent=1))

    # -- blocks ----------------------------------------------------------------------------
    def block_file(self, i: int) -> Path:
        return self.dir / f"block-{i:04d}.safetensors"

    def save_block(self, i: int, prefix: str, block: nn.Module, layers: dict, inputs: list | None) -> None:
        """Record block ``i`` as finished: its tensors, the next block's inputs, then the progress entry."""
        state = {f"{prefix}.{k}": v.detach().contiguous() for k, v in block.state_dict().items()}
        with atomic_file(self.block_file(i)) as tmp:
            save_file(state, tmp)
        if inputs is not None:
            with atomic_file(self.dir / "inputs.pt") as tmp:
                torch.save([_to_plain(x) for x in inputs], tmp)
        prog = self.progress()
        if len(prog["blocks"]) != i:
            raise LowbitError(f"{self.dir}: progress records {len(prog['blocks'])} blocks, expected {i}; "
                              "two runs share this --offload-dir?")
        prog["blocks"].append({"name": prefix, "file": self.block_file(i).name, "layers": layers})
        self._write_progress(prog)

    def load_block(self, i: int, block: nn.Module, prefix: str) -> None:
        """Fill ``block`` (already holding the right quantized modules) with its saved tensors."""
        state = load_file(self.block_file(i))
        n = len(prefix) + 1
        block.load_state_dict({k[n:]: v for k, v in state.items()}, strict=True, assign=True)

    def load_inputs(self) -> list[dict]:
        return torch.load(self.dir / "inputs.pt", weights_only=True)

    def files(self) -> list[Path]:
        return [self.dir / b["file"] for b in self.progress()["blocks"]]


    def clear(self) -> None:
        """Delete what this run wrote (and the directory, if nothing else is in it)."""
        for f in [self.dir / PROGRESS, self.dir / "inputs.pt", *self.dir.glob("block-[0-9][0-9][0-9][0-9].safetensors")]:
            f.unlink(missing_ok=True)
        try:
            self.dir.rmdir()
        except OSError:
            pass


def _to_plain(inp) -> dict:
    return {"hidden": inp.hidden, "args": inp.args, "kwargs": inp.kwargs}
