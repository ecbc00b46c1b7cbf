"""Malformed model files through every command and Llama, each in a subprocess with a timeout:
a clean refusal (one line naming the problem, no traceback, no signal, no hang), never a crash
or a silent acceptance. Mutations of the SmolLM2 test model with centres."""
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import rewritten_copy

from triattention_gguf.modelinfo import open_gguf

TIMEOUT = 60
LLAMA = ("import sys; from triattention_gguf import Llama; "
         "Llama(sys.argv[1], kv_compress='tri', n_ctx=256, verbose=False)")
OUR_ERRORS = ("ModelFileError: ", "CentersError: ", "CompressionError: ")


@pytest.fixture(scope="module")
def model(smollm2_centred) -> Path:
    return Path(smollm2_centred)


@pytest.fixture(scope="module")
def layout(model) -> dict[str, int]:
    """Byte offsets in the model file: each metadata key's start, and the first tensor info's."""
    reader = gguf.GGUFReader(model)
    offsets = {name: field.offset for name, field in reader.fields.items()}
    offsets["tensor:" + reader.tensors[0].name] = reader.tensors[0].field.offset
    offsets["data"] = reader.tensors[0].data_offset
    return offsets


def _key_end(layout, key):  # the byte after the key's name: its value type, then its value
    return layout[key] + 8 + len(key)


def patch_bytes(at, new):
    return lambda data, layout: data[:at(layout)] + new + data[at(layout) + len(new):]


def truncate(at):
    return lambda data, layout: data[:at(layout, len(data))]


