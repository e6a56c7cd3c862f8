#!/usr/bin/env bash
# Builds ggml's CUDA backend as a module for ferrite: OUT/libggml-cuda.so and OUT/libggml-base.so.0 (keep them
# together; run `ferrite ... --backend-dir OUT`, or put both beside the ferrite executable). ferrite itself is the
# ordinary `cargo build --release` binary: it loads the module at run time, so one binary serves CPU-only machines
# and NVIDIA ones alike.
#
#   scripts/build-cuda.sh [--configure-only | --one-object] [--bundle-runtime] [OUT]     (OUT: dist/cuda)
#
# Environment:
#   CUDA_ARCHS   compute capabilities to build for, CMake style [default: 80;86;89;90;120]
#                (A100, RTX 30xx/A6000, RTX 40xx/L40/L4, H100/H200, RTX 50xx/RTX PRO 6000); `native` = this GPU
#   JOBS         parallel compile jobs [default: nproc]
#   CUDACXX      the nvcc to use [default: nvcc on PATH, /usr/local/cuda/bin/nvcc, else a CUDA 13 toolkit installed
#                from PyPI's wheels into target/cuda-toolkit/ (nvidia-cuda-nvcc, -runtime, -cccl, -crt, nvidia-nvvm,
#                nvidia-cublas; about 1.1 GB; needs python3 with venv)]
#
# The wheels have no libcuda.so stub, so the build sets GGML_CUDA_NO_VMM=ON (ggml then allocates device memory
# with cudaMalloc instead of the driver's virtual memory API; same kernels). The module needs the CUDA runtime
# it was built with (libcudart.so.13, libcublas.so.13, libcublasLt.so.13) and a driver for that CUDA version
# (`nvidia-smi` shows the highest CUDA version the driver runs): install the CUDA runtime, or `pip install
# nvidia-cuda-runtime nvidia-cublas` and put their nvidia/cu13/lib folder on LD_LIBRARY_PATH, or pass
# --bundle-runtime to copy the three libraries beside the module (about 600 MB).
#
# --configure-only stops after CMake's configure; --one-object also compiles one small kernel file (a check of the
# toolkit that takes seconds; the whole backend takes 12-27 minutes per architecture on 2 cores).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
say() { printf 'build-cuda: %s\n' "$*" >&2; }
die() { printf 'build-cuda: error: %s\n' "$*" >&2; exit 1; }

mode=full
bundle=0
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --configure-only) mode=configure; shift ;;
        --one-object) mode=object; shift ;;
        --bundle-runtime) bundle=1; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) out="$1"; shift ;;
    esac
done
out="${out:-$root/dist/cuda}"
archs="${CUDA_ARCHS:-80;86;89;90;120}"
jobs="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
start=$(date +%s)

# 1. A CUDA toolkit: nvcc given or installed, else the PyPI wheels.
nvcc="${CUDACXX:-}"
if [ -z "$nvcc" ]; then
    if command -v nvcc >/dev/null 2>&1; then
        nvcc="$(command -v nvcc)"
    elif [ -x /usr/local/cuda/bin/nvcc ]; then
        nvcc=/usr/local/cuda/bin/nvcc
    fi
fi
if [ -z "$nvcc" ] && [ -n "${FERRITE_NO_PIP:-}" ]; then
    die "no nvcc on PATH, in CUDACXX or in /usr/local/cuda/bin (FERRITE_NO_PIP: not installing one from PyPI)"
fi
if [ -z "$nvcc" ]; then
    tk="$root/target/cuda-toolkit"
    venv="$tk/venv"
    if [ ! -x "$venv/bin/pip" ]; then
        command -v python3 >/dev/null 2>&1 || die "no nvcc and no python3 to install a CUDA toolkit from PyPI; install the CUDA toolkit (or set CUDACXX)"
        say "no nvcc here: installing a CUDA 13 toolkit from PyPI's wheels into $venv"
        python3 -m venv "$venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
    fi
    pkgs=("nvidia-cuda-nvcc==13.*" "nvidia-cuda-runtime==13.*" "nvidia-cuda-cccl==13.*" "nvidia-cuda-crt==13.*"
          "nvidia-nvvm==13.*" "nvidia-cublas==13.*")
    "$venv/bin/pip" install -q --disable-pip-version-check "${pkgs[@]}" \
        || die "pip could not install the CUDA wheels (${pkgs[*]})"
    cu="$("$venv/bin/python" -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
    [ -x "$cu/bin/nvcc" ] || die "the wheels gave no $cu/bin/nvcc"
    # CMake's FindCUDAToolkit and the linker look for the unversioned names the wheels lack.
    for l in cudart cublas cublasLt; do
        [ -e "$cu/lib/lib$l.so.13" ] || die "the wheels gave no $cu/lib/lib$l.so.13"
        ln -sf "lib$l.so.13" "$cu/lib/lib$l.so"
    done
    nvcc="$cu/bin/nvcc"
    say "toolkit ready in $(( $(date +%s) - start ))s: $nvcc"
