#!/usr/bin/env bash
# Paging under a memory cap: a Flash-width model about 3x the cap, run in a memory cgroup with that cap, measured as
# ferrite with the paged expert store, ferrite with the experts in the OS map (--no-paging), and llama.cpp
# (in-process, same file, same cap), plus the disk-bandwidth limit at the measured hit rate. See bench/README.md,
# "Paging under a memory cap".
#
# Needs root (a memory cgroup, dropping the page cache), cargo, and jq or python3.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bench/paging.sh [--layers N] [--model PATH] [--cap SIZE] [-t THREADS] [-p 512] [-n 32] [-r 2] [--out DIR]
                       [--no-build]

  --layers N     layers of the generated model (default 4: 16.25 GB)
  --model PATH   model file (default /tmp/ferrite-flash-<N>L.gguf); generated with --layers N if missing
  --cap SIZE     memory cap of the runs: 5G, 5400M, 5GiB, bytes (default: the file size / 3)
  -t THREADS     CPU threads (default: all cores; use no more than the idle ones)
  -p N           prompt tokens of the prefill test (default 512)
  -n N           generated tokens of the decode test (default 32)
  -r N           repetitions (default 2)
  --out DIR      where the JSON, logs and summary.md go (default bench/results/paging-<date>)
  --no-build     use the binaries already in target/release (FERRITE_BIN=PATH picks another ferrite binary)

Runs, each after dropping the page cache: the disk bandwidth (examples/disk_read), then in the capped cgroup
`ferrite bench --vs-llama --json` planned from the cap (paged experts), and again with --no-paging (the OS map).
EOF
}

log() { printf 'paging.sh: %s\n' "$*" >&2; }
die() {
    printf 'paging.sh: error: %s\n' "$*" >&2
    exit 1
}

# ---------------------------------------------------------------------------------------------------------------
# Arguments

layers=4
model=""
cap_arg=""
threads=""
n_prompt=512
n_gen=32
reps=2
out=""
build=1

need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"; }
positive() { [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 $2: expected a whole number of at least 1"; }

while [[ $# -gt 0 ]]; do
    case $1 in
    --layers) need_value "$@"; positive "$1" "$2"; layers=$2; shift 2 ;;
    --model | -m) need_value "$@"; model=$2; shift 2 ;;
    --cap) need_value "$@"; cap_arg=$2; shift 2 ;;
    -t | --threads) need_value "$@"; positive "$1" "$2"; threads=$2; shift 2 ;;
    -p) need_value "$@"; positive "$1" "$2"; n_prompt=$2; shift 2 ;;
    -n) need_value "$@"; positive "$1" "$2"; n_gen=$2; shift 2 ;;
    -r) need_value "$@"; positive "$1" "$2"; reps=$2; shift 2 ;;
    --out) need_value "$@"; out=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
    esac
done

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
[[ -n $model ]] || model=/tmp/ferrite-flash-${layers}L.gguf
[[ -n $threads ]] || threads=$(nproc)
[[ -n $out ]] || out=bench/results/paging-$(date +%Y%m%d-%H%M%S)

# "5G", "5400M", "1.5GiB", "123456": decimal units as ferrite's --mem (K = 1000), binary ones with "iB".
to_bytes() {
    awk -v s="$1" 'BEGIN {
        if (!match(s, /^[0-9]+(\.[0-9]+)?/)) exit 1
        n = substr(s, 1, RLENGTH); u = toupper(substr(s, RLENGTH + 1))
        m[""] = 1; m["B"] = 1; m["K"] = 1e3; m["KB"] = 1e3; m["M"] = 1e6; m["MB"] = 1e6; m["G"] = 1e9; m["GB"] = 1e9
        m["T"] = 1e12; m["TB"] = 1e12; m["KIB"] = 2^10; m["MIB"] = 2^20; m["GIB"] = 2^30; m["TIB"] = 2^40
        if (!(u in m) || n * m[u] < 1) exit 1
        printf "%.0f\n", n * m[u]
    }'
}
gib() { awk -v b="$1" 'BEGIN { printf "%.2f GiB", b / 2^30 }'; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 2^20 }'; }

# ---------------------------------------------------------------------------------------------------------------
# Tools

