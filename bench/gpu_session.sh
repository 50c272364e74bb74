#!/usr/bin/env bash
# One GPU lease, one call: build the CUDA extension for the card present, run the GPU suite, then the benchmarks.
#
#   bash bench/gpu_session.sh [STEP...]
#   (no argument: build gpu_tests moe talker_frame e2e_full attention concurrent thinker_batch test)
#   steps: build, gpu_tests (pytest -m gpu: CUDA ops, graphs, bf16 parity), test (the whole suite on the GPU: Triton
#   kernels on device), kernels (= moe attention norms code2wav), e2e (= e2e_small e2e_full talker_frame thinker_decode),
#   pacing (the speech engine's prefill pacer with a long prompt), pacing_audio (its encoder pacing), pacer_fit (its
#   chunk-cost model), tune
# The default order is for one call of a 15-minute lease: what only a GPU can show first (the GPU tests), then the
# figures the open targets need (MoE kernels, the talker frame, first packet and RTF), then the rest as time allows.
#   TESTS="tests/test_x.py ..." narrows the test step; DEADLINE=SECONDS bounds the whole run.
#
# Logs, junit XML and result JSON are packed after every step into $OUT/session.tgz ($OUT: the device tool's folder,
# else /tmp/gpu_session), beside the built extension and summary.txt; results also land in bench/results/.
# Packages the machine lacks (soundfile, soxr, cffi; transformers 5.24.0) are carried as wheels in .whl/ (installed
# to /tmp/site): run `bash bench/fetch_wheels.sh` here first and pass carry=[".whl"] to the device tool. Each step has
# its own time limit, shortened to fit DEADLINE seconds from the start (default 540); a step that would get less than
# its minimum is skipped; a failing step does not stop the next one. A step out of time gets SIGINT first (pytest
# still writes its junit XML and summary), SIGKILL 15 s later.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_session} logs=$(mktemp -d)
mkdir -p "$out"
deadline=${DEADLINE:-540}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build gpu_tests moe talker_frame e2e_full attention concurrent thinker_batch test)
summary=()

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

