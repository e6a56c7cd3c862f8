#!/usr/bin/env bash
# ferrite's tests on another instruction set: cross-builds the workspace for 64-bit Arm (aarch64, ggml's NEON
# kernels) and runs the test binaries under qemu-user on this x86-64 machine. ggml's kernels sum in an order of their
# own on each ISA (lanes, tinyBLAS's conditions), so a bound that holds on AVX2 and AVX-512 may not hold on NEON;
# this shows it without an Arm machine.
#
#   scripts/test-arm64.sh                          # every test target of the workspace (hours: see below)
#   scripts/test-arm64.sh --test parity_llama      # one target; any other `cargo test` arguments go through
#   scripts/test-arm64.sh --test depth_top_k -- chosen_rows_match_full_reads_and_llama_f16_cache --nocapture
#   FERRITE_ARM_ARCH=armv8.6-a+fp16+dotprod+i8mm scripts/test-arm64.sh --test grouped_experts
#
# FERRITE_ARM_ARCH builds ggml's CPU backend for another Arm architecture than the plain armv8-a that
# llama-cpp-sys-2 pins for non-native aarch64 Linux builds (it sets GGML_CPU_ARM_ARCH itself, after the environment
# is read, so the variable cannot be passed through): a compiler wrapper replaces that one `-march=armv8-a` with
# `-march=$FERRITE_ARM_ARCH`. ggml then compiles in its dot-product (`+dotprod`), int8 matrix-multiply (`+i8mm`) and
# FP16 arithmetic (`+fp16`) kernels and uses them (ggml decides these from the compiler's flags, not at run time);
# qemu-user's default `max` CPU executes them. Each architecture builds in its own target directory
# (target/aarch64-<arch>).
#
# What it sets up (Debian/Ubuntu, as root or through sudo; quick when present): scripts/setup.sh with the packages
# qemu-user, gcc-aarch64-linux-gnu and g++-aarch64-linux-gnu, the Rust target aarch64-unknown-linux-gnu (rustup), and a
# binfmt_misc entry for aarch64 ELF files (the CLI tests start the `ferrite` binary themselves; without the entry
# only the test binaries, run through cargo's runner, would work). ggml is built for plain armv8-a (NEON, no dot
# product; llama-cpp-sys-2 pins that for non-native aarch64 Linux builds), in target/aarch64.
#
# Time, measured on the 2-core AMD EPYC (Zen 3) host: the first build 16 minutes; under qemu the tests run 20-30x
# slower than natively (offload_rpc 708 s, parity_llama 1796 s). On a 2-core Intel Xeon (AVX-512) a build took 8.5
# minutes, repack 87-188 s, graph_reuse 348 s, depth_top_k 1133 s.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
triple=aarch64-unknown-linux-gnu
sysroot=/usr/aarch64-linux-gnu

say() { printf 'test-arm64: %s\n' "$*" >&2; }
die() { printf 'test-arm64: error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root or sudo for: $*"
    fi
}

[ "$(uname -m)" = x86_64 ] || die "this script runs Arm tests on an x86-64 host; on an Arm machine run scripts/test.sh"

# What the build needs, the Python fixtures' virtualenv (host Python; the fixtures do not depend on the ISA), and
# qemu-user and the aarch64 cross compilers where missing.
scripts/setup.sh qemu-aarch64=qemu-user aarch64-linux-gnu-gcc=gcc-aarch64-linux-gnu \
    aarch64-linux-gnu-g++=g++-aarch64-linux-gnu
export FERRITE_PYTHON="$root/.venv/bin/python"

if ! rustup target list --installed 2>/dev/null | grep -qx "$triple"; then
    say "rustup target add $triple"
    rustup target add "$triple" >&2 || die "rustup target add $triple failed"
fi

