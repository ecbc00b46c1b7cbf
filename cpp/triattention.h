// TriAttention KV-cache compression for llama.cpp: the additive C API.
// Everything here is new API next to llama.h; no existing struct changes layout,
// so llama-cpp-python's bindings stay valid.
#pragma once

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

// Version of this C API; bumped when a declaration here changes.
#define TRIATTENTION_API_VERSION 1

LLAMA_API int32_t triattention_api_version(void);

#ifdef __cplusplus
}
#endif
