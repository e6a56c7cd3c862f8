#!/usr/bin/env bash
# Prepare a machine to build and test ferrite. Safe to run again; quick when all is present.
#
# 1. System packages the build needs (Debian/Ubuntu, apt-get), installed only when missing:
#    cmake and a C++ compiler (ggml), libclang-dev (bindgen in llama-cpp-sys-2),
#    python3-venv (only if `python3 -m venv` cannot make the virtualenv).
# 2. The Python virtualenv .venv at the repository root, from scripts/requirements.txt;
#    packages are reinstalled only when requirements.txt changes (hash stamp inside .venv).
#
#   scripts/setup.sh [COMMAND=PACKAGE ...]   # also install PACKAGE where COMMAND is not on the PATH
#                                            # (scripts/test-arm64.sh: qemu-aarch64=qemu-user, ...)
#
# Messages go to stderr. Runs apt-get as root, or through sudo otherwise.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
req="$root/scripts/requirements.txt"
venv="$root/.venv"
stamp="$venv/.ferrite-requirements.sha256"
python=python3

say() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

apt_updated=0
apt_install() {
    local -a as_root=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 \
            || die "need root or sudo to install: $*; install them yourself and run again"
        as_root=(sudo)
    fi
    command -v apt-get >/dev/null 2>&1 \
        || die "no apt-get on this machine; install these (or their equivalents) yourself: $*"
    if [ "$apt_updated" -eq 0 ]; then
        say "apt-get update"
        "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 \
            || die "apt-get update failed"
        apt_updated=1
    fi
    say "apt-get install $*"
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" >&2 \
        || die "apt-get install $* failed"
}

have_libclang() {
    [ -n "${LIBCLANG_PATH:-}" ] && return 0
    # The unversioned libclang.so (or libclang-NN.so) comes with libclang-dev, which also
    # brings clang's builtin headers that bindgen needs.
    if command -v ldconfig >/dev/null 2>&1 \
        && ldconfig -p 2>/dev/null | grep -Eq '[[:space:]]libclang(-[0-9.]+)?\.so[[:space:]]'; then
        return 0
    fi
    compgen -G '/usr/lib/llvm-*/lib/libclang.so' >/dev/null
}

# --- 1. system packages ---------------------------------------------------------------
missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v c++ >/dev/null 2>&1 || missing+=(g++)
command -v make >/dev/null 2>&1 || missing+=(make)
have_libclang || missing+=(libclang-dev)
command -v "$python" >/dev/null 2>&1 || missing+=(python3 python3-venv)
for pair in "$@"; do
    case "$pair" in
        ?*=?*) command -v "${pair%%=*}" >/dev/null 2>&1 || missing+=("${pair#*=}") ;;
        *) die "expected COMMAND=PACKAGE, got: $pair" ;;
    esac
done
if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}"
fi

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "$python is $("$python" --version 2>&1); the gguf package needs Python 3.10 or newer"

# --- 2. the virtualenv -------------------------------------------------------------------
if [ -d "$venv" ] && ! "$venv/bin/python" -c '' >/dev/null 2>&1; then
    say "$venv is broken (its Python is gone?); recreating it"
    rm -rf "$venv"
fi
if [ ! -x "$venv/bin/python" ]; then
    say "creating virtualenv $venv with $("$python" --version 2>&1)"
    if ! "$python" -m venv "$venv" >&2; then
        rm -rf "$venv"
        # Debian's own python3 needs python3-venv for ensurepip.
        apt_install python3-venv
        "$python" -m venv "$venv" >&2 || die "$python -m venv failed"
    fi
fi

want="$(sha256sum "$req" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    say "installing scripts/requirements.txt into .venv"
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$venv/bin/python" -m pip install -q -r "$req" >&2 \
        || die "pip install -r scripts/requirements.txt failed"
    printf '%s\n' "$want" >"$stamp"
else
    say ".venv is up to date"
fi