fi
[ -x "$nvcc" ] || die "$nvcc is not an executable nvcc"
cuda_root="$(cd "$(dirname "$nvcc")/.." && pwd)"
"$nvcc" --version | tail -2 >&2

# 2. Without the driver API's stub library (the wheels), ggml cannot use the virtual memory API.
vmm=OFF
if ! ls "$cuda_root"/lib*/stubs/libcuda.so "$cuda_root"/lib/libcuda.so "$cuda_root"/targets/*/lib/stubs/libcuda.so >/dev/null 2>&1; then
    vmm=ON
    say "no libcuda.so stub in $cuda_root: GGML_CUDA_NO_VMM=ON"
fi

# 3. The module.
build="$root/target/ggml-modules/build-cuda"
# The toolkit's library folders go into the module's run path: it then finds libcudart/libcublas without
# LD_LIBRARY_PATH on this machine (elsewhere: the system's, or LD_LIBRARY_PATH, or --bundle-runtime).
rpath=""
for d in "$cuda_root/lib64" "$cuda_root/lib" "$cuda_root"/targets/*/lib; do
    [ -d "$d" ] && ls "$d"/libcudart.so* >/dev/null 2>&1 && rpath="${rpath:+$rpath;}$d"
done
cmake_args=(-DCMAKE_CUDA_COMPILER="$nvcc" -DCUDAToolkit_ROOT="$cuda_root" -DCMAKE_CUDA_ARCHITECTURES="$archs"
            -DGGML_CUDA_NO_VMM="$vmm" -DFERRITE_MODULE_RPATH="$rpath" -DCMAKE_CUDA_RUNTIME_LIBRARY=Shared)
case "$mode" in
    configure|object)
        src="${FERRITE_GGML_SRC:-}"
        # Configure only, through ggml-module.sh's configure step (its build step would build everything).
        FERRITE_GGML_MODULE_CONFIGURE_ONLY=1 "$root/scripts/ggml-module.sh" --build "$build" -j "$jobs" \
            ${src:+--ggml "$src"} cuda "$out" "${cmake_args[@]}"
        if [ "$mode" = object ]; then
            say "compiling one kernel file (arange.cu) for $archs"
            make -C "$build/ggml/src/ggml-cuda" arange.cu.o > "$build/object.log" 2>&1 \
                || { tail -30 "$build/object.log" >&2; die "nvcc failed on arange.cu (log: $build/object.log)"; }
        fi
        say "done in $(( $(date +%s) - start ))s (no module built: --configure-only / --one-object)"
        exit 0
        ;;
esac
say "building libggml-cuda.so for CUDA_ARCHS=$archs with $jobs jobs (about 2 minutes per architecture on 16 cores, 12-27 on 2)"
"$root/scripts/ggml-module.sh" --build "$build" -j "$jobs" ${FERRITE_GGML_SRC:+--ggml "$FERRITE_GGML_SRC"} \
    cuda "$out" "${cmake_args[@]}"
strip --strip-unneeded "$out/libggml-cuda.so" "$out/libggml-base.so.0" 2>/dev/null || true
if [ "$bundle" = 1 ]; then
    for l in libcudart.so.13 libcublas.so.13 libcublasLt.so.13; do
        f="$(find "$cuda_root" -name "$l" 2>/dev/null | head -1)"
        [ -n "$f" ] || die "cannot find $l under $cuda_root to bundle"
        cp -fL "$f" "$out/"
    done
    say "bundled the CUDA runtime libraries beside the module"
fi
took=$(( $(date +%s) - start ))
say "built $out/libggml-cuda.so ($(du -h "$out/libggml-cuda.so" | cut -f1), stripped) in ${took}s ($(( took / 60 ))m $(( took % 60 ))s)"
say "run: ferrite complete -m MODEL --backend-dir $out --list-devices   (CUDA0 should be listed)"
