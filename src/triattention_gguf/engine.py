"""What `serve` runs requests on: the model, its slots and prompt cache, the one worker thread
that alone touches them, and what the server counts.

Requests run one at a time, in arrival order, on that thread; the event loop only parses, queues
and streams. On a CPU one decode already keeps every core busy, so slots share the thread: two
decodes at once would each run at well under half speed. A client that disconnects stops its
generation at the next token.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import llama_cpp
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge

from triattention_gguf.llama import Llama
from triattention_gguf.methods import DEFAULT_SELECT
from triattention_gguf.openai_api import (PROMPT_ERRORS, ApiError, BaseRequest, as_chunks, error_body,
                                          parse_tool_calls, sse)
from triattention_gguf.prompt_cache import PromptCache
from triattention_gguf.slots import SlotPool

log = logging.getLogger("triattention_gguf.server")
_DONE = object()
MiB = 2 ** 20


@dataclass
class _Finished:
    usage: dict  # of the streamed request, counted when its generation ended


@dataclass
class ServeConfig:
    model: str
    alias: str | None = None
    kv_compress: str = "tri"
    kv_budget: int = 4096
    kv_divide_length: int = 128
    kv_select: str = DEFAULT_SELECT
    kv_keep_prompt: bool = False
    kv_keep_recent: int | None = None  # None: the model's tuned setting, else the reference's (Llama)
    kv_horizon: int | None = None
    kv_min_concentration: float | None = None
    n_ctx: int = 0  # 0: the model's trained context
    n_gpu_layers: int = 0
    threads: int | None = None
    chat_format: str | None = None
    api_key: str | None = None
    parallel: int = 1           # slots
    cache_ram: int = 2048       # MiB of host memory for displaced conversations, 0: none
    cache_dir: str | None = None
    cache_dir_max: int = 16384  # MiB

    @property
    def name(self) -> str:
        return self.alias or Path(self.model).name


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("triattention_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("triattention_prompt_tokens", "prompt tokens of completed requests", registry=r)
        self.prompt_reused = Counter("triattention_prompt_tokens_reused", "prompt tokens served from the cache",
                                     registry=r)
        self.completion_tokens = Counter("triattention_completion_tokens", "generated tokens", registry=r)
        self.queue = Gauge("triattention_queue_depth", "requests waiting or running", registry=r)
        self.cells_used = Gauge("triattention_kv_cells_used", "KV cells in use (the last request's slot)", registry=r)
        self.cells_capacity = Gauge("triattention_kv_cells_capacity", "physical KV cells per slot", registry=r)
        self.kv_bytes = Gauge("triattention_kv_bytes", "KV cache bytes allocated per slot", registry=r)
        self.logical = Gauge("triattention_logical_tokens", "tokens of the conversation the cache represents",
                             registry=r)
        self.compressions = Gauge("triattention_compressions_total", "compressions since start", registry=r)
        self.compress_seconds = Gauge("triattention_compress_seconds_total", "seconds spent compressing", registry=r)
        self.cache = {name: Gauge(f"triattention_prompt_cache_{name}", text, registry=r) for name, text in (
            ("entries", "conversations held in memory"), ("bytes", "bytes of the conversations held in memory"),
            ("disk_entries", "conversations in the cache directory"),
            ("disk_bytes", "bytes of the conversations in the cache directory"),
            ("hits_total", "new conversations warmed from the prompt cache"),
            ("slot_copies_total", "new conversations warmed from another slot"),
            ("misses_total", "new conversations that found nothing to restore"),
            ("tokens_saved_total", "prompt tokens restored instead of read"))}

    def observe(self, kv: dict, compressions: int, compress_seconds: float, cache: dict) -> None:
        self.cells_used.set(kv["cells_used"])
        self.cells_capacity.set(kv["cells_capacity"])
        self.kv_bytes.set(kv["kv_bytes"])
        self.logical.set(kv["logical_pos"])
        self.compressions.set(compressions)
        self.compress_seconds.set(compress_seconds)
        for name, value in cache.items():
            self.cache[name].set(value)


class Engine:
    """The model, its slots and prompt cache, its single worker thread, and what the server counts."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.llm = Llama(config.model, kv_compress=config.kv_compress, kv_budget=config.kv_budget,
                         kv_divide_length=config.kv_divide_length, kv_select=config.kv_select,
                         kv_keep_prompt=config.kv_keep_prompt, kv_keep_recent=config.kv_keep_recent,
                         kv_horizon=config.kv_horizon, kv_min_concentration=config.kv_min_concentration,
                         n_ctx=config.n_ctx, n_gpu_layers=config.n_gpu_layers,
                         n_threads=config.threads, chat_format=config.chat_format, verbose=False)
        self.cache = (PromptCache(self.llm.state_identity(), self.llm.n_ctx(), config.cache_ram * MiB,
                                  config.cache_dir, config.cache_dir_max * MiB)
                      if config.cache_ram or config.cache_dir else None)
        self.slots = SlotPool(self.llm, config.parallel, self.cache)
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.metrics = Metrics()
        self.metrics.observe(self.llm.kv_stats(), 0, 0.0, self.cache_figures())
        self.sampled = 0

    @property
    def chat_template(self) -> str:
        return self.llm.metadata.get("tokenizer.chat_template", "")

    def cache_figures(self) -> dict:
        reuse = self.slots.reuse
        figures = self.cache.figures() if self.cache is not None else None
        return {"entries": figures.entries if figures else 0, "bytes": figures.bytes if figures else 0,
                "disk_entries": figures.disk_entries if figures else 0,
                "disk_bytes": figures.disk_bytes if figures else 0, "hits_total": reuse.hits,
                "slot_copies_total": reuse.slot_copies, "misses_total": reuse.misses,
                "tokens_saved_total": reuse.tokens_saved}

    def close(self) -> None:
        """Finish the queued work and the cache's disk writes."""
        self.worker.shutdown(wait=True)
        if self.cache is not None:
            self.cache.close()

    def startup_line(self) -> str:
        """What the server holds: its cache per slot, and how many conversations the prompt cache keeps."""
        config, kv = self.config, self.llm.kv_stats()
        window = kv["swa_kv_bytes"]  # a sliding-window model's window cache, the same with or without compression
        per_cell = (kv["kv_bytes"] - window) / max(1, kv["cells_capacity"])
        full = per_cell * self.llm.n_ctx() + window
        swa = (f" + {kv['swa_cells_capacity']} sliding-window cells (llama.cpp's own)"
               if kv["swa_cells_capacity"] else "")
        line = (f"serving {config.model} as {config.name!r}: n_ctx {self.llm.n_ctx()}, kv_compress "
                f"{config.kv_compress}, budget {config.kv_budget}; {config.parallel} slot(s) of {kv['cells_capacity']} "
                f"KV cells{swa}, {kv['kv_bytes'] / MiB:.1f} MiB each (a full cache of n_ctx would take "
                f"{full / MiB:.1f} MiB)")
        if self.cache is None:
            return line + "; no prompt cache"
        held = per_cell * (min(config.kv_budget, self.llm.n_ctx()) + config.kv_divide_length) + window \
            if config.kv_compress != "none" else full
        line += (f"; prompt cache {config.cache_ram} MiB of RAM: about {int(config.cache_ram * MiB // held)} "
                 f"conversations of {held / MiB:.1f} MiB (full caches of n_ctx: {int(config.cache_ram * MiB // full)})")
        if config.cache_dir:
            line += f", and {config.cache_dir} up to {config.cache_dir_max} MiB"
        return line

    def stopper(self, cancel: threading.Event) -> llama_cpp.LogitsProcessorList:
        """Counts sampled tokens; once cancel is set, leaves the end-of-generation token as the only
        choice (llama-cpp-python's chat API takes logits processors, not stopping criteria)."""
        eos = self.llm.token_eos()

        def process(_ids, logits):
            self.sampled += 1
            if cancel.is_set():
                logits[:] = -float("inf")
                logits[eos] = 0.0
            return logits

        return llama_cpp.LogitsProcessorList([process])

    def submit(self, job: Callable[[], Any]) -> concurrent.futures.Future:
        """Run job on the model's thread after the requests queued before it; cancelling the future
        drops a job that has not started."""
        self.metrics.queue.inc()
        future = self.worker.submit(job)
        future.add_done_callback(lambda _: self.metrics.queue.dec())
        return future

    def stream(self, make: Callable[[], Iterator[dict]], finish: Callable[[], Any],
               cancel: threading.Event) -> tuple[asyncio.Queue, concurrent.futures.Future]:
        """Iterate make() on the model's thread; its items, then _Finished(finish()) (counted on that
        thread, before any later request runs) or the exception raised, then _DONE arrive on a queue."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        put = lambda item: loop.call_soon_threadsafe(queue.put_nowait, item)  # noqa: E731

        def job() -> None:
            try:
                if not cancel.is_set():  # the client may have left while queued
                    for item in make():
                        put(item)
                        if cancel.is_set():
                            break
                    put(_Finished(finish()))
            except Exception as err:  # noqa: BLE001 - handed to the event loop, which answers the client
                put(err)
            finally:
                put(_DONE)

        return queue, self.submit(job)

    @staticmethod
    async def watch_disconnect(request: Request, cancel: threading.Event, job: concurrent.futures.Future) -> None:
        """A client that left stops its generation at the next token; a queued job is dropped at once."""
        while not cancel.is_set():
            if await request.is_disconnected():
                cancel.set()
                job.cancel()
            await asyncio.sleep(0.1)

    def account(self, kind: str, started: float, completion_tokens: int) -> dict:
        """After a request, on the model's thread: its usage, counted and logged."""
        before = self.slots.finished()
        prompt, kv = self.llm.prompt_reuse(), self.llm.kv_stats()
        m = self.metrics
        m.prompt_tokens.inc(prompt["tokens"])
        m.prompt_reused.inc(prompt["reused"])
        m.completion_tokens.inc(completion_tokens)
        compressions = sum(s.kv["compressions"] for s in self.slots.slots)
        m.observe(kv, compressions, sum(s.kv["compress_seconds"] for s in self.slots.slots), self.cache_figures())
        log.info("%s slot=%d prompt=%d reused=%d completion=%d compressions=+%d cells=%d/%d logical=%d %.2fs", kind,
                 self.slots.current.id, prompt["tokens"], prompt["reused"], completion_tokens,
                 kv["compressions"] - before["compressions"], kv["cells_used"], kv["cells_capacity"],
                 kv["logical_pos"], time.perf_counter() - started)
        return {"prompt_tokens": prompt["tokens"], "completion_tokens": completion_tokens,
                "total_tokens": prompt["tokens"] + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": prompt["reused"]}}

    async def respond(self, request: Request, body: BaseRequest, kind: str, call: Callable[..., Any],
                      tools_auto: bool):
        """Run call(stream, logits_processor) on the model's thread and answer as JSON or server-sent events."""
        cancel, started = threading.Event(), time.perf_counter()
        state = {}

        def begin() -> None:
            state["sampled"] = self.sampled

        def generated() -> int:
            return self.sampled - state["sampled"]

        if not body.stream or tools_auto:
            def job():
                begin()
                result = call(False, self.stopper(cancel))
                if tools_auto and parse_tool_calls(result["choices"][0]["message"]):
                    result["choices"][0]["finish_reason"] = "tool_calls"
                result["usage"] = self.account(kind, started, result["usage"]["completion_tokens"])
                return result

            future = self.submit(job)
            watcher = asyncio.create_task(self.watch_disconnect(request, cancel, future))
            try:
                result = await asyncio.wrap_future(future)
            except PROMPT_ERRORS as err:
                raise ApiError(400, str(err)) from err
            except asyncio.CancelledError:
                if future.cancelled():  # dropped from the queue: nobody is waiting for an answer
                    raise ApiError(499, "the client closed the request") from None
                raise
            finally:
                cancel.set()
                watcher.cancel()
            if not body.stream:
                return JSONResponse(result)
            items = list(as_chunks(result, body))
        else:
            def make():
                begin()
                yield from call(True, self.stopper(cancel))

            def finish() -> dict:
                return self.account(kind, started, generated())

            queue, future = self.stream(make, finish, cancel)
            watcher = asyncio.create_task(self.watch_disconnect(request, cancel, future))
            try:
                first = await queue.get()  # errors in the prompt (too long, ...) still get a status code
            finally:
                watcher.cancel()
            if isinstance(first, Exception):
                await queue.get()  # _DONE
                raise ApiError(400, str(first)) if isinstance(first, PROMPT_ERRORS) else first
            items = None

        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def events():
            try:
                for chunk in items or ():
                    yield sse(chunk)
                item, last = (first, None) if items is None else (_DONE, None)
                while item is not _DONE:
                    if isinstance(item, _Finished):
                        if include_usage and last is not None:
                            yield sse({"id": last["id"], "object": last["object"], "created": last["created"],
                                       "model": last["model"], "choices": [], "usage": item.usage})
                    elif isinstance(item, Exception):
                        log.error("internal error while streaming", exc_info=item)
                        yield sse(error_body("internal error (see the server's log)", "server_error"))
                    else:
                        last = item
                        yield sse(item)
                    item = await queue.get()
            finally:
                cancel.set()
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")