[[ $(id -u) -eq 0 ]] || die "run as root: the benchmark creates a memory cgroup and drops the page cache"
command -v cargo >/dev/null || die "cargo is not on PATH"
if command -v jq >/dev/null; then
    json_tool=jq
elif command -v python3 >/dev/null; then
    json_tool=python3
else
    die "needs jq or python3 to read the JSON the benchmarks print"
fi

ferrite=${FERRITE_BIN:-target/release/ferrite}
flash_model=target/release/examples/flash_model
disk_read=target/release/examples/disk_read
if [[ $build -eq 1 ]]; then
    log "building (cargo build --release)"
    cargo build --release --bin ferrite --example flash_model --example disk_read ||
        die "the build failed (if someone is editing the tree, retry later or pass --no-build)"
fi
for bin in "$ferrite" "$flash_model" "$disk_read"; do
    [[ -x $bin ]] || die "$bin is missing: build it (cargo build --release --bin ferrite --example flash_model --example disk_read)"
done
bench_help=$("$ferrite" bench --help)
[[ $bench_help == *--no-paging* ]] || die "$ferrite bench has no --no-paging flag: this script needs a newer ferrite"

# ---------------------------------------------------------------------------------------------------------------
# Memory cap: a child of this process's memory cgroup (v2 memory.max, or v1 memory.limit_in_bytes), else a
# systemd scope with MemoryMax.

cg_mode=""   # v2 | v1 | systemd
cg_parent="" # the folder new cgroups go in (v2, v1)
cg_dir=""    # the cgroup of the current run

# /proc/self/mountinfo as "FSTYPE MOUNT_POINT ROOT SUPER_OPTIONS" (the optional fields before "-" vary in number).
mounts() {
    awk '{ for (i = 7; i <= NF && $i != "-"; i++) {}; print $(i + 1), $5, $4, $(i + 3) }' /proc/self/mountinfo
}