binfmt=/proc/sys/fs/binfmt_misc
if [ ! -e "$binfmt/qemu-aarch64" ]; then
    [ -e "$binfmt/register" ] || as_root mount -t binfmt_misc binfmt_misc "$binfmt" \
        || die "cannot mount binfmt_misc at $binfmt (the CLI tests need it to start aarch64 binaries)"
    say "registering qemu-aarch64 for aarch64 ELF files in $binfmt"
    # ELF64, little-endian, e_machine 183 (EM_AARCH64); the mask ignores the ABI version and the file type's low bit.
    magic='\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00'
    mask='\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff'
    printf ':qemu-aarch64:M::%s:%s:%s:\n' "$magic" "$mask" "$(command -v qemu-aarch64)" \
        | as_root tee "$binfmt/register" >/dev/null || die "cannot register qemu-aarch64 in $binfmt"
fi

export CARGO_TARGET_DIR="$root/target/aarch64"
cc=aarch64-linux-gnu-gcc
cxx=aarch64-linux-gnu-g++
if [ -n "${FERRITE_ARM_ARCH:-}" ]; then
    case "$FERRITE_ARM_ARCH" in
        armv8*|armv9*) ;;
        *) die "FERRITE_ARM_ARCH=$FERRITE_ARM_ARCH: expected an -march value such as armv8.2-a+dotprod+fp16" ;;
    esac
    CARGO_TARGET_DIR="$root/target/aarch64-$(printf '%s' "$FERRITE_ARM_ARCH" | tr -c 'A-Za-z0-9.\n' '-')"
    wrappers="$CARGO_TARGET_DIR/march-wrappers"
    mkdir -p "$wrappers"
    for compiler in "$cc" "$cxx"; do
        # Only the exact pinned flag changes; every other argument goes through untouched.
        cat > "$wrappers/$compiler" <<WRAPPER
#!/usr/bin/env bash
args=()
for a in "\$@"; do
    if [ "\$a" = -march=armv8-a ]; then args+=(-march=$FERRITE_ARM_ARCH); else args+=("\$a"); fi
done
exec $(command -v "$compiler") "\${args[@]}"
WRAPPER
        chmod +x "$wrappers/$compiler"
    done
    cc="$wrappers/$cc"
    cxx="$wrappers/$cxx"
    say "ggml's CPU backend for -march=$FERRITE_ARM_ARCH (in $CARGO_TARGET_DIR)"
    # GCC 12 auto-vectorizes the scalar tail of ggml's Q4_0 dot product (a row of an odd number of 32-value blocks)
    # into USDOT, which reads the signed nibbles minus 8 as unsigned bytes: wrong Q4_0 products wherever int8 matmul
    # (i8mm, part of armv8.6-a and later) is enabled. Found with Debian's cross GCC 12.2; qemu's USDOT itself
    # computes correctly. tests/ggml_matmul.rs (block_32...) and parity_llama's q4_0 cache test fail on such a build.
    gcc_major="$(aarch64-linux-gnu-gcc -dumpversion 2>/dev/null | cut -d. -f1)"
    case "$FERRITE_ARM_ARCH" in
        *i8mm*|armv8.[6-9]*|armv9*)
            if [ "$gcc_major" = 12 ]; then
                say "warning: GCC 12 miscompiles ggml's Q4_0 dot product with int8 matmul (USDOT on signed values):" \
                    "expect ggml_matmul's block_32 test and parity_llama's q4_0 cache test to fail on this build"
            fi
            ;;
    esac
fi
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L $sysroot"
# Replaces .cargo/config.toml's target-cpu=native (this host's CPU) for the Arm target.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+neon"
export CC_aarch64_unknown_linux_gnu="$cc"
export CXX_aarch64_unknown_linux_gnu="$cxx"
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
export BINDGEN_EXTRA_CLANG_ARGS_aarch64_unknown_linux_gnu="--sysroot=$sysroot"
# Where qemu finds the Arm C library for the binaries the tests start themselves.
export QEMU_LD_PREFIX="$sysroot"

if [ "$#" -eq 0 ]; then
    set -- --workspace
fi
say "cargo test --release --target $triple $*"
exec cargo test --release --target "$triple" "$@"
