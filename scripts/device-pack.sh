#!/usr/bin/env bash
# Prepares dist/ for scripts/device-check.sh on a GPU machine that has no Rust toolchain and no network, where
# only the working tree and a few carried paths travel (64 MiB in all):
#
#   dist/ferrite          the release binary, stripped
#   dist/flash_model      examples/flash_model, stripped (writes the Flash-width benchmark model there)
#   dist/ggml-src.tar.gz  the ggml source of the linked llama-cpp-sys-2 (base + CUDA backend only), from which
#                         device-check.sh builds libggml-cuda.so with that machine's nvcc (about 2 minutes on 16 cores)
#   dist/cuda/            optional: a prebuilt module (scripts/build-cuda.sh dist/cuda), carried only with --with-cuda
#                         (57 MiB stripped for one architecture: too big beside the binaries in 64 MiB)
#   dist/PACK-INFO        commit, build flags, instruction set, sizes
#
#   scripts/device-pack.sh [--native] [--with-cuda]
#
# By default the binaries are built for any AVX2 machine (RUSTFLAGS=-C target-cpu=x86-64-v3, in target/portable:
# a second ggml build, about 8 minutes on 2 cores the first time): the GPU machine's CPU is unknown here. --native
# reuses target/release (this machine's instruction set; device-check.sh refuses to run it on a CPU without that
# set). Prints the size of what is carried; the run tool's `carry` takes ["dist"] (dist/ is git-ignored).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
say() { printf 'device-pack: %s\n' "$*" >&2; }
die() { printf 'device-pack: error: %s\n' "$*" >&2; exit 1; }

native=0
with_cuda=0
for a in "$@"; do
    case "$a" in
        --native) native=1 ;;
        --with-cuda) with_cuda=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) die "unknown argument $a (see --help)" ;;
    esac
done
limit=$((64 * 1024 * 1024))
start=$(date +%s)

if [ "$native" = 1 ]; then
    target="$root/target"
    isa="native ($(grep -m1 -o -w -E 'avx512f' /proc/cpuinfo >/dev/null && echo avx512f,avx2,fma,f16c || echo avx2,fma,f16c))"
    needs="$(grep -q -w avx512f /proc/cpuinfo && echo 'avx2 fma f16c avx512f avx512bw' || echo 'avx2 fma f16c')"
    say "building the release binaries for this machine's CPU (target/release)"
    cargo build --release --bin ferrite --example flash_model
else
    [ "$(uname -m)" = x86_64 ] || die "the portable build is for x86-64; on $(uname -m) use --native"
    target="$root/target/portable"
    isa="x86-64-v3 (avx2,fma,f16c)"
    needs="avx2 fma f16c"
    say "building portable (x86-64-v3) release binaries into target/portable"
    CARGO_TARGET_DIR="$target" RUSTFLAGS="-C target-cpu=x86-64-v3" \
        cargo build --release --bin ferrite --example flash_model
fi

rm -rf dist/ferrite dist/flash_model dist/ggml-src.tar.gz dist/PACK-INFO
mkdir -p dist
strip -o dist/ferrite "$target/release/ferrite"
strip -o dist/flash_model "$target/release/examples/flash_model"

# The ggml source: what ggml-base and the CUDA backend need (the module build adds ggml as a subproject).
ver="$(awk '/^name = "llama-cpp-sys-2"/{getline; gsub(/[" ]/, "", $0); sub(/version=/, "", $0); print; exit}' Cargo.lock)"
ggml=""
for d in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/llama-cpp-sys-2-"$ver"/llama.cpp/ggml; do
    [ -d "$d" ] && ggml="$d"
done
[ -n "$ggml" ] || die "cannot find llama-cpp-sys-2 $ver's ggml in the cargo registry (build ferrite first)"
( cd "$(dirname "$ggml")" && { echo ggml/CMakeLists.txt; echo ggml/cmake; echo ggml/include; echo ggml/src/ggml-cuda;
    find ggml/src -maxdepth 1 -type f; } ) > "$root/target/ggml-src.list"
tar -C "$(dirname "$ggml")" -czf dist/ggml-src.tar.gz -T "$root/target/ggml-src.list"
tar -tzf dist/ggml-src.tar.gz > "$root/target/ggml-src.list"
grep -q '^ggml/src/ggml-cuda/ggml-cuda.cu$' "$root/target/ggml-src.list" || die "the ggml source lacks ggml-cuda"

if [ "$with_cuda" = 1 ]; then
    [ -f dist/cuda/libggml-cuda.so ] || die "--with-cuda: build the module first (CUDA_ARCHS=90 scripts/build-cuda.sh dist/cuda)"
else
    rm -rf dist/cuda
fi

{
    echo "commit: $(git rev-parse HEAD)$(git diff --quiet HEAD -- . ':!dist' || echo ' (with uncommitted changes)')"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m)"
    echo "isa: $isa"
    echo "needs: $needs"
    echo "llama-cpp-sys-2: $ver"
} > dist/PACK-INFO
total=$(du -cb dist/ferrite dist/flash_model dist/ggml-src.tar.gz dist/PACK-INFO $( [ -d dist/cuda ] && echo dist/cuda ) | tail -1 | cut -f1)
echo "size: $total bytes" >> dist/PACK-INFO
for f in dist/ferrite dist/flash_model dist/ggml-src.tar.gz; do
    say "$(du -h "$f" | cut -f1)  $f"
done
[ -d dist/cuda ] && say "$(du -sh dist/cuda | cut -f1)  dist/cuda"
mib=$(( (total + 1048575) / 1048576 ))
say "carry dist/: $total bytes ($mib MiB of the 64 MiB limit) in $(( $(date +%s) - start ))s"
[ "$total" -le "$limit" ] || die "dist/ is $mib MiB: over the 64 MiB the device machine takes"
