#!/usr/bin/env python3
"""Compile our CUDA sources (cpp/*.cu) against the pinned ggml headers, without a GPU.

Machines without a GPU have nvcc but not cuBLAS, whose header ggml-cuda includes; the
headers are taken from the `nvidia-cublas` wheel matching nvcc (pip, registry only) and
cached. Exit status 0 when every file compiles.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMA = ROOT / "third_party" / "llama.cpp"
CUBLAS = {"13.0": "nvidia-cublas==13.0.2.14"}


def cache_dir() -> Path:
    return Path(os.environ.get("TRIATTENTION_CACHE", Path.home() / ".cache" / "triattention-gguf"))


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release (\d+\.\d+)", out)
    if not match:
        raise SystemExit(f"cannot read the CUDA version from `nvcc --version`:\n{out}")
    return match.group(1)


def cublas_include(version: str) -> Path:
    requirement = CUBLAS.get(version)
    if requirement is None:
        raise SystemExit(f"no cuBLAS header package pinned for CUDA {version}; add one to CUBLAS in {__file__}")
    include = cache_dir() / f"cublas-{version}" / "include"
    if (include / "cublas_v2.h").exists():
        return include
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, requirement],
                       check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        staging = Path(tmp) / "include"
        staging.mkdir()
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if "/include/" in name and not name.endswith("/"):
                    (staging / Path(name).name).write_bytes(zf.read(name))
        include.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), include)
    return include


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="sm_90", help="GPU architecture to compile for (default sm_90)")
    args = parser.parse_args(argv)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("nvcc not found: install the CUDA toolkit to compile the CUDA sources", file=sys.stderr)
        return 1
    include = cublas_include(nvcc_version(nvcc))
    sources = sorted((ROOT / "cpp").glob("*.cu"))
    with tempfile.TemporaryDirectory() as out:
        for source in sources:
            cmd = [nvcc, "-std=c++17", f"-arch={args.arch}", "-O2", "-c", str(source), "-o",
                   str(Path(out) / (source.stem + ".o")), "-I", str(LLAMA / "ggml" / "include"),
                   "-I", str(LLAMA / "ggml" / "src"), "-I", str(ROOT / "cpp"), "-I", str(include)]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                print(f"{source.name}: nvcc failed\n{result.stdout}{result.stderr}", file=sys.stderr)
                return 1
            print(f"{source.name}: compiled for {args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
