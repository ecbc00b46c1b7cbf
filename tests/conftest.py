import pytest

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
    once /health answers; every server started is stopped at the end of the module."""
    import socket
    import subprocess
    import sys
    import time

    import httpx

    started = []

    def start(model: str, *args: str) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = open(tmp_path_factory.mktemp("server") / "log.txt", "w+")
        proc = subprocess.Popen([sys.executable, "-m", "triattention_gguf.cli", "serve", model, "--port", str(port),
                                 *args], stdout=log, stderr=subprocess.STDOUT)
        started.append((proc, log))
        base = f"http://127.0.0.1:{port}"
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

    yield start
    for proc, log in started:
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
