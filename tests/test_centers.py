"""Centres in the GGUF file: embed, read back, validate, strip; and every way input can be bad."""
import dataclasses
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from triattention_gguf import Llama
from triattention_gguf.calibrate import compute_centers
from triattention_gguf.centers import CentersError, load_centers, read_centers, rewrite_model
from triattention_gguf.methods import DEFAULT_CLUSTERS
from triattention_gguf.modelinfo import read_facts
from conftest import rewritten_copy

CALIB_TOKENS = 512
CLUSTERS = 4


def cli(*args, user=None, preexec_fn=None):
    cmd = [sys.executable, "-m", "triattention_gguf.cli", *map(str, args)]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, preexec_fn=preexec_fn)


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def greedy(path, n=16):
    llm = Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False)
    return llm("Once upon a time", max_tokens=n, temperature=0.0)["choices"][0]["text"]


@pytest.fixture(scope="module")
def smollm2_centres(smollm2_path):
    return compute_centers(smollm2_path, max_tokens=CALIB_TOKENS, n_threads=2, progress=False, clusters=CLUSTERS)


@pytest.fixture
def smollm2_copy(smollm2_path, tmp_path):
    path = tmp_path / "smollm2.gguf"
    shutil.copy(smollm2_path, path)
    return path


@pytest.fixture
def embedded(smollm2_copy, smollm2_centres):
    rewrite_model(smollm2_copy, smollm2_centres)
    return smollm2_copy


def test_embed_keeps_tensors_and_stock_generation(smollm2_path, embedded):
    original, updated = gguf.GGUFReader(smollm2_path), gguf.GGUFReader(embedded)
    assert [t.name for t in original.tensors] == [t.name for t in updated.tensors]
    for a, b in zip(original.tensors, updated.tensors):
        assert np.array_equal(np.asarray(a.data).view(np.uint8), np.asarray(b.data).view(np.uint8)), a.name
    assert greedy(embedded) == greedy(smollm2_path)


def test_centres_read_back_and_validate(embedded, smollm2_centres):
    centres = load_centers(read_facts(embedded))
    np.testing.assert_array_equal(centres.q_mean, smollm2_centres.q_mean)
    np.testing.assert_array_equal(centres.q_abs_mean, smollm2_centres.q_abs_mean)
    np.testing.assert_array_equal(centres.cluster_mean, smollm2_centres.cluster_mean)
    np.testing.assert_array_equal(centres.cluster_abs_mean, smollm2_centres.cluster_abs_mean)
    assert centres.n_clusters == CLUSTERS and centres.cluster_mean.shape == (30, 9, CLUSTERS, 32)
    assert centres.calibration_tokens == CALIB_TOKENS
    r = centres.resultant_length
    assert r.shape == (30, 9, 32) and np.all((r >= 0) & (r <= 1 + 1e-6))


def test_a_version_1_file_reads_as_one_cluster_per_head(embedded, smollm2_centres, tmp_path):
    """Files embedded before the query clusters (schema version 1) keep working: the centre is each
    head's one virtual query."""
    old = tmp_path / "v1.gguf"
    rewritten_copy(embedded, old, {"triattention.version": (1, gguf.GGUFValueType.UINT32, None),
                                   **{f"triattention.{k}": (None, None, None) for k in (
                                       "clusters", "cluster.q_mean_real", "cluster.q_mean_imag",
                                       "cluster.q_abs_mean")}})
    assert not any(k.startswith("triattention.cluster") for k in gguf.GGUFReader(old).fields)
    centres = load_centers(read_facts(old))
    assert centres.n_clusters == 1
    np.testing.assert_array_equal(centres.cluster_mean[:, :, 0], smollm2_centres.q_mean)
    np.testing.assert_array_equal(centres.cluster_abs_mean[:, :, 0], smollm2_centres.q_abs_mean)
    llm = Llama(model_path=str(old), n_ctx=1024, n_threads=2, verbose=False, kv_compress="tri", kv_budget=64,
                kv_divide_length=32)
    llm("Once upon a time", max_tokens=120, temperature=0.0)
    assert llm.kv_stats()["compressions"] > 0
    # a version 2 file without its cluster count, or a version this release does not know, is refused
    for version, dropped in ((2, ("clusters",)), (3, ())):
        bad = tmp_path / f"v{version}.gguf"
        rewritten_copy(embedded, bad, {"triattention.version": (version, gguf.GGUFValueType.UINT32, None),
                                       **{f"triattention.{k}": (None, None, None) for k in dropped}})
        with pytest.raises(CentersError, match="--force"):
            read_centers(bad)


def test_strip_restores_the_original_bytes(smollm2_path, embedded):
    result = cli("strip-centers", embedded)
    assert result.returncode == 0, result.stderr
    assert sha256(embedded) == sha256(smollm2_path)
    assert "nothing to do" in cli("strip-centers", embedded).stdout


