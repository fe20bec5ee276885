#!/usr/bin/env bash
# parallm's GPU checks, run on a machine with an NVIDIA GPU from binaries
# built on another machine (the GPU machine has CUDA but no Rust).
#
# Built and packed here (from the repository root):
#   cargo build --release && cargo test --release --test cuda_gpu --no-run
#   strip -o /tmp/p target/release/parallm && xz -c /tmp/p > .dev/a/parallm.xz
#   strip -o /tmp/t target/release/deps/cuda_gpu-<hash> && xz -c /tmp/t > .dev/b/cuda_gpu.xz
#   (kernels: the parallm-kernels unit-test binary, as kernels.xz in .dev/a)
#   split -b 52000000 -d -a 1 <reference model> /tmp/model.part
#   mv /tmp/model.part0 .dev/a/; mv /tmp/model.part1 .dev/b/
#   cp ../shared/golden/smollm2-135m-q4_1.json .dev/b/golden.json
# (.dev/ is ignored by git; the model is split because one call carries at
# most 64 MiB. A warm GPU machine keeps /tmp between calls but not the
# repository's ignored folders, so every phase first copies the model parts
# it was carried into /tmp/parallm-model: carry .dev/a for `bench`, then
# .dev/b for `tests` while the machine is still warm.)
#
# On the GPU machine, from the repository root:
#   bash benches/gpu/device_run.sh bench [1b|8b|both]   # needs .dev/a
#   bash benches/gpu/device_run.sh profile [SHAPE]       # needs .dev/a; ncu
#   bash benches/gpu/device_run.sh kernels [SHAPE]       # needs .dev/a with kernels.xz
#   bash benches/gpu/device_run.sh tests [FILTER]        # needs the model's two parts
# Logs and JSON go to /tmp/parallm-gpu, packed after every step into
# $OUT/logs-PHASE.tgz (the device tool brings back at most 8 files); the last
# lines printed are a summary.
set -u
LOGS=/tmp/parallm-gpu
mkdir -p "$LOGS"
DEV=${PARALLM_DEV_DIR:-.dev}
BIN=/tmp/parallm-bin
phase=${1:-bench}
what=${2:-both}

pack() { [ -n "${OUT:-}" ] && tar czf "$OUT/logs-$phase.tgz" -C "$LOGS" . 2>/dev/null; return 0; }
say() { echo "== $*" | tee -a "$LOGS/summary.txt"; }

# CUDA's libraries under the generic names cudarc tries first
# (pip's NCCL ships only libnccl.so.2).
setup_libs() {
    local links=/tmp/parallm-libs dirs="" n p
    mkdir -p "$links"
    for n in libcuda.so.1 libnvrtc.so.13 libnvrtc-builtins.so.13.0 libcublas.so.13 libcublasLt.so.13 libnccl.so.2; do
        p=$(ldconfig -p 2>/dev/null | awk -v n="$n" '$1 == n {print $NF; exit}')
        if [ -z "$p" ]; then
            p=$(find /usr/local/nvidia /usr/local/cuda/ /usr/local/cuda/lib64/ /usr/lib/x86_64-linux-gnu /opt \
                -name "$n" 2>/dev/null | head -1)
        fi
        echo "$n: ${p:-missing}" | tee -a "$LOGS/libs.txt"
        [ -n "$p" ] || continue
        dirs="$dirs:$(dirname "$p")"
        ln -sf "$p" "$links/${n%%.so*}.so"
    done
    export LD_LIBRARY_PATH="$links$dirs:${LD_LIBRARY_PATH:-}"
}

unpack() { # name dir
    [ -x "$BIN/$1" ] && return 0
    mkdir -p "$BIN"
    if [ ! -f "$DEV/$2/$1.xz" ]; then
        say "$DEV/$2/$1.xz is missing"
        return 1
    fi
    xz -dc "$DEV/$2/$1.xz" > "$BIN/$1" || python3 -c "import lzma,sys; sys.stdout.buffer.write(lzma.open(sys.argv[1]).read())" "$DEV/$2/$1.xz" > "$BIN/$1"
    chmod +x "$BIN/$1"
}

run() { # name timeout command...
    local name=$1 limit=$2 t0 rc
    shift 2
    t0=$(date +%s%N)
    timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    say "$name: rc=$rc in $((($(date +%s%N) - t0) / 1000000)) ms"
    pack
    return $rc
}