# mutations of the bytes: (name, function(data, layout) -> data)
BYTES = {
    "truncated in the header magic": truncate(lambda lay, n: 3),
    "truncated in the counts": truncate(lambda lay, n: 20),
    "truncated in the vocabulary": truncate(lambda lay, n: lay["tokenizer.ggml.tokens"] + 5000),
    "truncated in the centres": truncate(lambda lay, n: lay["triattention.q_abs_mean"] + 100),
    "truncated in the tensor infos": truncate(lambda lay, n: lay["tensor:token_embd.weight"] + 30),
    "truncated in the tensor data": truncate(lambda lay, n: n // 2),
    "truncated by one byte": truncate(lambda lay, n: n - 1),
    "2^62 metadata keys": patch_bytes(lambda lay: 16, struct.pack("<Q", 1 << 62)),
    "2^40 tensors": patch_bytes(lambda lay: 8, struct.pack("<Q", 1 << 40)),
    "no tensors": patch_bytes(lambda lay: 8, struct.pack("<Q", 0)),
    "version 7": patch_bytes(lambda lay: 4, struct.pack("<I", 7)),
    "an array of 2^62 strings": patch_bytes(lambda lay: _key_end(lay, "tokenizer.ggml.tokens") + 8,
                                             struct.pack("<Q", 1 << 62)),
    "an array of 2^62 integers": patch_bytes(lambda lay: _key_end(lay, "tokenizer.ggml.token_type") + 8,
                                              struct.pack("<Q", 1 << 62)),
    "a key 2^60 bytes long": patch_bytes(lambda lay: lay["general.name"], struct.pack("<Q", 1 << 60)),
    "a key that appears twice": patch_bytes(lambda lay: lay["general.name"] + 8, b"general.type"),
    "invalid UTF-8 in a key": patch_bytes(lambda lay: lay["general.name"] + 8, b"\xff"),
    "invalid UTF-8 in a string value": patch_bytes(lambda lay: _key_end(lay, "general.name") + 12, b"\xc3\x28"),
    "invalid UTF-8 in the chat template": patch_bytes(lambda lay: _key_end(lay, "tokenizer.chat_template") + 12,
                                                       b"\xe2\x28\xa1"),
    "value type 99": patch_bytes(lambda lay: _key_end(lay, "general.name"), struct.pack("<I", 99)),
    "a nested array": patch_bytes(lambda lay: _key_end(lay, "general.languages") + 4,
                                  struct.pack("<I", gguf.GGUFValueType.ARRAY)),
    "a tensor of 7 dimensions": patch_bytes(lambda lay: lay["tensor:token_embd.weight"] + 8 + 17,
                                            struct.pack("<I", 7)),
}

T = gguf.GGUFValueType


def _inf_scales(data):
    """Q4_1 blocks start with an f16 scale: make the first blocks' scales infinite."""
    data[:20 * 20].reshape(-1, 20)[:, :2] = np.frombuffer(
        np.float16(np.inf).tobytes(), dtype=np.uint8)


def _centre(model, key):
    return np.array(open_gguf(model).metadata["triattention." + key], dtype=np.float32)


def _array(values, item=T.FLOAT32):
    return (values.tolist() if hasattr(values, "tolist") else values, T.ARRAY, item)


# mutations of the metadata: name -> (function(model) -> {key: (value, type, item type)}, "model" | "centres")
META = {
    "block_count 0": (lambda m: {"llama.block_count": (0, T.UINT32, None)}, "model"),
    "block_count 1000": (lambda m: {"llama.block_count": (1000, T.UINT32, None)}, "model"),
    "block_count 2^31": (lambda m: {"llama.block_count": (1 << 31, T.UINT32, None)}, "model"),
    "block_count as a string": (lambda m: {"llama.block_count": ("30", T.STRING, None)}, "model"),
    "rms epsilon NaN": (lambda m: {"llama.attention.layer_norm_rms_epsilon": (float("nan"), T.FLOAT32, None)},
                        "model"),
    "rope base 0": (lambda m: {"llama.rope.freq_base": (0.0, T.FLOAT32, None)}, "model"),
    "rope base NaN": (lambda m: {"llama.rope.freq_base": (float("nan"), T.FLOAT32, None)}, "model"),
    "rope base -1": (lambda m: {"llama.rope.freq_base": (-1.0, T.FLOAT32, None)}, "model"),
    "head_count_kv 2 against the tensors": (lambda m: {"llama.attention.head_count_kv": (2, T.UINT32, None)},
                                            "model"),
    "head_count 0": (lambda m: {"llama.attention.head_count": (0, T.UINT32, None)}, "model"),
    "centres as INT32": (lambda m: {"triattention.q_mean_real": _array(_centre(m, "q_mean_real").astype(np.int32),
                                                                       T.INT32)}, "centres"),
    "centres as BOOL": (lambda m: {"triattention.q_mean_real": _array(_centre(m, "q_mean_real") > 0, T.BOOL)},
                        "centres"),
    "centres as numeric strings": (lambda m: {"triattention.q_mean_real": _array(
        [str(v) for v in _centre(m, "q_mean_real")], T.STRING)}, "centres"),
    "centres as a scalar": (lambda m: {"triattention.q_abs_mean": (1.0, T.FLOAT32, None)}, "centres"),
    "centres of 1e30": (lambda m: {"triattention.q_mean_real": _array(_centre(m, "q_mean_real") * 0 + 1e30)},
                        "centres"),
    "mean magnitude 0": (lambda m: {"triattention.q_abs_mean": _array(_centre(m, "q_abs_mean") * 0)}, "centres"),
    "mean magnitude negative": (lambda m: {"triattention.q_abs_mean": _array(-_centre(m, "q_abs_mean") - 1)},
                                "centres"),
    "token count negative": (lambda m: {"triattention.calibration.tokens": (-5, T.INT64, None)}, "centres"),
    "token count 0": (lambda m: {"triattention.calibration.tokens": (0, T.UINT64, None)}, "centres"),
    "0 query clusters": (lambda m: {"triattention.clusters": (0, T.UINT32, None)}, "centres"),
    "query clusters against their arrays": (lambda m: {"triattention.clusters": (
        int(_centre(m, "clusters")) + 1, T.UINT32, None)}, "centres"),
    "a cluster's mean magnitude 0": (lambda m: {"triattention.cluster.q_abs_mean": _array(
        _centre(m, "cluster.q_abs_mean") * 0)}, "centres"),
    "centres of one layer": (lambda m: {"triattention.q_mean_imag": _array(_centre(m, "q_mean_imag")[:100])},
                             "centres"),
    "an unknown tuned setting": (lambda m: {"triattention.tuned": ("tri+recent+horizon5", T.STRING, None)},
                                 "centres"),
    "a tuned setting as a number": (lambda m: {"triattention.tuned": (4, T.UINT32, None)}, "centres"),
}


def _run(args, code=None):
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "triattention_gguf.cli", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(map(str, args))}: no answer in {TIMEOUT} s (a hang)")