# Where new cgroups can go in hierarchy $1 ("0::" line for v2, the memory controller's for v1): the folder of this
# process's cgroup, then the mount's root (a v2 leaf with processes cannot hand the memory controller down).
cgroup_folder() {
    local version=$1 mount root path line
    if [[ $version == 2 ]]; then
        line=$(mounts | awk '$1 == "cgroup2" { print $2, $3; exit }')
        path=$(awk -F: '$1 == "0" && $2 == "" { print $3; exit }' /proc/self/cgroup)
    else
        line=$(mounts | awk '$1 == "cgroup" && ("," $4 ",") ~ /,memory,/ { print $2, $3; exit }')
        path=$(awk -F: '("," $2 ",") ~ /,memory,/ { print $3; exit }' /proc/self/cgroup)
    fi
    [[ -n $line && -n $path ]] || return 1
    mount=${line%% *}
    root=${line#* }
    # Inside a container the mount's root may be our own cgroup: strip it from the path.
    if [[ $root != / && $path == "$root"* ]]; then path=${path#"$root"}; fi
    [[ -d $mount$path ]] || path=/
    printf '%s\n' "${mount%/}${path%/}"
    [[ $path == / ]] || printf '%s\n' "${mount%/}"
}

# Creates cgroup $1 under cg_parent with the cap; returns 1 (and leaves nothing behind) when it cannot.
make_cgroup() {
    local dir=$cg_parent/$1
    mkdir "$dir" 2>/dev/null || return 1
    cg_dir=$dir
    if [[ $cg_mode == v2 ]]; then
        if [[ ! -e $dir/memory.max ]]; then
            # The parent does not hand the memory controller to its children; it can when it holds no process.
            echo +memory >"$cg_parent/cgroup.subtree_control" 2>/dev/null || true
        fi
        { echo "$cap" >"$dir/memory.max"; } 2>/dev/null || { remove_cgroup; return 1; }
        if [[ -e $dir/memory.swap.max ]]; then echo 0 >"$dir/memory.swap.max" 2>/dev/null || true; fi
    else
        { echo "$cap" >"$dir/memory.limit_in_bytes"; } 2>/dev/null || { remove_cgroup; return 1; }
        # Without swap accounting this file is absent; with it, the cap covers swap too.
        if [[ -e $dir/memory.memsw.limit_in_bytes ]]; then
            { echo "$cap" >"$dir/memory.memsw.limit_in_bytes"; } 2>/dev/null || { remove_cgroup; return 1; }
        fi
    fi
}

# Stops what is left in the current cgroup (only this script's runs go there) and removes it.
remove_cgroup() {
    local dir=$cg_dir pids tries
    [[ -n $dir && -d $dir ]] || { cg_dir=""; return 0; }
    for tries in 1 2 3 4 5 6 7 8 9 10 11; do
        pids=$(cat "$dir/cgroup.procs" 2>/dev/null) || break
        [[ -n $pids ]] || break
        if [[ $tries -eq 11 ]]; then
            log "warning: processes $(echo "$pids" | tr '\n' ' ')still run in $dir"
            break
        fi
        # shellcheck disable=SC2086 # one pid a word
        kill $pids 2>/dev/null || true
        sleep 0.5
    done
    for tries in 1 2 3 4 5 6; do
        rmdir "$dir" 2>/dev/null && break
        [[ $tries -lt 6 ]] || log "warning: cannot remove the cgroup $dir (remove it with rmdir once it is empty)"
        sleep 0.2
    done
    cg_dir=""
}
trap remove_cgroup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

choose_cap_method() {
    local version folder
    for version in 2 1; do
        while read -r folder; do
            if [[ $version == 2 ]]; then
                grep -qw memory "$folder/cgroup.controllers" 2>/dev/null || continue
                cg_mode=v2
            else
                cg_mode=v1
            fi
            cg_parent=$folder
            if make_cgroup "ferrite-paging-probe-$$"; then
                remove_cgroup
                return 0
            fi
        done < <(cgroup_folder "$version" || true)
    done
    cg_mode=""
    cg_parent=""
    if command -v systemd-run >/dev/null &&
        systemd-run --scope --quiet -p MemoryMax="$cap" true >/dev/null 2>&1; then
        cg_mode=systemd
        return 0
    fi
    die "cannot cap memory here: no writable cgroup v2 memory.max or v1 memory.limit_in_bytes under this process's
cgroups, and 'systemd-run --scope -p MemoryMax=' does not work (run as root on a machine with a memory cgroup)"
}

# Runs a command in a new capped cgroup named $1; the cgroup's peak memory and OOM kills go to $2.peak, $2.oom.
capped() {
    local name=$1 stem=$2 rc=0
    shift 2
    # Started in the background and waited for, so that Ctrl-C or a TERM runs the traps at once; the EXIT trap
    # stops what runs in the cgroup.
    case $cg_mode in
    systemd)
        systemd-run --scope --quiet -p MemoryMax="$cap" -p MemorySwapMax=0 -- "$@" &
        wait "$!" || rc=$?
        ;;
    *)
        make_cgroup "$name" || die "cannot create the cgroup $cg_parent/$name"
        # shellcheck disable=SC2016 # $$ and $0 expand in the child shell, which moves itself into the cgroup.
        bash -c 'echo "$$" >"$0/cgroup.procs" && exec "$@"' "$cg_dir" "$@" &
        wait "$!" || rc=$?
        if [[ $cg_mode == v1 ]]; then
            cat "$cg_dir/memory.max_usage_in_bytes" >"$stem.peak" 2>/dev/null || true
            awk '$1 == "oom_kill" { print $2 }' "$cg_dir/memory.oom_control" >"$stem.oom" 2>/dev/null || true
        else
            cat "$cg_dir/memory.peak" >"$stem.peak" 2>/dev/null || true
            awk '$1 == "oom_kill" { print $2 }' "$cg_dir/memory.events" >"$stem.oom" 2>/dev/null || true
        fi
        remove_cgroup
        ;;
    esac
    return "$rc"
}

