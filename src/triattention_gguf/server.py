"""`triattention-gguf serve`: an OpenAI-compatible HTTP server over one model with compressed
caches: its routes. What runs the requests (slots, prompt cache, the model's thread) is engine.py;
the API's request bodies and checks are openai_api.py."""
from __future__ import annotations

import contextlib
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import generate_latest
from starlette.exceptions import HTTPException

from triattention_gguf.engine import Engine, Metrics, ServeConfig
from triattention_gguf.openai_api import (ApiError, ChatRequest, CompletionRequest, check_max_tokens, check_messages,
                                          check_model, check_tools, completion_prompt, error_body, for_template,
                                          refuse_logprobs, response_format)

log = logging.getLogger("triattention_gguf.server")
__all__ = ["ServeConfig", "create_app"]


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
                await JSONResponse(error_body("missing or wrong API key (Authorization: Bearer ...)",
                                               "invalid_request_error", code="invalid_api_key"),
                                   status_code=401)(scope, receive, counted)
            else:
                await self.app(scope, receive, counted)
        finally:
            self.metrics.requests.labels(scope["path"], str(status["code"])).inc()


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, err: ApiError):
        return JSONResponse(error_body(str(err), err.kind, err.code, err.param), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, err: RequestValidationError):
        first = err.errors()[0]
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(f"the request body is not valid JSON ({first.get('ctx', {}).get('error')})",
                                            "invalid_request_error"), status_code=400)
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg')}" if where else first.get("msg", "invalid request")
        return JSONResponse(error_body(message, "invalid_request_error", param=where or None), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, err: HTTPException):
        return JSONResponse(error_body(str(err.detail), "invalid_request_error"), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, err: Exception):
        log.error("internal error", exc_info=err)  # the traceback goes to the log, not to the client
        return JSONResponse(error_body("internal error (see the server's log)", "server_error"), status_code=500)


def create_app(config: ServeConfig) -> FastAPI:
    engine = Engine(config)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        engine.close()

    app = FastAPI(title="triattention-gguf", version="0.1", lifespan=lifespan)
    app.state.engine = engine
    _add_error_handlers(app)
    app.add_middleware(_GateAndCount, api_key=config.api_key, metrics=engine.metrics)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body.model, config)
        check_max_tokens(body.max_tokens, "max_tokens", engine.llm.n_ctx())
        check_max_tokens(body.max_completion_tokens, "max_completion_tokens", engine.llm.n_ctx())
        refuse_logprobs(bool(body.logprobs) or body.top_logprobs is not None)
        check_messages(body.messages)
        check_tools(body.tools, body.tool_choice)
        fmt = response_format(body.response_format)
        tools = body.tools if body.tool_choice != "none" else None
        forced = isinstance(body.tool_choice, dict)

        def call(stream: bool, stopping):
            return engine.llm.create_chat_completion(
                messages=for_template(body.messages, engine.chat_template), tools=tools,
                tool_choice=body.tool_choice if forced else None,
                max_tokens=body.max_completion_tokens or body.max_tokens, temperature=body.temperature,
                top_p=body.top_p, seed=body.seed, stop=body.stop, stream=stream, response_format=fmt,
                presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                logits_processor=stopping, model=config.name)

        return await engine.respond(request, body, "chat", call, tools_auto=bool(tools) and not forced)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model, config)
        check_max_tokens(body.max_tokens, "max_tokens", engine.llm.n_ctx())
        refuse_logprobs(body.logprobs is not None)
        prompt = completion_prompt(body.prompt, engine.llm.n_vocab())

        def call(stream: bool, stopping):
            return engine.llm.create_completion(
                prompt=prompt, max_tokens=body.max_tokens or 16, temperature=body.temperature, top_p=body.top_p,
                seed=body.seed, stop=body.stop, stream=stream, echo=body.echo,
                presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                logits_processor=stopping, model=config.name)

        return await engine.respond(request, body, "completion", call, tools_auto=False)

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
            "total_slots": config.parallel,
            "model_path": config.model,
            "model_alias": config.name,
            "chat_template": template,
            "chat_template_caps": {"supports_tools": "tools" in template,
                                   "supports_tool_calls": "tool_calls" in template or "<tool_call>" in template,
                                   "supports_parallel_tool_calls": False},
            "kv_compress": {"method": config.kv_compress,
                            **{k.removeprefix("kv_"): v for k, v in engine.llm.kv_settings.items() if k != "kv_compress"},
                            **engine.slots.current.kv},
        }

    @app.get("/slots")
    async def slots():
        return engine.slots.describe()

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(engine.metrics.registry).decode(),
                                 media_type="text/plain; version=0.0.4")

    log.info(engine.startup_line())
    return app
