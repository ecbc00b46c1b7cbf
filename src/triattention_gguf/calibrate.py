"""Calibration: run the real model over plain text and average its pre-RoPE queries.

The statistics are accumulated inside our libllama by an eval callback on the
graph (see cpp/triattention-calib.cpp), so any GGUF that llama.cpp runs,
quantized included, is calibrated through exactly the computation that
inference uses.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from triattention_gguf._lib import lib, llama_cpp_bindings as ll
from triattention_gguf.centers import Centers
from triattention_gguf.modelinfo import ModelFacts, model_context, model_with_facts, tokenize

DEFAULT_TOKENS = 32768
MIN_TOKENS = 256
DEFAULT_CHUNK = 2048
_f32p = ctypes.POINTER(ctypes.c_float)


class CalibrationError(ValueError):
    pass


def default_text() -> str:
    """Python's own documentation (~100k tokens): on every machine, offline."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def read_texts(paths: Iterable[str | os.PathLike]) -> str:
    parts = []
    for path in paths:
        try:
            parts.append(Path(path).read_text(encoding="utf-8", errors="replace"))
        except OSError as err:
            raise CalibrationError(f"cannot read calibration text {path}: {err.strerror}") from err
    return "\n\n".join(parts)


@dataclass
class CalibrationRun:
    """A model and a context whose graph feeds a calibration accumulator."""

    facts: ModelFacts
    model: ctypes.c_void_p
    ctx: ctypes.c_void_p
    calib: ctypes.c_void_p
    n_ctx: int

    def tokenize(self, text: str) -> list[int]:
        return tokenize(self.model, text)

    def decode(self, tokens: list[int]) -> None:
        """Decode one chunk from position 0 (the cache is cleared first)."""
        ll.llama_memory_clear(ll.llama_get_memory(self.ctx), True)
        arr = (ll.llama_token * len(tokens))(*tokens)
        rc = ll.llama_decode(self.ctx, ll.llama_batch_get_one(arr, len(tokens)))
        error = lib.triattention_calib_error(self.calib).decode()
        if error:
            raise CalibrationError(f"{self.facts.path}: cannot find the pre-RoPE queries in this model's graph: {error}")
        if rc != 0:
            raise CalibrationError(f"llama_decode failed with code {rc}")

    def n_tokens(self) -> int:
        return lib.triattention_calib_n_tokens(self.calib)

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        f = self.facts
        shape = (f.n_layer, f.n_head, f.n_pairs)
        re, im, absm = (np.zeros(shape, dtype=np.float32) for _ in range(3))
        lib.triattention_calib_get(self.calib, *(a.ctypes.data_as(_f32p) for a in (re, im, absm)))
        return (re + 1j * im).astype(np.complex64), absm

    def last_queries(self, il: int, post_rope: bool) -> np.ndarray:
        """[tokens, n_head, head_dim] queries of layer il from the last ubatch (keep_last runs only)."""
        return last_queries(self.calib, self.facts, il, post_rope, self.n_ctx)


def last_queries(calib, facts: ModelFacts, il: int, post_rope: bool, n_max: int) -> np.ndarray:
    """[tokens, n_head, head_dim] queries of layer il from the last ubatch that a keep_last
    accumulator saw (at most n_max tokens)."""
    buf = np.zeros(n_max * facts.n_head * facts.head_dim, dtype=np.float32)
    n = lib.triattention_calib_last(calib, il, post_rope, buf.ctypes.data_as(_f32p), buf.size)
    if n < 0:
        raise CalibrationError("no captured queries (was the accumulator made with keep_last=True?)")
    return buf[: n * facts.n_head * facts.head_dim].reshape(n, facts.n_head, facts.head_dim)


@contextlib.contextmanager
def query_capture(model, keep_last: bool) -> Iterator[tuple[ctypes.c_void_p, dict]]:
    """A calibration accumulator for a loaded llama_model*, and the llama_context_params
    fields that make a context's graph feed it."""
    calib = lib.triattention_calib_init(model, keep_last)
    callback = ctypes.cast(lib.triattention_calib_callback(), ll.ggml_backend_sched_eval_callback)
    try:
        yield calib, {"cb_eval": callback, "cb_eval_user_data": calib}
    finally:
        lib.triattention_calib_free(calib)


@contextlib.contextmanager
def calibration_run(model_path: str | os.PathLike, n_ctx: int = DEFAULT_CHUNK, keep_last: bool = False,
                    n_threads: int | None = None, **context_overrides) -> Iterator[CalibrationRun]:
    """Open the model with the calibration callback on its graph. context_overrides set
    llama_context_params fields (e.g. rope_freq_scale) for tests of RoPE scaling."""
    with model_with_facts(model_path) as (model, facts):
        n_ctx = min(n_ctx, facts.n_ctx_train)
        with query_capture(model, keep_last) as (calib, feed):
            # keep_last captures one ubatch, so a whole chunk must fit in one.
            with model_context(model, n_ctx, n_threads, n_ubatch=n_ctx if keep_last else 512,
                               **feed, **context_overrides) as ctx:
                yield CalibrationRun(facts, model, ctx, calib, n_ctx)


def compute_centers(model_path: str | os.PathLike, text: str | None = None, max_tokens: int = DEFAULT_TOKENS,
                    chunk: int = DEFAULT_CHUNK, n_threads: int | None = None, progress: bool = True) -> Centers:
    """Calibrate a model on text (default: Python's documentation) and return its centres."""
    text = default_text() if text is None else text
    if max_tokens < MIN_TOKENS:
        raise CalibrationError(f"--tokens {max_tokens} is too few; calibration needs at least {MIN_TOKENS}")
    with calibration_run(model_path, n_ctx=chunk, n_threads=n_threads) as run:
        facts, chunk = run.facts, run.n_ctx
        tokens = run.tokenize(text)[:max_tokens]
        if len(tokens) < MIN_TOKENS:
            raise CalibrationError(f"the calibration text has {len(tokens)} tokens; at least {MIN_TOKENS} are needed "
                                   "(give a longer --text, or leave it out to use the built-in text)")
        with tqdm(total=len(tokens), unit="tok", desc="calibrating", disable=not progress) as bar:
            for start in range(0, len(tokens), chunk):
                piece = tokens[start:start + chunk]
                run.decode(piece)
                bar.update(len(piece))
        q_mean, q_abs_mean = run.statistics()
        n_seen = run.n_tokens()
    if n_seen != len(tokens):
        raise CalibrationError(f"captured queries for {n_seen} tokens, expected {len(tokens)}")
    broken = ~(np.isfinite(q_mean) & np.isfinite(q_abs_mean)).all(axis=(1, 2))
    if broken.any():
        raise CalibrationError(f"{model_path}: the queries of layer {int(np.argmax(broken))} are not finite: a weight "
                               "of the model is NaN or infinite; the file is damaged, download or convert it again")
    return Centers(
        n_layer=facts.n_layer, n_head=facts.n_head, n_head_kv=facts.n_head_kv, head_dim=facts.head_dim,
        n_rot=facts.n_rot, rope_type=facts.rope_type, q_mean=q_mean, q_abs_mean=q_abs_mean,
        calibration_tokens=len(tokens), text_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        model_fingerprint=facts.fingerprint)
