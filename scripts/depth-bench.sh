#!/usr/bin/env bash
# Speed at depth against llama.cpp (issue 18, item 3): prompt processing (pp512) and generation (tg32) after
# 0, 4K, 16K and 64K tokens already in the cache, with an F16 and a q8_0 cache, on a Flash-attention-width model:
# Flash's real attention, compressor, indexer (64 x 128, top-512) and cache sizes, 4 layers (raw, ratio 4, ratio 128,
# ratio 4), 8 small experts (width 256), so that depth and not the experts dominates. Both engines are loaded at once
# and their repetitions alternate (`--interleave`), so the ratio compares them on the same machine state.
#
#   scripts/depth-bench.sh                       # the whole matrix (see the time estimate below)
#   scripts/depth-bench.sh -d 0,4096,16384       # without 64K
#   scripts/depth-bench.sh -d 0,2048 -r 1 -c f16 # a quick check that everything runs
#
# Options (defaults in brackets):
#   -d LIST   depths, comma-separated                    [0,4096,16384,65536]
#   -c LIST   cache types, comma-separated (f16,q8_0,f32) [f16,q8_0]
#   -r N      timed repetitions per test                 [3]
#   -t N      threads                                    [all cores]
#   -p N      prompt tokens of the pp test               [512]
#   -n N      generated tokens of the tg test            [32]
#   -m FILE   the model; generated if missing            [/tmp/ferrite-flash-attn4.gguf]
#   -o DIR    logs and summary.md                        [/tmp/ferrite-depth-bench-DATE]
#   -L MIN    skip a depth whose estimated wall time exceeds MIN minutes (0: run every depth)   [0]
#   -x        also run ferrite with FERRITE_CHOSEN_ROWS=0 (attention past the indexer's top-k reads every visible
#             ratio-4 row under a mask, as llama.cpp does): what reading only the indexer's chosen rows gives
#
# Each (cache type, depth) is one `ferrite bench` run with its own log, so a stopped run keeps what finished.
#
# Time: each engine processes a depth's tokens once (untimed; `bench` prints how long), then the warm-ups and timed
# runs. Before each depth the script prints an estimate from the earlier depths of the same cache type; -L skips
# what would take longer. Measured on a 2-core AVX2 host (idle), the indexer as products (4K, 16K: 250fe4d; 64K: 1044343):
#   d4096 f16 343 s, q8_0 318 s (prefills about 93 s ferrite, 105-122 s llama.cpp); d16384 f16 1409 s, q8_0 1113 s
#   (prefills: ferrite 436 / 428 s, llama.cpp 775 / 551 s); d65536 q8_0 5907 s (ferrite 2227 s, llama.cpp
#   3091-3469 s), at bd3bbfa 5564 s (ferrite 2020 s, llama.cpp 3327 s); d65536 f16 at f31b9b2: 9029 s in all
#   (ferrite 2240 s, llama.cpp 6534 s), so about 2.5 h. On a 2-core Intel Xeon with AMX (2381a4e): d4096 f16 197 s,
#   q8_0 179 s; d16384 f16 796 s, q8_0 653 s (prefills: ferrite 221 / 228 s, llama.cpp 463 / 342 s).
# The time per depth token grows slowly with the depth (ferrite 23 ms at 4K, 27 ms at 16K, 34 ms at 64K): the wall
# time is close to linear in the depth, at 64K about 1.5 h with q8_0 and 2.5 h with f16. Before the indexer became
# products (ggml's fused operator in both engines) ferrite's prefill grew with the square of the depth (3197 s at 64K).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

depths="0,4096,16384,65536"
caches="f16,q8_0"
reps=3
threads=""
n_prompt=512
n_gen=32
model="/tmp/ferrite-flash-attn4.gguf"
out="/tmp/ferrite-depth-bench-$(date -u +%Y%m%d-%H%M%S)"
masked=0
limit_min=0

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2; }
while getopts "d:c:r:t:p:n:m:o:L:xh" opt; do
    case "$opt" in
        d) depths="$OPTARG" ;;
        c) caches="$OPTARG" ;;
        r) reps="$OPTARG" ;;
        t) threads="$OPTARG" ;;
        p) n_prompt="$OPTARG" ;;
        n) n_gen="$OPTARG" ;;
        m) model="$OPTARG" ;;
        o) out="$OPTARG" ;;
        L) limit_min="$OPTARG" ;;
        x) masked=1 ;;
        *) usage ;;
    esac
done
shift $((OPTIND - 1))
[ $# -eq 0 ] || { echo "depth-bench: unexpected argument: $1" >&2; usage; }
for list in "$depths" "$reps" "$n_prompt" "$n_gen" "$limit_min" ${threads:+"$threads"}; do
    [[ "$list" =~ ^[0-9]+(,[0-9]+)*$ ]] || { echo "depth-bench: not a number or list of numbers: $list" >&2; exit 2; }
done
[[ "$caches" =~ ^(f16|f32|q8_0)(,(f16|f32|q8_0))*$ ]] || { echo "depth-bench: cache types are f16, f32, q8_0: got $caches" >&2; exit 2; }

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
echo "depth-bench: building ferrite and the model generator (release)" >&2
cargo build --release --bin ferrite --example flash_model >&2
ferrite="$root/target/release/ferrite"

if [ ! -f "$model" ]; then
    echo "depth-bench: writing the benchmark model $model (1.72 GB, a few minutes)" >&2
    "$root/target/release/examples/flash_model" "$model" --layers 4 --n-expert 8 --expert-ffn 256 >&2
fi

mkdir -p "$out"
summary="$out/summary.md"
commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo +dirty)"
cpu="$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)"
# The ISA decides ggml's kernels (and ferrite's gather blocks): runs on AVX2 and AVX-512 hosts are not comparable.
# The widest the CPU has (the flags line lists avx2 before avx512f, so the first match is not it).
flags=" $(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
isa="ISA unknown"
for f in amx_int8:"AVX-512 with AMX" avx512f:AVX-512 avx2:AVX2 asimd:NEON neon:NEON; do
    case "$flags" in *" ${f%%:*} "*) isa="${f#*:}"; break ;; esac
