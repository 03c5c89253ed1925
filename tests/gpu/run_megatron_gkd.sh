#!/usr/bin/env bash
# End-to-end check of `megatron rlhf --rlhf_type gkd` with the plugin on a tiny offline Qwen3 model: 2 training
# iterations per case, in each mode (off-policy, on-policy sampled by the training model, seq_kd), at TP=1, and at
# TP=2 when the machine has 2 or more GPUs. Prints `SKIP: ...` and exits 0 without CUDA or without the Megatron stack
# (transformer-engine, megatron-core, mcore-bridge). See tests/gpu/README.md.
#
# With 2 or more GPUs it also runs a tiny Qwen3-MoE pair with expert parallelism 2 (on-policy and seq_kd sampling),
# and the off-policy case with context parallelism 2, whose logged losses must equal the 1-GPU run's (bf16 tolerance).
# Environment: PYTHON (python), WORK (a fresh temporary directory; logs and outputs are kept there), CASES (space
# separated case names to run, default all), CASE_TIMEOUT (seconds per run, 900), ATTN_BACKEND (auto).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-python}

skip() {
    echo "SKIP: $*"
    exit 0
}

# ---------------------------------------------------------------------------------------------------- preconditions
"$PYTHON" -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1 ||
    skip "no CUDA device (torch.cuda.is_available() is False); Megatron-SWIFT needs GPUs"
for module in transformer_engine megatron.core mcore_bridge; do
    "$PYTHON" -c "import $module" >/dev/null 2>&1 ||
        skip "cannot import $module: the Megatron stack is not installed (ms-swift[megatron], transformer-engine)"
done
MEGATRON=$(dirname "$(command -v "$PYTHON")")/megatron
[ -x "$MEGATRON" ] || MEGATRON=$(command -v megatron || true)
[ -n "$MEGATRON" ] || skip "ms-swift's \`megatron\` command is not installed next to $PYTHON"

# The plugin under test is this checkout; its auto-activation (swift_gkd_plugin.pth) must be installed.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
unset SWIFT_GKD_PLUGIN
if ! "$PYTHON" - <<'EOF'
import sys
from swift_gkd_plugin.entry.bootstrap import _PostImportFinder
sys.exit(0 if any(isinstance(f, _PostImportFinder) for f in sys.meta_path) else 1)
EOF
then
    echo "ERROR: the plugin's auto-activation is not installed in this environment: run \`pip install .\` in $REPO"
    exit 1
fi

N_GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
WORK=${WORK:-$(mktemp -d -t megatron_gkd.XXXXXX)}
mkdir -p "$WORK"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MODELSCOPE_OFFLINE=1 USE_HF=1
export TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF='expandable_segments:True'
echo "work directory: $WORK ($N_GPUS GPU(s))"

# ---------------------------------------------------------------------------------------------------- tiny models
# All models share the tokenizer (448 padded vocabulary rows, 442 tokens); head_dim 32, 2 KV heads (TP=2 ok). The
# MoE pair (4 experts, 2 active) is for the expert-parallel cases.
"$PYTHON" - "$WORK" <<'EOF' || { echo "ERROR: could not build the tiny workspace in $WORK"; exit 1; }
import os
import sys

from swift_gkd_plugin.demo import tiny

root = sys.argv[1]
tok = tiny.build_tokenizer(os.path.join(root, 'tok'))
tiny.build_model(os.path.join(root, 'student'), tok, seed=0, hidden_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, intermediate_size=256)
tiny.build_model(os.path.join(root, 'teacher'), tok, seed=1, hidden_size=128, num_layers=3, num_heads=4,
                 num_kv_heads=2, intermediate_size=384)
for name, seed in [('moe_student', 2), ('moe_teacher', 3)]:
    tiny.build_model(os.path.join(root, name), tok, seed=seed, hidden_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, intermediate_size=128, moe=True, num_experts=4, num_experts_per_tok=2)
tiny.write_dataset(os.path.join(root, 'train.jsonl'), tiny.make_rows(64, seed=0, split='train'))
print('tiny workspace ready:', root)
EOF