# The model parts this call carried, kept for the next call on this machine.
mkdir -p /tmp/parallm-model
for part in "$DEV"/*/model.part*; do
    [ -f "$part" ] && cp "$part" /tmp/parallm-model/
done

setup_libs
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee -a "$LOGS/summary.txt"
unpack parallm a || exit 1
P=$BIN/parallm

case $phase in
bench)
    run probe 60 "$P" cuda --compile compute_90
    grep -E "libraries|GPUs|compiled" "$LOGS/probe.log" | tee -a "$LOGS/summary.txt"
    shapes="1b 8b"
    [ "$what" = both ] || shapes=$what
    for s in $shapes; do
        S=$(echo "$s" | tr a-z A-Z)
        run "decode-$s" 240 "$P" cuda --decode "$s" --depth 128 --steps 64 --json "$LOGS/decode-$s.json"
        run "engine-$s" 300 "$P" bench throughput --synthetic "$s" --device cuda:0 --dtype f16 \
            --concurrency 1,64 --prompt-tokens 128 --output-tokens 128 --max-batch-tokens 2048 \
            --kv-blocks 1100 --no-bare --json "$LOGS/engine-$s.json"
        run "hf-$s" 300 python3 benches/gpu/transformers_anchor.py --shape "$S" --vocab 32000 \
            --warmup 1 --runs 2 --json "$LOGS/hf-$s.json"
    done
    for s in $shapes; do
        echo "---- $s"
        grep -A3 "^| shape" "$LOGS/decode-$s.log"
        grep -A20 "batch-1 decode step" "$LOGS/decode-$s.log"
        grep -A4 "^| requests" "$LOGS/engine-$s.log"
        grep -A3 "^shape" "$LOGS/hf-$s.log"
        for f in decode engine hf; do
            grep -iE "error|panic" "$LOGS/$f-$s.log" | head -5
        done
    done 2>&1 | tee -a "$LOGS/summary.txt"
    ;;
profile)
    # Where an 8B decode step goes: the fenced per-op profile at batch 1 and
    # 64, then each kernel's own time on the device (Nsight Compute, one
    # decode step between cuProfilerStart and cuProfilerStop).
    shape=${what/both/8b}
    NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    for b in 1 64; do
        run "decode-$shape-b$b" 240 "$P" cuda --decode "$shape" --batch "$b" --depth 128 --steps 32 \
            --json "$LOGS/decode-$shape-b$b.json"
        grep -B2 -A20 "^| shape" "$LOGS/decode-$shape-b$b.log" | tee -a "$LOGS/summary.txt"
    done
    for b in 1 64; do
        run "ncu-$shape-b$b" 240 "$NCU" --clock-control none --profile-from-start off \
            --metrics gpu__time_duration.sum --csv --log-file "$LOGS/ncu-$shape-b$b.csv" \
            "$P" cuda --decode "$shape" --batch "$b" --depth 128 --steps 4 --kernel-trace
        python3 benches/gpu/kernel_times.py "$LOGS/ncu-$shape-b$b.csv" | tee -a "$LOGS/summary.txt"
    done
    ;;
kernels)
    # The CUDA kernels' unit tests on the GPU (they run on the host
    # emulation elsewhere), then the 8B engine and bare decode figures.
    unpack kernels a || exit 1
    PARALLM_CUDA_TESTS=gpu run kernel-tests 60 "$BIN/kernels" --test-threads 1 \
        cuda::tests::attention cuda::tests::elementwise cuda::tests::quant cuda::tests::sampling
    grep -E "^test |test result" "$LOGS/kernel-tests.log" | tee -a "$LOGS/summary.txt"
    s=${what/both/8b}
    run "engine-$s" 150 "$P" bench throughput --synthetic "$s" --device cuda:0 --dtype f16 \
        --concurrency 1,64 --prompt-tokens 128 --output-tokens 128 --max-batch-tokens 2048 \
        --kv-blocks 1100 --no-bare --json "$LOGS/engine-$s.json"
    grep -A4 "^| requests" "$LOGS/engine-$s.log" | tee -a "$LOGS/summary.txt"
    run "decode-$s" 120 "$P" cuda --decode "$s" --depth 128 --steps 64 --json "$LOGS/decode-$s.json"
    grep -A20 "^| shape" "$LOGS/decode-$s.log" | tee -a "$LOGS/summary.txt"
    ;;
tests)
    unpack cuda_gpu b || exit 1
    export PARALLM_HOME=/tmp/parallm-home
    mkdir -p "$PARALLM_HOME/models"
    model=$PARALLM_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf
    cat /tmp/parallm-model/model.part0 /tmp/parallm-model/model.part1 > "$model"
    echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $model" | sha256sum -c - | tee -a "$LOGS/summary.txt"
    export PARALLM_GOLDEN=$PWD/$DEV/b/golden.json
    run generate 60 "$P" generate --device cuda:0 --max-tokens 24 "The capital of France is"
    tail -3 "$LOGS/generate.log" | tee -a "$LOGS/summary.txt"
    run tests 480 "$BIN/cuda_gpu" --ignored --nocapture --test-threads 3 ${what/both/}
    grep -E "^test |test result|FAILED|panicked|worst|diverged|within" "$LOGS/tests.log" | tail -60 | tee -a "$LOGS/summary.txt"
    ;;
*)
    echo "unknown phase $phase (bench or tests)"
    exit 2
    ;;
esac
pack
