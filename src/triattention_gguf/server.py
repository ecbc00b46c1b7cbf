"""`triattention-gguf serve`: an OpenAI-compatible HTTP server over one model with a compressed cache.

One model per process. Requests run one at a time, in arrival order, on a single worker thread
that alone touches the model; the event loop only parses, queues and streams. Between requests the
cache keeps its (compressed) state, and a prompt that extends the history it represents continues
from it (see Llama.generate). A client that disconnects stops its generation at the next token.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import jinja2
import jsonschema
import llama_cpp
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from llama_cpp.llama_grammar import LlamaGrammar
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from triattention_gguf.llama import Llama
from triattention_gguf.methods import DEFAULT_SELECT

log = logging.getLogger("triattention_gguf.server")
TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)
# what a prompt the model cannot take raises (longer than n_ctx, messages the template cannot render)
PROMPT_ERRORS = (ValueError, jinja2.TemplateError)
_DONE = object()


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
    kv_keep_recent: int = 0
    n_ctx: int = 0  # 0: the model's trained context
    n_gpu_layers: int = 0
    threads: int | None = None
    chat_format: str | None = None
    api_key: str | None = None

    @property
    def name(self) -> str:
        return self.alias or Path(self.model).name


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.code, self.param = status, kind, code, param


def _error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # fields we do not use are ignored, as OpenAI's own SDKs send some

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    n: int = Field(1, ge=1, le=1)


class ChatRequest(_Request):
    messages: list[dict] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("triattention_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("triattention_prompt_tokens", "prompt tokens of completed requests", registry=r)
        self.prompt_reused = Counter("triattention_prompt_tokens_reused", "prompt tokens served from the cache",
                                     registry=r)
        self.completion_tokens = Counter("triattention_completion_tokens", "generated tokens", registry=r)
        self.queue = Gauge("triattention_queue_depth", "requests waiting or running", registry=r)
        self.cells_used = Gauge("triattention_kv_cells_used", "KV cells in use", registry=r)
        self.cells_capacity = Gauge("triattention_kv_cells_capacity", "physical KV cells", registry=r)
        self.kv_bytes = Gauge("triattention_kv_bytes", "KV cache bytes allocated", registry=r)
        self.logical = Gauge("triattention_logical_tokens", "tokens of the conversation the cache represents",
                             registry=r)
        self.compressions = Gauge("triattention_compressions_total", "compressions since start", registry=r)
        self.compress_seconds = Gauge("triattention_compress_seconds_total", "seconds spent compressing", registry=r)

    def observe_cache(self, kv: dict) -> None:
        self.cells_used.set(kv["cells_used"])
        self.cells_capacity.set(kv["cells_capacity"])
        self.kv_bytes.set(kv["kv_bytes"])
        self.logical.set(kv["logical_pos"])
        self.compressions.set(kv["compressions"])
        self.compress_seconds.set(kv["compress_seconds"])


class Engine:
    """The model, its single worker thread, and what the server counts."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.llm = Llama(config.model, kv_compress=config.kv_compress, kv_budget=config.kv_budget,
                         kv_divide_length=config.kv_divide_length, kv_select=config.kv_select,
                         kv_keep_prompt=config.kv_keep_prompt, kv_keep_recent=config.kv_keep_recent,
                         n_ctx=config.n_ctx,
                         n_gpu_layers=config.n_gpu_layers, n_threads=config.threads, chat_format=config.chat_format,
                         verbose=False)
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.metrics = Metrics()
        self.metrics.observe_cache(self.llm.kv_stats())
        self.sampled = 0

    @property
    def chat_template(self) -> str:
        return self.llm.metadata.get("tokenizer.chat_template", "")

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


