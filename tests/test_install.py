"""Installation: llama_cpp loads our patched library in any import order, and the README's
one pip command installs a working package into a fresh virtual environment."""
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# prints the folder of the libllama that llama_cpp loaded and whether it has TriAttention
REPORT = ("import llama_cpp.llama_cpp as b; print(b._base_path.resolve(), hasattr(b._lib, 'triattention_api_version'))")
ORDERS = {
    "llama_cpp only": "import llama_cpp; " + REPORT,
    "llama_cpp first": "import llama_cpp; import triattention_gguf; triattention_gguf.Llama; " + REPORT,
    "triattention_gguf first": "import triattention_gguf; from triattention_gguf import Llama; import llama_cpp; "
                               + REPORT,
    "from llama_cpp import Llama": "from llama_cpp import Llama; from triattention_gguf import Llama as T; "
                                   "assert issubclass(T, Llama); " + REPORT,
}


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("LLAMA_CPP_LIB_PATH", "TRIATTENTION_LIB_PATH")}


def _run(python: str, code: str, cwd=None) -> str:
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, env=_clean_env(), cwd=cwd,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1]


def _installed_lib(python: str, cwd=None) -> Path:
    code = "from triattention_gguf import _lib; print(_lib.lib_dir().resolve())"
    return Path(_run(python, code, cwd))


@pytest.mark.parametrize("order", ORDERS)
def test_any_import_order_loads_our_library(order, tmp_path):
    expected = _installed_lib(sys.executable)
    assert _run(sys.executable, ORDERS[order], cwd=tmp_path) == f"{expected} True"


def test_the_hook_leaves_no_environment_behind(tmp_path):
    code = "import os, llama_cpp; print(os.environ.get('LLAMA_CPP_LIB_PATH'))"
    assert _run(sys.executable, code, cwd=tmp_path) == "None"  # child processes are not pointed anywhere


def test_a_library_chosen_by_the_user_is_refused_clearly(tmp_path):
    code = "import triattention_gguf; triattention_gguf.Llama"
    env = {**_clean_env(), "LLAMA_CPP_LIB_PATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0 and "'llama' not found" in result.stderr  # llama_cpp's own loader, loudly


def readme_pip_command() -> str:
    """The pip command under "Install with pip" in the README."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^    (CMAKE_ARGS=\S+ pip install \S+)$", text, re.M)
    assert match, "the README has no pip install command"
    return match.group(1)


def test_pip_installs_into_a_fresh_venv(tmp_path):
    """The README's command in a new venv (the build folder and ccache make the native build a relink)."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    env = {**_clean_env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "VIRTUAL_ENV": str(env_dir)}
    result = subprocess.run(["bash", "-c", readme_pip_command()], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    python = str(bin_dir / "python")
    lib = _installed_lib(python, cwd=tmp_path)
    assert lib.is_relative_to(env_dir)  # the venv's own copy, not the source tree's
    for order, code in ORDERS.items():
        assert _run(python, code, cwd=tmp_path) == f"{lib} True", order
    cli = subprocess.run([str(bin_dir / "triattention-gguf"), "--help"], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=120)
    assert cli.returncode == 0 and "embed-centers" in cli.stdout