cache_dropped=1
drop_caches() {
    sync
    if ! { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null; then
        [[ $cache_dropped -eq 0 ]] || log "warning: cannot drop the page cache: runs may read the model from memory"
        cache_dropped=0
    fi
}

# ---------------------------------------------------------------------------------------------------------------
# JSON: flat key=value lines from one ferrite bench report (jq, else python3). The expert statistics are the first
# object with "hit_rate" and "per_token" inside a result (that test's), else anywhere else in the report (the whole
# run's); the plan the first object with "placement".

bench_fields() {
    if [[ $json_tool == jq ]]; then
        jq -r '
            def v: if . == null then "" else tostring end;
            def stats: [.. | objects | select(has("hit_rate") and has("per_token"))] | .[0];
            (.results // []) as $rs
            | ($rs | map(select(.kind == "pp")) | .[0]) as $pp
            | ($rs | map(select(.kind == "tg")) | .[0]) as $tg
            | (del(.results) | stats) as $all
            | ([.. | objects | select(has("placement"))] | .[0]) as $plan
            | (if ($tg | stats) != null then "test" elif $all != null then "run" else "" end) as $scope
            | (($tg | stats) // $all) as $stg
            | (($pp | stats) // null) as $spp
            | "pp_ferrite=\($pp.ferrite.median | v)", "pp_llama=\($pp.llama.median | v)",
              "tg_ferrite=\($tg.ferrite.median | v)", "tg_llama=\($tg.llama.median | v)",
              "tg_hit_rate=\($stg.hit_rate | v)", "tg_miss_bytes=\($stg.per_token.bytes_read | v)",
              "tg_misses=\($stg.per_token.misses | v)", "tg_io_wait_ms=\($stg.per_token.io_wait_ms | v)",
              "tg_read_bps=\($stg.read_bytes_per_s | v)", "tg_tokens=\($stg.tokens | v)",
              "tg_misses_all=\($stg.misses | v)", "tg_prefetch_loads=\($stg.prefetch_loads | v)",
              "stats_scope=\($scope)",
              "pp_hit_rate=\($spp.hit_rate | v)", "pp_miss_bytes=\($spp.per_token.bytes_read | v)",
              "pp_io_wait_ms=\($spp.per_token.io_wait_ms | v)",
              "placement=\($plan.placement | v)", "slots=\($plan.slots | v)", "slot_bytes=\($plan.slot_bytes | v)",
              "n_layer=\(.model.n_layer | v)", "size_bytes=\(.model.size_bytes | v)",
              "rss=\(.rss_peak_bytes | v)", "llama_rss=\(.llama_rss_peak_bytes | v)"
        ' "$1"
    else
        python3 - "$1" <<'EOF'
import json, sys

def objects(x):
    if isinstance(x, dict):
        yield x
        for v in x.values():
            yield from objects(v)
    elif isinstance(x, list):
        for v in x:
            yield from objects(v)

def first(x, pred):
    return next((o for o in objects(x) if pred(o)), None)

def stats(x):
    return first(x, lambda o: "hit_rate" in o and "per_token" in o)

def get(o, *path):
    for k in path:
        if not isinstance(o, dict) or o.get(k) is None:
            return ""
        o = o[k]
    return o

r = json.load(open(sys.argv[1]))
rs = r.get("results") or []
pp = next((x for x in rs if x.get("kind") == "pp"), None)
tg = next((x for x in rs if x.get("kind") == "tg"), None)
run = stats({k: v for k, v in r.items() if k != "results"})
stg = stats(tg) or run
spp = stats(pp)
plan = first(r, lambda o: "placement" in o)
fields = {
    "pp_ferrite": get(pp, "ferrite", "median"), "pp_llama": get(pp, "llama", "median"),
    "tg_ferrite": get(tg, "ferrite", "median"), "tg_llama": get(tg, "llama", "median"),
    "tg_hit_rate": get(stg, "hit_rate"), "tg_miss_bytes": get(stg, "per_token", "bytes_read"),
    "tg_misses": get(stg, "per_token", "misses"), "tg_io_wait_ms": get(stg, "per_token", "io_wait_ms"),
    "tg_read_bps": get(stg, "read_bytes_per_s"), "tg_tokens": get(stg, "tokens"),
    "tg_misses_all": get(stg, "misses"), "tg_prefetch_loads": get(stg, "prefetch_loads"),
    "stats_scope": "test" if stats(tg) else ("run" if run else ""),
    "pp_hit_rate": get(spp, "hit_rate"), "pp_miss_bytes": get(spp, "per_token", "bytes_read"),
    "pp_io_wait_ms": get(spp, "per_token", "io_wait_ms"),
    "placement": get(plan, "placement"), "slots": get(plan, "slots"), "slot_bytes": get(plan, "slot_bytes"),
    "n_layer": get(r, "model", "n_layer"), "size_bytes": get(r, "model", "size_bytes"),
    "rss": get(r, "rss_peak_bytes"), "llama_rss": get(r, "llama_rss_peak_bytes"),
}
for k, v in fields.items():
    print(f"{k}={v}")
EOF
    fi
}

disk_bps() {
    if [[ $json_tool == jq ]]; then
        jq -r '.bytes_per_second' "$1"
    else
        python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["bytes_per_second"])' "$1"
    fi
}

# Reads bench_fields of $2 into the associative array named $1.
load_fields() {
    local -n into=$1
    local key value
    # shellcheck disable=SC2034 # into is a name reference: this fills the caller's array.
    while IFS='=' read -r key value; do into["$key"]=$value; done < <(bench_fields "$2")
}

# Arithmetic on JSON numbers that may be missing: calc EXPR A [B [C]] evaluates the awk expression EXPR of a, b, c;
# prints nothing when an operand is empty or the expression divides by zero.
calc() {
    local expr=$1 x
    shift
    for x in "$@"; do [[ -n $x ]] || return 0; done
    awk -v a="${1:-0}" -v b="${2:-0}" -v c="${3:-0}" "BEGIN { printf \"%.6g\", $expr }" 2>/dev/null || true
}
# Formats a number with $2 decimals, "n/a" when missing.
num() { if [[ -n $1 ]]; then awk -v x="$1" -v d="$2" 'BEGIN { printf "%.*f", d, x }'; else printf 'n/a'; fi; }
# "yes" / "no" for $1 >= $2, "n/a" when missing.
met() {
    if [[ -n $1 && -n $2 ]]; then awk -v a="$1" -v b="$2" 'BEGIN { print (a >= b ? "yes" : "no") }'; else echo n/a; fi
}
# GiB of a byte count, "n/a" when missing; peak_file: of the number in file $1.
gib_or_na() { if [[ -n $1 ]]; then gib "$1"; else printf 'n/a'; fi; }
peak_file() { if [[ -s $1 ]]; then gib "$(cat "$1")"; else printf 'n/a'; fi; }

# ---------------------------------------------------------------------------------------------------------------
# The model

gen_seconds=""
if [[ ! -e $model ]]; then
    planned=$("$flash_model" "$model" --layers "$layers" --dry-run 2>/dev/null) ||
        die "flash_model --dry-run failed for $model --layers $layers"
    dir=$(dirname "$model")
    [[ -d $dir ]] || die "$dir does not exist (the folder of --model)"
    free_bytes=$(df -B1 --output=avail "$dir" | tail -1 | tr -d ' ')
    [[ $free_bytes -gt $planned ]] ||
        die "$model needs $(gib "$planned") but $dir has $(gib "$free_bytes") free"
    log "generating $model ($layers layers, $(gib "$planned"); about 15 CPU-minutes per layer, longer on a busy machine)"
    start=$(date +%s)
    "$flash_model" "$model" --layers "$layers" || die "generating $model failed"
    gen_seconds=$(($(date +%s) - start))
    log "generated $model in $gen_seconds s"
fi
[[ -f $model && -r $model ]] || die "$model is not a readable file"
model_bytes=$(stat -c %s "$model")

if [[ -n $cap_arg ]]; then
    cap=$(to_bytes "$cap_arg") || die "--cap $cap_arg: not a size (e.g. 5G, 5400M, 5GiB)"
else
    cap=$((model_bytes / 3))
fi
avail=$(awk '$1 == "MemAvailable:" { printf "%.0f\n", $2 * 1024 }' /proc/meminfo)
if [[ -n $avail && $cap -gt $avail ]]; then
    log "warning: the cap $(gib "$cap") is above MemAvailable ($(gib "$avail")): the machine, not the cap, limits"
fi
ratio=$(awk -v m="$model_bytes" -v c="$cap" 'BEGIN { printf "%.2f", m / c }')

choose_cap_method
mkdir -p "$out"
log "model $model ($(gib "$model_bytes")), cap $(gib "$cap") (file / cap = $ratio) via ${cg_mode}${cg_parent:+ under $cg_parent}"
log "threads $threads, -p $n_prompt -n $n_gen -r $reps; results in $out"

{
    echo "date: $(date -Is)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    git status --short 2>/dev/null | sed 's/^/  /' || true
    echo "cpu: $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p')"
    echo "cores: $(nproc), memory: $(gib "$(awk '$1 == "MemTotal:" { printf "%.0f\n", $2 * 1024 }' /proc/meminfo)")"
    echo "load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$out/machine.txt"
load_start=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------------------------------------------------------
# Runs

log "disk bandwidth: 64 random experts, 8 threads, cold page cache"
drop_caches
"$disk_read" "$model" --experts 64 -t 8 --json >"$out/disk.json" ||
    die "disk_read failed (see above)"
disk=$(disk_bps "$out/disk.json")
log "disk: $(num "$(calc "a / 1e6" "$disk")" 0) MB/s"

bench_cmd=("$ferrite" bench -m "$model" -t "$threads" -p "$n_prompt" -n "$n_gen" -r "$reps" --vs-llama --json)

run_bench() {
    local stem=$1 label=$2 rc=0
    shift 2
    log "$label: ${bench_cmd[*]} $*"
    drop_caches
    local start
    start=$(date +%s)
    capped "ferrite-paging-$stem-$$" "$out/$stem" "${bench_cmd[@]}" "$@" \
        >"$out/$stem.json" 2> >(tee "$out/$stem.log" >&2) || rc=$?
    echo $(($(date +%s) - start)) >"$out/$stem.seconds"
    if [[ $rc -ne 0 ]]; then
        local oom=""
        [[ ! -s $out/$stem.oom || $(cat "$out/$stem.oom") == 0 ]] ||
            oom=" (the kernel killed it for memory: the cap is too small)"
        die "$label failed with exit code $rc$oom; see $out/$stem.log"
    fi
}
run_bench paged "ferrite paged + llama.cpp"
run_bench osmap "ferrite OS map + llama.cpp" --no-paging
load_end=$(cut -d' ' -f1-3 /proc/loadavg)
echo "load at end: $load_end" >>"$out/machine.txt"

# ---------------------------------------------------------------------------------------------------------------
# Summary

declare -A a b
load_fields a "$out/paged.json"
load_fields b "$out/osmap.json"
[[ -n ${a[tg_ferrite]} || -n ${a[pp_ferrite]} ]] || die "$out/paged.json has no results"
if [[ ${a[placement]} != paged ]]; then
    log "warning: the default plan under the cap kept the experts ${a[placement]:-(no plan in the JSON)}, not paged"
fi

# Bytes read from disk per generated token: misses and prefetch loads (hash-routed layers are prefetched from the token
# ids, so their reads count as hits); the disk limit is the disk bandwidth over them.
miss_bytes=${a[tg_miss_bytes]}
reads_per_token=$(calc "(a + b) / c" "${a[tg_misses_all]}" "${a[tg_prefetch_loads]:-0}" "${a[tg_tokens]}")
limit=$(calc "a / b" "$disk" "$miss_bytes")
reached=$(calc "a / b" "${a[tg_ferrite]}" "$limit")
r_tg_paged=$(calc "a / b" "${a[tg_ferrite]}" "${a[tg_llama]}")
r_pp_paged=$(calc "a / b" "${a[pp_ferrite]}" "${a[pp_llama]}")
r_tg_os=$(calc "a / b" "${b[tg_ferrite]}" "${b[tg_llama]}")
r_pp_os=$(calc "a / b" "${b[pp_ferrite]}" "${b[pp_llama]}")
scope_note=""
case ${a[stats_scope]} in
test) scope_note="from the decode test's expert statistics" ;;
run) scope_note="from the whole run's expert statistics (prefill and decode together: per-token numbers are low)" ;;
*) scope_note="not measured: the JSON has no expert statistics" ;;
esac

{
    echo "# Paging under a memory cap"
    echo
    echo "- Model: \`$model\`, ${a[n_layer]:-?} layers, $(gib "$model_bytes")$([[ -z $gen_seconds ]] || echo ", generated in $gen_seconds s")"
    echo "- Cap: $(gib "$cap") (file / cap = $ratio), $cg_mode$([[ -z $cg_parent ]] || echo " cgroup under \`$cg_parent\`")"
    echo "- \`-t $threads -p $n_prompt -n $n_gen -r $reps\`; page cache dropped before each run: $([[ $cache_dropped -eq 1 ]] && echo yes || echo "NO (numbers may include cached reads)")"
    echo "- Disk: $(num "$(calc "a / 1e6" "$disk")" 0) MB/s (64 random experts, 8 threads, cold: \`disk.json\`)"
    echo "- Plan under the cap: ${a[placement]:-n/a}$([[ -z ${a[slots]} ]] || echo ", ${a[slots]} slots of $(mib "${a[slot_bytes]}")")"
    echo "- $(sed -n 's/^cpu: //p' "$out/machine.txt"), $(nproc) cores; load $load_start at start, $load_end at end"
    echo "- Commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$([[ -z $(git status --short 2>/dev/null) ]] || echo " with uncommitted changes")"
    echo
    echo "| engine | pp$n_prompt t/s | vs llama.cpp | tg$n_gen t/s | vs llama.cpp | peak RSS | cgroup peak | run time (both engines) |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    echo "| ferrite paged | $(num "${a[pp_ferrite]}" 2) | $(num "$r_pp_paged" 2) | $(num "${a[tg_ferrite]}" 2) | $(num "$r_tg_paged" 2) | $(gib_or_na "${a[rss]}") | $(peak_file "$out/paged.peak") | $(cat "$out/paged.seconds") s |"
    echo "| llama.cpp (same run) | $(num "${a[pp_llama]}" 2) | 1 | $(num "${a[tg_llama]}" 2) | 1 | $(gib_or_na "${a[llama_rss]}") | | |"
    echo "| ferrite OS map (\`--no-paging\`) | $(num "${b[pp_ferrite]}" 2) | $(num "$r_pp_os" 2) | $(num "${b[tg_ferrite]}" 2) | $(num "$r_tg_os" 2) | $(gib_or_na "${b[rss]}") | $(peak_file "$out/osmap.peak") | $(cat "$out/osmap.seconds") s |"
    echo "| llama.cpp (same run) | $(num "${b[pp_llama]}" 2) | 1 | $(num "${b[tg_llama]}" 2) | 1 | $(gib_or_na "${b[llama_rss]}") | | |"
    echo
    echo "Decode paging ($scope_note):"
    echo
    echo "| hit rate | misses / token | experts read / token | MB read / token | I/O wait ms / token | store reads MB/s | disk limit t/s | reached |"
    echo "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    echo "| $(num "$(calc "a * 100" "${a[tg_hit_rate]}")" 1) % | $(num "${a[tg_misses]}" 2) | $(num "$reads_per_token" 2) | $(num "$(calc "a / 1e6" "$miss_bytes")" 1) | $(num "${a[tg_io_wait_ms]}" 1) | $(num "$(calc "a / 1e6" "${a[tg_read_bps]}")" 0) | $(num "$limit" 2) | $(num "$(calc "a * 100" "$reached")" 0) % |"
    echo
    echo "Hit rate: requested experts found in the cache (prefetched ones count as hits). Experts read: misses plus"
    echo "prefetch loads. Disk limit: disk MB/s / MB read per token; reached: paged decode t/s / disk limit."
    echo
    if [[ -n ${a[pp_hit_rate]} ]]; then
        echo "Prefill paging (pp$n_prompt): $(num "$(calc "a * 100" "${a[pp_hit_rate]}")" 1) % hits, $(num "$(calc "a / 1e6" "${a[pp_miss_bytes]}")" 1) MB read and $(num "${a[pp_io_wait_ms]}" 1) ms I/O wait per prompt token."
        echo
    fi
    echo "Targets (reported, not asserted):"
    echo
    echo "| target | measured | met |"
    echo "| --- | ---: | --- |"
    echo "| paged decode >= 3x llama.cpp | $(num "$r_tg_paged" 2)x | $(met "$r_tg_paged" 3) |"
    echo "| paged decode >= 70 % of the disk limit | $(num "$(calc "a * 100" "$reached")" 0) % | $(met "$reached" 0.7) |"
    echo "| paged prefill (pp$n_prompt) >= 2x llama.cpp | $(num "$r_pp_paged" 2)x | $(met "$r_pp_paged" 2) |"
} >"$out/summary.md"

cat "$out/summary.md"
log "wrote $out/summary.md (raw: paged.json, osmap.json, disk.json; logs: *.log; machine.txt)"