def _parse_tool_calls(message: dict) -> bool:
    """Turn <tool_call>{"name", "arguments"}</tool_call> blocks (Hermes/Qwen templates) of a message's
    content into OpenAI tool_calls; True when there were any."""
    text = message.get("content") or ""
    calls = []
    for block in TOOL_CALL.findall(text):
        try:
            call = json.loads(block)
            name, arguments = call["name"], call.get("arguments", {})
        except (ValueError, KeyError, TypeError):
            continue
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": name, "arguments": json.dumps(arguments)}})
    if calls:
        message["tool_calls"] = calls
        message["content"] = TOOL_CALL.sub("", text).strip() or None
    return bool(calls)


def _text_of(content: str | list | None) -> str:
    """A message's content as text: OpenAI's list of parts (which agents such as OpenClaw send) joined."""
    if not isinstance(content, list):
        return content or ""
    return "\n".join(part.get("text") or "" for part in content)  # parts checked by _check_messages


ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def _check_messages(messages: list[dict]) -> None:
    """Roles, contents and assistant tool calls that a chat template can render, else a 400 naming the field."""
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if message.get("role") not in ROLES:
            raise ApiError(400, f"{where}.role is {message.get('role')!r}; it must be one of {', '.join(ROLES)}",
                           param=f"{where}.role")
        content, calls = message.get("content"), message.get("tool_calls")
        if not (content is None or isinstance(content, (str, list))) or (content is None and not calls):
            raise ApiError(400, f"{where}.content must be a string or a list of text parts",
                           param=f"{where}.content")
        for part in content if isinstance(content, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("text", "input_text") or not isinstance(part.get("text") or "", str):
                raise ApiError(400, f"{where}.content: a part of type {kind!r} is not supported; this server "
                                    'takes text parts {"type": "text", "text": "..."}', param=f"{where}.content")
        if calls is None:
            continue
        if message["role"] != "assistant" or not isinstance(calls, list) or not all(
                isinstance(c, dict) and isinstance(c.get("function"), dict) and
                isinstance(c["function"].get("name"), str) and c["function"]["name"] and
                isinstance(c["function"].get("arguments", "{}"), (str, dict)) for c in calls):
            raise ApiError(400, f"{where}.tool_calls must be an assistant's list of "
                                '{"function": {"name": ..., "arguments": ...}}', param=f"{where}.tool_calls")


def _check_schema(schema, param: str, followed: bool) -> None:
    """A valid JSON schema, else a 400 naming the parameter; one that the output must follow (a
    forced tool call, a json_schema response format) must also compile to llama.cpp's grammar. A tool
    the model only reads about (tool_choice auto) may use what the grammar converter does not know."""
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as err:
        raise ApiError(400, f"{param} is not a valid JSON schema: {err.message}", param=param) from None
    if not followed:
        return
    try:
        LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
    except Exception as err:  # noqa: BLE001 - the converter asserts on what it does not understand
        raise ApiError(400, f"{param} is not a JSON schema this server can follow ({type(err).__name__}: "
                            f"{str(err)[:200]})", param=param) from None


def _check_tools(tools: list[dict] | None, tool_choice) -> None:
    forced = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, dict) and \
        isinstance(tool_choice.get("function"), dict) else None
    for i, tool in enumerate(tools or []):
        function = tool.get("function")
        if tool.get("type", "function") != "function" or not isinstance(function, dict) or \
                not isinstance(function.get("name"), str) or not function["name"]:
            raise ApiError(400, f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., '
                                '"parameters": {...}}}}', param=f"tools[{i}]")
        _check_schema(function.get("parameters", {"type": "object"}), f"tools[{i}].function.parameters",
                      followed=function["name"] == forced)
    if isinstance(tool_choice, dict):
        if not any(t["function"]["name"] == forced for t in tools or []):
            raise ApiError(400, "tool_choice names a function that is not in tools", param="tool_choice")
    elif tool_choice not in (None, "none", "auto"):
        raise ApiError(400, f"tool_choice {tool_choice!r} is not supported; use none, auto or "
                            '{"type": "function", "function": {"name": ...}}', param="tool_choice")


