"""`triattention-gguf tune`: the measured choice of tri's defaults, stored with the centres and used
by Llama and serve unless other settings are given."""
import dataclasses

import httpx
import numpy as np
import pytest

from triattention_gguf import Llama
from triattention_gguf.centers import read_centers, rewrite_model
from triattention_gguf.cli import main
from triattention_gguf.methods import MAX_HORIZON, TUNED_SPECS
from triattention_gguf.tuning import Cell, choose

HYBRID = "tri+recent+horizon4"
BUDGET = 64


@pytest.fixture(scope="module")
def tuned(smollm2_centred, tmp_path_factory):
    """A copy of the centred test model whose stored tuning is the hybrid."""
    out = tmp_path_factory.mktemp("tuned") / "tuned.gguf"
    rewrite_model(smollm2_centred, dataclasses.replace(read_centers(smollm2_centred), tuned=HYBRID), out)
    return str(out)


def test_tune_measures_every_candidate_and_stores_its_choice(smollm2_centred, tmp_path, capsys):
    out = tmp_path / "out.gguf"
    assert main(["tune", smollm2_centred, "-o", str(out), "--tokens", "512", "--prompts", "1", "--generate", "96",
                 "--threads", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    cells = [line for line in printed.splitlines() if line.startswith(("| text", "| generate"))]
    assert len(cells) == 4  # two settings x two budgets
    for line in cells:  # every spec measured: a KL per spec, an interval per candidate
        values = [v.strip() for v in line.strip("|").split("|")]
        assert all(np.isfinite(float(v)) and float(v) >= 0 for v in values[2:2 + len(TUNED_SPECS)])
        assert all("[" in v for v in values[2 + len(TUNED_SPECS):])
    choice = read_centers(out).tuned
    assert choice in TUNED_SPECS and f"chosen: {choice}" in printed
    assert np.array_equal(read_centers(out).q_mean, read_centers(smollm2_centred).q_mean)
    assert read_centers(smollm2_centred).tuned is None  # -o: the source is untouched


def test_tune_refuses_a_model_without_centres(smollm2_path, tmp_path, capsys):
    assert main(["tune", smollm2_path, "-o", str(tmp_path / "out.gguf")]) == 2
    assert "embed-centers" in capsys.readouterr().err and not (tmp_path / "out.gguf").exists()


def test_tune_refuses_an_unwritable_destination_before_measuring(smollm2_centred, tmp_path, capsys):
    assert main(["tune", smollm2_centred, "-o", str(tmp_path / "missing" / "out.gguf")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_tune_refuses_a_text_too_short(smollm2_centred, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("a few words of text. " * 20)
    assert main(["tune", smollm2_centred, "--text", str(short), "-o", str(tmp_path / "out.gguf"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the tuning text has" in err and "--text" in err and not (tmp_path / "out.gguf").exists()


def _cell(low: float, high: float) -> Cell:
    return Cell("text", BUDGET, {}, {HYBRID: ((low + high) / 2, low, high)})


def test_choose_takes_a_candidate_only_when_it_clearly_keeps_more():
    assert choose([_cell(-0.05, -0.01), _cell(-0.02, 0.01)], {HYBRID: (-0.02, -0.03, -0.01)}) == HYBRID
    assert choose([_cell(-0.05, -0.01)], {HYBRID: (-0.01, -0.03, 0.001)}) == "tri"  # pooled interval holds 0
    # clearly better pooled, clearly worse in one cell: the reference
    assert choose([_cell(-0.09, -0.05), _cell(0.001, 0.02)], {HYBRID: (-0.03, -0.05, -0.01)}) == "tri"
    assert choose([], {}) == "tri"


def _generate(path: str, **kv) -> tuple[list[int], dict]:
    llm = Llama(path, n_ctx=1024, n_threads=2, verbose=False, kv_compress=kv.pop("kv_compress", "tri"),
                kv_budget=BUDGET, kv_divide_length=32, **kv)
    prompt = llm.tokenize(b"<|im_start|>user\nList twenty animals and one fact about each.<|im_end|>\n"
                          b"<|im_start|>assistant\n", special=True)
    tokens = []
    for token in llm.generate(prompt, temp=0.0):
        tokens.append(token)
        if len(tokens) == 200:
            break
    assert llm.kv_stats()["compressions"] > 0
    return tokens, llm.kv_settings


def test_llama_takes_the_tuned_settings_unless_given(tuned, smollm2_centred):
    tokens, settings = _generate(tuned)
    assert (settings["kv_keep_recent"], settings["kv_horizon"]) == (BUDGET // 4, 4)
    # the same as giving those settings to the untuned file
    assert tokens == _generate(smollm2_centred, kv_keep_recent=BUDGET // 4, kv_horizon=4)[0]
    _, settings = _generate(tuned, kv_keep_recent=0, kv_horizon=MAX_HORIZON)
    assert (settings["kv_keep_recent"], settings["kv_horizon"]) == (0, MAX_HORIZON)
    _, settings = _generate(smollm2_centred)  # untuned: the reference's
    assert (settings["kv_keep_recent"], settings["kv_horizon"], settings["kv_min_concentration"]) == (0, MAX_HORIZON, 0)
    _, settings = _generate(tuned, kv_compress="streaming")  # the tuning is tri's
    assert (settings["kv_keep_recent"], settings["kv_horizon"]) == (0, MAX_HORIZON)


def test_the_tuning_survives_a_copy_and_inspect_names_it(tuned, tmp_path, capsys):
    copy = tmp_path / "copy.gguf"
    assert main(["embed-centers", tuned, "-o", str(copy)]) == 0  # the existing centres, written elsewhere
    assert read_centers(copy).tuned == HYBRID
    assert main(["inspect", str(copy)]) == 0
    assert f"tri's default settings: {HYBRID} (chosen by `triattention-gguf tune`)" in capsys.readouterr().out


def test_serve_reports_the_tuned_settings(tuned, server_factory):
    base = server_factory(tuned, "--kv-budget", str(BUDGET), "--n-ctx", "2048")
    kv = httpx.get(f"{base}/props").json()["kv_compress"]
    assert (kv["keep_recent"], kv["horizon"], kv["budget"]) == (BUDGET // 4, 4, BUDGET)
