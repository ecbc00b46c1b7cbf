"""A server's slots: conversations on one loaded model, each in a context of its own (a compressed
cache of budget + divide_length + n_ubatch cells), and the prompt cache behind them.

A request continues the slot whose last prompt its own prompt starts with (the next turn of that
conversation). Any other request takes an empty slot, else the least recently used one, whose
conversation is first saved to the prompt cache; the slot is then warmed with whatever shares the
longest prefix with the prompt (a cache entry or another slot's state) when that beats what the slot
holds, and generate() reads only what follows (cutting a compressed history where Llama serves it).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from triattention_gguf.llama import Conversation, Llama
from triattention_gguf.prompt_cache import PromptCache, common_prefix

log = logging.getLogger("triattention_gguf.slots")


@dataclass(eq=False)
class Slot:
    id: int
    conversation: Conversation
    prompt_tokens: int = 0   # of its last request: a prompt that starts with them continues it
    last_used: float = 0.0   # time.time() of its last request, 0 for never
    kv: dict = field(default_factory=dict)  # Llama.kv_stats() after its last request


@dataclass
class Reuse:
    hits: int = 0          # new conversations warmed from the prompt cache
    slot_copies: int = 0   # ... from another slot
    misses: int = 0        # ... from nothing (read whole)
    tokens_saved: int = 0  # prompt tokens restored instead of read


class SlotPool:
    """n_slots conversations on llm (its own context is slot 0), routed by prompt (Llama.on_prompt)."""

    def __init__(self, llm: Llama, n_slots: int, cache: PromptCache | None):
        self.llm, self.cache, self.reuse = llm, cache, Reuse()
        self.slots = [Slot(0, llm.conversation)] + [Slot(i, llm.new_conversation()) for i in range(1, n_slots)]
        for slot in self.slots:
            llm.use(slot.conversation)
            slot.kv = llm.kv_stats()
        llm.use(self.slots[0].conversation)
        llm.on_prompt = self.route

    def held(self, slot: Slot) -> np.ndarray:
        """The tokens slot's cache holds."""
        c = slot.conversation
        if c is self.llm.conversation:
            return np.asarray(self.llm.input_ids[:self.llm.n_tokens], dtype=np.int32)
        return np.asarray(c.input_ids[:c.n_tokens], dtype=np.int32)

    def route(self, tokens: list[int]) -> None:
        """Make the slot for this prompt the Llama's context (warmed when it starts another conversation)."""
        prompt = np.asarray(tokens, dtype=np.int32)
        shared = {slot: common_prefix(self.held(slot), prompt) for slot in self.slots}
        continuing = [s for s in self.slots if s.prompt_tokens and shared[s] >= s.prompt_tokens]
        if continuing:
            slot = max(continuing, key=shared.get)
            self.llm.use(slot.conversation)
        else:
            slot = min(self.slots, key=lambda s: (s.last_used > 0, s.last_used))  # empty first, then LRU
            self._warm(slot, prompt, shared)
        slot.prompt_tokens, slot.last_used = len(prompt), time.time()

    def _warm(self, slot: Slot, prompt: np.ndarray, shared: dict) -> None:
        llm = self.llm
        llm.use(slot.conversation)
        if self.cache is not None and llm.n_tokens > 0:
            self.cache.put(llm.save_state())  # the conversation it held stays warm
        # what each source shares with the prompt, and (of equal prefixes, the least is best) what
        # follows it: the cut there discards that
        reach = {s: (shared[s], shared[s] - len(self.held(s))) for s in self.slots}
        sources = [(reach[s], s) for s in self.slots if s is not slot]
        entry, n = self.cache.best(prompt) if self.cache is not None else (None, 0)
        if entry is not None:
            sources.append(((n, n - len(entry.tokens)), entry))
        best, source = max(sources, key=lambda s: s[0], default=((0, 0), None))
        saved = best[0]
        if saved == 0 or best <= reach[slot]:
            self.reuse.misses += shared[slot] == 0
            return
        if isinstance(source, Slot):
            llm.use(source.conversation)
            state = llm.save_state()
            llm.use(slot.conversation)
            self.reuse.slot_copies += 1
        else:
            state = self.cache.take(source)
            if state is None:  # a damaged file: logged by the cache
                self.reuse.misses += 1
                return
            self.reuse.hits += 1
        llm.load_state(state)
        self.reuse.tokens_saved += saved - shared[slot]
        log.info("slot %d: restored a conversation of %d tokens from %s, %d of them shared with the prompt",
                 slot.id, state.n_tokens, f"slot {source.id}" if isinstance(source, Slot) else "the prompt cache",
                 saved)

    @property
    def current(self) -> Slot:
        """The slot whose context the Llama works on."""
        return next(s for s in self.slots if s.conversation is self.llm.conversation)

    def finished(self) -> dict:
        """After a request on the current slot: its state to disk when the cache has a directory;
        its new figures kept, its figures before the request returned."""
        slot, before = self.current, self.current.kv
        slot.kv = self.llm.kv_stats()
        if self.cache is not None and self.cache.directory is not None and self.llm.n_tokens > 0:
            self.cache.put(self.llm.save_state(), memory=False)
        return before

    def describe(self) -> list[dict]:
        """What GET /slots shows."""
        return [{"id": s.id, "n_tokens": len(self.held(s)), "cells_used": s.kv.get("cells_used"),
                 "cells_capacity": s.kv.get("cells_capacity"), "logical_tokens": s.kv.get("logical_pos"),
                 "last_used": s.last_used or None} for s in self.slots]
