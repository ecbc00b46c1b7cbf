"""`serve --parallel / --cache-ram / --cache-dir`: many conversations kept warm. A real server on
127.0.0.1 and the openai client."""
import concurrent.futures

import httpx
import openai
import pytest
from conftest import metric

BUDGET = 256
SMOL = ("--alias", "smol", "--kv-budget", str(BUDGET), "--kv-divide-length", "64", "--n-ctx", "8192", "--threads", "2")
# longer than the budget: every conversation is compressed before its first answer
SYSTEM = "You are a terse assistant for a team of gardeners. " + "Answer in one short sentence. " * 70
MiB = 2 ** 20


def client_of(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=600)


class Conversation:
    def __init__(self, client: openai.OpenAI, name: str, system: str = SYSTEM):
        self.client, self.name = client, name
        self.messages = [{"role": "system", "content": system}]

    def turn(self, text: str) -> tuple[str, int, int]:
        """Its next turn: the answer, the prompt's tokens, and how many of them were read (not cached)."""
        self.messages.append({"role": "user", "content": f"{self.name}: {text}"})
        reply = self.client.chat.completions.create(model="smol", messages=self.messages, max_tokens=10,
                                                    temperature=0)
        answer = reply.choices[0].message.content
        self.messages.append({"role": "assistant", "content": answer})
        usage = reply.usage
        return answer, usage.prompt_tokens, usage.prompt_tokens - usage.prompt_tokens_details.cached_tokens


def alternate(base: str, names: str, turns: int) -> dict[str, list[tuple[str, int, int]]]:
    conversations = {n: Conversation(client_of(base), n) for n in names}
    out = {n: [] for n in names}
    for t in range(turns):
        for n, c in conversations.items():
            out[n].append(c.turn(f"question {t}: name a flower."))
    return out


@pytest.fixture(scope="module")
def cached(server_factory, smollm2_centred):
    """One slot, a prompt cache in memory."""
    return server_factory(smollm2_centred, *SMOL, "--parallel", "1", "--cache-ram", "512")


def test_alternating_conversations_read_their_long_prompt_once(cached):
    turns = alternate(cached, "AB", 3)
    for name, rows in turns.items():
        first_read = rows[0][2]
        assert first_read > BUDGET or name == "B"  # A read everything; B shared the system prompt with A
        for _, prompt, read in rows[1:]:
            assert read <= 40, rows  # its own new turn (about 25 tokens), never the history again
    assert metric(cached, "triattention_prompt_cache_hits_total") >= 4
    # each restore saves what follows the system prompt (which the slot's other conversation shares)
    assert metric(cached, "triattention_prompt_cache_tokens_saved_total") >= 4 * 20


def test_a_new_conversation_sharing_the_system_prompt_reads_only_its_own_part(cached):
    Conversation(client_of(cached), "D").turn("name a tree.")
    _, prompt, read = Conversation(client_of(cached), "E").turn("name a herb.")
    assert prompt > 400 and read <= 30  # the system prompt came from the cache or the slot


@pytest.fixture(scope="module")
def no_cache(server_factory, smollm2_centred):
    """Two slots, no prompt cache: conversations never displaced."""
    return server_factory(smollm2_centred, *SMOL, "--parallel", "2", "--cache-ram", "0")


def test_answers_restored_from_the_cache_equal_those_never_displaced(cached, no_cache):
    warm = alternate(cached, "FG", 3)  # one slot: each turn restores its conversation from the cache
    kept = alternate(no_cache, "FG", 3)  # two slots: each conversation stays in its own
    assert [a for rows in warm.values() for a, _, _ in rows] == [a for rows in kept.values() for a, _, _ in rows]
    assert all(read <= 40 for rows in kept.values() for _, _, read in rows[1:])
    assert metric(no_cache, "triattention_prompt_cache_hits_total") == 0
    assert metric(no_cache, "triattention_prompt_cache_entries") == 0


def test_the_cache_stays_within_its_byte_limits(server_factory, smollm2_centred, tmp_path):
    base = server_factory(smollm2_centred, *SMOL, "--cache-ram", "16", "--cache-dir", str(tmp_path),
                          "--cache-dir-max", "24")
    for name in "HIJKL":
        Conversation(client_of(base), name, system=f"{name} says: " + SYSTEM).turn("name a fruit.")
        assert metric(base, "triattention_prompt_cache_bytes") <= 16 * MiB
        assert metric(base, "triattention_prompt_cache_disk_bytes") <= 24 * MiB
    assert metric(base, "triattention_prompt_cache_entries") >= 1  # a conversation (about 7 MiB) fits
    server_factory.stop(base)  # every write done
    files = list(tmp_path.glob("*.triastate"))
    assert 1 <= len(files) < 5 and sum(f.stat().st_size for f in files) <= 24 * MiB


