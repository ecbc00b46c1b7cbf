"""`triattention_gguf.Llama`: llama_cpp.Llama with a compressed KV cache."""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import llama_cpp
import llama_cpp._internals as internals
import numpy as np
from llama_cpp._logger import set_verbose
from llama_cpp._utils import suppress_stdout_stderr

from triattention_gguf import state_file
from triattention_gguf._lib import lib, llama_cpp_bindings as ll
from triattention_gguf.centers import load_centers
from triattention_gguf.compression import (CompressionError, check_arguments, configure, keep_prompt, physical_cells,
                                          prompt_ubatch, stats)
from triattention_gguf.harness import Config, tri_defaults
from triattention_gguf.methods import DEFAULT_SELECT
from triattention_gguf.modelinfo import fingerprint, open_gguf, read_facts

log = logging.getLogger(__name__)


@dataclass
class Conversation:
    """One llama_context on a Llama's model with the tokens its cache holds (Llama.use makes it the
    one that generate() and the state calls work on)."""
    ctx: internals.LlamaContext
    input_ids: np.ndarray
    n_tokens: int = 0
    requires_eval: bool = True


class Llama(llama_cpp.Llama):
    """llama_cpp.Llama whose KV cache is kept within a budget by TriAttention or a baseline.

    Every argument of llama_cpp.Llama keeps its meaning (n_ctx is still the longest
    conversation, in tokens), plus:

    kv_compress: "tri" (needs centres in the file: `triattention-gguf embed-centers`),
        "none", or the baselines "streaming", "knorm", "random", "snapkv".
    kv_budget: cells each KV head keeps after a compression (default 2048).
    kv_divide_length: compress when budget + divide_length cells are reached (default 128).
    kv_select: "per-layer-head" (default: every layer's KV heads keep their own sets, from that
        layer's scores), "per-head" (a set per KV head shared by the layers) or "shared" (one set).
    kv_keep_recent: never evict the newest kv_keep_recent tokens (0: the method alone decides); the
        rest of the budget goes by the method's scores.
    kv_horizon: "tri" predicts the attention of the queries up to kv_horizon tokens ahead (the
        future offsets 1, 2, 4, ... up to it; 65536 is the reference's). At budgets of tens to
        hundreds of cells, 4 kept more of the full model in generation (BENCHMARKS.md).
    kv_min_concentration: "tri" scores every (layer, KV head) whose query heads' mean calibrated
        concentration R is below this by recency plus the attention its latest 8 queries gave (0: every
        head by its centres, as the reference). It kept more of SmolLM2 and less of Qwen2.5
        (BENCHMARKS.md, "Spread heads", "Observed spread heads").
        These three default (None) to what `triattention-gguf tune` stored in the model file for tri
        (README.md, "Tuned defaults"), else to the reference's 0, 65536 and 0; kv_settings has the values
        in use.
    kv_keep_prompt: never evict the prompt of a generation (as the reference does) while it fits in
        the budget beside the kept recent tokens; a longer prompt is compressed like the rest, with a
        warning.
    kv_seed: seed of the "random" baseline.

    More contexts on the same loaded model, compressed alike, come from new_conversation(); use()
    switches between them, and on_prompt (when set) is called with each generation's prompt tokens
    before the cache is matched against them (the server routes requests to its slots there).

    With compression the physical cache holds kv_budget + kv_divide_length + n_ubatch cells,
    however long n_ctx is; prompts are read in chunks of n_ubatch tokens (default: at most 512,
    chosen so that llama.cpp's rounding of the cache to 256 cells adds nothing). A sliding-window
    model (Gemma 3, ...) compresses its full-attention layers; llama.cpp keeps its sliding-window
    layers in a cache of their own, window-sized unless swa_full=True.
    """

    def __init__(self, model_path: str, *args, kv_compress: str = "none", kv_budget: int = 2048,
                 kv_divide_length: int = 128, kv_select: str = DEFAULT_SELECT, kv_keep_prompt: bool = False,
                 kv_keep_recent: int | None = None, kv_horizon: int | None = None,
                 kv_min_concentration: float | None = None, kv_seed: int = 0, **kwargs):
        given = {"keep_recent": kv_keep_recent, "horizon": kv_horizon, "min_concentration": kv_min_concentration}
        reference = Config(kv_compress, kv_budget)
        check_arguments(kv_compress, kv_budget, kv_divide_length, kv_select,
                        **{k: getattr(reference, k) if v is None else v for k, v in given.items()})
        # every check that can fail runs before the model and the cache are allocated, with
        # llama.cpp's log as quiet as the parent will make it (its load log would drown the error)
        set_verbose(kwargs.get("verbose", True))
        open_gguf(model_path)  # llama.cpp's loader trusts the header: a malformed one can crash or hang it
        self.kv_compress = kv_compress
        self._kv_budget, self._kv_divide_length = kv_budget, kv_divide_length
        self._kv_keep_prompt, self._kv_select, self._kv_seed = kv_keep_prompt, kv_select, kv_seed
        self.on_prompt: Callable[[list[int]], None] | None = None
        centres = None
        logical_n_ctx = kwargs.get("n_ctx", 512)
        if kv_compress != "none":
            facts = read_facts(model_path)
            centres = load_centers(facts) if kv_compress == "tri" else None
            if centres is not None:
                # one cluster is the centre: states saved before there were clusters still match
                clusters = (centres.cluster_mean, centres.cluster_abs_mean) if centres.n_clusters > 1 else ()
                self._centres_sha256 = hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in (
                    centres.q_mean, centres.q_abs_mean, *clusters))).hexdigest()
            logical_n_ctx = logical_n_ctx or facts.n_ctx_train
            n_ubatch = kwargs.setdefault("n_ubatch", prompt_ubatch(kv_budget, kv_divide_length))
            kwargs["n_ctx"] = physical_cells(kv_budget, kv_divide_length, n_ubatch, facts.n_swa)
            kwargs["n_batch"] = min(kwargs.get("n_batch", 512), n_ubatch)
            # llama.cpp's default sizes a sliding-window cache like the whole context; the window is enough
            if kwargs.get("swa_full") is None:
                kwargs["swa_full"] = False
        self._logical_n_ctx = logical_n_ctx
        super().__init__(model_path, *args, **kwargs)
        if kv_compress != "none":
            self._n_ctx = logical_n_ctx
            self.input_ids = np.ndarray((logical_n_ctx,), dtype=np.intc)
            if self._logits_all:
                self.scores = np.ndarray((logical_n_ctx, self._n_vocab), dtype=np.single)
        self._centres = centres
        defaults = tri_defaults(centres, kv_budget) if kv_compress == "tri" else reference
        resolved = {k: getattr(defaults, k) if v is None else v for k, v in given.items()}
        if kv_compress == "tri" and centres.tuned is not None:
            log.info("%s: tri's settings tuned for this model: %s; in use: %s", model_path, centres.tuned, resolved)
        self._kv_keep_recent, self._kv_horizon = resolved["keep_recent"], resolved["horizon"]
        self._kv_min_concentration = resolved["min_concentration"]
        self._configure(self._ctx.ctx)
        self._conversation = Conversation(self._ctx, self.input_ids)

    def _configure(self, ctx) -> None:
        if self.kv_compress != "none":
            configure(ctx, self.kv_compress, self._kv_budget, self._kv_divide_length, self._kv_select, self._kv_seed,
                      self._centres, self._kv_keep_recent, self._kv_horizon, self._kv_min_concentration)

    def new_conversation(self) -> Conversation:
        """Another context on the loaded model with a cache of its own, compressed alike, freed with
        this Llama."""
        with suppress_stdout_stderr(disable=self.verbose):  # llama.cpp logs a context's set-up at length
            ctx = self._stack.enter_context(contextlib.closing(internals.LlamaContext(
                model=self._model, params=self.context_params, verbose=self.verbose)))
        self._configure(ctx.ctx)
        return Conversation(ctx, np.zeros_like(self.input_ids))

    @property
    def conversation(self) -> Conversation:
        """The context that generate() works on now."""
        return self._conversation

    def use(self, conversation: Conversation) -> None:
        """Make conversation's context the one that generate() and the state calls work on."""
        held = self._conversation
        held.input_ids, held.n_tokens, held.requires_eval = self.input_ids, self.n_tokens, self._requires_eval
        self._ctx, self.input_ids = conversation.ctx, conversation.input_ids
        self.n_tokens, self._requires_eval = conversation.n_tokens, conversation.requires_eval
        self._conversation = conversation

    def __del__(self):
        # argument errors are raised before llama_cpp.Llama.__init__ has built anything to free
        if hasattr(self, "_stack"):
            super().__del__()

    def n_ctx(self) -> int:
        """The longest conversation in tokens (the physical cache may be smaller)."""
        return self._logical_n_ctx if self.kv_compress != "none" else super().n_ctx()

    def generate(self, tokens: Sequence[int], *args, reset: bool = True, **kwargs):
        tokens = list(tokens)
        if reset and self.on_prompt is not None:
            self.on_prompt(tokens)
        self.last_prompt = {"tokens": len(tokens), "reused": None}
        if reset and self.kv_compress != "none" and self.n_tokens > 0:
            prefix = 0
            for a, b in zip(self._input_ids, tokens):
                if a != b:
                    break
                prefix += 1
            exact_hit = prefix == len(tokens) == self.n_tokens and not self._requires_eval
            # the parent cuts the cache where the prompt leaves the history (one token earlier
            # when the prompt is all history, to refresh the logits)
            if not exact_hit and not self._cut_is_served(min(prefix, len(tokens) - 1)):
                self.n_tokens = 0
                ll.llama_memory_clear(ll.llama_get_memory(self._ctx.ctx), True)
        if self._kv_keep_prompt and self.kv_compress != "none" and not keep_prompt(
                self._ctx.ctx, len(tokens), self._kv_budget, self._kv_keep_recent):
            log.warning("kv_keep_prompt: the prompt has %d tokens, more than kv_budget %d holds beside the %d "
                        "newest tokens; it is compressed like the generated tokens", len(tokens), self._kv_budget,
                        max(self._kv_keep_recent, 1))
        return super().generate(tokens, *args, reset=reset, **kwargs)

    def eval(self, tokens: Sequence[int]) -> None:
        record = getattr(self, "last_prompt", None)
        if record is not None and record["reused"] is None:
            # the first evaluation of a generation starts after what the cache already held
            record["reused"] = min(self.n_tokens, record["tokens"])
        super().eval(tokens)

    def prompt_reuse(self) -> dict:
        """Of the last generate()'s prompt: tokens, and how many of them the cache already held."""
        record = dict(getattr(self, "last_prompt", None) or {"tokens": 0, "reused": 0})
        if record["reused"] is None:  # nothing evaluated: the whole prompt was held
            record["reused"] = record["tokens"]
        return record

    def _cut_is_served(self, cut: int) -> bool:
        """Whether the cache, cut at position `cut`, still serves the history before it.

        A cut after the last compression keeps that history exactly. A cut inside the compressed
        history (a chat template that tokenizes the previous answer differently, an agent that
        edits its last turn) keeps, in every KV head, the same number of its tokens before the cut
        (the fewest any head holds; the next decode compacts them): served when reading that prefix
        afresh would have compressed it too (cut > budget + divide_length) and every head keeps at
        least half the budget, refilled by the tokens that follow; otherwise the prompt is read
        again. (Under per-layer-head selection every layer's heads keep the newest tokens in cells
        of their own, so a cut into the last answer leaves fewer than budget - divide_length.)"""
        if not self._window_holds(cut):
            return False
        if stats(self._ctx.ctx)["compressed_upto"] < cut:
            return True
        budget, divide = self._kv_budget, self._kv_divide_length
        return cut > budget + divide and lib.triattention_cells_before(self._ctx.ctx, cut) >= budget // 2

    def _window_holds(self, cut: int) -> bool:
        """Whether a sliding-window model's window cache, cut at `cut`, still holds every token
        that the token at `cut` attends to (llama.cpp reuses cells that left the window)."""
        n_swa = ll.llama_model_n_swa(self._model.model)
        if n_swa <= 0 or lib.triattention_get_cache_info(self._ctx.ctx).swa_cells_capacity == 0:
            return True
        oldest = ll.llama_memory_seq_pos_min(ll.llama_get_memory(self._ctx.ctx), 0)
        return 0 <= oldest <= max(0, cut - n_swa + 1)

    def save_state(self) -> llama_cpp.LlamaState:
        """llama_cpp.Llama.save_state, with what compaction recorded (triattention_records). The saved
        logits are only those logits_all keeps (the parent copies n_batch x n_vocab floats, mostly
        stale, which outweighed a compressed cache): a restored state decodes its last token again."""
        size = ll.llama_state_get_size(self._ctx.ctx)
        data = (ctypes.c_uint8 * size)()
        n = ll.llama_state_get_data(self._ctx.ctx, data, size)
        logits = self._scores.copy() if self._logits_all else np.zeros((0, self._n_vocab), dtype=np.single)
        state = llama_cpp.LlamaState(input_ids=self.input_ids[:self.n_tokens].copy(), scores=logits,
                                     n_tokens=self.n_tokens, llama_state=bytes(data[:n]), llama_state_size=n,
                                     seed=self._seed)
        # llama.cpp saves the cells; which token each head keeps in them is ours to save
        size = lib.triattention_records_size(self._ctx.ctx)
        buf = ctypes.create_string_buffer(size)
        lib.triattention_records_get(self._ctx.ctx, buf, size)
        state.triattention_records = buf.raw
        return state

    def load_state(self, state: llama_cpp.LlamaState) -> None:
        if state.n_tokens > self.n_ctx():
            raise CompressionError(f"load_state: the state holds {state.n_tokens} tokens, more than n_ctx "
                                   f"{self.n_ctx()}")
        data = (ctypes.c_uint8 * state.llama_state_size).from_buffer_copy(state.llama_state)
        if ll.llama_state_set_data(self._ctx.ctx, data, state.llama_state_size) != state.llama_state_size:
            raise CompressionError("load_state: llama.cpp refused the state (another model or context size?)")
        self.input_ids[:state.n_tokens] = state.input_ids[:state.n_tokens]
        self.n_tokens, self._seed, self._requires_eval = state.n_tokens, state.seed, True
        if self._logits_all:
            self.scores[:len(state.scores)] = state.scores
        records = getattr(state, "triattention_records", None)
        if records is not None and lib.triattention_records_set(self._ctx.ctx, records, len(records)) != 0:
            raise CompressionError(f"load_state: {lib.triattention_last_error().decode()}")

    @property
    def kv_settings(self) -> dict:
        """The compression settings in use, those left unset resolved (a tuned model's, or the reference's)."""
        return {"kv_compress": self.kv_compress, "kv_budget": self._kv_budget,
                "kv_divide_length": self._kv_divide_length, "kv_select": self._kv_select,
                "kv_keep_prompt": self._kv_keep_prompt, "kv_keep_recent": self._kv_keep_recent,
                "kv_horizon": self._kv_horizon, "kv_min_concentration": self._kv_min_concentration}

    def state_identity(self) -> dict:
        """What a saved state must match to be restored here."""
        settings = {k: v for k, v in self.kv_settings.items() if k != "kv_keep_prompt"}
        return {"model": fingerprint(open_gguf(self.model_path)), **settings,
                "centres": getattr(self, "_centres_sha256", None), "cells": ll.llama_n_ctx(self._ctx.ctx)}

    def save_state_file(self, path: str | os.PathLike) -> None:
        """Save the conversation held now (compressed cache, tokens, last logits) to path,
        atomically, for load_state_file in this or another process."""
        state = self.save_state()
        state_file.write(path, state, state.triattention_records, self.state_identity())

    def load_state_file(self, path: str | os.PathLike) -> None:
        """Restore a conversation saved by save_state_file from the same model file with the same
        compression settings (StateFileError otherwise, or when the file is damaged); the next
        generate() whose prompt extends it reads only the new tokens."""
        state, records = state_file.read(path, self.state_identity(), self.n_ctx())
        state.triattention_records = records
        self.load_state(state)

    def kv_stats(self) -> dict:
        """Cache use: cells_used / cells_capacity (physical), logical_pos (tokens in the
        conversation), kv_bytes (allocated), kv_bytes_full (what a full cache would need at
        this logical length), compressions, compress_seconds. For a sliding-window model the
        cells are those of its full-attention layers; swa_cells_capacity and swa_kv_bytes give
        llama.cpp's window cache of the other layers, counted in kv_bytes and kv_bytes_full."""
        info = lib.triattention_get_cache_info(self._ctx.ctx)
        logical = ll.llama_memory_seq_pos_max(ll.llama_get_memory(self._ctx.ctx), 0) + 1
        s = stats(self._ctx.ctx)
        return {
            "cells_used": info.cells_used,
            "cells_capacity": info.cells_capacity,
            "swa_cells_capacity": info.swa_cells_capacity,
            "logical_pos": logical,
            "kv_bytes": info.bytes + info.swa_bytes,
            "kv_bytes_full": info.bytes * logical // max(1, info.cells_capacity) + info.swa_bytes,
            "swa_kv_bytes": info.swa_bytes,
            "compressions": s["compressions"],
            "compress_seconds": s["compress_seconds"],
        }
