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
