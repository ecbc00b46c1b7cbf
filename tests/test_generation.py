"""A real model generates through our library exactly as llama.cpp's own greedy loop does."""

import numpy as np
import pytest

from triattention_gguf import Llama
from triattention_gguf._lib import llama_cpp_bindings as ll

PROMPT = "The three primary colours are"
N_NEW = 24


def _greedy_low_level(path: str, prompt: str, n_new: int) -> list[int]:
    """Greedy decoding straight through the C API: decode, argmax of the last logits, repeat."""
    mparams = ll.llama_model_default_params()
    model = ll.llama_model_load_from_file(path.encode(), mparams)
    assert model
    cparams = ll.llama_context_default_params()
    cparams.n_ctx = 512
    cparams.n_threads = cparams.n_threads_batch = 2
    ctx = ll.llama_init_from_model(model, cparams)
    try:
        vocab = ll.llama_model_get_vocab(model)
        buf = (ll.llama_token * 512)()
        n = ll.llama_tokenize(vocab, prompt.encode(), len(prompt.encode()), buf, 512, True, False)
        tokens = list(buf[:n])
        n_vocab = ll.llama_vocab_n_tokens(vocab)
        out = []
        batch_tokens = tokens
        for _ in range(n_new):
            arr = (ll.llama_token * len(batch_tokens))(*batch_tokens)
            assert ll.llama_decode(ctx, ll.llama_batch_get_one(arr, len(batch_tokens))) == 0
            logits = np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
            token = int(np.argmax(logits))
            out.append(token)
            batch_tokens = [token]
        return out
    finally:
        ll.llama_free(ctx)
        ll.llama_model_free(model)


@pytest.mark.parametrize("model", ["smollm2_path", "qwen_path"])
def test_greedy_generation_matches_the_c_api_loop(model, request):
    path = request.getfixturevalue(model)
    llm = Llama(model_path=path, n_ctx=512, n_threads=2, verbose=False)
    prompt_tokens = llm.tokenize(PROMPT.encode())
    generated = []
    for token in llm.generate(prompt_tokens, temp=0.0):
        generated.append(token)
        if len(generated) == N_NEW:
            break
    assert generated == _greedy_low_level(path, PROMPT, N_NEW)
    text = llm.detokenize(generated).decode(errors="replace")
    assert len(set(generated)) > 3, text  # real text, not one token repeated


def test_generation_is_deterministic(smollm2_path):
    def run():
        llm = Llama(model_path=smollm2_path, n_ctx=512, n_threads=2, verbose=False)
        return llm(PROMPT, max_tokens=16, temperature=0.0)["choices"][0]["text"]

    assert run() == run()