# ---------------------------------------------------------------------------------------------------- cases
SEED=42
TRAIN_ITERS=2
# name | student | teacher | model type | lmbda | seq_kd | extra flags. The first three are the modes; then teacher
# placements (shared-base LoRA self-distillation: --teacher_model == --model; an offloaded teacher) and the teacher's
# top-k (cut per micro-batch), evaluation with the shared-base teacher (ms-swift raised KeyError 'teacher_output'),
# and with vLLM installed the shared base under vLLM weight syncs (the merge/unmerge round trip), at TP=1; the modes
# and the top-k (the padded vocabulary: 448 rows, split over 2 ranks) at TP=2; the MoE cases on 2 GPUs with expert
# parallelism 2 (data parallelism 2).
CASE_TABLE=(
    "off_policy|student|teacher|qwen3|0|false|"
    "on_policy|student|teacher|qwen3|1|false|--use_vllm false"
    "seq_kd|student|teacher|qwen3|0|true|"
    "shared_base_lora_seq_kd|student|student|qwen3|0|true|--tuner_type lora"
    "offloaded_teacher_seq_kd|student|teacher|qwen3|0|true|--offload_teacher_model true"
    "teacher_topk_tail|student|teacher|qwen3|0|false|--gkd_logits_topk 8 --gkd_topk_tail true"
    "shared_base_lora_eval|student|student|qwen3|0|false|--tuner_type lora --split_dataset_ratio 0.25 --eval_steps 1 --eval_iters 1"
    "shared_base_lora_vllm|student|student|qwen3|1|false|--tuner_type lora --use_vllm true --vllm_mode colocate --vllm_gpu_memory_utilization 0.3 --vllm_max_model_len 256"
    "moe_ep2_on_policy|moe_student|moe_teacher|qwen3_moe|1|false|--use_vllm false --expert_model_parallel_size 2"
    "moe_ep2_seq_kd|moe_student|moe_teacher|qwen3_moe|0|true|--expert_model_parallel_size 2"
)
TP1_CASES=" off_policy on_policy seq_kd shared_base_lora_seq_kd offloaded_teacher_seq_kd teacher_topk_tail shared_base_lora_eval "
# vLLM is optional: its shared-base case runs only where vLLM is installed
"$PYTHON" -c 'import vllm' >/dev/null 2>&1 && TP1_CASES="$TP1_CASES shared_base_lora_vllm "
TP2_CASES=" off_policy on_policy seq_kd teacher_topk_tail "
EP2_CASES=" moe_ep2_on_policy moe_ep2_seq_kd "
CP2_CASES=" off_policy "
CASES=" ${CASES:-$TP1_CASES $EP2_CASES} "

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# check_run OUT LOG LMBDA SEQ_KD: the run logged the plugin's start-up line, losses, and one mode per iteration, each
# the mode choose_mode(seed, step, lmbda, seq_kd) gives for its step.
check_run() {
    local out=$1 log=$2 lmbda=$3 seq_kd=$4
    grep -q 'GKD trainer active (megatron' "$log" ||
        { echo "  no 'GKD trainer active (megatron' line in $log"; return 1; }
    local journal
    journal=$(find "$out" -path '*gkd_modes/rank0.jsonl' | head -n 1)
    [ -n "$journal" ] || { echo "  no gkd_modes/rank0.jsonl under $out"; return 1; }
    grep -Eq "'loss': |\"loss\": " "$log" "$out"/logging.jsonl 2>/dev/null ||
        { echo "  no logged loss in $log or $out/logging.jsonl"; return 1; }
    "$PYTHON" - "$journal" "$out" "$SEED" "$lmbda" "$seq_kd" "$TRAIN_ITERS" <<'EOF'
import glob
import json
import math
import os
import sys

from swift_gkd_plugin.core import choose_mode

journal, out, seed, lmbda, seq_kd, iters = sys.argv[1:]
rows = [json.loads(line) for line in open(journal) if line.strip()]
assert len(rows) == int(iters), f'{len(rows)} mode decisions in {journal}, expected {iters}: {rows}'
for row in rows:
    expected = choose_mode(int(seed), row['step'], float(lmbda), seq_kd == 'true').value
    assert row['mode'] == expected, f'step {row["step"]}: mode {row["mode"]}, choose_mode gives {expected}'
losses = []
for path in glob.glob(os.path.join(out, '**', 'logging.jsonl'), recursive=True):
    losses += [json.loads(line)['loss'] for line in open(path) if '"loss"' in line]
assert all(math.isfinite(float(x)) for x in losses), f'non-finite loss: {losses}'
print(f'  modes {[r["mode"] for r in rows]}, losses {losses}')
EOF
}

# compare_losses OUT_ONE OUT_SPLIT: the same iterations logged the same losses (bf16 tolerance): context and sequence
# parallelism split each sequence over the ranks; the loss is a per-token mean over all of them.
compare_losses() {
    "$PYTHON" - "$1" "$2" <<'EOF'
import json
import os
import sys

def losses(out):
    path = os.path.join(out, 'logging.jsonl')
    return [json.loads(line)['loss'] for line in open(path) if '"loss"' in line] if os.path.exists(path) else []

one, two = losses(sys.argv[1]), losses(sys.argv[2])
ok = bool(one) and len(one) == len(two) and all(abs(a - b) <= 3e-2 * max(abs(a), 1e-3) for a, b in zip(one, two))
print(f'  one GPU: losses {one}; split: losses {two}: {"equal" if ok else "DIFFERENT"} (rel. tolerance 3e-2, bf16)')
sys.exit(0 if ok else 1)
EOF
}

