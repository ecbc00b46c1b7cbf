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


@pytest.fixture(scope="session")
def smollm2_centred(smollm2_path, tmp_path_factory):
    """SmolLM2 with centres from a short calibration (the tests' copy: made once per session)."""
    from triattention_gguf.calibrate import compute_centers
    from triattention_gguf.centers import rewrite_model

    path = tmp_path_factory.mktemp("centred") / "smollm2.gguf"
    rewrite_model(smollm2_path, compute_centers(smollm2_path, max_tokens=512, n_threads=2, progress=False), path)
    return str(path)