def _refused(result, what):
    assert result.returncode > 0, f"{what}: exit status {result.returncode} (a signal is a crash)\n{result.stderr[-2000:]}"
    if "-c" in result.args:  # Llama: one of our errors, not an unexpected exception
        last = result.stderr.strip().splitlines()[-1]
        assert any(e in last for e in OUR_ERRORS), f"{what}: {last}"
    else:
        assert "Traceback" not in result.stderr, f"{what}: {result.stderr[-2000:]}"
        lines = [line for line in result.stderr.splitlines() if "error:" in line]
        assert len(lines) == 1 and len(lines[0]) > 40, f"{what}: {result.stderr[-2000:]}"
    return result.stderr


def _check_model_refused(path, tmp_path):
    for args in (["inspect", path], ["strip-centers", path, "-o", tmp_path / "out.gguf"],
                 ["embed-centers", path, "--tokens", "256", "-o", tmp_path / "out.gguf"]):
        _refused(_run(args), args[0])
    _refused(_run([path], LLAMA), "Llama")
    assert not (tmp_path / "out.gguf").exists()  # nothing written from a refused file


@pytest.mark.parametrize("mutation", BYTES)
def test_malformed_bytes_are_refused(mutation, model, layout, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(BYTES[mutation](model.read_bytes(), layout))
    _check_model_refused(bad, tmp_path)


@pytest.mark.parametrize("mutation", META)
def test_malformed_metadata_is_refused(mutation, model, tmp_path):
    changes, kind = META[mutation]
    bad = tmp_path / "bad.gguf"
    rewritten_copy(model, bad, changes(model))
    if kind == "model":
        _check_model_refused(bad, tmp_path)
        return
    # malformed centres: named by inspect, refused by embed-centers (unless --force) and Llama,
    # removed by strip-centers, replaced by embed-centers --force
    inspected = _run(["inspect", bad])
    assert inspected.returncode == 2 or "centres: INVALID" in inspected.stdout, inspected.stdout + inspected.stderr
    if inspected.returncode == 2:
        _refused(inspected, "inspect")
    assert "--force" in _refused(_run(["embed-centers", bad, "--tokens", "256"]), "embed-centers")
    _refused(_run([bad], LLAMA), "Llama")
    stripped = _run(["strip-centers", bad, "-o", tmp_path / "stripped.gguf"])
    assert stripped.returncode == 0, stripped.stderr
    assert not any(k.startswith("triattention.") for k in open_gguf(tmp_path / "stripped.gguf").metadata)


def test_infinite_weight_scales_are_refused_by_calibration(model, tmp_path):
    bad = tmp_path / "bad.gguf"
    rewritten_copy(model, bad, {}, tensor_edit=("blk.0.attn_q.weight", _inf_scales))
    result = _run(["embed-centers", bad, "--force", "--tokens", "256", "-o", tmp_path / "out.gguf"])
    assert "not finite" in _refused(result, "embed-centers")
    assert not (tmp_path / "out.gguf").exists()


def test_serve_refuses_a_malformed_model_with_the_same_message(model, tmp_path):
    bad = tmp_path / "bad.gguf"
    rewritten_copy(model, bad, META["block_count 2^31"][0](model))
    served = _run(["serve", bad, "--port", "0"])
    inspected = _run(["inspect", bad])
    message = _refused(inspected, "inspect").split("error: ", 1)[1]
    assert "block_count" in message and message in _refused(served, "serve")


def test_verbose_adds_the_traceback(model, layout, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(BYTES["2^62 metadata keys"](model.read_bytes(), layout))
    quiet, verbose = _run(["inspect", bad]), _run(["inspect", bad, "--verbose"])
    assert "Traceback" not in quiet.stderr and "Traceback" in verbose.stderr
    assert quiet.stderr.strip().splitlines()[-1] == verbose.stderr.strip().splitlines()[-1]
