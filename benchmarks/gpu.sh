#!/usr/bin/env bash
# The GPU check in one run (about 8 minutes on one GPU with 16 cores): the CUDA tests, then for
# ViT-B-32 (random weights, bf16, 256-px tiles) and the shipped models: bare forward tiles/s, the
# single-process engine's tiles/s and ratio, the Ray engine's with 256- and 1,024-tile units,
# CoCa captions/s against the bare decoder loop, peak GPU memory, and the card's name.
# What each figure means: docs/gpu.md.
#
#   bash benchmarks/gpu.sh                        # on the GPU machine, from the repository root
#   DEVICE=cpu bash benchmarks/gpu.sh --quick     # the same steps on the CPU at toy sizes (checks the script)
#   bash benchmarks/gpu.sh --fetch-wheels .gpu-wheels   # where PyPI is reachable: what a bare GPU
#                                  # image lacks, as .gpu-wheels/part1, part2, ... of at most 18 MiB each
#   bash benchmarks/gpu.sh --receive .gpu-wheels/partN  # on the GPU machine: keep a carried part
#
# Python: $PYTHON if set, else .venv/bin/python when it has what the engine needs, else the system
# python3 (its CUDA build of torch as it is) with the missing packages installed into .gpu-site/
# from the wheels in $WHEELS (default .gpu-received/; no network needed), else from the package
# index. Whatever still cannot run is said in one line and skipped (docs/gpu.md: how to carry the
# wheels to a machine without network). Every figure also goes to $RESULTS (default
# $OUT/gpu-results.jsonl, else /tmp/gpu-results.jsonl), one JSON object a line.
set -u
cd "$(dirname "$0")/.."

QUICK=0
FETCH=""
RECEIVE=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --fetch-wheels) FETCH="${2:?--fetch-wheels needs a folder}"; shift ;;
        --receive) RECEIVE="${2:?--receive needs a folder}"; shift ;;
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu.sh: unknown argument $1 (use --quick, --fetch-wheels DIR, --receive DIR or --help)" >&2; exit 2 ;;
    esac
    shift
done

# what the engine needs beyond torch (module name = package name unless given as module:package)
NEEDED="open_clip:open_clip_torch rasterio pyproj shapely pandas geopandas pyarrow PIL:pillow tqdm attrs affine safetensors huggingface_hub ftfy"
# wheels a bare GPU image (python 3.12 with torch, numpy, pandas, pyarrow, timm, click) lacks; no
# pyogrio (32 MB, only for GeoPackage layers: the GPU runs use GeoParquet) and no ray (too large to carry)
WHEEL_LIST="open_clip_torch ftfy wcwidth rasterio affine cligj click-plugins pyproj shapely geopandas"
SITE="$PWD/.gpu-site"
WHEELS="${WHEELS:-.gpu-received}"

if [ -n "$FETCH" ]; then
    mkdir -p "$FETCH/all"
    python3 -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$FETCH/all" --no-deps $WHEEL_LIST \
        || { echo "gpu.sh: could not download the wheels into $FETCH/all" >&2; exit 1; }
    # one tar of them cut in parts of at most 18 MiB (what one device call can carry beside the working tree)
    tar -cf "$FETCH/wheels.tar" -C "$FETCH/all" . && rm -rf "$FETCH/all"
    split -b 18M -d "$FETCH/wheels.tar" "$FETCH/wheels.tar." && rm -f "$FETCH/wheels.tar"
    part=0
    for piece in "$FETCH"/wheels.tar.*; do
        part=$((part + 1)); mkdir -p "$FETCH/part$part"; mv "$piece" "$FETCH/part$part/"
    done
    du -sh "$FETCH"/part* 2>/dev/null
    echo "carry each $FETCH/partN in its own device call (bash benchmarks/gpu.sh --receive $FETCH/partN), then run"
    echo "bash benchmarks/gpu.sh on the same, still warm machine (docs/gpu.md)"
    exit 0
fi

