#!/usr/bin/env bash
# The SmolLM2 accuracy benchmarks on one CUDA GPU, one after the other, each with --device cuda and
# its usual results file under benchmarks/results/. The same scripts run on a CPU (minutes to hours per
# table there); on an H200 a table takes minutes. Logs go to $LOGS (default gpu_accuracy_logs);
# JOBS picks and orders the tables (names below). Run from the repository root with lowbit importable
# and ../shared/data/wikitext-2 present.
#   JOBS="foundation_2048 vq extreme" bash benchmarks/gpu_accuracy_all.sh
set -u
cd "$(dirname "$0")/.."
logs=${LOGS:-gpu_accuracy_logs}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1
job() {  # name, command...
    local name=$1
    shift
    echo "=== $name: $*"
    local start=$SECONDS
    "$@" >"$logs/$name.log" 2>&1
    echo "=== $name: exit $? after $((SECONDS - start)) s"
    grep -v "it/s]\|s/it]" "$logs/$name.log" | tail -n 8
}
all="foundation_2048 foundation vq vq_eora extreme weight_only rotations formats activations activations_kv4 kv_cache budget"
for j in ${JOBS:-$all}; do
    case $j in
        foundation_2048) job $j python3 benchmarks/foundation.py --device cuda --samples 128 --seq-len 2048 \
            --methods rtn,gptq,gptq-static-mse --out benchmarks/results/foundation_2048 ;;
        foundation) job $j python3 benchmarks/foundation.py --device cuda --samples 128 --seq-len 512 \
            --methods rtn,gptq,gptq-static-mse ;;
        vq) job $j python3 benchmarks/vq.py --device cuda ;;
        vq_eora) job $j python3 benchmarks/vq.py --device cuda --eora-rank 4 --out benchmarks/results/vq_eora ;;
        extreme) job $j python3 benchmarks/extreme_low_bits.py --device cuda ;;
        weight_only) job $j python3 benchmarks/weight_only_methods.py --device cuda \
            --methods rtn,awq,hqq,easyquant,gptq,gptq-static-mse,awq+gptq ;;
        rotations) job $j python3 benchmarks/rotations.py --device cuda ;;
        formats) job $j python3 benchmarks/formats.py --device cuda ;;
        activations) job $j python3 benchmarks/activations.py --device cuda ;;
        activations_kv4) job $j python3 benchmarks/activations.py --device cuda --samples 32 --seq-len 512 \
            --rows w4a4kv4-rtn,w4a4kv4-gptq,w4a4kv4-quarot-rtn,w4a4kv4-quarot-gptq \
            --out benchmarks/results/activations_w4a4kv4 ;;
        kv_cache) job $j python3 benchmarks/kv_cache.py --device cuda ;;
        budget) job $j python3 benchmarks/budget.py --device cuda ;;
        *) echo "unknown job $j; choose among: $all" ;;
    esac
done
