"""`triattention-gguf serve`: a real server on 127.0.0.1, real clients (the openai package, httpx)."""
import concurrent.futures
import json
import time

import httpx
import openai
import pytest
from conftest import metric

BUDGET = 256
SMOL = ("--alias", "smol", "--kv-budget", str(BUDGET), "--kv-divide-length", "64", "--n-ctx", "8192", "--threads", "2")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def base(server_factory, smollm2_centred):
    return server_factory(smollm2_centred, *SMOL)


@pytest.fixture
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=600)


def test_chat_models_and_completions(client):
    assert [m.id for m in client.models.list().data] == ["smol"]
    messages = [{"role": "user", "content": "Name a colour."}]
    reply = client.chat.completions.create(model="smol", messages=messages, max_tokens=12, temperature=0)
    text = reply.choices[0].message.content
    assert text and reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 5
    stream = client.chat.completions.create(model="smol", messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again: reused
    done = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert done.choices[0].text and done.usage.prompt_tokens == 5


def test_tool_call_round_trip(client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client.chat.completions.create(model="smol", messages=messages, tools=[WEATHER], max_tokens=64,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = reply.choices[0].message.tool_calls[0]
    assert reply.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    messages += [reply.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21})}]
    answer = client.chat.completions.create(model="smol", messages=messages, tools=[WEATHER], max_tokens=24)
    choice = answer.choices[0]
    assert choice.message.content or choice.message.tool_calls  # the model decides; the protocol holds
    streamed = list(client.chat.completions.create(model="smol", messages=messages[:1], tools=[WEATHER],
                                                   max_tokens=64, stream=True,
                                                   tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    deltas = [tc for c in streamed if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].function.name == "get_weather"
    assert json.loads("".join(d.function.arguments or "" for d in deltas))["city"]


def test_long_agent_conversation_reuses_the_compressed_cache(base, client):
    system = "You are a terse assistant. Notes for the session follow.\n" + ("Keep answers short. " * 60)
    messages = [{"role": "system", "content": system}]
    reused_before, compressions_before = metric(base, "triattention_prompt_tokens_reused_total"), \
        metric(base, "triattention_compressions_total")
    read = []
    for turn in range(20):
        messages.append({"role": "user", "content": f"Step {turn}: give one word for a kind of weather."})
        reply = client.chat.completions.create(model="smol", messages=messages, max_tokens=16, temperature=0)
        assert reply.choices[0].message.content is not None
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
        usage = reply.usage
        read.append(usage.prompt_tokens - usage.prompt_tokens_details.cached_tokens)
    props = httpx.get(f"{base}/props").json()
    assert props["kv_compress"]["logical_pos"] > 3 * BUDGET  # the conversation outgrew the budget
    assert metric(base, "triattention_compressions_total") > compressions_before
    assert metric(base, "triattention_prompt_tokens_reused_total") - reused_before > 10 * usage.prompt_tokens
    assert max(read[1:]) < 60, read  # each turn reads its new message (and the re-tokenized tail), not the history


def test_concurrent_clients_get_their_own_answers(base):
    def ask(i: int) -> tuple[int, str, int]:
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=600)
        prompt = "Count: " + " ".join(str(n) for n in range(i % 8 + 1))
        r = c.completions.create(model="smol", prompt=prompt, max_tokens=4, temperature=0)
        return i % 8, r.choices[0].text, r.usage.prompt_tokens

    sequential = {k: ask(k)[1:] for k in range(8)}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, range(80)))
    assert len(results) == 80
    for key, text, prompt_tokens in results:
        assert (text, prompt_tokens) == sequential[key]


def test_a_client_that_leaves_frees_the_slot(base, client):
    with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=600, json={
            "model": "smol", "max_tokens": 4000, "stream": True,
            "messages": [{"role": "user", "content": "Write a very long story."}]}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                break  # leave after the first token
    start = time.perf_counter()
    reply = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert reply.choices[0].message.content is not None
    assert time.perf_counter() - start < 60  # not behind 4000 abandoned tokens (~30 tokens/s here)
    assert metric(base, "triattention_queue_depth") == 0


