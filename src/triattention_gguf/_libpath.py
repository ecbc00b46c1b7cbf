"""Make llama-cpp-python load the patched libllama built with this package, in any import order.

llama-cpp-python's ctypes loader (module llama_cpp.llama_cpp) reads LLAMA_CPP_LIB_PATH once,
when it is imported. triattention_gguf.pth, installed beside the package, calls install() at
interpreter start: an import hook that sets the variable to our library folder only while that
module loads, so nothing leaks into the environment of child processes. A LLAMA_CPP_LIB_PATH
that the user set is left alone; importing triattention_gguf then refuses a library without
TriAttention, saying so. Nothing here imports more than the standard library.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

LIB_ENV = "TRIATTENTION_LIB_PATH"
LIB_NAME = "libllama.so"
BINDINGS = "llama_cpp.llama_cpp"


def lib_dirs() -> list[Path]:
    """The folders where our libllama may be: $TRIATTENTION_LIB_PATH, else lib/ inside the package
    (an editable install spreads the package over the source tree and the build output)."""
    override = os.environ.get(LIB_ENV)
    if override:
        return [Path(override)]
    spec = importlib.util.find_spec("triattention_gguf")
    return [Path(base) / "lib" for base in (spec.submodule_search_locations or [])] if spec else []


def lib_dir() -> Path | None:
    """The folder holding our libllama, None when it was not built."""
    return next((d for d in lib_dirs() if (d / LIB_NAME).exists()), None)


class _OurLibrary(importlib.abc.MetaPathFinder):
    """Finds llama_cpp.llama_cpp as usual, and loads it with LLAMA_CPP_LIB_PATH set to our library."""

    def find_spec(self, name, path, target=None):
        if name != BINDINGS or "LLAMA_CPP_LIB_PATH" in os.environ:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        found = lib_dir()
        if spec is None or spec.loader is None or found is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            os.environ["LLAMA_CPP_LIB_PATH"] = str(found)
            try:
                load(module)
            finally:
                os.environ.pop("LLAMA_CPP_LIB_PATH", None)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Put the hook first on sys.meta_path (once)."""
    if not any(isinstance(finder, _OurLibrary) for finder in sys.meta_path):
        sys.meta_path.insert(0, _OurLibrary())
