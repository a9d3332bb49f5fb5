#!/bin/bash
# Verify the GPU backend on a real GPU in one go: install, the `gpu` tests,
# the speed table, and compute-sanitizer over every kernel.  Logs go to $OUT
# (default /tmp/fastbn-gpu), one file per step; a summary line per step is
# printed with the tail of its log.  A global deadline (FASTBN_GPU_DEADLINE
# seconds, default 560) shortens later steps so the whole run ends in time.
#
#   bash tools/gpu_check.sh [tests] [bench] [sanitize] [profile] [fuse] [ncu]
#   (default: tests bench sanitize)
set -u
OUT=${OUT:-/tmp/fastbn-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-/tmp/fastbn-cupy-cache}
deadline=$(( $(date +%s) + ${FASTBN_GPU_DEADLINE:-560} ))
steps=${*:-tests bench sanitize}

step() {  # step NAME LIMIT_S CMD...: run CMD with its output in $OUT/NAME.log
    local name=$1 lim=$2 left start rc
    shift 2
    left=$(( deadline - $(date +%s) ))
    (( left < lim )) && lim=$left
    if (( lim < 10 )); then echo "== $name: skipped, out of time"; return; fi
    echo "== $name (limit ${lim}s): $*"
    start=$(date +%s)
    timeout "$lim" "$@" >>"$OUT/$name.log" 2>&1
    rc=$?
    echo "== $name: rc $rc in $(( $(date +%s) - start ))s"
    tail -n "${TAIL:-15}" "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu \
    --format=csv,noheader
python3 -c "import cupy, torch, numpy; print('cupy', cupy.__version__, 'torch', \
torch.__version__, 'numpy', numpy.__version__)"
TAIL=5 step install 240 python3 -m pip install --no-build-isolation --no-deps -e .

for s in $steps; do
    case $s in
    tests)
        step tests 300 python3 -m pytest tests/test_gpu.py tests/test_gpu_geometry.py \
            -q -rsxX -p no:cacheprovider ;;
    bench)
        step bench 240 python3 tools/bench_gpu.py ${BENCH_ARGS:-} --out "$OUT/bench.md" \
            --json "$OUT/bench.json" ;;
    profile)
        step profile 60 python3 tools/gpu_profile.py launch ;;
    fuse)
        step fuse 120 python3 tools/gpu_profile.py fuse \
            ${FUSE_SHAPES:-256x256x14x14,64x512x14x14,128x256x28x28} float32,float16 ;;
    ncu)
        step ncu 200 ncu --clock-control none --cache-control none -k regex:fbn_ --csv \
            --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,\
launch__registers_per_thread,launch__grid_size,launch__block_size,\
sm__warps_active.avg.pct_of_peak_sustained_active \
            python3 tools/gpu_profile.py ops ${NCU_SHAPES:-64x256x56x56,256x256x14x14,16x16x8x8} \
            float32,float16 ;;
    ncu-detail)
        step ncu-detail 240 ncu --clock-control none --cache-control none -k regex:fbn_ \
            --section SpeedOfLight --section Occupancy --section LaunchStats \
            --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
            python3 tools/gpu_profile.py ops ${NCU_SHAPES:-256x256x14x14,64x256x56x56} \
            ${NCU_DTYPES:-float16} ;;
    sanitize)
        for tool in memcheck racecheck synccheck initcheck; do
            TAIL=6 step sanitize 120 compute-sanitizer --tool $tool --error-exitcode 9 \
                python3 tools/gpu_sanitize.py
        done ;;
    esac
done
