"""The OpenAI API's side of `serve`: request bodies, their checks (each failure a 400 that names the
field), tool calls in and out of a chat template's text, and server-sent events."""
from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import jinja2
import jsonschema
from llama_cpp.llama_grammar import LlamaGrammar
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from triattention_gguf.engine import ServeConfig

TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)
# what a prompt the model cannot take raises (longer than n_ctx, messages the template cannot render)
PROMPT_ERRORS = (ValueError, jinja2.TemplateError)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.code, self.param = status, kind, code, param


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class BaseRequest(BaseModel):
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


class ChatRequest(BaseRequest):
    messages: list[dict] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(BaseRequest):
    prompt: str | list[int] | list[str]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


def check_model(name: str | None, config: ServeConfig) -> None:
    if name not in (None, "", config.name, Path(config.model).name, config.model):
        raise ApiError(404, f"model {name!r} is not served here; this server serves {config.name!r}",
                       code="model_not_found", param="model")


def refuse_logprobs(asked: bool) -> None:
    if asked:  # llama-cpp-python computes them only with logits_all: every position's logits kept
        raise ApiError(400, "logprobs are not available from this server (the model runs without "
                            "logits_all, which would keep the logits of every position)", param="logprobs")


def check_max_tokens(value: int | None, param: str, n_ctx: int) -> None:
    if value is not None and value > n_ctx:
        raise ApiError(400, f"{param} {value} exceeds the context of {n_ctx} tokens", param=param)


def completion_prompt(prompt: str | list[int] | list[str], n_vocab: int) -> str | list[int]:
    """A completion request's prompt: a text, or a non-empty list of token ids below n_vocab."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise ApiError(400, "one prompt per request", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, list) and (not prompt or not all(0 <= t < n_vocab for t in prompt)):
        raise ApiError(400, f"prompt: a list of token ids must be non-empty, each in [0, {n_vocab})", param="prompt")
    return prompt


def parse_tool_calls(message: dict) -> bool:
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
    return "\n".join(part.get("text") or "" for part in content)  # parts checked by check_messages


ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def check_messages(messages: list[dict]) -> None:
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


def check_tools(tools: list[dict] | None, tool_choice) -> None:
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
    """An OpenAI tool call's function as the <tool_call> block that parse_tool_calls reads back."""
    arguments = json.loads(function.get("arguments") or "{}")
    return f"<tool_call>\n{json.dumps({'name': function['name'], 'arguments': arguments})}\n</tool_call>"


def for_template(messages: list[dict], template: str) -> list[dict]:
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


def response_format(spec: dict | None) -> dict | None:
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


def sse(item: dict | str) -> str:
    return f"data: {item if isinstance(item, str) else json.dumps(item)}\n\n"


def as_chunks(result: dict, body: BaseRequest) -> Iterator[dict]:
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