def test_bad_requests_get_clear_4xx(base, client, server_factory, smollm2_centred):
    bad_json = httpx.post(f"{base}/v1/chat/completions", content=b"{bad", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}], max_tokens=-1)
    with pytest.raises(openai.BadRequestError, match="exceed context window"):
        client.completions.create(model="smol", prompt="word " * 9000, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="exceed context window"):
        list(client.completions.create(model="smol", prompt="word " * 9000, max_tokens=4, stream=True))
    locked = server_factory(smollm2_centred, *SMOL, "--api-key", "sesame")
    assert httpx.get(f"{locked}/health").status_code == 200
    with pytest.raises(openai.AuthenticationError, match="API key"):
        openai.OpenAI(base_url=f"{locked}/v1", api_key="wrong").models.list()
    assert openai.OpenAI(base_url=f"{locked}/v1", api_key="sesame").models.list().data[0].id == "smol"
    assert httpx.get(f"{locked}/metrics").status_code == 401


@pytest.mark.parametrize("flag, value, message", [("--kv-keep-recent", "-1", "must be 0 or a positive integer"),
                                                    ("--cache-ram", "-5", "must be 0 or a positive integer"),
                                                    ("--parallel", "0", "must be a positive integer"),
                                                    ("--kv-horizon", "0", "must be a positive integer"),
                                                    ("--kv-min-concentration", "1.5", "must be a number from 0 to 1"),
                                                    ("--kv-min-concentration", "x", "must be a number from 0 to 1")])
def test_serve_refuses_bad_numbers_before_loading(flag, value, message, capsys):
    from triattention_gguf.cli import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", "model.gguf", flag, value])
    assert exited.value.code == 2 and f"{flag}: {message}, not {value}" in capsys.readouterr().err


def test_props_and_metrics_describe_the_server(base):
    props = httpx.get(f"{base}/props").json()
    assert props["default_generation_settings"]["n_ctx"] == 8192 and props["model_alias"] == "smol"
    assert "<|im_start|>" in props["chat_template"] and props["total_slots"] == 1
    assert props["kv_compress"]["method"] == "tri" and props["kv_compress"]["cells_capacity"] < 8192
    text = httpx.get(f"{base}/metrics").text
    for name in ("triattention_requests_total", "triattention_prompt_tokens_reused_total",
                 "triattention_kv_cells_used", "triattention_kv_cells_capacity", "triattention_compressions_total",
                 "triattention_compress_seconds_total"):
        assert f"\n{name}" in text, name


def test_a_sliding_window_model_is_served_compressed(server_factory, gemma3_path, tmp_path):
    """Gemma 3: its full-attention cache is compressed; /props reports the window cache beside it."""
    from conftest import centred_copy

    gemma = server_factory(centred_copy(gemma3_path, tmp_path / "gemma3.gguf", 256), "--alias", "gemma",
                           "--kv-budget", "128", "--kv-divide-length", "32", "--n-ctx", "4096", "--threads", "2",
                           "--kv-select", "per-head", "--kv-keep-prompt", "--kv-keep-recent", "32",
                           "--kv-horizon", "8", "--kv-min-concentration", "0.5")
    client = openai.OpenAI(base_url=f"{gemma}/v1", api_key="unused", timeout=600)
    out = client.completions.create(model="gemma", prompt="Once upon a time", max_tokens=1200, temperature=0)
    kv = httpx.get(f"{gemma}/props").json()["kv_compress"]
    assert out.usage.completion_tokens == 1200 and kv["compressions"] > 0
    assert kv["swa_cells_capacity"] > 0 and kv["cells_used"] <= 128 + 32
    assert kv["select"] == "per-head" and kv["keep_prompt"] is True and kv["keep_recent"] == 32 and kv["horizon"] == 8
    assert kv["min_concentration"] == 0.5
    assert kv["logical_pos"] > kv["cells_capacity"]


