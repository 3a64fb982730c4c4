#!/usr/bin/env bash
# One device call: GPU tests, then the GPU benchmarks named in $STEPS, each under its own time limit,
# results and logs into $OUT (default ./gpu_out). Run from the repository root (or a copy of src,
# benchmarks and tests): PYTHONPATH must reach lowbit's src; gemlite and fbgemm-gpu-genai, if wanted,
# must be importable, and so must lowbit's own needs that a CUDA image may lack: pydantic (with
# pydantic-core, annotated-types, typing-inspection; decode, tests), compressed-tensors and loguru
# (tests that import lowbit.export). The tests step's files took more than the 10 minutes of one
# device call on an H200: give tests/test_kernels.py a call of its own (129 s there alone).
#   STEPS="tests kernels decode decode_fused decode_separate quant4 quant32 quant_shortcuts quant_no_thp peer generate decode_attention warmup ranges profile gemv_splits gemv_floor tuner_stability gluon_zero_fold wgmma_swap_ab warmup_breakdown gluon_gemv zero_points transfer vq" OUT=/tmp/out bash benchmarks/gpu_run_all.sh
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
step() {  # name, seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "=== $name: exit $? after $((SECONDS - start)) s"
    tail -n 25 "$out/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
for s in ${STEPS:-tests kernels decode}; do
    case $s in
        # Every GPU test compiles and autotunes its own kernels: the whole of test_kernels.py takes
        # several minutes on a fresh machine; TESTS narrows it (pytest -k expression).
        tests) step tests "${T_TESTS:-120}" python3 -m pytest -q -x -p no:cacheprovider -k "${TESTS:-}" \
                   "$here/tests/test_kernels_gluon.py" "$here/tests/test_kernels_gemlite.py" "$here/tests/test_kernels_fbgemm.py" "$here/tests/test_kernel_timing.py" \
                   "$here/tests/test_gpu_solvers.py" "$here/tests/test_f16_pairs.py" "$here/tests/test_shortcuts.py" "$here/tests/test_block_memory.py" "$here/tests/test_decode_ops.py" "$here/tests/test_decode_attention.py" "$here/tests/test_generate.py" "$here/tests/test_packed_load.py" \
                   "$here/tests/test_kernels.py" ;;
        # The bench module directly (the device image may lack the CLI's own imports, pydantic),
        # one shape at a time, saving after each, so a run stopped by its limit keeps what it timed.
        # About a minute per shape on an H200 with GemLite: KERNEL_SHAPES (names separated by commas,
        # e.g. "70B k/v_proj,70B down_proj") splits the eight over two calls; KERNEL_M (e.g. "1")
        # times fewer batch sizes.
        kernels) step kernels "${T_KERNELS:-300}" python3 -c "import json, pathlib; from lowbit.bench import kernels as k
out, r = pathlib.Path('$out/gpu_kernels'), None
for name in [n for n in '${KERNEL_SHAPES:-}'.split(',') if n] or k.SHAPES:
    part = k.run([name], m_values=tuple(int(m) for m in '${KERNEL_M:-1,16,64,256}'.split(',')))
    r = part if r is None else {**r, 'rows': r['rows'] + part['rows']}
    out.with_suffix('.json').write_text(json.dumps(r, indent=1)); out.with_suffix('.md').write_text(k.markdown_table(r))
