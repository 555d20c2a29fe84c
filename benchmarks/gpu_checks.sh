#!/usr/bin/env bash
# The GPU checks of issue 4 in one script, sized for a short device session:
#   1. the CUDA-graph tests (`-m gpu`): graph replays equal the eager static forward;
#   2. `bench floor` on a 7B-shaped Llama in bfloat16: eager, lean and CUDA-graph verify forwards against the
#      HBM floor;
#   3. `bench latency` on the GPU with the demo pair, the workers on static KV slots (CUDA graphs), greedy,
#      a reduced variant set;
#   4. (a second command: GPU_CHECK_STEPS=4) the issue's large-target profile: a 7B-shaped random Llama in
#      float32 (26 GB) with a draft steered to acceptance 0.8 (docs/benchmarks.md, "Cost profiling"),
#      pipelining off and on. Float32, because a random model's logits are nearly tied and in bfloat16 a verify
#      block of k + 1 rounds differently from the one-token steps the steering follows (on an H200 the
#      acceptance fell from 0.8 to 0.22).
# Usage: bash benchmarks/gpu_checks.sh OUT_DIR   (results and logs go there; each step's output in its file)
#        GPU_CHECK_STEPS="1 3" bash benchmarks/gpu_checks.sh OUT_DIR   (chosen steps only; default "1 2 3")
# On an H200 (2026-11-30) steps 1-3 took about 4 minutes and step 4 about 3.5. The steps' timeouts (95 + 180 +
# 240 s, or 300 s for step 4, and 10 s each to stop) keep a command under the device tool's 600 s, with ~60 s
# for the wheels, nvidia-smi and CUDA's start-up, so a slow step costs its own results, not the later steps'
# or the files copied at the end. A step past its time gets SIGINT (KeyboardInterrupt: the benchmark stops the
# services it started, instead of leaving them on the GPU) and SIGKILL 10 s later.
# On the lent machine: first `bash benchmarks/gpu_wheels.sh` here, then run with carry [".whl"], e.g.
#   run(command='bash benchmarks/gpu_checks.sh $OUT', carry=['.whl'], timeout_s=600)
#   run(command='GPU_CHECK_STEPS=4 bash benchmarks/gpu_checks.sh $OUT', carry=['.whl'], timeout_s=420)
# The wheels (the gRPC, protobuf, Redis and outlines-core pieces the image lacks) install to /tmp/site; the
# project runs from this checkout (PYTHONPATH), not installed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: gpu_checks.sh OUT_DIR}"
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl > /tmp/wheels.txt 2>&1 || { echo "wheels: install failed"; tail -n 20 /tmp/wheels.txt; }
    export PYTHONPATH="/tmp/site:$PWD"
else
    echo "no .whl/: run benchmarks/gpu_wheels.sh here first and carry ['.whl'] (the image lacks gRPC pieces)"
    export PYTHONPATH="$PWD"
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" \
    >> "$out/gpu.txt" 2>&1

steps=" ${GPU_CHECK_STEPS:-1 2 3} "

if [[ $steps == *" 1 "* ]]; then
timeout -s INT -k 10 95 python3 -m pytest -m gpu -p no:cacheprovider -q tests/test_graphed_forward.py \
    > "$out/1-gpu-tests.txt" 2>&1
echo "gpu tests: exit $?"
fi

if [[ $steps == *" 2 "* ]]; then
timeout -s INT -k 10 180 python3 -m specpipe bench floor --llama-shape 7b --device cuda --dtype bfloat16 --runs 10 \
    --batch-sessions 4 --out "$out/2-floor-7b.json" > "$out/2-floor-7b.txt" 2>&1
echo "floor 7b: exit $?"
fi

if [[ $steps == *" 3 "* ]]; then
rm -rf /tmp/latency  # a rerun on a warm machine must not copy back the previous run's results
timeout -s INT -k 10 240 python3 -m specpipe bench latency --device cuda --dtype float32 --static-kv-slots 4 \
    --modes greedy --num-prompts 8 --time-budget 190 \
    --variants plain-1t,hf-generate,hf-assisted,specpipe-k0,specpipe-adaptive,specpipe-adaptive-pipe \
    --out-dir /tmp/latency > "$out/3-latency.txt" 2>&1
echo "latency: exit $?"
cp /tmp/latency/latency.json "$out/3-latency.json" 2>/dev/null
# The workers' and coordinators' logs (tracebacks, "captured N CUDA graphs"): seven files in all.
tail -n 60 /tmp/latency/logs/*.log > "$out/3-latency-logs.txt" 2>&1
fi
if [[ $steps == *" 4 "* ]]; then
rm -rf /tmp/pair /tmp/latency-7b
timeout -s INT -k 10 100 python3 -m specpipe bench random-pair --target-shape 7b --draft-shape 160m \
    --device cuda --dtype float32 --out /tmp/pair > "$out/4-random-pair.txt" 2>&1
echo "random pair 7b: exit $?"
# The references (the steered draft's "right" tokens) come from the workers' static forward.
timeout -s INT -k 10 200 python3 -m specpipe bench latency --target-model /tmp/pair/target \
    --draft-model /tmp/pair/draft --device cuda --dtype float32 --static-kv-slots 4 \
    --controlled-acceptance 0.8 --modes greedy --num-prompts 3 --time-budget 150 \
    --variants plain-1t,specpipe-k0,specpipe-adaptive,specpipe-adaptive-pipe \
    --out-dir /tmp/latency-7b > "$out/4-latency-7b.txt" 2>&1
echo "latency 7b: exit $?"
cp /tmp/latency-7b/latency.json "$out/4-latency-7b.json" 2>/dev/null
tail -n 40 /tmp/latency-7b/logs/*.log > "$out/4-latency-7b-logs.txt" 2>&1
fi
tail -n 30 "$out"/*.txt