pack() {
  cp bench/results/*.json "$logs/" 2>/dev/null
  printf '%s\n' "${summary[@]}" >"$out/summary.txt"
  tar czf "$out/session.tgz" -C "$logs" .
}

step() {  # step NAME SECONDS [MIN_SECONDS] COMMAND...: runs COMMAND with a limit, logs to NAME.log, records the outcome
  local name=$1 limit=$2 least=30; shift 2
  if [[ $1 =~ ^[0-9]+$ ]]; then least=$1; shift; fi
  local start=$SECONDS left=$((deadline - SECONDS - 15))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt "$least" ]; then summary+=("$name: skipped, ${left}s left (needs ${least}s)"); return; fi
  echo "=== $name (limit ${limit}s): $*"
  timeout -s INT -k 15 "$limit" "$@" >"$logs/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$logs/$name.log"
  summary+=("$(printf '%-22s rc=%-3s %4ss' "$name" "$rc" $((SECONDS - start)))")
  pack
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$logs/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__)" | tee -a "$logs/gpu.txt"
for module in nvtx soundfile soxr tokenizers PIL; do   # what the runtime and tests import
  python3 -c "import $module" 2>/dev/null || echo "missing: $module (bench/fetch_wheels.sh, carry .whl)" | tee -a "$logs/gpu.txt"
done

for ((i = 0; i < ${#steps[@]}; i++)); do
  s=${steps[i]}
  case $s in
    build)
      arch=$(python3 -c "import torch; print('.'.join(map(str, torch.cuda.get_device_capability())))")
      if compgen -G "omni_kernels/_C*.so" >/dev/null; then
        summary+=("build: reusing $(ls omni_kernels/_C*.so)")
      else
        step build 300 env TORCH_CUDA_ARCH_LIST="$arch" python3 setup.py -q build_ext --inplace
      fi
      cp omni_kernels/_C*.so "$out/" 2>/dev/null ;;
    gpu_tests)
      step gpu_tests 180 60 python3 -m pytest -q -p no:cacheprovider -m gpu -n 8 --timeout 170 -rfE --tb=short \
        --continue-on-collection-errors \
        --junitxml="$logs/junit_gpu.xml" ${TESTS:-tests} ;;
    test)
      step test_gpu 360 60 python3 -m pytest -q -p no:cacheprovider -n 8 --timeout 240 -rfE --tb=short \
        --continue-on-collection-errors \
        --junitxml="$logs/junit.xml" ${TESTS:-tests} ;;
    kernels) steps+=(moe attention norms code2wav) ;;
    moe) step bench_fused_moe 240 60 python3 bench/bench_fused_moe.py ;;   # saves after every shape
    attention) step bench_attention 150 python3 bench/bench_attention.py ;;
    norms) step bench_norms 90 python3 bench/bench_norms.py ;;
    code2wav) step bench_code2wav 240 python3 bench/bench_code2wav_kernels.py ;;
    e2e) steps+=(e2e_small e2e_full talker_frame thinker_decode) ;;
    e2e_small) step e2e_small 180 python3 bench/e2e_latency.py --device cuda --dtype bfloat16 ;;
    e2e_full)  # all 48 thinker layers: the released model, 64 GiB peak in bf16 with the talker (fits an H100 80GB)
      step e2e_full 300 120 python3 bench/e2e_latency.py --device cuda --dtype bfloat16 --full-size \
        --thinker-layers "${THINKER_LAYERS:-48}" ;;
    talker_frame) step talker_frame 180 python3 bench/profile_talker_frame.py --device cuda --dtype bfloat16 --full-size ;;
    concurrent)  # the released sizes at concurrency 1, 4, 6, 8: batched against one request after another
      step concurrent_speech 200 120 python3 bench/concurrent_speech.py --device cuda --dtype bfloat16 --full-size \
        --thinker-layers "${THINKER_LAYERS:-48}" --concurrency 1,4,6,8 --repeats 1 ;;
    pacing)  # a 3000-token prompt arrives while three answers speak: the pacer against one whole prefill
      for mode in "" --fixed-chunks; do
        step "pacing${mode:+_fixed}" 150 100 python3 bench/concurrent_speech.py --device cuda --dtype bfloat16 --full-size \
          --thinker-layers "${THINKER_LAYERS:-48}" --concurrency 4 --arrival-ms 200 --long-prompt-tokens 3000 \
          --repeats 1 $mode
      done ;;
    pacing_audio)  # 240 s of audio (the released audio encoder runs at admission) arrives while three answers speak
      step pacing_audio 200 120 python3 bench/concurrent_speech.py --device cuda --dtype bfloat16 --full-size \
        --thinker-layers "${THINKER_LAYERS:-48}" --concurrency 4 --arrival-ms 200 --audio-seconds 240 --repeats 1 ;;
    pacer_fit)  # the pacer's chunk-cost model on a 3900-token prompt: fitted on the first chunks, the later ones predicted
      step prefill_cost_fit 150 90 python3 bench/prefill_cost_fit.py --device cuda --dtype bfloat16 --full-size \
        --thinker-layers "${THINKER_LAYERS:-48}" ;;
    thinker_batch) step thinker_batch 150 90 python3 bench/thinker_batch.py --device cuda --dtype bfloat16 --full-size \
      --batches 1,2,4,8,16 ;;
    thinker_decode) step thinker_decode 120 python3 bench/thinker_decode.py --device cuda --dtype bfloat16 ;;
    tune)
      step tune_fused_moe 540 60 python3 bench/tune_fused_moe.py --quick
      cp omni_kernels/configs/fused_moe/*.json omni_kernels/configs/fused_moe/*.partial "$logs/" 2>/dev/null; pack ;;
    *) echo "unknown step $s"; exit 2 ;;
  esac
done
pack
echo "=== summary"
cat "$out/summary.txt"