def test_cli_embed_inspect_force(smollm2_copy, tmp_path):
    out = tmp_path / "out.gguf"
    result = cli("embed-centers", smollm2_copy, "-o", out, "--tokens", 300, "--threads", 2, "--quiet")
    assert result.returncode == 0, result.stderr
    assert read_centers(smollm2_copy) is None  # -o leaves the input alone
    assert read_centers(out).calibration_tokens == 300

    before = sha256(out)
    again = cli("embed-centers", out, "--tokens", 400, "--quiet")
    assert again.returncode == 0 and "already has TriAttention centres" in again.stdout
    assert sha256(out) == before
    forced = cli("embed-centers", out, "--tokens", 400, "--force", "--quiet")
    assert forced.returncode == 0, forced.stderr
    assert read_centers(out).calibration_tokens == 400

    assert read_centers(out).n_clusters == DEFAULT_CLUSTERS
    clustered = cli("embed-centers", out, "--tokens", 300, "--clusters", 3, "--force", "--quiet")
    assert clustered.returncode == 0 and "query clusters per head: 3" in clustered.stdout, clustered.stderr
    assert read_centers(out).n_clusters == 3
    too_many = cli("embed-centers", out, "--clusters", 65, "--force", "--quiet")
    assert too_many.returncode == 2 and "--clusters 65 must be in [1, 64]" in too_many.stderr
    assert read_centers(out).n_clusters == 3  # the refused run left the file alone

    png = tmp_path / "r.png"
    shown = cli("inspect", out, "--plot", png)
    assert shown.returncode == 0, shown.stderr
    assert "valid for this model" in shown.stdout and "R > 0.9" in shown.stdout and "layer  29" in shown.stdout
    assert "query clusters per head (tri's virtual queries): 3" in shown.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_remakes_a_copy_with_another_cluster_count(smollm2_path, tmp_path, monkeypatch):
    """`demo` (the README's first command) embeds the default model's centres once; a copy left by a
    release with another default cluster count is made again, then reused."""
    models = tmp_path / "models"
    models.mkdir()
    (models / Path(smollm2_path).name).symlink_to(smollm2_path)
    stale = models / (Path(smollm2_path).stem + ".triattention.gguf")
    rewrite_model(smollm2_path, compute_centers(smollm2_path, max_tokens=256, n_threads=2, progress=False,
                                                clusters=1), stale)
    monkeypatch.setenv("TRIATTENTION_CACHE", str(tmp_path))
    args = ("demo", "--max-tokens", 200, "--kv-budget", 64, "--n-ctx", 1024, "--threads", 2)
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    assert "embedding TriAttention centres" in first.stdout and "KV memory:" in first.stdout
    assert read_centers(stale).n_clusters == DEFAULT_CLUSTERS
    made = sha256(stale)
    again = cli(*args)
    assert again.returncode == 0 and "embedding" not in again.stdout, again.stderr
    assert sha256(stale) == made


def test_own_text_and_provenance(smollm2_copy, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 30)
    result = cli("embed-centers", smollm2_copy, "--text", text, "--text", text, "--quiet")
    assert result.returncode == 0, result.stderr
    centres = read_centers(smollm2_copy)
    combined = text.read_text() + "\n\n" + text.read_text()
    assert centres.text_sha256 == hashlib.sha256(combined.encode()).hexdigest()


# --- bad input -------------------------------------------------------------------------


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello, I am text")
    result = cli("embed-centers", bad)
    assert result.returncode == 2 and "not a GGUF file" in result.stderr


def test_truncated_gguf(smollm2_path, tmp_path):
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(Path(smollm2_path).read_bytes()[: 3 << 20])
    result = cli("inspect", bad)
    assert result.returncode == 2 and "truncated or corrupt" in result.stderr


def test_missing_path(tmp_path):
    result = cli("embed-centers", tmp_path / "nope.gguf")
    assert result.returncode == 2 and "no such file" in result.stderr


def _tiny_gpt2(smollm2_path, path):
    """A loadable GGUF of an architecture without RoPE (GPT-2: learned positions)."""
    src = gguf.GGUFReader(smollm2_path)
    n_vocab, n_embd, n_ff = 49152, 8, 16
    w = gguf.GGUFWriter(path, arch="gpt2")
    w.add_context_length(64)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_block_count(1)
    w.add_head_count(2)
    w.add_layer_norm_eps(1e-5)
    for field in src.fields.values():
        if field.name.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (n_vocab, n_embd), "position_embd.weight": (64, n_embd),
              "output_norm.weight": (n_embd,), "output_norm.bias": (n_embd,), "output.weight": (n_vocab, n_embd),
              "blk.0.attn_norm.weight": (n_embd,), "blk.0.attn_norm.bias": (n_embd,),
              "blk.0.attn_qkv.weight": (3 * n_embd, n_embd), "blk.0.attn_qkv.bias": (3 * n_embd,),
              "blk.0.attn_output.weight": (n_embd, n_embd), "blk.0.attn_output.bias": (n_embd,),
              "blk.0.ffn_norm.weight": (n_embd,), "blk.0.ffn_norm.bias": (n_embd,),
              "blk.0.ffn_up.weight": (n_ff, n_embd), "blk.0.ffn_up.bias": (n_ff,),
              "blk.0.ffn_down.weight": (n_embd, n_ff), "blk.0.ffn_down.bias": (n_embd,)}
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_architecture_without_rope(smollm2_path, tmp_path):
    model = tmp_path / "gpt2.gguf"
    _tiny_gpt2(smollm2_path, model)
    result = cli("embed-centers", model)
    assert result.returncode == 2
    assert "architecture 'gpt2'" in result.stderr and "cannot compress" in result.stderr


