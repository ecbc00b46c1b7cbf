"""TriAttention KV-cache compression for llama.cpp and GGUF models.

Importing this package loads the patched libllama built with it into
llama-cpp-python, so import it before `llama_cpp`.
"""
from triattention_gguf._lib import api_version
from llama_cpp import Llama

__version__ = "0.1.0"
__all__ = ["Llama", "api_version", "__version__"]