def _tool_call_block(function: dict) -> str:
    """An OpenAI tool call's function as the <tool_call> block that _parse_tool_calls reads back."""
    arguments = json.loads(function.get("arguments") or "{}")
    return f"<tool_call>\n{json.dumps({'name': function['name'], 'arguments': arguments})}\n</tool_call>"


def _for_template(messages: list[dict], template: str) -> list[dict]:
    """Messages as every chat template can render them: content always text, and an assistant's
    tool calls written into its content (as <tool_call> blocks) when the template has no tool_calls."""
    out = []
    for message in messages:
        message = {**message, "content": _text_of(message.get("content"))}
        if message.get("tool_calls") and "tool_calls" not in template:
            calls = "".join(_tool_call_block(call["function"]) for call in message["tool_calls"])
            message["content"] = (message["content"] + "\n" + calls).strip()
        out.append(message)
    return out


def _response_format(spec: dict | None) -> dict | None:
    """OpenAI's response_format in llama-cpp-python's terms (json_object, with a schema if given)."""
    if spec is None or spec.get("type") == "text":
        return None
    if spec.get("type") == "json_object":
        return {"type": "json_object"}
    if spec.get("type") == "json_schema":
        schema = (spec.get("json_schema") or {}).get("schema", {})
        _check_schema(schema, "response_format.json_schema.schema", followed=True)
        return {"type": "json_object", "schema": schema}
    raise ApiError(400, f"response_format type {spec.get('type')!r} is not supported; use text, json_object or "
                        "json_schema", param="response_format")


def _sse(item: dict | str) -> str:
    return f"data: {item if isinstance(item, str) else json.dumps(item)}\n\n"


class _GateAndCount:
    """Checks the API key (all but /health) and counts responses by path and status. Plain ASGI:
    Starlette's BaseHTTPMiddleware would hide a client's disconnect from the endpoints."""

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app, self.metrics = app, metrics
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.expected and scope["path"] != "/health" and \
                    dict(scope["headers"]).get(b"authorization") != self.expected:
                await JSONResponse(_error_body("missing or wrong API key (Authorization: Bearer ...)",
                                               "invalid_request_error", code="invalid_api_key"),
                                   status_code=401)(scope, receive, counted)
            else:
                await self.app(scope, receive, counted)
        finally:
            self.metrics.requests.labels(scope["path"], str(status["code"])).inc()


