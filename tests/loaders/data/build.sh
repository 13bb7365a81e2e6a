#!/bin/sh
# build.sh: regenerate the committed BPF objects that the loaders package and its tests use.
# Run from anywhere; paths are resolved against the repository root so the output is reproducible.
set -eu
root=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$root"
CLANG=${CLANG:-clang-19}
CFLAGS="-O2 -g -target bpf -I/usr/include/x86_64-linux-gnu -I bpf/include"
$CLANG $CFLAGS -c tests/loaders/data/test_progs.bpf.c -o tests/loaders/data/test_progs.bpf.o
$CLANG $CFLAGS -c bpf/probes.bpf.c -o loaders/objects/probes.bpf.o