print(k.markdown_table(r))" ;;
        decode_attention) step decode_attention "${T_DECODE:-240}" python3 "$here/benchmarks/gpu_decode_attention.py" \
                              --out "$out/gpu_decode_attention" ;;
        decode) step decode "${T_DECODE:-240}" python3 "$here/benchmarks/gpu_decode.py" --profile --out "$out/gpu_decode" ;;
        # The same with lowbit's own kernels alone (no GemLite/FBGEMM): what lowbit adds by itself.
        # q/k/v and gate/up as separate matmuls (StaticDecoder(merge_projections=False); `decode` merges them).
        decode_separate) step decode_separate "${T_DECODE:-240}" python3 "$here/benchmarks/gpu_decode.py" --no-merge \
                             --out "$out/gpu_decode_separate" ;;
        decode_fused) step decode_fused "${T_DECODE:-180}" python3 "$here/benchmarks/gpu_decode.py" --paths fused \
                          dequantize+cublas --out "$out/gpu_decode_fused" ;;
        quant4) step quant4 "${T_QUANT4:-120}" python3 "$here/benchmarks/gpu_quant_speed.py" --layers 4 --breakdown \
                    --out "$out/gpu_quant_speed_4layers" ;;
        quant32) step quant32 "${T_QUANT32:-200}" python3 "$here/benchmarks/gpu_quant_speed.py" --layers 32 \
                     --out "$out/gpu_quant_speed" ;;
        # The 32 layers with and without the pipeline's shortcuts (pipeline/shortcuts.py), same call.
        quant_shortcuts) step quant_shortcuts "${T_QUANT32:-300}" python3 "$here/benchmarks/gpu_quant_speed.py" --layers 32 \
                             --without-shortcuts --out "$out/gpu_quant_speed_shortcuts" ;;
        # The same 32 layers without transparent huge pages, which lowbit asks torch's CPU allocator
        # for when it is imported first (the CLI, and gpu_quant_speed.py): the codes' copies to new
        # host memory fault more (gpu_block_transfer_thp_h200_round7.md).
        quant_no_thp) step quant_no_thp "${T_QUANT32:-200}" env THP_MEM_ALLOC_ENABLE=0 python3 "$here/benchmarks/gpu_quant_speed.py" \
                          --layers 32 --out "$out/gpu_quant_speed_no_thp" ;;
        # llm-compressor 0.14 beside lowbit on all 32 layers, same call (the issue's 5x): PEER_PATH is a
        # folder holding llm-compressor and the packages the image lacks (benchmarks/peer_wheels.sh).
        peer) step peer "${T_PEER:-560}" python3 "$here/benchmarks/gpu_quant_speed.py" --layers 32 --peer-layers 32 \
                  --peer-path "${PEER_PATH:?PEER_PATH: a folder holding llm-compressor 0.14 and its needs}" \
                  --peer-timeout "${T_PEER_RUN:-480}" --out "$out/gpu_quant_speed_vs_llmcompressor" ;;
        # `lowbit generate` on an int4 export of the 8B-shaped model (written by gpu_export.py, read
        # back onto its codes), batch 1 and 16: the path a user's export takes.
        generate) [ -d /tmp/int4-8b ] || step generate_export "${T_GENERATE:-300}" python3 "$here/benchmarks/gpu_export.py" --out /tmp/int4-8b
                  for b in 1 16; do
                      step "generate_b$b" "${T_GENERATE:-300}" env TRITON_CACHE_DIR=/tmp/triton_parallel \
                          python3 -m lowbit.cli generate /tmp/int4-8b \
                          --prompt "w1 w2 w3 w4 w5 w6 w7 w8" --new-tokens 128 --batch "$b"
                  done ;;
        # lowbit generate's warm-up (batch 1, the generate step's export, written first if missing),
        # each run with its own Triton cache: cold with candidates compiled one by one
        # (LOWBIT_COMPILE_THREADS=1) and on the thread pool (default), then the latter's cache again
        # (tunings kept on disk: a user's second run). WARMUP_RUNS (NAME:CACHE:THREADS ...) picks runs.
        warmup) [ -d /tmp/int4-8b ] || step generate_export "${T_GENERATE:-300}" python3 "$here/benchmarks/gpu_export.py" --out /tmp/int4-8b
                for run in ${WARMUP_RUNS:-cold_serial:serial:1 cold_parallel:parallel: cached:parallel:}; do
                    IFS=: read -r name cache threads <<< "$run"
                    step "generate_b1_$name" "${T_GENERATE:-300}" env TRITON_CACHE_DIR="/tmp/triton_$cache" \
                        LOWBIT_COMPILE_THREADS="$threads" python3 -m lowbit.cli generate /tmp/int4-8b \
                        --prompt "w1 w2 w3 w4 w5 w6 w7 w8" --new-tokens 128 --batch 1
                done ;;
        ranges) step ranges "${T_RANGES:-180}" python3 "$here/benchmarks/gpu_quant_speed.py" --layers 4 --ranges \
                    --out "$out/gpu_quant_speed_ranges" ;;
        # Nsight Compute's stall reasons (each as warps stalled per issued instruction), occupancy and
        # throughput for a few kernels (gpu_profile.py: the configs the saved kernel table chose);
        # PROFILE_CASES (SHAPE:M[@CONFIG], separated by "|") replaces the default cases; a CONFIG names
        # its kernel (e.g. "8B gate/up_proj:16@16x128 span 1024 w8", the Gluon 16-row tile).
        # PROFILE_SOURCE=1 adds ncu's SourceCounters section: warp stalls sampled per SASS instruction.
        profile) IFS='|' read -r -a cases <<< "${PROFILE_CASES:-70B gate/up_proj:1|70B gate/up_proj:16|8B gate/up_proj:16|8B k/v_proj:1}"
                 step profile "${T_PROFILE:-300}" ncu --clock-control none --profile-from-start off \
                     --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
                     --section SchedulerStats --section MemoryWorkloadAnalysis ${PROFILE_SOURCE:+--section SourceCounters} \
                     --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
                     python3 "$here/benchmarks/gpu_profile.py" --cases "${cases[@]}" ;;
        # The Gluon 16-row tile with asymmetric zero points unpacked or folded, beside symmetric (gpu_gluon_zero_fold.py).
        gluon_zero_fold) step gluon_zero_fold "${T_FOLD:-300}" python3 "$here/benchmarks/gpu_gluon_zero_fold.py" --out "$out/gpu_gluon_zero_fold" ;;
        # The swap-AB wgmma tile for M = 16 and 64 beside bf16 and the dispatcher (gpu_wgmma_swap_ab.py).
        wgmma_swap_ab) step wgmma_swap_ab "${T_WGMMA:-300}" python3 "$here/benchmarks/gpu_wgmma_swap_ab.py" --out "$out/gpu_wgmma_swap_ab" ;;
        # One config at a time: symmetric, uint8 zero points, float16 zero points (gpu_zero_points.py).
        # One GEMV tile at every split count (gpu_gemv_splits.py): a program's fixed cost.
        gemv_splits) step gemv_splits "${T_SPLITS:-180}" python3 "$here/benchmarks/gpu_gemv_splits.py" --out "$out/gpu_gemv_splits" ;;
        # What a GEMV call costs before its weight streams: launch floor, prologue, split-K tail (gpu_gemv_floor.py).
        # lowbit generate's first warm-up, phase by phase (gpu_warmup_breakdown.py), cold at batch 1.
        warmup_breakdown) [ -d /tmp/int4-8b ] || step generate_export "${T_GENERATE:-300}" python3 "$here/benchmarks/gpu_export.py" --out /tmp/int4-8b
                for b in 1 16; do
                    step "warmup_breakdown_b$b" "${T_GENERATE:-300}" env TRITON_CACHE_DIR=/tmp/triton_breakdown \
                        python3 "$here/benchmarks/gpu_warmup_breakdown.py" /tmp/int4-8b --batch "$b" \
                        --out "$out/gpu_warmup_breakdown_b$b.md"
                done ;;
        # The Gluon GEMV beside the Triton GEMV's tuned choice, M = 1 (gpu_gluon_gemv.py).
        gluon_gemv) step gluon_gemv "${T_GLUON_GEMV:-300}" python3 "$here/benchmarks/gpu_gluon_gemv.py" --out "$out/gpu_gluon_gemv" ;;
        gemv_floor) step gemv_floor "${T_FLOOR:-120}" python3 "$here/benchmarks/gpu_gemv_floor.py" --out "$out/gpu_gemv_floor" ;;
        # The GEMV's autotuner run from scratch again and again (gpu_tuner_stability.py): how often it keeps a
        # slower config, without finalists, with the autotuner's own setting and with a wider one.
        tuner_stability) step tuner_stability "${T_TUNER:-420}" python3 "$here/benchmarks/gpu_tuner_stability.py" \
                             --settings 1:1.0 4:1.15 8:1.3 --out "$out/gpu_tuner_stability" ;;
        zero_points) step zero_points "${T_ZERO:-240}" python3 "$here/benchmarks/gpu_zero_points.py" --out "$out/gpu_zero_points" ;;
        # One decoder block between CPU and GPU memory, by method (gpu_block_transfer.py); again with
        # torch's CPU allocator asking for transparent huge pages (fewer page faults in new memory).
        transfer) step transfer "${T_TRANSFER:-120}" python3 "$here/benchmarks/gpu_block_transfer.py" \
                      --out "$out/gpu_block_transfer"
                  step transfer_thp "${T_TRANSFER:-120}" env THP_MEM_ALLOC_ENABLE=1 \
                      python3 "$here/benchmarks/gpu_block_transfer.py" --out "$out/gpu_block_transfer_thp" ;;
        vq) step vq "${T_VQ:-180}" python3 "$here/benchmarks/vq.py" --decode --device cuda --out "$out/vq" ;;
        *) echo "unknown step $s (tests kernels decode decode_fused decode_separate quant4 quant32 quant_shortcuts quant_no_thp peer generate warmup ranges profile gemv_splits gemv_floor tuner_stability gluon_zero_fold wgmma_swap_ab warmup_breakdown gluon_gemv zero_points transfer vq)"; exit 2 ;;
    esac
done
