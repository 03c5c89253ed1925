#!/usr/bin/env bash
# Hardware: 8 GPUs (NPROC_PER_NODE=8), bf16, Megatron TP 2 x DP 4, flash attention.
# 硬件：8 卡（NPROC_PER_NODE=8），bf16，Megatron TP 2 x DP 4，flash attention。
# Cost: not measured (not yet run on GPUs). / 开销：未测量（尚未在 GPU 上运行）。
# CPU try-out (GKD_EXAMPLE_TINY): does not apply, megatron rlhf needs megatron-core, mcore-bridge and
# transformer-engine on GPUs (docs_en/megatron.md).
#
# Megatron-SWIFT GKD, dense models: Qwen3-8B teacher -> Qwen3-1.7B student (full tuning), 8 GPUs, TP=2 (DP=4).
# Megatron-SWIFT 上的 GKD（稠密模型）：Qwen3-8B 教师 -> Qwen3-1.7B 学生（全参训练），8 卡，TP=2（DP=4）。
# Modes: on-policy half of the steps (--lmbda 0.5), the teacher writes the other responses (--seq_kd true).
# 模式：一半步数 on-policy（--lmbda 0.5），其余步由教师生成回复（--seq_kd true）。
# On-policy samples: the training model itself by default (no KV cache, fine for short completions); USE_VLLM=true
# uses vLLM colocated on the same GPUs instead (much faster for long completions). seq_kd always samples with the
# Megatron teacher. / on-policy 采样默认由训练中的模型自身完成（无 KV cache，适合短回复）；USE_VLLM=true 时改用同卡
# colocate 的 vLLM（长回复快得多）。seq_kd 始终由 Megatron 教师模型采样。
# The teacher is built in the student's layout (same TP/PP) and has the same vocabulary (all Qwen3 models do);
# --offload_teacher_model keeps it on the CPU between uses. / 教师按学生的并行布局构建（TP/PP 相同），词表与学生一致
# （Qwen3 系列均如此）；--offload_teacher_model 让教师不用时留在 CPU 上。
# Not yet run end to end on GPUs: check your set-up with tests/gpu/run_megatron_gkd.sh first (docs_en/megatron.md).
# 尚未在 GPU 上端到端运行过：请先用 tests/gpu/run_megatron_gkd.sh 检查环境（见 docs_zh/megatron.md）。
set -euo pipefail
GKD_TINY_NOT_APPLICABLE='megatron rlhf needs megatron-core, mcore-bridge and transformer-engine on GPUs '\
'(docs_en/megatron.md)'  # in the CPU mode
source "$(dirname "${BASH_SOURCE[0]}")/cpu_mode/cpu_mode.sh"  # GKD_EXAMPLE_TINY=DIR: tiny models on CPU
STUDENT=${STUDENT:-Qwen/Qwen3-1.7B}
TEACHER=${TEACHER:-Qwen/Qwen3-8B}
USE_VLLM=${USE_VLLM:-false}

if [ "$USE_VLLM" = true ]; then
    ROLLOUT=(--use_vllm true --vllm_mode colocate --vllm_gpu_memory_utilization 0.35 --vllm_max_model_len 2560
             --sleep_level 1)
else
    ROLLOUT=(--use_vllm false)  # ms-swift's Megatron default is true / ms-swift 的 Megatron 默认值为 true
fi

export PYTORCH_CUDA_ALLOC_CONF='expandable_segments:True'
CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 \
NPROC_PER_NODE=8 \
megatron rlhf \
    --rlhf_type gkd \
    --model "$STUDENT" \
    --teacher_model "$TEACHER" \
    --tuner_type full \
    --torch_dtype bfloat16 \
    --dataset 'AI-ModelScope/alpaca-gpt4-data-en#5000' \
    --tensor_model_parallel_size 2 \
    --pipeline_model_parallel_size 1 \
    --context_parallel_size 1 \
    --sequence_parallel true \
    --lmbda 0.5 \
    --seq_kd true \
    --beta 0.5 \
    --temperature 0.9 \
    --max_length 2048 \
    --max_completion_length 512 \
    "${ROLLOUT[@]}" \
    --offload_teacher_model true \
    --micro_batch_size 2 \
    --global_batch_size 32 \
    --num_train_epochs 1 \
    --lr 1e-5 \
    --lr_warmup_fraction 0.05 \
    --min_lr 1e-6 \
    --recompute_granularity selective \
    --attention_backend flash \
    --padding_free true \
    --finetune true \
    --no_save_optim true \
    --no_save_rng true \
    --logging_steps 5 \
    --save_steps 200 \
    --output_dir megatron_output/gkd-dense
