#!/usr/bin/env bash
# Hardware: 8 GPUs (NPROC_PER_NODE=8), bf16, Megatron EP 8, LoRA on a 30B MoE, flash attention.
# 硬件：8 卡（NPROC_PER_NODE=8），bf16，Megatron EP 8，30B MoE 上的 LoRA，flash attention。
# Cost: not measured (not yet run on GPUs). / 开销：未测量（尚未在 GPU 上运行）。
# CPU try-out (GKD_EXAMPLE_TINY): does not apply, megatron rlhf needs megatron-core, mcore-bridge and
# transformer-engine on GPUs (docs_en/megatron.md).
#
# Megatron-SWIFT GKD, MoE: LoRA self-distillation of Qwen3-30B-A3B-Instruct-2507 with expert parallelism (EP=8,
# 8 GPUs). Teacher = the base model with the LoRA adapter disabled, student = base + LoRA: --teacher_model equal to
# --model with --tuner_type lora loads the weights ONCE. / Megatron-SWIFT 上的 GKD（MoE）：Qwen3-30B-A3B-Instruct-2507
# 的 LoRA 自蒸馏，专家并行 EP=8（8 卡）。教师 = 关闭 LoRA 的基座模型，学生 = 基座 + LoRA：--teacher_model 与 --model
# 相同且 --tuner_type lora 时权重只加载一次。
# Modes: on-policy half of the steps, the teacher (the base) samples the other responses (seq_kd). Without vLLM the
# Megatron model samples (no KV cache), and with expert parallelism all ranks keep running forwards until every rank's
# completions have stopped (the MoE all-to-alls span the data-parallel ranks): keep completions short, or set
# USE_VLLM=true for the on-policy steps.
# 模式：一半步数 on-policy，其余步由教师（基座）生成回复（seq_kd）。不用 vLLM 时由 Megatron 模型采样（无 KV cache）；在
# 专家并行下所有 rank 会一直执行前向，直到所有 rank 的回复都结束（MoE 的 all-to-all 跨数据并行 rank），请保持回复较短，
# 或设置 USE_VLLM=true 让 on-policy 步使用 vLLM。
# What drives the loss: a fresh LoRA is zero, so on the same prompt the student equals its teacher and the divergence
# is exactly 0. Every row therefore gets a `teacher_prompt` column (the question plus the dataset's reference answer,
# written by privileged_teacher_data.py), which only the teacher reads: it scores the response, and on seq_kd steps
# samples it, with the reference in view, and the LoRA learns to answer without it as the base does with it. Other
# ways to move a zero LoRA away from its teacher: start from an SFT adapter (ADAPTERS=path).
# 损失从何而来：新 LoRA 为零，同一提示下学生与教师相同，散度恰为 0。因此每行加上 `teacher_prompt` 列（问题 + 数据集的
# 参考答案，由 privileged_teacher_data.py 写入），只有教师能看到：教师在看到参考答案的情况下给回复打分，并在 seq_kd 步
# 生成回复；LoRA 学会在没有参考答案时像看到参考答案的基座那样作答。其他让零 LoRA 偏离教师的方法：从 SFT 适配器开始
# （ADAPTERS=路径）。
# Not yet run end to end on GPUs: check your set-up with tests/gpu/run_megatron_gkd.sh first (docs_en/megatron.md).
# 尚未在 GPU 上端到端运行过：请先用 tests/gpu/run_megatron_gkd.sh 检查环境（见 docs_zh/megatron.md）。
set -euo pipefail
GKD_TINY_NOT_APPLICABLE='megatron rlhf needs megatron-core, mcore-bridge and transformer-engine on GPUs '\
'(docs_en/megatron.md)'  # in the CPU mode
source "$(dirname "${BASH_SOURCE[0]}")/cpu_mode/cpu_mode.sh"  # GKD_EXAMPLE_TINY=DIR: tiny models on CPU
MODEL=${MODEL:-Qwen/Qwen3-30B-A3B-Instruct-2507}
USE_VLLM=${USE_VLLM:-false}
ADAPTERS=${ADAPTERS:-}
SOURCE_DATASET=${SOURCE_DATASET:-AI-ModelScope/alpaca-gpt4-data-zh#2000}  # any dataset with answers / 任何带答案的数据集
OUTPUT_DIR=${OUTPUT_DIR:-megatron_output/gkd-moe-self-distill}
DATA=${DATA:-$OUTPUT_DIR/privileged_train.jsonl}

if [ ! -f "$DATA" ]; then
    mkdir -p "$(dirname "$DATA")"
    python "$(dirname "${BASH_SOURCE[0]}")/privileged_teacher_data.py" "$SOURCE_DATASET" "$DATA"
fi

EXTRA=()
if [ "$USE_VLLM" = true ]; then
    EXTRA+=(--use_vllm true --vllm_mode colocate --vllm_tensor_parallel_size 4 --vllm_gpu_memory_utilization 0.45
            --vllm_max_model_len 2048 --sleep_level 1)
else
    EXTRA+=(--use_vllm false)  # ms-swift's Megatron default is true / ms-swift 的 Megatron 默认值为 true
fi
if [ -n "$ADAPTERS" ]; then
    EXTRA+=(--adapters "$ADAPTERS")
fi

export PYTORCH_CUDA_ALLOC_CONF='expandable_segments:True'
CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 \
NPROC_PER_NODE=8 \
megatron rlhf \
    --rlhf_type gkd \
    --model "$MODEL" \
    --teacher_model "$MODEL" \
    --tuner_type lora \
    --lora_rank 8 \
    --lora_alpha 32 \
    --target_modules all-linear \
    --torch_dtype bfloat16 \
    --dataset "$DATA" \
    --tensor_model_parallel_size 1 \
    --pipeline_model_parallel_size 1 \
    --context_parallel_size 1 \
    --expert_model_parallel_size 8 \
    --moe_grouped_gemm true \
    --lmbda 0.5 \
    --seq_kd true \
    --beta 0.5 \
    --temperature 1.0 \
    --max_length 1536 \
    --max_completion_length 256 \
    "${EXTRA[@]}" \
    --micro_batch_size 1 \
    --global_batch_size 16 \
    --num_train_epochs 1 \
    --lr 1e-4 \
    --lr_warmup_fraction 0.05 \
    --recompute_granularity selective \
    --attention_backend flash \
    --padding_free true \
    --finetune true \
    --no_save_optim true \
    --no_save_rng true \
    --logging_steps 5 \
    --save_steps 100 \
    --output_dir "$OUTPUT_DIR"