FAILED=()
PASSED=()
# run_case NPROC TP SPEC [CP]: one `megatron rlhf` run on NPROC GPUs, then check_run.
run_case() {
    local nproc=$1 tp=$2 spec=$3 cp=${4:-1}
    local name student teacher model_type lmbda seq_kd extra
    IFS='|' read -r name student teacher model_type lmbda seq_kd extra <<<"$spec"
    local tag="gpu${nproc}_tp${tp}_${name}"
    [ "$cp" -gt 1 ] && tag="gpu${nproc}_tp${tp}_cp${cp}_${name}"
    local out="$WORK/$tag" log="$WORK/$tag.log"
    # global batch 2: micro-batches of 2 on one data-parallel rank, or of 1 on two
    local micro=$((2 * tp * cp / nproc))
    rm -rf "$out"
    echo "=== $tag: student=$student teacher=$teacher lmbda=$lmbda seq_kd=$seq_kd $extra"
    # shellcheck disable=SC2086  # $extra is a list of flags
    NPROC_PER_NODE=$nproc CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((nproc - 1))) MASTER_PORT=$(free_port) \
        timeout "${CASE_TIMEOUT:-900}" "$MEGATRON" rlhf \
        --rlhf_type gkd \
        --model "$WORK/$student" --model_type "$model_type" \
        --teacher_model "$WORK/$teacher" --teacher_model_type "$model_type" \
        --template qwen3_nothinking \
        --dataset "$WORK/train.jsonl" --split_dataset_ratio 0 --dataset_num_proc 1 --dataloader_num_workers 1 \
        --tuner_type full --torch_dtype bfloat16 --check_model false \
        --tensor_model_parallel_size "$tp" --pipeline_model_parallel_size 1 --context_parallel_size "$cp" \
        --attention_backend "${ATTN_BACKEND:-auto}" \
        --lmbda "$lmbda" --seq_kd "$seq_kd" --beta 0.5 --temperature 1.0 --seed "$SEED" \
        --max_length 128 --max_completion_length 8 \
        --micro_batch_size "$micro" --global_batch_size 2 --train_iters "$TRAIN_ITERS" \
        --lr 1e-5 --logging_steps 1 --save_steps 100 --no_save_optim true --no_save_rng true \
        --output_dir "$out" --add_version false \
        $extra >"$log" 2>&1
    local rc=$?
    if [ $rc -ne 0 ]; then
        echo "  FAIL: exit code $rc; last lines of $log:"
        tail -n 40 "$log" | sed 's/^/    /'
        FAILED+=("$tag")
    elif [[ "$extra" == *--eval_steps* ]] && ! grep -q "eval_loss" "$log"; then
        echo "  FAIL: no eval_loss logged in $log (evaluation did not run or did not score)"
        FAILED+=("$tag")
    elif check_run "$out" "$log" "$lmbda" "$seq_kd"; then
        echo "  PASS"
        PASSED+=("$tag")
    else
        echo "  FAIL: see $log"
        FAILED+=("$tag")
    fi
}

selected() { [[ "$CASES" == *" $1 "* && "$2" == *" $1 "* ]]; }
for spec in "${CASE_TABLE[@]}"; do
    selected "${spec%%|*}" "$TP1_CASES" && run_case 1 1 "$spec"
done
if [ "$N_GPUS" -ge 2 ]; then
    for spec in "${CASE_TABLE[@]}"; do
        selected "${spec%%|*}" "$TP2_CASES" && run_case 2 2 "$spec"
    done
    for spec in "${CASE_TABLE[@]}"; do
        selected "${spec%%|*}" "$EP2_CASES" && run_case 2 1 "$spec"
    done
    for spec in "${CASE_TABLE[@]}"; do
        name=${spec%%|*}
        selected "$name" "$CP2_CASES" || continue
        [ -d "$WORK/gpu1_tp1_$name" ] || run_case 1 1 "$spec"
        run_case 2 1 "$spec" 2 && compare_losses "$WORK/gpu1_tp1_$name" "$WORK/gpu2_tp1_cp2_$name" ||
            { [[ " ${FAILED[*]} " == *" gpu2_tp1_cp2_$name "* ]] || FAILED+=("gpu2_tp1_cp2_${name}_vs_cp1"); }
        # Megatron's sequence parallelism (TP = 2, --sequence_parallel true, TE's norms) against the one-GPU run
        run_case 2 2 "${name}_sp|${spec#*|} --sequence_parallel true" &&
            compare_losses "$WORK/gpu1_tp1_$name" "$WORK/gpu2_tp2_${name}_sp" ||
            { [[ " ${FAILED[*]} " == *" gpu2_tp2_${name}_sp "* ]] || FAILED+=("gpu2_tp2_${name}_sp_vs_tp1"); }
    done
else
    echo "TP=2, context-parallel, sequence-parallel and expert-parallel cases not run: fewer than 2 GPUs"
fi

echo "passed: ${PASSED[*]:-none}"
echo "failed: ${FAILED[*]:-none}"
[ ${#FAILED[@]} -eq 0 ]
