"""`triattention-gguf eval` and `bench`, CI-sized, on SmolLM2: structure and sanity, no timings."""
import json

import numpy as np

import pytest

from triattention_gguf.cli import main
from triattention_gguf.compression import CompressionError
from triattention_gguf.harness import Config

METHODS = ["none", "tri", "streaming", "knorm", "random", "snapkv"]


@pytest.fixture(scope="module")
def centred(smollm2_centred):
    return smollm2_centred


def test_eval_compares_every_method_with_the_full_cache(centred, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", centred, "--tokens", "640", "--budgets", "1/4", "--retrieval-tokens", "512",
                 "--retrieval-trials", "1", "--recall-checkpoints", "2", "--threads", "2", "--quiet",
                 "--out", str(out)]) == 0
    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert sorted(r["method"] for r in rows) == sorted(METHODS)
    assert (out / "eval.md").read_text().count("\n") == len(rows) + 2
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG"
    assert "| tri | 160 |" in capsys.readouterr().out
    by = {r["method"]: r for r in rows}
    assert by["none"]["kl"] == 0.0 and by["none"]["top1"] == 1.0 and by["none"]["recall"] == 1.0
    for method in METHODS[1:]:
        row = by[method]
        assert row["budget"] == 160 and row["compressions"] > 0, row
        assert row["kl"] > 0 and 0 < row["top1"] < 1 and 0 < row["recall"] < 1, row
        assert row["ppl_full"] == by["none"]["ppl"]
        assert row["passkey"] in (0.0, 1.0) and row["own_output"] in (0.0, 1.0)
    assert by["tri"]["kl"] < 0.3 and by["tri"]["top1"] > 0.8  # generous: 135M model, 1/4 of 640 tokens
    assert by["random"]["kl"] > by["tri"]["kl"]


