// The two calls llama.cpp makes into TriAttention (added by patches/0003).
#pragma once

#include "llama.h"

// Before llama_decode processes a batch: compress the sequence's cells to the budget when the
// batch would not fit under budget + divide_length. Returns 0, or the value llama_decode returns.
int32_t triattention_on_decode(llama_context * ctx, const llama_batch & batch);

// Before the context is freed: drop its TriAttention state.
void triattention_on_free(llama_context * ctx);
