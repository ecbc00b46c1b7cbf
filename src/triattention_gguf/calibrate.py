"""Calibration: run the real model over plain text and average its pre-RoPE queries.

The statistics are accumulated inside our libllama by an eval callback on the
graph (see cpp/triattention-calib.cpp), so any GGUF that llama.cpp runs,
quantized included, is calibrated through exactly the computation that
inference uses. The query clusters come from a sample of the same queries:
k-means per (layer, head), then each cluster's own statistics.
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
from triattention_gguf.methods import DEFAULT_CLUSTERS, MAX_CLUSTERS
from triattention_gguf.modelinfo import ModelFacts, model_context, model_with_facts, tokenize
from triattention_gguf.scoring import real_to_pairs

DEFAULT_TOKENS = 32768
MIN_TOKENS = 256
DEFAULT_CHUNK = 2048
CLUSTER_TOKENS = 8192      # the clusters come from this many sampled tokens at most,
CLUSTER_BYTES = 512 << 20  # whose queries take this much memory at most
KMEANS_ITERATIONS = 30
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


class QuerySample:
    """Every stride-th calibration token's pre-RoPE queries, [layer][token][head][head_dim]."""

    def __init__(self, facts: ModelFacts, n_tokens: int):
        per_token = facts.n_layer * facts.n_head * facts.head_dim * 4
        self.stride = -(-n_tokens // max(1, min(CLUSTER_TOKENS, CLUSTER_BYTES // per_token)))
        self.queries = np.empty((facts.n_layer, -(-n_tokens // self.stride), facts.n_head, facts.head_dim),
                                dtype=np.float32)
        self.n = 0

    def add(self, run: CalibrationRun, start: int) -> None:
        """The sampled tokens of the chunk that run decoded last, which began at token start."""
        for il in range(run.facts.n_layer):
            chunk = run.last_queries(il, post_rope=False)
            taken = chunk[-start % self.stride::self.stride]
            self.queries[il, self.n:self.n + len(taken)] = taken
        self.n += len(taken)


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeds, [rows, k, d]: each next one drawn in proportion to the squared distance to the
    nearest one so far, so that separate clusters get a seed each."""
    rows = np.arange(len(x))
    chosen = [rng.integers(0, x.shape[1], size=len(x))]
    nearest = np.full(x.shape[:2], np.inf, dtype=np.float64)
    for _ in range(1, k):
        nearest = np.minimum(nearest, ((x - x[rows, chosen[-1]][:, None]) ** 2).sum(-1))
        cumulative = np.cumsum(nearest, axis=1)
        draw = rng.random(len(x)) * cumulative[:, -1]
        chosen.append(np.minimum((cumulative < draw[:, None]).sum(1), x.shape[1] - 1))
    return x[rows[:, None], np.stack(chosen, axis=1)]


def kmeans_labels(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Lloyd's k-means of each row's points, x [rows, n, d] -> the cluster of each point [rows, n]."""
    centres = kmeans_plus_plus(x, k, rng)
    labels = None
    for _ in range(KMEANS_ITERATIONS):
        # the nearest centre: |x|^2 is the same for every centre of a point
        distance = (centres ** 2).sum(-1)[:, None, :] - 2 * x @ centres.transpose(0, 2, 1)
        new_labels = distance.argmin(-1)
        if labels is not None and np.array_equal(new_labels, labels):
            break
        labels = new_labels
        members = (labels[..., None] == np.arange(k)).astype(np.float32)  # [rows, n, k]
        counts = members.sum(1)[..., None]
        centres = np.where(counts > 0, members.transpose(0, 2, 1) @ x / np.maximum(counts, 1), centres)
    return labels


def cluster_statistics(sample: QuerySample, facts: ModelFacts, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each (layer, head)'s k clusters of the sampled queries: their mean pairs and mean pair
    magnitudes, [n_layer, n_head, k, head_dim/2]. A cluster left empty gets the head's statistics."""
    rng = np.random.default_rng(0)  # the same text gives the same clusters
    mean = np.zeros((facts.n_layer, facts.n_head, k, facts.n_pairs), dtype=np.complex64)
    magnitude = np.zeros(mean.shape, dtype=np.float32)
    for il in range(facts.n_layer):
        x = np.ascontiguousarray(sample.queries[il, :sample.n].transpose(1, 0, 2))  # [head, token, head_dim]
        members = (kmeans_labels(x, k, rng)[..., None] == np.arange(k)).astype(np.float32).transpose(0, 2, 1)
        counts = members.sum(-1)[..., None]
        z = real_to_pairs(x, facts.rope_type, facts.n_rot).astype(np.complex64)
        empty = counts == 0
        mean[il] = np.where(empty, z.mean(1, keepdims=True), members @ z / np.maximum(counts, 1))
        magnitude[il] = np.where(empty, np.abs(z).mean(1, keepdims=True), members @ np.abs(z) / np.maximum(counts, 1))
    return mean, magnitude


def compute_centers(model_path: str | os.PathLike, text: str | None = None, max_tokens: int = DEFAULT_TOKENS,
                    chunk: int = DEFAULT_CHUNK, n_threads: int | None = None, progress: bool = True,
                    clusters: int = DEFAULT_CLUSTERS) -> Centers:
    """Calibrate a model on text (default: Python's documentation) and return its centres, with
    `clusters` query clusters per head."""
    text = default_text() if text is None else text
    if max_tokens < MIN_TOKENS:
        raise CalibrationError(f"--tokens {max_tokens} is too few; calibration needs at least {MIN_TOKENS}")
    if not 1 <= clusters <= MAX_CLUSTERS:
        raise CalibrationError(f"--clusters {clusters} must be in [1, {MAX_CLUSTERS}]")
    with calibration_run(model_path, n_ctx=chunk, n_threads=n_threads, keep_last=clusters > 1) as run:
        facts, chunk = run.facts, run.n_ctx
        tokens = run.tokenize(text)[:max_tokens]
        if len(tokens) < MIN_TOKENS:
            raise CalibrationError(f"the calibration text has {len(tokens)} tokens; at least {MIN_TOKENS} are needed "
                                   "(give a longer --text, or leave it out to use the built-in text)")
        sample = QuerySample(facts, len(tokens)) if clusters > 1 else None
        with tqdm(total=len(tokens), unit="tok", desc="calibrating", disable=not progress) as bar:
            for start in range(0, len(tokens), chunk):
                piece = tokens[start:start + chunk]
                run.decode(piece)
                if sample is not None:
                    sample.add(run, start)
                bar.update(len(piece))
        q_mean, q_abs_mean = run.statistics()
        n_seen = run.n_tokens()
    if n_seen != len(tokens):
        raise CalibrationError(f"captured queries for {n_seen} tokens, expected {len(tokens)}")
    broken = ~(np.isfinite(q_mean) & np.isfinite(q_abs_mean)).all(axis=(1, 2))
    if broken.any():
        raise CalibrationError(f"{model_path}: the queries of layer {int(np.argmax(broken))} are not finite: a weight "
                               "of the model is NaN or infinite; the file is damaged, download or convert it again")
    cluster_mean, cluster_abs_mean = (cluster_statistics(sample, facts, clusters) if sample is not None
                                      else (None, None))
    return Centers(
        n_layer=facts.n_layer, n_head=facts.n_head, n_head_kv=facts.n_head_kv, head_dim=facts.head_dim,
        n_rot=facts.n_rot, rope_type=facts.rope_type, q_mean=q_mean, q_abs_mean=q_abs_mean,
        calibration_tokens=len(tokens), text_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        model_fingerprint=facts.fingerprint, cluster_mean=cluster_mean, cluster_abs_mean=cluster_abs_mean)
