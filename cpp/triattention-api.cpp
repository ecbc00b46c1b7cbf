#include "triattention.h"

int32_t triattention_api_version(void) {
    return TRIATTENTION_API_VERSION;
}
