"""`triattention-gguf bench-serve`: agent traffic against real servers (subprocesses on 127.0.0.1,
the openai client), the same traffic for each server configuration, one server at a time.

Agents: several conversations share one long system prompt and take turns in alternation; each
turn's prompt tokens, the tokens the server had to read (not served from a cache), and the wall
time are recorded, with the prompt cache's entries and bytes at the end. Restart: one long
conversation, the server stopped and started again on the same --cache-dir, the next turn timed.
"""
from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import llama_cpp
import openai
from prometheus_client.parser import text_string_to_metric_families

QUESTIONS = ["Summarise the rule above that matters most for my task.", "Which part of it is easiest to get wrong?",
             "Give one short example.", "What would you check first?", "Anything else to keep in mind?"]


@contextlib.contextmanager
def served(model: str, args: list[str], log_path: Path):
    """`triattention-gguf serve model args` on a free port until the block ends (stopped as by Ctrl-C)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "triattention_gguf.cli", "serve", model, "--port", str(port),
                                 "--alias", "bench", *args], stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the server exited; its log: {log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                        break
                time.sleep(0.2)
            yield base
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()


def metrics(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics").text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if not s.labels}


def text_of_tokens(model: str, text: str, n: int) -> str:
    """The first n tokens of text (by model's tokenizer), as text."""
    vocab = llama_cpp.Llama(model, vocab_only=True, verbose=False)
    return vocab.detokenize(vocab.tokenize(text.encode(), add_bos=False)[:n]).decode("utf-8", "ignore")


def _turn(client: openai.OpenAI, messages: list[dict], max_tokens: int) -> dict:
    start = time.perf_counter()
    reply = client.chat.completions.create(model="bench", messages=messages, max_tokens=max_tokens, temperature=0)
    seconds = time.perf_counter() - start
    messages.append({"role": "assistant", "content": reply.choices[0].message.content or ""})
    usage = reply.usage
    return {"prompt_tokens": usage.prompt_tokens, "read": usage.prompt_tokens - usage.prompt_tokens_details.cached_tokens,
            "seconds": seconds}


def agents(model: str, args: list[str], system: str, n_conversations: int, turns: int, max_tokens: int,
           log_path: Path) -> dict:
    """n_conversations sharing the system prompt, `turns` turns each in alternation: per turn and summed."""
    with served(model, args, log_path) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=3600)
        chats = [[{"role": "system", "content": system}] for _ in range(n_conversations)]
        per_turn = []
        for t in range(turns):
            for i, messages in enumerate(chats):
                messages.append({"role": "user", "content": f"[agent {i}] {QUESTIONS[t % len(QUESTIONS)]}"})
                per_turn.append({"conversation": i, "turn": t, **_turn(client, messages, max_tokens)})
        m = metrics(base)
        kv = httpx.get(f"{base}/props").json()["kv_compress"]
    later = per_turn[1:]
    entries = m["triattention_prompt_cache_entries"]
    return {"prompt_tokens": sum(r["prompt_tokens"] for r in per_turn), "read": sum(r["read"] for r in per_turn),
            "read_first": per_turn[0]["read"], "read_later_max": max(r["read"] for r in later),
            "seconds": sum(r["seconds"] for r in per_turn), "seconds_first": per_turn[0]["seconds"],
            "seconds_later_median": sorted(r["seconds"] for r in later)[len(later) // 2],
            "cache_entries": entries, "entry_mib": m["triattention_prompt_cache_bytes"] / max(1, entries) / 2**20,
            "slot_kv_mib": kv["kv_bytes"] / 2**20, "turns": per_turn}


def restart(model: str, args: list[str], system: str, max_tokens: int, cache_dir: Path, log_dir: Path) -> dict:
    """One conversation with a long first prompt; the server restarted on cache_dir before its next turn."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": QUESTIONS[0]}]
    args = [*args, "--cache-dir", str(cache_dir)]
    with served(model, args, log_dir / "restart-1.log") as base:
        first = _turn(openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=3600), messages, max_tokens)
    files = list(cache_dir.glob("*.triastate"))  # the next turn's file replaces this one
    entry_mib = sum(f.stat().st_size for f in files) / max(1, len(files)) / 2**20
    messages.append({"role": "user", "content": QUESTIONS[1]})
    with served(model, args, log_dir / "restart-2.log") as base:
        second = _turn(openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=3600), messages, max_tokens)
    return {"first_prompt": first["prompt_tokens"], "first_read": first["read"], "first_seconds": first["seconds"],
            "entry_mib": entry_mib,
            "after_restart_prompt": second["prompt_tokens"], "after_restart_read": second["read"],
            "after_restart_seconds": second["seconds"]}


def bench_serve(model: str, text: str, system_tokens: int, n_conversations: int, turns: int, max_tokens: int,
                budget: int, n_ctx: int, restart_tokens: int, threads: int | None, out: Path) -> list[dict]:
    """Rows: the agent traffic on tri and the full cache, each with one slot and the prompt cache and
    with a slot per conversation; then (restart_tokens > 0) the restart on both."""
    out.mkdir(parents=True, exist_ok=True)
    common = ["--kv-budget", str(budget), "--n-ctx", str(n_ctx), *(["--threads", str(threads)] if threads else [])]
    system = text_of_tokens(model, text, system_tokens)
    rows = []
    for method in ("tri", "none"):
        for parallel in (1, n_conversations):
            args = [*common, "--kv-compress", method, "--parallel", str(parallel)]
            name = f"{method} --parallel {parallel}"
            row = agents(model, args, system, n_conversations, turns, max_tokens, out / f"{method}-{parallel}.log")
            rows.append({"model": Path(model).name, "case": "agents", "server": name, **row})
    if restart_tokens:
        system = text_of_tokens(model, text, restart_tokens)
        for method in ("tri", "none"):
            cache_dir = out / f"cache-{method}"
            for stale in cache_dir.glob("*.triastate"):
                stale.unlink()
            row = restart(model, [*common, "--kv-compress", method], system, max_tokens, cache_dir, out)
            rows.append({"model": Path(model).name, "case": "restart", "server": f"{method} --cache-dir", **row})
    return rows