def test_generate_eval_scores_the_full_caches_own_continuations(centred, tmp_path):
    out = tmp_path / "gen"
    assert main(["eval", centred, "--generate", "96", "--tasks", "2", "--budgets", "80", "--divide-length", "32", "--methods",
                 "none,tri,tri/per-head,tri+horizon4,tri+conc0.72,tri+horizon4+conc0.72,streaming", "--threads", "2",
                 "--quiet", "--out", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads((out / "eval.json").read_text())["rows"]}
    assert set(rows) == {"none", "tri", "tri/per-head", "tri+horizon4", "tri+conc0.72", "tri+horizon4+conc0.72",
                         "streaming", "tri+prompt", "tri/per-head+prompt", "tri+prompt+horizon4", "tri+prompt+conc0.72",
                         "tri+prompt+horizon4+conc0.72", "streaming+prompt"}
    for name, row in rows.items():
        assert row["setting"] == "generate 96" and row["sequences"] == 2 and 0 <= row["first_diff"] <= 96
        if name != "none":
            assert row["budget"] == 80 and row["compressions"] > 0 and row["kl_compressed"] > 0
            assert row["prompts_kept"] == (2 if "+prompt" in name else 0)  # 79 and 63 tokens
    for name in ("tri", "tri/per-head"):  # paired against the best (here: only) baseline
        row = rows[name]
        assert row["vs"] == "streaming" and row["d_lo"] <= row["d_kl"] <= row["d_hi"]
        assert row["d_kl"] == pytest.approx(row["kl_compressed"] - rows["streaming"]["kl_compressed"])
        parts = row["d_by_sequence"]  # one per prompt, the pooled mean between them
        assert len(parts) == 2 and min(parts) <= row["d_kl"] <= max(parts) and parts[0] != parts[1]
    assert rows["tri+prompt"]["vs"] == "streaming+prompt"
    for name in ("tri/per-head", "tri+horizon4", "tri+conc0.72"):  # variants paired with the default too
        row = rows[name]
        assert row["vs_select"] == "tri" and row["ds_lo"] <= row["ds_kl"] <= row["ds_hi"]
        assert row["ds_kl"] == pytest.approx(row["kl_compressed"] - rows["tri"]["kl_compressed"])
    assert rows["tri+prompt+horizon4"]["vs_select"] == "tri+prompt"
    # two settings off their defaults: paired with the run's config that has one of them back
    assert rows["tri+horizon4+conc0.72"]["vs_select"] == "tri+horizon4"
    assert rows["tri+prompt+horizon4+conc0.72"]["vs_select"] == "tri+prompt+horizon4"
    for name in ("tri+horizon4", "tri+conc0.72"):  # the horizon and min_concentration reached the engine
        assert rows[name]["kl_compressed"] != rows["tri"]["kl_compressed"]
    assert "vs_select" not in rows["tri"]


@pytest.mark.parametrize("template,message", [
    ("", "the model has no chat template; --generate needs one"),
    ("{{ messages }} in a dialect nobody speaks", "llama.cpp does not know the model's chat template"),
])
def test_generate_needs_a_chat_template_llama_cpp_knows(template, message, centred, tmp_path, capsys):
    import gguf
    from conftest import rewritten_copy

    path = tmp_path / "template.gguf"
    rewritten_copy(centred, path, {"tokenizer.chat_template": (template, gguf.GGUFValueType.STRING, None)})
    assert main(["eval", str(path), "--generate", "16", "--tasks", "1", "--quiet", "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_windows_are_pooled(centred, tmp_path):
    out = tmp_path / "windows"
    assert main(["eval", centred, "--tokens", "320", "--windows", "2", "--budgets", "96", "--methods",
                 "none,tri/shared,tri/shared+recent,tri/shared+recent8", "--retrieval-trials", "0", "--threads", "2",
                 "--quiet", "--out", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads((out / "eval.json").read_text())["rows"]}
    assert rows["tri/shared"]["sequences"] == 2 and rows["tri/shared"]["positions"] == 2 * 319
    assert rows["tri/shared"]["recall"] is not None and "vs" not in rows["tri/shared"]  # no baseline to pair with
    # the newest quarter of the budget kept outright: a different kept set, so different measures
    assert rows["tri/shared+recent"]["compressions"] > 0 and rows["tri/shared+recent"]["kl"] != rows["tri/shared"]["kl"]
    assert rows["tri/shared+recent8"]["kl"] not in (rows["tri/shared"]["kl"], rows["tri/shared+recent"]["kl"])


@pytest.mark.parametrize("spec, name, keep_recent", [
    ("tri+recent", "tri+recent", 96), ("tri+recent4", "tri+recent", 96),
    ("tri+recent8+horizon4", "tri+recent8+horizon4", 48),
    ("snapkv+prompt+recent1", "snapkv+recent1+prompt", 384), ("tri+horizon4", "tri+horizon4", 0),
])
def test_recent_suffix_keeps_the_newest_budget_over_n(spec, name, keep_recent):
    config = Config.parse(spec, 384)
    assert (config.name, config.keep_recent) == (name, keep_recent)
    assert Config.parse(config.name, 384) == config


@pytest.mark.parametrize("spec", ["tri+recent0", "tri+recent-2", "tri+recentx"])
def test_recent_suffix_needs_a_positive_share(spec):
    with pytest.raises(CompressionError, match=r"use \+recent\[N\]"):
        Config.parse(spec, 384)


def test_recall_and_retrieval_can_be_left_out_but_not_negative(centred, tmp_path, capsys):
    out = tmp_path / "no-recall"
    assert main(["eval", centred, "--tokens", "320", "--budgets", "96", "--methods", "none,tri", "--retrieval-trials",
                 "0", "--recall-checkpoints", "0", "--threads", "2", "--quiet", "--out", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads((out / "eval.json").read_text())["rows"]}
    assert rows["tri"]["compressions"] > 0 and rows["tri"]["kl"] > 0
    assert rows["tri"]["recall"] is None and rows["none"]["recall"] is None
    assert rows["tri"]["passkey"] is None
    for option in ("--recall-checkpoints", "--retrieval-trials"):
        with pytest.raises(SystemExit) as exited:
            main(["eval", centred, option, "-1", "--out", str(tmp_path)])
        assert exited.value.code == 2
        assert f"argument {option}: must be 0 or a positive integer, not -1" in capsys.readouterr().err


def test_bench_measures_every_method_next_to_the_full_cache(centred, tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", centred, "--lengths", "768", "--budgets", "128", "--rounds", "2", "--decode-tokens", "8",
                 "--threads", "2", "--quiet", "--out", str(out)]) == 0
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert sorted(r["method"] for r in rows) == sorted(METHODS)
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    full = next(r for r in rows if r["method"] == "none")
    assert full["decode_vs_full"] == 1.0 and full["compressions"] == 0
    for row in rows:
        assert row["length"] == 768 and row["prefill_tps"] > 0 and row["decode_tps_min"] > 0
        assert row["decode_tps_min"] <= row["decode_tps_median"]
        if row["method"] != "none":
            assert row["compressions"] > 0 and row["compress_ms"] > 0
            assert row["kv_bytes"] < full["kv_bytes"] and row["kv_vs_full"] > 1


def test_bad_arguments_are_usage_errors(centred, tmp_path, capsys):
    assert main(["eval", centred, "--budgets", "1/0", "--out", str(tmp_path)]) == 2
    assert "neither a number of cells" in capsys.readouterr().err
    assert main(["eval", centred, "--chunk", "256", "--out", str(tmp_path)]) == 2
    assert "larger than --divide-length" in capsys.readouterr().err
    assert main(["bench", centred, "--lengths", "2k", "--out", str(tmp_path)]) == 2
    assert "comma-separated numbers" in capsys.readouterr().err
    assert main(["eval", centred, "--methods", "none,snap", "--out", str(tmp_path)]) == 2
    assert "unknown kv_compress 'snap'" in capsys.readouterr().err
    assert main(["eval", centred, "--methods", "tri/per-layer", "--out", str(tmp_path)]) == 2
    assert "unknown select mode 'per-layer' in 'tri/per-layer'" in capsys.readouterr().err
    assert main(["eval", centred, "--methods", "tri+recnt", "--out", str(tmp_path)]) == 2
    assert ("unknown suffix +recnt in 'tri+recnt'; use +recent[N], +prompt, +horizonN (tri's horizon in tokens) and/or "
            "+concR" in capsys.readouterr().err)
    assert main(["eval", centred, "--methods", "tri+horizon0", "--out", str(tmp_path)]) == 2
    assert "kv_horizon must be between 1 and 65536 tokens (got 0)" in capsys.readouterr().err
    assert main(["eval", centred, "--methods", "tri+conc1.5", "--out", str(tmp_path)]) == 2
    assert "kv_min_concentration must be between 0 and 1 (got 1.5)" in capsys.readouterr().err
    assert main(["eval", centred, "--methods", "streaming+conc0.5", "--out", str(tmp_path)]) == 2
    assert "kv_min_concentration is tri's" in capsys.readouterr().err


def test_each_sequence_is_read_as_by_a_fresh_context(centred):
    """The eval reuses its contexts across windows and prompts: the second sequence's measures equal
    those of a run that reads it alone (nothing of the first's compaction records carries over)."""
    from triattention_gguf.calibrate import default_text
    from triattention_gguf.evaluation import fidelity
    from triattention_gguf.harness import configs_for
    from triattention_gguf.modelinfo import model_with_facts, tokenize

    with model_with_facts(centred) as (model, facts):
        tokens = tokenize(model, default_text())
        first, second = (tokens[:400], 1), (tokens[5000:5300], 40)
        configs = configs_for(["tri", "snapkv+prompt"], [96], 32)
        both, _ = fidelity(model, facts, [first, second], configs, 32, 32, 2, progress=False)
        alone, _ = fidelity(model, facts, [second], configs, 32, 32, 2, progress=False)
    for config in configs:
        n = len(alone[config.label].array("kl"))
        assert alone[config.label].array("compressed").any()
        np.testing.assert_array_equal(both[config.label].array("kl")[-n:], alone[config.label].array("kl"))
