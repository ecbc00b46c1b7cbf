import numpy as np
import pytest

from triattention_gguf._lib import llama_cpp_bindings as ll
from triattention_gguf.testmodels import model_path


@pytest.fixture(scope="session")
def smollm2_path():
    return str(model_path("smollm2"))


@pytest.fixture(scope="session")
def qwen_path():
    return str(model_path("qwen2.5-0.5b"))


@pytest.fixture(scope="session")
def gemma3_path():
    return str(model_path("gemma3-270m"))


@pytest.fixture(scope="session")
def mamba_path(tmp_path_factory):
    """A tiny Mamba GGUF (recurrent memory: no KV cache to compress), random weights, 16 tokens."""
    import gguf
    import numpy as np

    path = tmp_path_factory.mktemp("mamba") / "mamba.gguf"
    n_embd, d_inner, d_state, d_conv, dt_rank, n_layer = 16, 32, 4, 4, 2, 2
    tokens = ["<unk>", "<s>", "</s>"] + [f"\u2581{c}" for c in "abcdefghijklm"]
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_context_length(128)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(0)
    w.add_head_count(0)
    w.add_ssm_conv_kernel(d_conv)
    w.add_ssm_inner_size(d_inner)
    w.add_ssm_state_size(d_state)
    w.add_ssm_time_step_rank(dt_rank)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([2, 3, 3] + [1] * (len(tokens) - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (n_embd, len(tokens)), "output_norm.weight": (n_embd,)}
    for i in range(n_layer):
        shapes.update({f"blk.{i}.{name}": shape for name, shape in {
            "attn_norm.weight": (n_embd,), "ssm_in.weight": (n_embd, 2 * d_inner),
            "ssm_conv1d.weight": (d_conv, d_inner), "ssm_conv1d.bias": (d_inner,),
            "ssm_x.weight": (d_inner, dt_rank + 2 * d_state), "ssm_dt.weight": (dt_rank, d_inner),
            "ssm_dt.bias": (d_inner,), "ssm_a": (d_state, d_inner), "ssm_d": (d_inner,),
            "ssm_out.weight": (d_inner, n_embd)}.items()})
    for name, shape in shapes.items():  # ggml's ne order is numpy's reversed
        w.add_tensor(name, (0.1 * rng.standard_normal(shape[::-1])).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def rewritten_copy(src, dest, changes: dict, tensor_edit=None) -> None:
    """src written to dest with metadata keys set ({key: (value, type, item type)}: replaced where
    src has them, added where not; a value None removes the key) and, with tensor_edit (name,
    function), that tensor's bytes edited in a copy."""
    from triattention_gguf.gguf_copy import metadata_of, tensor_bytes, write_gguf
    from triattention_gguf.modelinfo import open_gguf

    header = open_gguf(src)
    metadata = metadata_of(header) | changes
    data = tensor_bytes(header)
    if tensor_edit:
        data[tensor_edit[0]] = np.array(data[tensor_edit[0]])
        tensor_edit[1](data[tensor_edit[0]])
    write_gguf(header, dest, {k: v for k, v in metadata.items() if v[0] is not None}, data)


def centred_copy(model: str, dest, tokens: int) -> str:
    """A copy of model at dest with centres from a short calibration of `tokens` tokens."""
    from triattention_gguf.calibrate import compute_centers
    from triattention_gguf.centers import rewrite_model

    rewrite_model(model, compute_centers(model, max_tokens=tokens, n_threads=2, progress=False), dest)
    return str(dest)


@pytest.fixture(scope="session")
def smollm2_centred(smollm2_path, tmp_path_factory):
    """SmolLM2 with centres from a short calibration (the tests' copy: made once per session)."""
    return centred_copy(smollm2_path, tmp_path_factory.mktemp("centred") / "smollm2.gguf", 512)


@pytest.fixture(scope="module")
def server_factory(tmp_path_factory):
    """Starts `triattention-gguf serve MODEL ARGS...` on a free 127.0.0.1 port, returns its base URL
    once /health answers; every server started is stopped at the end of the module.
    start.stop(base) stops one now (as Ctrl-C would); start.log(base) is what it logged."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx

    started = {}

    def start(model: str, *args: str) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = open(tmp_path_factory.mktemp("server") / "log.txt", "w+")
        proc = subprocess.Popen([sys.executable, "-m", "triattention_gguf.cli", "serve", model, "--port", str(port),
                                 *args], stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        started[base] = (proc, log)
        for _ in range(600):
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    return base
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"server exited: {log.read()}")
            time.sleep(0.1)
        raise RuntimeError("server did not start")

    def stop(base: str) -> None:
        proc, _ = started[base]
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)

    def text(base: str) -> str:
        log = started[base][1]
        log.flush()
        log.seek(0)
        return log.read()

    start.stop, start.log = stop, text
    yield start
    for proc, log in started.values():
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def metric(base: str, name: str, api_key: str | None = None) -> float:
    """One sample of the server's /metrics, read with prometheus_client's own parser."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    text = httpx.get(f"{base}/metrics", headers=headers).text
    return next(s.value for family in text_string_to_metric_families(text) for s in family.samples
                if s.name == name and not s.labels)


class NodeCapture:
    """Copies graph nodes by name (f32) through llama.cpp's eval callback."""

    def __init__(self, names):
        import ctypes

        from triattention_gguf._lib import lib_dir

        self.names, self.data = set(names), {}
        ggml = ctypes.CDLL(str(lib_dir() / "libggml-base.so"))
        ggml.ggml_get_name.restype = ctypes.c_char_p
        ggml.ggml_get_name.argtypes = [ctypes.c_void_p]
        ggml.ggml_op_desc.restype = ctypes.c_char_p
        ggml.ggml_op_desc.argtypes = [ctypes.c_void_p]
        ggml.ggml_nbytes.restype = ctypes.c_size_t
        ggml.ggml_nbytes.argtypes = [ctypes.c_void_p]
        ggml.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]

        def callback(t, ask, _):
            name = ggml.ggml_get_name(t).decode()
            # the query as attention reads it: the output of the query RoPE
            key = f"{name}:{ggml.ggml_op_desc(t).decode()}"
            if key not in self.names:
                return False
            if not ask:
                out = np.zeros(ggml.ggml_nbytes(t) // 4, dtype=np.float32)
                ggml.ggml_backend_tensor_get(t, out.ctypes.data, 0, out.nbytes)
                self.data[key] = out
            return True

        self.callback = ll.ggml_backend_sched_eval_callback(callback)


def snapkv_attention(q, qpos, keys, kpos, h, hkv, hd):
    """One layer's snapkv score in numpy (algorithm.md §6), [n_head_kv, n_cells]: the attention of
    the window's queries q [token, head, dim] (positions qpos) to the cached keys [cell, hkv * hd]
    (positions kpos [n_head_kv, n_cells], -1 for an empty cell), summed over the window, max-pooled
    over 7 neighbouring tokens in each head's position order, summed over each GQA group."""
    from numpy.lib.stride_tricks import sliding_window_view

    group = np.arange(h) // (h // hkv)
    kp = kpos[group]  # [head, cell]
    order = np.argsort(kp, axis=1, kind="stable")
    k = keys.reshape(-1, hkv, hd)[:, group]  # [cell, head, dim]
    logits = np.einsum("jhd,nhd->hjn", q, k) / np.sqrt(hd)
    hidden = (kp[:, None, :] > qpos[None, :, None]) | (kp[:, None, :] < 0)
    logits[np.broadcast_to(hidden, logits.shape)] = -np.inf
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn = (attn / attn.sum(-1, keepdims=True)).sum(1)  # [head, cell]
    pooled = sliding_window_view(np.pad(np.take_along_axis(attn, order, 1), ((0, 0), (3, 3))), 7, axis=1).max(-1)
    in_cells = np.empty_like(pooled)
    np.put_along_axis(in_cells, order, pooled, 1)
    return in_cells.reshape(hkv, h // hkv, -1).sum(1)
