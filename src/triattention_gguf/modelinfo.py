"""What TriAttention needs to know about a GGUF model, read the way llama.cpp reads it.

The file's header is checked and read first (gguf_check: clear errors on bad files), then
loaded by our libllama (vocab only, no weights) so that rope type, head sizes
and layer counts come from llama.cpp's own code path, not from a table here.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from triattention_gguf._lib import lib, llama_cpp_bindings as ll
from triattention_gguf.gguf_check import GGUFError, Header, check_gguf

ROPE_TYPES = {ll.LLAMA_ROPE_TYPE_NORM: "norm", ll.LLAMA_ROPE_TYPE_NEOX: "neox"}
_FINGERPRINT_SAMPLE = 1 << 16


class ModelFileError(ValueError):
    """The model file cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class ModelFacts:
    path: str
    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int
    rope_type: str
    n_ctx_train: int
    fingerprint: str
    n_swa: int = 0  # tokens in a sliding-window layer's window (Gemma 3, ...), 0 without such layers

    @property
    def n_pairs(self) -> int:
        return self.head_dim // 2


@functools.lru_cache(maxsize=4)  # a header holds its tokenizer: tens of MB for a large vocabulary
def _checked(path: str, identity: tuple[int, int, int, int]) -> Header:
    return check_gguf(path)