done
{
    echo "# ferrite bench at depth vs llama.cpp"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'), ferrite $commit"
    echo "- host: ${cpu:-unknown CPU}, $(nproc) cores, $(free -g | awk '/^Mem:/ {print $2}') GiB RAM, $isa"
    echo "- model: $model ($(du -h --apparent-size "$model" | cut -f1)): 4 Flash-width layers (raw, ratio 4, ratio 128, ratio 4), 8 experts of width 256"
    echo "- each run: \`ferrite bench -m MODEL -p $n_prompt -n $n_gen -d DEPTH -r $reps --cache-type TYPE --vs-llama --llama-repack --interleave${threads:+ -t $threads}\`"
    echo "- ratio: median of the interleaved pairs' ratios (ferrite / llama.cpp); > 1 means ferrite is faster"
    echo
} > "$summary"

# Estimated seconds of a run at depth $1 from the runs so far of this cache type (depths in `done_d`, wall seconds
# in `done_s`): the time per depth token grows with the depth (the indexer and the rows each query sees), fitted
# linearly through the last two depths; from one depth, that depth's time per token with a quarter more for every
# fourfold of depth (measured: 4K -> 16K +17 %, 16K -> 64K +26 %). Empty when nothing is known yet.
estimate() {
    local d="$1" n=${#done_d[@]}
    [ "$n" -gt 0 ] || return 0
    local d2=${done_d[n-1]} s2=${done_s[n-1]}
    if [ "$n" -ge 2 ]; then
        awk -v d="$d" -v d1="${done_d[n-2]}" -v s1="${done_s[n-2]}" -v d2="$d2" -v s2="$s2" 'BEGIN {
            a1 = s1 / d1; a2 = s2 / d2; a = a2 + (a2 - a1) * (d - d2) / (d2 - d1);
            if (a < a2) a = a2; printf "%d", a * d }'
    else
        awk -v d="$d" -v d2="$d2" -v s2="$s2" 'BEGIN { printf "%d", s2 * (d / d2) * (1 + 0.25 * log(d / d2) / log(4)) }'
    fi
}

run() { # cache depth label [env...]
    local cache="$1" depth="$2" label="$3"
    shift 3
    local log="$out/bench-$cache-d$depth$label.log"
    local args=(bench -m "$model" -p "$n_prompt" -n "$n_gen" -d "$depth" -r "$reps" --cache-type "$cache"
        --vs-llama --llama-repack --interleave)
    [ -z "$threads" ] || args+=(-t "$threads")
    local load_before start rc=0
    load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
    start=$(date +%s)
    echo "depth-bench: $cache cache, depth $depth${label:+ ($label)}: $log" >&2
    env "$@" "$ferrite" "${args[@]}" > "$log" 2>&1 || rc=$?
    local secs=$(( $(date +%s) - start ))
    {
        echo "### cache $cache, depth $depth${label:+, ${label#-}}"
        echo
        if [ "$rc" -eq 0 ]; then
            grep '^|' "$log" || echo "(no table in $log)"
            echo
            # How long each engine took to process the depth's tokens (untimed; most of a deep run's wall time).
            grep "the depth's .* processed in" "$log" || true
        else
            echo "**failed** (exit $rc), last lines of $log:"
            echo '```'
            tail -n 5 "$log"
            echo '```'
        fi
        echo
        echo "wall ${secs} s, load average before: $load_before, after: $(cut -d' ' -f1-3 /proc/loadavg)"
        echo
    } >> "$summary"
    return 0
}

IFS=',' read -r -a cache_list <<< "$caches"
IFS=',' read -r -a depth_list <<< "$depths"
for cache in "${cache_list[@]}"; do
    done_d=()
    done_s=()
    for depth in "${depth_list[@]}"; do
        est=""
        [ "$depth" -eq 0 ] || est="$(estimate "$depth")"
        if [ -n "$est" ]; then
            echo "depth-bench: $cache cache, depth $depth: estimated $((est / 60)) min" >&2
            if [ "$limit_min" -gt 0 ] && [ "$est" -gt $((limit_min * 60)) ]; then
                printf '### cache %s, depth %s\n\nskipped: estimated %d min, over the %d min limit (-L)\n\n' \
                    "$cache" "$depth" $((est / 60)) "$limit_min" >> "$summary"
                continue
            fi
        fi
        start_run=$(date +%s)
        run "$cache" "$depth" ""
        if [ "$depth" -gt 0 ]; then
            done_d+=("$depth")
            done_s+=($(( $(date +%s) - start_run )))
        fi
        if [ "$masked" -eq 1 ]; then
            run "$cache" "$depth" "-masked" FERRITE_CHOSEN_ROWS=0
        fi
    done
done
echo "depth-bench: done; summary: $summary" >&2
cat "$summary"