def test_a_restarted_server_resumes_from_its_cache_dir_and_ignores_a_corrupt_file(server_factory, smollm2_centred,
                                                                                     tmp_path):
    args = (*SMOL, "--cache-dir", str(tmp_path))
    first = server_factory(smollm2_centred, *args)
    talk = Conversation(client_of(first), "M")
    answers = [talk.turn(f"question {t}: name a colour.") for t in range(3)]
    assert answers[0][2] > BUDGET
    server_factory.stop(first)
    files = sorted(tmp_path.glob("*.triastate"), key=lambda f: f.stat().st_mtime)
    assert len(files) == 1  # each turn's state replaced the one it continues
    (tmp_path / "broken.triastate").write_bytes(files[0].read_bytes()[:-1000])  # truncated
    (tmp_path / "foreign.triastate").write_bytes(b"not a state file")

    second = server_factory(smollm2_centred, *args)
    talk.client = client_of(second)
    _, prompt, read = talk.turn("question 3: name a colour.")
    assert prompt > 500 and read <= 30
    log = server_factory.log(second)
    assert "ignored foreign.triastate: " in log and "not a triattention-gguf state file" in log
    assert "ignored broken.triastate: " in log and "truncated or corrupt" in log

    other = server_factory(smollm2_centred, *SMOL[:3], "128", *SMOL[4:], "--cache-dir", str(tmp_path))
    _, prompt, read = Conversation(client_of(other), "M").turn("question 0: name a colour.")
    assert read == prompt  # entries of another budget are not this server's
    assert "saved with kv_budget = 256; this Llama has 128" in server_factory.log(other)


def test_slots_hold_their_conversations_and_concurrent_clients_get_their_own(server_factory, smollm2_centred):
    base = server_factory(smollm2_centred, *SMOL, "--parallel", "4")
    client = client_of(base)
    words = ["apple", "river", "candle", "marble", "violin", "pepper", "harbor", "lantern"]

    def talk(word: str) -> list[str]:
        prompt = f"{SYSTEM}\nThe code word is {word}. Code: {word}. Code: {word}. Code: {word}. Code:"
        out = []
        for _ in range(2):  # two turns: the second continues the first's conversation
            text = client.completions.create(model="smol", prompt=prompt, max_tokens=6, temperature=0).choices[0].text
            out.append(text)
            prompt += text + f" Code: {word}. Code:"
        return out

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = dict(zip(words, pool.map(talk, words)))
    for word, texts in answers.items():
        assert all(word in t for t in texts), (word, texts)
        assert not any(other in t for t in texts for other in words if other != word), (word, texts)
    slots = httpx.get(f"{base}/slots").json()
    assert [s["id"] for s in slots] == [0, 1, 2, 3] and httpx.get(f"{base}/props").json()["total_slots"] == 4
    for s in slots:
        assert s["n_tokens"] == s["logical_tokens"] > BUDGET and s["cells_used"] <= s["cells_capacity"]
        assert s["cells_used"] <= BUDGET + 64 and s["last_used"] > 0


def test_bench_serve_measures_agents_and_a_restart(smollm2_centred, tmp_path, capsys):
    import json

    from triattention_gguf.cli import main

    assert main(["bench-serve", smollm2_centred, "--system-tokens", "300", "--conversations", "2", "--turns", "2",
                 "--max-tokens", "4", "--kv-budget", "128", "--n-ctx", "2048", "--restart-tokens", "400",
                 "--threads", "2", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench-serve.json").read_text())["rows"]
    agents = {r["server"]: r for r in rows if r["case"] == "agents"}
    assert set(agents) == {"tri --parallel 1", "tri --parallel 2", "none --parallel 1", "none --parallel 2"}
    for row in agents.values():
        assert row["read_first"] >= 300 and row["read_later_max"] <= 40 and len(row["turns"]) == 4
    assert agents["tri --parallel 1"]["cache_entries"] >= 1 and agents["tri --parallel 2"]["cache_entries"] == 0
    assert agents["tri --parallel 1"]["entry_mib"] < agents["none --parallel 1"]["entry_mib"]
    restarts = {r["server"]: r for r in rows if r["case"] == "restart"}
    for row in restarts.values():
        assert row["first_read"] >= 400 and row["after_restart_read"] <= 40
    assert restarts["tri --cache-dir"]["entry_mib"] < restarts["none --cache-dir"]["entry_mib"]
    assert "| tri --parallel 1 |" in capsys.readouterr().out
