"""The build: our patched library is the one llama-cpp-python runs, and the fetch step is strict."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import triattention_gguf
from triattention_gguf import _lib

ROOT = Path(__file__).resolve().parent.parent
FETCH = ROOT / "scripts" / "fetch_llama.py"
sys.path.insert(0, str(ROOT / "scripts"))
import fetch_llama  # noqa: E402


def _loaded_libllama() -> Path:
    for line in Path("/proc/self/maps").read_text().splitlines():
        if "/libllama.so" in line:
            return Path(line.split()[-1])
    raise AssertionError("no libllama mapped into this process")


def test_llama_cpp_runs_our_library():
    import llama_cpp.llama_cpp as bindings

    assert bindings._lib is _lib.lib
    assert triattention_gguf.api_version() == 7
    assert _loaded_libllama().resolve().parent == _lib.lib_dir().resolve()


def _run_fetch(*args):
    return subprocess.run([sys.executable, str(FETCH), *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def sdist():
    return fetch_llama.download_sdist(fetch_llama.cache_dir() / "sdist")


def test_fetch_refuses_tampered_sdist(sdist, tmp_path):
    tampered = tmp_path / sdist.name
    shutil.copy(sdist, tampered)
    with open(tampered, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    dest = tmp_path / "llama.cpp"
    result = _run_fetch("--sdist", str(tampered), "--dest", str(dest))
    assert result.returncode == 1
    assert "sha256 mismatch" in result.stderr and "tampered" in result.stderr
    assert not dest.exists()


def test_fetch_stops_on_a_patch_that_does_not_apply(sdist, tmp_path):
    patches = tmp_path / "patches"
    patches.mkdir()
    for patch in fetch_llama.patch_files(ROOT / "patches"):
        shutil.copy(patch, patches)
    (patches / "9999-broken.patch").write_text(
        "--- a/include/llama.h\n+++ b/include/llama.h\n@@ -1,3 +1,3 @@\n-this line is not there\n+nor this\n context\n")
    dest = tmp_path / "llama.cpp"
    dest.mkdir()
    (dest / "keep").write_text("old tree")
    result = _run_fetch("--sdist", str(sdist), "--dest", str(dest), "--patches", str(patches))
    assert result.returncode == 1
    assert "patch 9999-broken.patch does not apply" in result.stderr
    assert (dest / "keep").read_text() == "old tree"  # the previous tree is left as it was


def test_fetch_is_a_no_op_when_current():
    first = _run_fetch()
    assert first.returncode == 0, first.stderr
    second = _run_fetch()
    assert second.returncode == 0 and "up to date" in second.stdout


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="the CUDA toolkit (nvcc) is not installed")
def test_cuda_sources_compile():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "cuda_compile_check.py")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "triattn-score.cu: compiled" in result.stdout