def open_gguf(path: str | os.PathLike) -> Header:
    """The checked header of a GGUF file (metadata and tensor layout), every way the file can be
    unusable turned into a ModelFileError. Cached while the file (device, inode, size, mtime)
    stays the same."""
    path = Path(path)
    try:
        exists = path.exists()
    except OSError as err:
        raise ModelFileError(f"{path}: cannot access it ({err.strerror})") from err
    if not exists:
        raise ModelFileError(f"{path}: no such file")
    if not path.is_file():
        raise ModelFileError(f"{path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise ModelFileError(f"{path}: not readable (check its permissions)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelFileError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    st = path.stat()
    identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    try:
        return _checked(str(path), identity)  # bounded by the file's size: before anything else reads it
    except GGUFError as err:
        raise ModelFileError(str(err)) from None


def fingerprint(header: Header) -> str:
    """Identify the weights, not the metadata: every tensor's name, shape and type, plus
    the first bytes of the first attention projection (differs across finetunes and quants)."""
    digest = hashlib.sha256()
    tensors = list(header.tensors.values())
    for t in tensors:
        # shapes spelt as numpy 2 prints gguf-py's uint64 dims, which fingerprints stored so far used
        shape = ", ".join(f"np.uint64({n})" for n in t.shape)
        digest.update(f"{t.name}:[{shape}]:{gguf.GGMLQuantizationType(t.type).name};".encode())
    sample = next((t for t in tensors if t.name.endswith("attn_q.weight")), tensors[0])
    with open(header.path, "rb") as f:
        f.seek(sample.offset)
        digest.update(f.read(min(sample.nbytes, _FINGERPRINT_SAMPLE)))
    return digest.hexdigest()[:32]


@contextlib.contextmanager
def loaded_model(path: str | os.PathLike, n_gpu_layers: int = 0):
    """A llama_model* loaded by our libllama, freed on exit (the file checked first: llama.cpp's
    loader trusts the header)."""
    open_gguf(path)
    params = ll.llama_model_default_params()
    params.n_gpu_layers = n_gpu_layers
    model = ll.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ModelFileError(f"{path}: llama.cpp could not load this model "
                             "(unsupported architecture or damaged file; run with verbose output for details)")
    try:
        yield model
    finally:
        ll.llama_model_free(model)


@contextlib.contextmanager
def model_context(model, n_ctx: int, n_threads: int | None = None, n_ubatch: int = 512, **overrides):
    """A llama_context* on a loaded model; overrides set llama_context_params fields."""
    cparams = ll.llama_context_default_params()
    cparams.n_ctx = cparams.n_batch = n_ctx
    cparams.n_ubatch = min(n_ubatch, n_ctx)
    cparams.n_threads = cparams.n_threads_batch = n_threads or max(1, os.cpu_count() or 1)
    cparams.no_perf = True
    for key, value in overrides.items():
        setattr(cparams, key, value)
    ctx = ll.llama_init_from_model(model, cparams)
    if not ctx:
        raise ModelFileError(f"llama.cpp could not create a context of {n_ctx} tokens")
    try:
        yield ctx
    finally:
        ll.llama_free(ctx)


def tokenize(model, text: str, special: bool = False) -> list[int]:
    """Tokens of text for a loaded llama_model* (no BOS added), special tokens as plain text unless
    `special` (a chat template's output, which writes the special tokens it needs)."""
    data = text.encode("utf-8")
    n_max = len(data) + 16
    buf = (ll.llama_token * n_max)()
    n = ll.llama_tokenize(ll.llama_model_get_vocab(model), data, len(data), buf, n_max, False, special)
    if n < 0:
        raise ModelFileError(f"tokenization failed ({n})")
    return list(buf[:n])


def detokenize(model, tokens: list[int]) -> str:
    """Text of tokens for a loaded llama_model* (special tokens as text, bad UTF-8 replaced)."""
    vocab = ll.llama_model_get_vocab(model)
    out, piece = bytearray(), ctypes.create_string_buffer(256)
    for token in tokens:
        n = ll.llama_token_to_piece(vocab, token, piece, len(piece), 0, True)
        out += piece.raw[:max(0, n)]
    return out.decode("utf-8", errors="replace")


def facts_of(path: str | os.PathLike, header: Header, model) -> ModelFacts:
    """Facts of an open file and its loaded llama_model*."""
    arch = header.metadata[gguf.Keys.General.ARCHITECTURE]  # checked: present, a string
    rope = ll.llama_model_rope_type(model)
    n_head = ll.llama_model_n_head(model)
    if n_head <= 0 or rope not in ROPE_TYPES:
        why = "no attention heads" if n_head <= 0 else f"rope type {rope} (TriAttention needs NORM or NEOX RoPE)"
        raise ModelFileError(f"{path}: architecture '{arch}' has {why}; "
                             "TriAttention cannot compress its KV cache")
    return ModelFacts(
        path=str(path), arch=arch,
        n_layer=ll.llama_model_n_layer(model), n_head=n_head, n_head_kv=ll.llama_model_n_head_kv(model),
        head_dim=lib.triattention_model_head_dim(model), n_rot=lib.triattention_model_n_rot(model),
        rope_type=ROPE_TYPES[rope], n_ctx_train=ll.llama_model_n_ctx_train(model),
        fingerprint=fingerprint(header), n_swa=max(0, ll.llama_model_n_swa(model)))


@contextlib.contextmanager
def model_with_facts(path: str | os.PathLike, n_gpu_layers: int = 0):
    """A loaded llama_model* and the facts of its file (checked: RoPE, heads), freed on exit."""
    header = open_gguf(path)
    with loaded_model(path, n_gpu_layers) as model:
        yield model, facts_of(path, header, model)


def read_facts(path: str | os.PathLike) -> ModelFacts:
    # Weights are memory-mapped, not read: loading costs little, and llama.cpp
    # fills the hyperparameters only on a full load.
    with model_with_facts(path) as (_, facts):
        return facts


def rope_omega(ctx, n_layer: int, head_dim: int) -> np.ndarray:
    """[n_layer, head_dim/2] angular frequencies that the context's RoPE applies."""
    out = np.zeros((n_layer, head_dim // 2), dtype=np.float32)
    for il in range(n_layer):
        if lib.triattention_rope_omega(ctx, il, out[il].ctypes.data_as(ctypes.POINTER(ctypes.c_float))) != 0:
            raise ModelFileError(f"no RoPE frequencies for layer {il}")
    return out