# fingerprints that files embedded by earlier releases hold: a change in how they are computed
# would have every such file refused as "computed for another model"
STORED_FINGERPRINTS = {"smollm2_path": "360008f27dc78f20afbc91e3f2791160",
                       "qwen_path": "9b3d40efa70e70c28602c289875f66f0",
                       "gemma3_path": "15251066f1078bc263c45d51466b44fd"}


@pytest.mark.parametrize("model", STORED_FINGERPRINTS)
def test_fingerprints_stay_those_earlier_releases_stored(model, request):
    assert read_facts(request.getfixturevalue(model)).fingerprint == STORED_FINGERPRINTS[model]


def test_centres_of_another_model_are_refused(embedded, smollm2_centres, qwen_path, tmp_path):
    forged = dataclasses.replace(smollm2_centres, model_fingerprint="0" * 32)
    rewrite_model(embedded, forged)
    with pytest.raises(CentersError, match="computed for another model.*model fingerprint.*embed-centers --force"):
        load_centers(read_facts(embedded))
    refused = cli("embed-centers", embedded, "--quiet")
    assert refused.returncode == 2 and "another model" in refused.stderr and "--force" in refused.stderr
    assert "INVALID" in cli("inspect", embedded).stdout

    qwen_copy = tmp_path / "qwen.gguf"
    shutil.copy(qwen_path, qwen_copy)
    rewrite_model(qwen_copy, smollm2_centres)  # shapes of a llama model in a qwen2 file
    with pytest.raises(CentersError, match="n_layer 30 != 24"):
        load_centers(read_facts(qwen_copy))


def test_model_without_centres_names_the_command(smollm2_copy):
    with pytest.raises(CentersError, match="triattention-gguf embed-centers"):
        load_centers(read_facts(smollm2_copy))


def test_too_short_calibration_text(smollm2_copy, tmp_path):
    empty, short = tmp_path / "empty.txt", tmp_path / "short.txt"
    empty.write_text("")
    short.write_text("Just a few words.")
    for text in (empty, short):
        result = cli("embed-centers", smollm2_copy, "--text", text)
        assert result.returncode == 2 and "at least 256 are needed" in result.stderr
    result = cli("embed-centers", smollm2_copy, "--text", tmp_path / "missing.txt")
    assert result.returncode == 2 and "cannot read calibration text" in result.stderr
    assert read_centers(smollm2_copy) is None


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv to drop root privileges")
def test_read_only_location(embedded):
    folder = Path(tempfile.mkdtemp(prefix="triattention-ro-"))  # under /tmp, which anyone may traverse
    try:
        model = folder / "m.gguf"
        shutil.copy(embedded, model)
        os.chmod(folder, 0o755)
        os.chmod(model, 0o644)  # readable, but neither it nor its folder writable by an unprivileged user
        before = sha256(model)
        result = cli("strip-centers", model, user=65534)
        assert result.returncode == 2 and "not writable" in result.stderr, result.stderr
        assert sha256(model) == before
        hidden = cli("inspect", embedded, user=65534)  # pytest's own tmp folders are private to root
        assert hidden.returncode == 2 and "cannot access it" in hidden.stderr, hidden.stderr
    finally:
        shutil.rmtree(folder)


def _limit_file_size():
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, 8 << 20))


def test_disk_full_leaves_the_original_intact(embedded):
    before = sha256(embedded)
    result = cli("strip-centers", embedded, preexec_fn=_limit_file_size)
    assert result.returncode == 2 and "original file is unchanged" in result.stderr, result.stderr
    assert sha256(embedded) == before
    assert not list(embedded.parent.glob("*.triattention-tmp"))  # the partial file was removed


def test_killed_mid_write_leaves_the_original_intact(embedded):
    before = sha256(embedded)
    proc = subprocess.Popen([sys.executable, "-m", "triattention_gguf.cli", "strip-centers", str(embedded)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        partial = list(embedded.parent.glob("*.triattention-tmp"))
        if partial and partial[0].stat().st_size > (1 << 20):
            break
        time.sleep(0.005)
    else:
        pytest.fail("the rewrite never started writing")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert sha256(embedded) == before
    assert read_centers(embedded) is not None
    # the next run removes the killed process's copy and says so; a running writer's copy stays
    (stale,) = embedded.parent.glob("*.triattention-tmp")
    assert f".{embedded.name}.{proc.pid}." in stale.name
    live = embedded.parent / f".{embedded.name}.{os.getpid()}.x1y2.triattention-tmp"
    live.write_bytes(b"in progress")
    result = cli("strip-centers", embedded)
    assert result.returncode == 0 and f"removed {stale}: a temporary copy left by an interrupted run" in result.stderr
    assert not stale.exists() and live.exists()
    assert read_centers(embedded) is None