def create_app(config: ServeConfig) -> FastAPI:
    engine = Engine(config)
    app = FastAPI(title="triattention-gguf", version="0.1")
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, err: ApiError):
        return JSONResponse(_error_body(str(err), err.kind, err.code, err.param), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, err: RequestValidationError):
        first = err.errors()[0]
        if first.get("type") == "json_invalid":
            return JSONResponse(_error_body(f"the request body is not valid JSON ({first.get('ctx', {}).get('error')})",
                                            "invalid_request_error"), status_code=400)
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg')}" if where else first.get("msg", "invalid request")
        return JSONResponse(_error_body(message, "invalid_request_error", param=where or None), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, err: HTTPException):
        return JSONResponse(_error_body(str(err.detail), "invalid_request_error"), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, err: Exception):
        log.error("internal error", exc_info=err)  # the traceback goes to the log, not to the client
        return JSONResponse(_error_body("internal error (see the server's log)", "server_error"), status_code=500)

    app.add_middleware(_GateAndCount, api_key=config.api_key, metrics=engine.metrics)

    def check_model(name: str | None) -> None:
        if name not in (None, "", config.name, Path(config.model).name, config.model):
            raise ApiError(404, f"model {name!r} is not served here; this server serves {config.name!r}",
                           code="model_not_found", param="model")

    def refuse_logprobs(asked: bool) -> None:
        if asked:  # llama-cpp-python computes them only with logits_all: every position's logits kept
            raise ApiError(400, "logprobs are not available from this server (the model runs without "
                                "logits_all, which would keep the logits of every position)", param="logprobs")

    def check_max_tokens(value: int | None, param: str) -> None:
        if value is not None and value > engine.llm.n_ctx():
            raise ApiError(400, f"{param} {value} exceeds the context of {engine.llm.n_ctx()} tokens", param=param)

    async def watch_disconnect(request: Request, cancel: threading.Event, job: concurrent.futures.Future) -> None:
        """A client that left stops its generation at the next token; a queued job is dropped at once."""
        while not cancel.is_set():
            if await request.is_disconnected():
                cancel.set()
                job.cancel()
            await asyncio.sleep(0.1)

    def account(kind: str, started: float, before: dict, completion_tokens: int) -> dict:
        prompt = engine.llm.prompt_reuse()
        kv = engine.llm.kv_stats()
        m = engine.metrics
        m.prompt_tokens.inc(prompt["tokens"])
        m.prompt_reused.inc(prompt["reused"])
        m.completion_tokens.inc(completion_tokens)
        m.observe_cache(kv)
        log.info("%s prompt=%d reused=%d completion=%d compressions=+%d cells=%d/%d logical=%d %.2fs", kind,
                 prompt["tokens"], prompt["reused"], completion_tokens, kv["compressions"] - before["compressions"],
                 kv["cells_used"], kv["cells_capacity"], kv["logical_pos"], time.perf_counter() - started)
        return {"prompt_tokens": prompt["tokens"], "completion_tokens": completion_tokens,
                "total_tokens": prompt["tokens"] + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": prompt["reused"]}}

    async def respond(request: Request, body: _Request, kind: str, call: Callable[..., Any], tools_auto: bool):
        """Run call(stream, stopping_criteria) and answer as JSON or server-sent events."""
        cancel, started = threading.Event(), time.perf_counter()
        state = {}

        def begin() -> None:
            state["before"] = engine.llm.kv_stats()
            state["sampled"] = engine.sampled

        def generated() -> int:
            return engine.sampled - state["sampled"]

        if not body.stream or tools_auto:
            def job():
                begin()
                result = call(False, engine.stopper(cancel))
                if tools_auto and _parse_tool_calls(result["choices"][0]["message"]):
                    result["choices"][0]["finish_reason"] = "tool_calls"
                result["usage"] = account(kind, started, state["before"], result["usage"]["completion_tokens"])
                return result

            future = engine.submit(job)
            watcher = asyncio.create_task(watch_disconnect(request, cancel, future))
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
            items = list(_as_chunks(result, body))
        else:
            def make():
                begin()
                yield from call(True, engine.stopper(cancel))

            def finish() -> dict:
                return account(kind, started, state["before"], generated())

            queue, future = engine.stream(make, finish, cancel)
            watcher = asyncio.create_task(watch_disconnect(request, cancel, future))
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
                    yield _sse(chunk)
                item, last = (first, None) if items is None else (_DONE, None)
                while item is not _DONE:
                    if isinstance(item, _Finished):
                        if include_usage and last is not None:
                            yield _sse({"id": last["id"], "object": last["object"], "created": last["created"],
                                        "model": last["model"], "choices": [], "usage": item.usage})
                    elif isinstance(item, Exception):
                        log.error("internal error while streaming", exc_info=item)
                        yield _sse(_error_body("internal error (see the server's log)", "server_error"))
                    else:
                        last = item
                        yield _sse(item)
                    item = await queue.get()
            finally:
                cancel.set()
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body.model)
        check_max_tokens(body.max_tokens, "max_tokens")
        check_max_tokens(body.max_completion_tokens, "max_completion_tokens")
        refuse_logprobs(bool(body.logprobs) or body.top_logprobs is not None)
        _check_messages(body.messages)
        _check_tools(body.tools, body.tool_choice)
        fmt = _response_format(body.response_format)
        tools = body.tools if body.tool_choice != "none" else None
        forced = isinstance(body.tool_choice, dict)

        def call(stream: bool, stopping):
            return engine.llm.create_chat_completion(
                messages=_for_template(body.messages, engine.chat_template), tools=tools, tool_choice=body.tool_choice if forced else None,
                max_tokens=body.max_completion_tokens or body.max_tokens, temperature=body.temperature,
                top_p=body.top_p, seed=body.seed, stop=body.stop, stream=stream, response_format=fmt,
                presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                logits_processor=stopping, model=config.name)

        return await respond(request, body, "chat", call, tools_auto=bool(tools) and not forced)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        check_max_tokens(body.max_tokens, "max_tokens")
        refuse_logprobs(body.logprobs is not None)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, "one prompt per request", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, list):
            n_vocab = engine.llm.n_vocab()
            if not prompt or not all(0 <= t < n_vocab for t in prompt):
                raise ApiError(400, f"prompt: a list of token ids must be non-empty, each in [0, {n_vocab})",
                               param="prompt")

        def call(stream: bool, stopping):
            return engine.llm.create_completion(
                prompt=prompt, max_tokens=body.max_tokens or 16, temperature=body.temperature, top_p=body.top_p,
                seed=body.seed, stop=body.stop, stream=stream, echo=body.echo,
                presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                logits_processor=stopping, model=config.name)

        return await respond(request, body, "completion", call, tools_auto=False)

    def model_list():
        return {"object": "list", "data": [{"id": config.name, "object": "model", "created": int(time.time()),
                                            "owned_by": "triattention-gguf"}]}

    app.get("/v1/models")(model_list)
    app.get("/models")(model_list)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/props")
    async def props():
        template = engine.chat_template
        return {
            "default_generation_settings": {"n_ctx": engine.llm.n_ctx(), "model": config.model,
                                            "params": {"temperature": 1.0, "top_p": 1.0}},
            "total_slots": 1,
            "model_path": config.model,
            "model_alias": config.name,
            "chat_template": template,
            "chat_template_caps": {"supports_tools": "tools" in template,
                                   "supports_tool_calls": "tool_calls" in template or "<tool_call>" in template,
                                   "supports_parallel_tool_calls": False},
            "kv_compress": {"method": config.kv_compress, "budget": config.kv_budget,
                            "divide_length": config.kv_divide_length, "select": config.kv_select,
                            "keep_prompt": config.kv_keep_prompt, "keep_recent": config.kv_keep_recent,
                            **engine.llm.kv_stats()},
        }

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(engine.metrics.registry).decode(),
                                 media_type="text/plain; version=0.0.4")

    kv = engine.llm.kv_stats()
    window = kv["swa_kv_bytes"]  # a sliding-window model's window cache, the same with or without compression
    full = (kv["kv_bytes"] - window) * engine.llm.n_ctx() // max(1, kv["cells_capacity"]) + window
    swa = (f" + {kv['swa_cells_capacity']} sliding-window cells (llama.cpp's own)"
           if kv["swa_cells_capacity"] else "")
    log.info("serving %s as %r: n_ctx %d, kv_compress %s, budget %d: %d KV cells%s, %.1f MiB (a full cache of "
             "n_ctx would take %.1f MiB)", config.model, config.name, engine.llm.n_ctx(), config.kv_compress,
             config.kv_budget, kv["cells_capacity"], swa, kv["kv_bytes"] / 2**20, full / 2**20)
    return app


def _as_chunks(result: dict, body: _Request) -> Iterator[dict]:
    """A finished chat completion as the chunks a stream would have carried."""
    base = {"id": result["id"], "object": "chat.completion.chunk", "created": result["created"],
            "model": result["model"]}
    choice = result["choices"][0]
    message = choice["message"]
    delta = {"role": "assistant", "content": message.get("content")}
    if message.get("tool_calls"):
        delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
    yield {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}]}
    if (body.stream_options or {}).get("include_usage"):
        yield {**base, "choices": [], "usage": result["usage"]}