if [ -n "$RECEIVE" ]; then
    mkdir -p .gpu-received && cp "$RECEIVE"/* .gpu-received/ && ls .gpu-received && exit 0
    echo "gpu.sh: nothing to receive in $RECEIVE" >&2; exit 1
fi

# hqrs_geo from this checkout, installed or not; packages installed here for a bare image
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"

DEVICE="${DEVICE:-cuda}"
RESULTS="${RESULTS:-${OUT:-${TMPDIR:-/tmp}}/gpu-results.jsonl}"
: > "$RESULTS"
START=$(date +%s)
say() { printf '\n== %s (%ss)\n' "$1" "$(( $(date +%s) - START ))"; }

missing_modules() {  # the NEEDED modules "$1" cannot import, as package names
    "$1" - "$NEEDED" <<'EOF' 2>/dev/null || echo "torch"
import importlib, sys
import torch  # noqa: F401  (no torch: nothing here can run)
out = []
for item in sys.argv[1].split():
    module, _, package = item.partition(":")
    try:
        importlib.import_module(module)
    except Exception:
        out.append(package or module)
print(" ".join(out))
EOF
}

install_missing() {  # into $SITE with python "$1": from $WHEELS when it has wheels, else from the index
    local missing
    missing=$(missing_modules "$1")
    [ -z "$missing" ] && return 0
    if ls "$WHEELS"/wheels.tar.* >/dev/null 2>&1; then  # the parts carried one call each
        cat "$WHEELS"/wheels.tar.* > "$WHEELS/wheels.tar" && tar -xf "$WHEELS/wheels.tar" -C "$WHEELS" \
            && rm -f "$WHEELS"/wheels.tar* || echo "gpu.sh: the wheel parts in $WHEELS do not make a whole tar" >&2
    fi
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "installing $(ls "$WHEELS"/*.whl | wc -l) wheel(s) from $WHEELS into $SITE (missing: $missing)" >&2
        timeout 300 "$1" -m pip install -q --no-deps --no-index --target "$SITE" "$WHEELS"/*.whl >&2
    else
        echo "installing from the package index into $SITE (no wheels in $WHEELS): $missing" >&2
        timeout 300 "$1" -m pip install -q --retries 0 --timeout 10 --no-deps --target "$SITE" $WHEEL_LIST >&2 \
            || echo "gpu.sh: no package index either: the steps that need those packages are skipped" >&2
    fi
}

pick_python() {
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
    if [ -x .venv/bin/python ] && [ -z "$(missing_modules .venv/bin/python)" ]; then echo .venv/bin/python; return; fi
    local base
    base=$(command -v python3)
    install_missing "$base"
    echo "$base"
}

PY=$(pick_python)
MISSING=$(missing_modules "$PY")

say "machine"
"$PY" - "$DEVICE" <<'EOF'
import os, sys
try:
    import torch
except ImportError:
    print(f"python {sys.executable}: no torch: nothing can be measured"); raise SystemExit(0)
device = sys.argv[1]
card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA GPU"
print(f"card: {card}; torch {torch.__version__}; {os.cpu_count()} CPU cores; python {sys.executable}")
if torch.cuda.is_available():
    free, total = torch.cuda.mem_get_info()
    print(f"GPU memory: {total / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free; "
          f"compute capability {'.'.join(map(str, torch.cuda.get_device_capability()))}")
EOF
if [ "$DEVICE" = cuda ] && ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    echo "gpu.sh: no CUDA GPU is visible to $PY; run with DEVICE=cpu (and --quick) to check the script on the CPU"
    exit 1
fi
if [ -n "$MISSING" ]; then
    echo "gpu.sh: $PY cannot import: $MISSING; the steps that need them are skipped (carry the wheels of"
    echo "        'bash benchmarks/gpu.sh --fetch-wheels DIR' here: docs/gpu.md)"
fi
has() { case " $MISSING " in *" $1 "*) return 1 ;; *) return 0 ;; esac; }

if [ "$QUICK" = 1 ]; then
    EMBED_MODELS="hqrs-mini-clip"; CAPTION_MODELS="hqrs-mini-coca"
    EMBED_ARGS=(--size 512 --batch 4 --repeats 1 --layer-format parquet); CAPTION_ARGS=(--batch 2 --tokens 3 --engine-tiles 4 --repeats 1)
    RAY_ARGS=(--tiles 16 --batch 4 --repeat 1 --no-cold); UNITS="4 16"; LIMIT=300
else
    EMBED_MODELS="ViT-B-32 hqrs-mini-clip"; CAPTION_MODELS="coca_ViT-B-32 hqrs-mini-coca"
    EMBED_ARGS=(--size 16384 --scenes 2 --batch 256 --repeats 3 --layer-format parquet)
    CAPTION_ARGS=(--batch 128 --tokens 20 --engine-tiles 512 --repeats 2)
    RAY_ARGS=(--tiles 8192 --batch 256 --repeat 2); UNITS="256 1024"; LIMIT=150
fi

say "CUDA tests (they skip without a CUDA GPU)"
if has rasterio && has geopandas && has open_clip_torch; then
    TESTS=(tests/engine/test_cuda.py)
    "$PY" -c 'import pyogrio' 2>/dev/null && TESTS+=("tests/engine/test_engine.py::test_auto_device_and_precision")
    timeout 240 "$PY" -m pytest -q -p no:cacheprovider -rs "${TESTS[@]}" || echo "gpu.sh: CUDA tests FAILED (above)"
else
    echo "skipped: the tests need rasterio, geopandas and open_clip"
fi

# seconds: a step that would start later is skipped (the whole check stays within 8 minutes on the GPU)
BUDGET="${BUDGET:-$([ "$QUICK" = 1 ] && echo 1200 || echo 450)}"
run_json() {  # run a benchmark with a time limit; keep its JSON line; say clearly when it did not finish
    local label=$1; shift
    local elapsed=$(( $(date +%s) - START ))
    if [ "$elapsed" -gt "$BUDGET" ]; then
        echo "gpu.sh: $label skipped: ${elapsed}s gone, over the ${BUDGET}s budget (BUDGET=... to allow more)"
        return
    fi
    local log
    log=$(mktemp)
    timeout "$LIMIT" "$PY" "$@" --json > "$log" 2>&1
    local rc=$?
    grep -v '^{' "$log" | grep -v "No pretrained weights" | tail -n 20
    if [ $rc -ne 0 ]; then
        echo "gpu.sh: $label did not finish (exit $rc$( [ $rc = 124 ] && echo ", over ${LIMIT}s" ))"
    else
        grep '^{' "$log" | tail -n 1 | "$PY" -c 'import json,sys; d=json.loads(sys.stdin.read()); d["step"]=sys.argv[1]; print(json.dumps(d))' "$label" >> "$RESULTS"
    fi
    rm -f "$log"
}

for model in $EMBED_MODELS; do
    say "embeddings, $model: bare forward vs single-process engine"
    if has rasterio && has open_clip_torch && has geopandas; then
        run_json "embed $model" benchmarks/embed.py --arch "$model" --device "$DEVICE" "${EMBED_ARGS[@]}"
    else
        echo "skipped: needs rasterio, geopandas and open_clip"
    fi
done

for model in $CAPTION_MODELS; do
    say "captions, $model: cached decoder, bare decoder loop vs engine"
    if has open_clip_torch && has rasterio; then
        run_json "caption $model" benchmarks/caption.py --arch "$model" --device "$DEVICE" "${CAPTION_ARGS[@]}"
    else
        echo "skipped: needs open_clip and rasterio"
    fi
done

say "Ray engine: units of $(echo "$UNITS" | sed 's/ / and /') tiles"
if ! "$PY" -c 'import ray' 2>/dev/null; then
    echo "skipped: $PY has no ray (Ray engine figures not measured)"
elif ! grep -q -- '--unit-tiles' benchmarks/scale.py; then
    echo "skipped: benchmarks/scale.py has no --unit-tiles option yet (Ray engine figures not measured)"
else
    for model in $EMBED_MODELS; do
        for unit in $UNITS; do
            say "Ray engine, $model, $unit-tile units"
            run_json "ray $model $unit" benchmarks/scale.py --device "$DEVICE" --model "$model" --unit-tiles "$unit" \
                "${RAY_ARGS[@]}"
        done
    done
fi

say "summary"
"$PY" - "$RESULTS" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
if not rows:
    print("no figures: every step was skipped or failed (see above)"); raise SystemExit(0)
card = next((r.get("card") for r in rows if r.get("card")), "?")
print(f"card: {card}")
def f(v, fmt="{:,.1f}"):
    return fmt.format(v) if isinstance(v, (int, float)) else "-"
for r in rows:
    step, peak = r["step"], r.get("peak_gpu_bytes")
    mem = f" | peak GPU {peak / 2**30:.2f} GiB" if peak else ""
    if step.startswith("embed"):
        print(f"{step:28s} bare {f(r.get('bare_tiles_s'))} tiles/s | single-process engine "
              f"{f(r.get('engine_tiles_s'))} tiles/s | ratio {f(r.get('ratio'), '{:.3f}')}{mem}")
    elif step.startswith("caption"):
        print(f"{step:28s} bare decoder {f(r.get('bare_captions_s'))} captions/s | engine "
              f"{f(r.get('engine_captions_s'))} captions/s | ratio {f(r.get('caption_ratio'), '{:.3f}')} | cached "
              f"{f(r.get('cached_tokens_s'))} vs naive {f(r.get('naive_tokens_s'))} tokens/s{mem}")
    elif step.startswith("ray"):
        print(f"{step:28s} bare {f(r.get('bare_tiles_s'))} | single {f(r.get('single_tiles_s'))} | Ray "
              f"{f(r.get('ray_tiles_s'))} tiles/s | Ray ratio {f(r.get('ray_ratio'), '{:.3f}')} | single ratio "
              f"{f(r.get('single_ratio'), '{:.3f}')} | object store {f(r.get('object_store_bytes_per_tile'), '{:,.0f}')}"
              f" B/tile{mem}")
EOF
echo "figures: $RESULTS; $(( $(date +%s) - START )) s in all"
