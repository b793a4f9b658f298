#!/usr/bin/env bash
# The one-command check for a machine with a GPU: build, the whole test suite on the cuda backend,
# compute-sanitizer (memcheck, racecheck, synccheck) over the kernel tests, `pyalexnet bench`, `pyalexnet profile`'s
# prediction for this card beside what bench measured (bench/calibrate.py), and a short training run from JPEG
# files through the whole data pipeline (prepare, loader, augmentation kernel).
#
#   bash bench/gpu_check.sh [--stage build|test|sanitize|bench|profile|train|all] [--out DIR]
#
# Each stage fits in 10 minutes; where one command may run no longer, run the stages one per command (the
# build first). Everything lands in DIR (default bench/out/gpu-check): summary.txt, one log per stage,
# bench.json and bench.png, profile.json and calibration.json. Commit bench.json as
# bench/results/<date>-<card>-<commit>-bench.json and calibration.json as ...-calibration.json (their fields say
# which) and regenerate bench/RESULTS.md with `python bench/results_md.py`.
# The build needs no network (pip --no-build-isolation: pybind11, CMake, ninja and setuptools must be there);
# CUDAARCHS (default 90, the H100/H200) chooses what nvcc compiles for.
set -uo pipefail
usage() { echo "usage: $0 [--stage build|test|sanitize|bench|profile|train|all] [--out DIR]" >&2; exit 2; }
repo="$(cd "$(dirname "$0")/.." && pwd)"
stage=all
out="$repo/bench/out/gpu-check"
while [ $# -gt 0 ]; do
    case "$1" in
        --stage) [ $# -ge 2 ] || usage; stage="$2"; shift 2 ;;
        --out) [ $# -ge 2 ] || usage; mkdir -p "$2" && out="$(cd "$2" && pwd)"; shift 2 ;;  # relative to the caller
        *) usage ;;
    esac
done
cd "$repo"
case "$stage" in build|test|sanitize|bench|profile|train|all) ;; *) echo "unknown stage '$stage'" >&2; exit 2 ;; esac
mkdir -p "$out"
out="$(cd "$out" && pwd)"
summary="$out/summary.txt"
touch "$summary"  # kept across runs, so stages run one per command add up
failed=0

# run NAME LOG COMMAND...: runs COMMAND (output to LOG, appended), adds a line to the summary.
run() {
    local name="$1" log="$2"; shift 2
    local start=$SECONDS status=ok
    echo "== $name: $*" >> "$log"
    if ! "$@" >> "$log" 2>&1; then status=FAIL; failed=1; fi
    printf '%s %-12s %-5s %5ds  %s\n' "$(date -u +%H:%M:%S)" "$name" "$status" $((SECONDS - start)) \
        "$(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-80)" >> "$summary"
}

# Tests run from outside the checkout, so that `import pyalexnet` finds the installed package, not the sources.
tests() { (cd "$out" && "$@"); }
kernel_tests=("$repo/tests/test_ops.py" "$repo/tests/test_conv.py" "$repo/tests/test_lrn_pool_dropout.py"
              "$repo/tests/test_emulator.py" "$repo/tests/test_data.py")

if [ "$stage" = build ] || [ "$stage" = all ]; then
    : > "$out/build.log"
    run build "$out/build.log" env CUDAARCHS="${CUDAARCHS:-90}" python -m pip install --no-build-isolation --no-deps "$repo"
    run info "$out/build.log" tests env PYALEXNET_BACKEND=cuda python -m pyalexnet info
fi
if [ "$stage" = test ] || [ "$stage" = all ]; then
    : > "$out/test.log"
    run check "$out/test.log" tests env PYALEXNET_BACKEND=cuda python -m pyalexnet check
    run pytest "$out/test.log" tests env PYALEXNET_BACKEND=cuda timeout 540 python -m pytest -q -p no:cacheprovider \
        --rootdir "$repo" "$repo/tests"
fi
if [ "$stage" = sanitize ] || [ "$stage" = all ]; then
    : > "$out/sanitize.log"
    # racecheck is slow: -k drops the full-size AlexNet layers and the million-element dropout statistics.
    # PYALEXNET_CUPY_POOL=0: every array its own allocation, so an overrun cannot hide inside a pooled block.
    for tool in memcheck racecheck synccheck; do
        run "$tool" "$out/sanitize.log" tests env PYALEXNET_BACKEND=cuda PYALEXNET_CUPY_POOL=0 timeout 190 \
            compute-sanitizer --tool "$tool" --error-exitcode 1 python -m pytest -q -x -p no:cacheprovider \
            --rootdir "$repo" -k "not alexnet and not statistics" "${kernel_tests[@]}"
    done
fi
if [ "$stage" = bench ] || [ "$stage" = all ]; then
    : > "$out/bench.log"
    run bench "$out/bench.log" tests env PYALEXNET_BACKEND=cuda timeout 580 python -m pyalexnet bench \
        --checkout "$repo" --json "$out/bench.json"
fi
if [ "$stage" = profile ] || [ "$stage" = all ]; then
    : > "$out/profile.log"
    # The prediction for the card at hand (it runs on the emulator, on the CPUs), then predicted beside measured.
    case "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)" in
        *H200*) card=h200 ;; *A100*) card=a100 ;; *) card=h100 ;;
    esac
    run profile "$out/profile.log" tests timeout 580 python -m pyalexnet profile --card "$card" \
        --json "$out/profile.json"
    if [ -f "$out/bench.json" ]; then
        run calibrate "$out/profile.log" python "$repo/bench/calibrate.py" --profile "$out/profile.json" \
            --bench "$out/bench.json" --out "$out/calibration.json"
    else
        echo "no bench.json in $out: run the bench stage first to compare" >> "$out/profile.log"
    fi
fi
if [ "$stage" = train ] || [ "$stage" = all ]; then
    : > "$out/train.log"
    # 1280 ImageNet-sized JPEGs -> prepare (timed); the loader's staging rate for 1..16 threads (page cache,
    # cold, with the copy to the GPU) and the host-to-device rate; then 20 training steps of batch 128 at full
    # size: the log's images/s and data_wait (the share of the step spent waiting for input) say whether the
    # input pipeline keeps up with the network.
    run data "$out/train.log" tests env PYALEXNET_BACKEND=cuda timeout 400 python "$repo/bench/data_pipeline.py" \
        --images 1280 --workers 1 "$(nproc)" --threads 1 2 4 8 16 --keep "$out/photos" --out "$out/data_pipeline.json"
    run train "$out/train.log" tests env PYALEXNET_BACKEND=cuda timeout 300 python -m pyalexnet train \
        --data "$out/photos" --out "$out/train-run" --epochs 2 --batch-size 128 --schedule constant \
        --log-every 2 --checkpoint-every 100000 --no-progress
    tests python -c "import json, sys; r = [json.loads(l) for l in open(sys.argv[1])]; s = [x for x in r if x['kind'] == 'step']; \
print('training images/s (every 2 steps):', [round(x['images_per_s']) for x in s]); \
print('data wait (share of the step):', [round(x['data_wait'], 3) for x in s])" \
        "$out/train-run/log.jsonl" >> "$out/train.log" 2>&1 || true
fi

echo
echo "gpu_check ($stage) in $out:"
printf '%-8s %-12s %-5s %6s  %s\n' utc stage status time "last line of its log"
cat "$summary"
exit $failed
