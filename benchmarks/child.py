"""Running one benchmark row in a child process (shared by peers.py and kernels.py).

A row runs in its own process so that a library's crash, leak or thread settings cannot touch the
next row; the parent waits, kills the child on timeout or Ctrl-C, and, when the child wrote no
result, explains why from its exit status and the last line of its log.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def spawn_row(cmd: list[str], log: Path, cwd: Path, timeout: float | None) -> int | str:
    """Run ``cmd`` with stdout and stderr to ``log``; its exit status, or ``"timeout"``."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(cwd))
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return "timeout"
        except BaseException:                                   # Ctrl-C / SIGTERM: take the row down too
            proc.kill()
            proc.wait()
            raise


def why_no_result(rc: int | str, log: Path, timeout: float | None) -> str:
    """One line: how the child ended and the last line it logged."""
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    last = lines[-1].strip()[:300] if lines else ""
    if rc == "timeout":
        why = f"timed out after {timeout:.0f}s"
    elif isinstance(rc, int) and rc < 0:
        why = f"killed by signal {-rc}" + (" (out of memory?)" if rc == -9 else "")
    else:
        why = f"exit status {rc}"
    return f"{why}; last log line: {last}"
