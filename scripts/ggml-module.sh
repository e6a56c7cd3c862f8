#!/usr/bin/env bash
# Builds one ggml backend as a run-time module for `ferrite --backend-dir`: OUT/libggml-NAME.so and the
# libggml-base.so.0 it needs (run path $ORIGIN, so keep them together), from the ggml source of the
# llama-cpp-sys-2 version ferrite links (a module must be the same ggml as the binary; ferrite checks on load).
#
#   scripts/ggml-module.sh [--ggml DIR] [--build DIR] [-j N] NAME OUT [CMAKE_ARGS...]
#
# NAME: cuda, rpc, vulkan, ... (ggml's GGML_<NAME>=ON). The ggml source: --ggml DIR, else $FERRITE_GGML_SRC,
# else the crate's in the cargo registry (scripts/device-check.sh unpacks dist/ggml-src.tar.gz and passes it). The build folder
# (--build, default target/ggml-modules/build-NAME) is kept, so a second run only relinks what changed.
# Prints the time it took. CUDA: see scripts/build-cuda.sh, which installs a toolkit where none is present.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
say() { printf 'ggml-module: %s\n' "$*" >&2; }
die() { printf 'ggml-module: error: %s\n' "$*" >&2; exit 1; }

src="${FERRITE_GGML_SRC:-}"
build=""
jobs="$(nproc 2>/dev/null || echo 2)"
while [ $# -gt 0 ]; do
    case "$1" in
        --ggml) src="$2"; shift 2 ;;
        --build) build="$2"; shift 2 ;;
        -j) jobs="$2"; shift 2 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) break ;;
    esac
done
[ $# -ge 2 ] || die "usage: scripts/ggml-module.sh [--ggml DIR] [--build DIR] [-j N] NAME OUT [CMAKE_ARGS...]"
name="$1"; out="$2"; shift 2
case "$name" in
    cpu) die "ferrite has ggml's CPU backend built in; a CPU module cannot be loaded beside it" ;;
    *[!a-z0-9]*|"") die "backend name '$name': use ggml's lower-case name (cuda, rpc, vulkan, ...)" ;;
esac

# The crate's version from Cargo.lock, to find its source in the cargo registry.
crate_ggml() {
    local ver
    ver="$(awk '/^name = "llama-cpp-sys-2"/{getline; gsub(/[" ]/, "", $0); sub(/version=/, "", $0); print; exit}' "$root/Cargo.lock" 2>/dev/null || true)"
    [ -n "$ver" ] || return 1
    local d
    for d in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/llama-cpp-sys-2-"$ver"/llama.cpp/ggml; do
        [ -d "$d" ] && { echo "$d"; return 0; }
    done
    return 1
}
if [ -z "$src" ]; then
    src="$(crate_ggml)" || die "cannot find the ggml source: pass --ggml DIR (llama-cpp-sys-2's llama.cpp/ggml), or build ferrite once (cargo build --release) so the crate is in the cargo registry"
fi
[ -f "$src/CMakeLists.txt" ] && [ -d "$src/src/ggml-$name" ] || die "$src is not a ggml source folder with a $name backend (no src/ggml-$name)"
command -v cmake >/dev/null 2>&1 || die "cmake not found; install cmake 3.18 or newer"

upper="$(printf '%s' "$name" | tr a-z A-Z)"
build="${build:-$root/target/ggml-modules/build-$name}"
mkdir -p "$build" "$out"
start=$(date +%s)
say "configuring $upper from $src in $build"
cmake -S "$root/scripts/ggml-modules" -B "$build" -DGGML_SOURCE_DIR="$src" \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_BACKEND_DL=ON \
    -DGGML_CPU=OFF -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DGGML_CCACHE=OFF \
    -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF \
    -DGGML_"$upper"=ON "$@" > "$build/configure.log" 2>&1 \
    || { tail -30 "$build/configure.log" >&2; die "CMake configure failed (full log: $build/configure.log)"; }
if [ -n "${FERRITE_GGML_MODULE_CONFIGURE_ONLY:-}" ]; then
    say "configured in $(( $(date +%s) - start ))s (FERRITE_GGML_MODULE_CONFIGURE_ONLY: not building)"
    exit 0
fi
say "building ggml-$name with $jobs jobs"
cmake --build "$build" --target "ggml-$name" -j "$jobs" > "$build/build.log" 2>&1 \
    || { grep -m 20 -iE 'error' "$build/build.log" >&2 || tail -30 "$build/build.log" >&2; die "build failed (full log: $build/build.log)"; }
cp -f "$build/bin/libggml-$name.so" "$out/"
cp -fL "$build/bin/libggml-base.so.0" "$out/"
took=$(( $(date +%s) - start ))
say "built $out/libggml-$name.so ($(du -h "$out/libggml-$name.so" | cut -f1)) and libggml-base.so.0 in ${took}s"
