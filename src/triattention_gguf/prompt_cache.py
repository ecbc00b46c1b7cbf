"""Conversations kept warm: the saved states of a server's displaced slots, in host memory and
optionally on disk, found again by the longest prefix they share with a new prompt.

A compressed state holds at most budget + divide_length + n_ubatch cells however long its
conversation, so the same memory keeps many more conversations than full caches would. Memory
entries are evicted least recently used first; disk entries are state files (state_file.py),
written atomically by a background thread, named by a hash of the Llama's identity (model
fingerprint, centres, compression settings) and the tokens, and evicted oldest first when the
directory passes its bound. A damaged or mismatched file is logged and never loaded.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

from triattention_gguf import state_file

log = logging.getLogger("triattention_gguf.prompt_cache")
SUFFIX = ".triastate"


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens a and b share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def state_bytes(state: llama_cpp.LlamaState) -> int:
    return (state.llama_state_size + len(getattr(state, "triattention_records", b"")) + state.scores.nbytes
            + 4 * state.n_tokens)


@dataclass(eq=False)
class Entry:
    tokens: np.ndarray                     # int32, the conversation the state holds
    state: llama_cpp.LlamaState | None     # in memory, or None when only on disk
    path: Path | None = None               # its state file, when written
    disk_bytes: int = 0
    used: int = 0                          # LRU clock
    writing: bool = False                  # its file is queued for the writer


@dataclass
class CacheFigures:
    entries: int
    bytes: int        # of the entries in memory
    disk_entries: int
    disk_bytes: int


class PromptCache:
    """Saved states of conversations, found by common prefix. ram_bytes bounds the entries kept
    in memory; with a directory, every entry is also written there (and the directory's entries
    kept under dir_bytes), so another process with the same Llama identity finds them."""

    def __init__(self, identity: dict, n_ctx: int, ram_bytes: int, directory: str | Path | None = None,
                 dir_bytes: int = 0):
        self.identity, self.n_ctx = identity, n_ctx
        self.ram_bytes, self.dir_bytes = ram_bytes, dir_bytes
        self.directory = Path(directory) if directory else None
        self.entries: list[Entry] = []
        self._clock = itertools.count(1)
        self._lock = threading.Lock()  # the entries, shared with the disk writer
        self._writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-writer")
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._scan()

    def _scan(self) -> None:
        for path in sorted(self.directory.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime):
            try:
                tokens = state_file.read_tokens(path, self.identity)
            except (state_file.StateFileError, OSError) as err:
                log.info("prompt cache: ignored %s: %s", path.name, err)
                continue
            self.entries.append(Entry(tokens, None, path, path.stat().st_size, next(self._clock)))
        if self.entries:
            log.info("prompt cache: %d conversations found in %s", len(self.entries), self.directory)

    def _key(self, tokens: np.ndarray) -> str:
        identity = json.dumps(self.identity, sort_keys=True).encode()
        return hashlib.sha256(identity + tokens.astype(np.int32).tobytes()).hexdigest()[:32] + SUFFIX

    def put(self, state: llama_cpp.LlamaState, memory: bool = True) -> None:
        """Keep state (in memory unless memory=False; on disk when there is a directory). Entries
        whose conversation it continues are dropped: it serves every prompt they served."""
        tokens = np.asarray(state.input_ids[:state.n_tokens], dtype=np.int32)
        with self._lock:
            continued = [e for e in self.entries if len(e.tokens) <= len(tokens)
                         and common_prefix(e.tokens, tokens) == len(e.tokens)]
            entry = next((e for e in continued if len(e.tokens) == len(tokens)), None)
            for old in continued:
                if old is not entry:
                    self._drop(old)
            if entry is None:
                entry = Entry(tokens, None)
                self.entries.append(entry)
            entry.used = next(self._clock)
            if memory:
                entry.state = state
                self._evict_memory()
            write = self.directory is not None and entry.path is None and not entry.writing
            entry.writing = entry.writing or write
        if write:
            self._writer.submit(self._write, entry, state)

    def _write(self, entry: Entry, state: llama_cpp.LlamaState) -> None:
        path = self.directory / self._key(entry.tokens)
        try:
            state_file.write(path, state, state.triattention_records, self.identity)
        except OSError as err:
            log.warning("prompt cache: could not write %s: %s", path, err)
            with self._lock:
                if entry.state is None and entry in self.entries:
                    self.entries.remove(entry)
            return
        finally:
            entry.writing = False
        with self._lock:
            if entry not in self.entries:  # superseded while it was written
                path.unlink(missing_ok=True)
                return
            entry.path, entry.disk_bytes = path, path.stat().st_size
            self._evict_disk()

    def _drop(self, entry: Entry) -> None:
        self.entries.remove(entry)
        if entry.path is not None:
            entry.path.unlink(missing_ok=True)

    def _evict_memory(self) -> None:
        held = sorted((e for e in self.entries if e.state is not None), key=lambda e: e.used)
        total = sum(state_bytes(e.state) for e in held)
        for entry in held:
            if total <= self.ram_bytes:
                break
            total -= state_bytes(entry.state)
            entry.state = None
            if entry.path is None and self.directory is None:
                self.entries.remove(entry)

    def _evict_disk(self) -> None:
        on_disk = sorted((e for e in self.entries if e.path is not None), key=lambda e: e.used)
        total = sum(e.disk_bytes for e in on_disk)
        for entry in on_disk:
            if total <= self.dir_bytes:
                break
            total -= entry.disk_bytes
            entry.path.unlink(missing_ok=True)
            entry.path, entry.disk_bytes = None, 0
            if entry.state is None:
                self.entries.remove(entry)

    def best(self, prompt: np.ndarray) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with prompt (of those, the one with the least after it:
        the least that a cut there discards), and that length; None, 0 for none."""
        with self._lock:
            scored = [(n, n - len(e.tokens), e.used, e) for e in self.entries
                      for n in [common_prefix(e.tokens, prompt)]]
        if not scored:
            return None, 0
        n, _, _, entry = max(scored, key=lambda s: s[:3])
        return (entry, n) if n > 0 else (None, 0)

    def take(self, entry: Entry) -> llama_cpp.LlamaState | None:
        """entry's state, from memory or its file (None, logged, the entry forgotten, when the file
        is damaged or gone)."""
        with self._lock:
            entry.used = next(self._clock)
            state = entry.state
            path = entry.path
        if state is not None:
            return state
        try:
            state, records = state_file.read(path, self.identity, self.n_ctx)
        except (state_file.StateFileError, OSError) as err:
            log.warning("prompt cache: ignored %s: %s", path, err)
            with self._lock:
                if entry in self.entries:
                    self.entries.remove(entry)
            return None
        state.triattention_records = records
        path.touch()  # the directory's eviction order survives a restart
        return state

    def figures(self) -> CacheFigures:
        with self._lock:
            held = [e for e in self.entries if e.state is not None]
            on_disk = [e for e in self.entries if e.path is not None]
            return CacheFigures(len(held), sum(state_bytes(e.state) for e in held), len(on_disk),
                                sum(e.disk_bytes for e in on_disk))

    def flush(self) -> None:
        """Wait for the disk writes queued so far."""
        self._writer.submit(lambda: None).result()

    def close(self) -> None:
        self._writer.shutdown(wait=True)