USER = {"role": "user", "content": "Hi"}
BAD_SCHEMA = {"type": "objectx"}
UNFOLLOWABLE = {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}  # valid JSON schema, no grammar
BAD_REQUESTS = {  # name: (endpoint, body changes, the parameter the error must name)
    "content a number": ("chat", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    "role bogus": ("chat", {"messages": [{"role": "bogus", "content": "Hi"}]}, "messages[0].role"),
    "tool call without a name": ("chat", {"messages": [USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"arguments": "{}"}}]}]}, "messages[1].tool_calls"),
    "tool calls a string": ("chat", {"messages": [USER, {"role": "assistant", "content": "x",
                                                         "tool_calls": "get_weather"}]}, "messages[1].tool_calls"),
    "text part not a string": ("chat", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
                               "messages[0].content"),
    "image part": ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:,"}}]}]}, "messages[0].content"),
    "max_tokens 1e12": ("chat", {"max_tokens": 1e12}, "max_tokens"),
    "max_tokens 2^70": ("chat", {"max_tokens": 2 ** 70}, "max_tokens"),
    "max_tokens 2^70 on completions": ("completions", {"max_tokens": 2 ** 70}, "max_tokens"),
    "tool schema invalid": ("chat", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": BAD_SCHEMA}}]}, "tools[0].function.parameters"),
    "tool without function": ("chat", {"tools": [{"type": "function"}]}, "tools[0]"),
    "forced tool schema the grammar cannot follow": ("chat", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": UNFOLLOWABLE}}], "tool_choice": {"type": "function", "function": {"name": "f"}}},
        "tools[0].function.parameters"),
    "tool_choice bogus": ("chat", {"tools": [WEATHER], "tool_choice": "bogus"}, "tool_choice"),
    "json_schema invalid": ("chat", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": BAD_SCHEMA}}}, "response_format.json_schema.schema"),
    "token id out of range": ("completions", {"prompt": [1, 10 ** 7]}, "prompt"),
    "token id negative": ("completions", {"prompt": [1, -3]}, "prompt"),
    "empty token list": ("completions", {"prompt": []}, "prompt"),
    "logprobs on chat": ("chat", {"logprobs": True, "top_logprobs": 2}, "logprobs"),
    "logprobs on completions": ("completions", {"logprobs": 2}, "logprobs"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_request_table(case, base):
    endpoint, changes, param = BAD_REQUESTS[case]
    body = {"model": "smol", "max_tokens": 4, **({"messages": [USER]} if endpoint == "chat" else {"prompt": "Hi"}),
            **changes}
    r = httpx.post(f"{base}/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert param.split("[")[0] in error["message"] and "Traceback" not in error["message"]


def test_usage_counts_each_requests_own_tokens(base, client):
    """A streamed request's usage is its own, even with another request queued behind it."""
    def streamed_usage():
        stream = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Count to ten."}],
                                                max_tokens=24, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        return [chunk.usage for chunk in stream if chunk.usage][0]

    alone = streamed_usage()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(streamed_usage)
        time.sleep(0.3)
        other = pool.submit(client.completions.create, model="smol", prompt="word " * 300, max_tokens=16)
        queued = first.result()
        other.result()
    assert (queued.prompt_tokens, queued.completion_tokens) == (alone.prompt_tokens, alone.completion_tokens)


def test_clients_that_leave_are_cancelled_running_or_queued(base, client):
    long = {"model": "smol", "max_tokens": 4000, "messages": [{"role": "user", "content": "Write a very long story."}]}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        leavers = [pool.submit(httpx.post, f"{base}/v1/chat/completions", json=long, timeout=2) for _ in range(3)]
        for leaver in leavers:  # a non-streaming client that times out, while running or still queued
            with pytest.raises(httpx.TimeoutException):
                leaver.result()
    start = time.perf_counter()
    reply = client.chat.completions.create(model="smol", messages=[USER], max_tokens=4)
    assert reply.choices[0].message.content is not None
    assert time.perf_counter() - start < 20  # not behind 3 x 4000 abandoned tokens (~30 tokens/s here)
    assert metric(base, "triattention_queue_depth") == 0


def test_a_tool_the_model_only_reads_about_may_use_any_valid_schema(client):
    """With tool_choice auto the schema only goes into the template: a valid schema the grammar
    converter cannot follow is accepted."""
    tool = {"type": "function", "function": {"name": "f", "parameters": UNFOLLOWABLE}}
    reply = client.chat.completions.create(model="smol", messages=[USER], tools=[tool], max_tokens=4)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
