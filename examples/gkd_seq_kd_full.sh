#!/usr/bin/env bash
# Hardware: 4 GPUs (NPROC_PER_NODE=4), bf16, DeepSpeed ZeRO-3, the 3B teacher offloaded between uses.
# 硬件：4 卡（NPROC_PER_NODE=4），bf16，DeepSpeed ZeRO-3，3B 教师不用时卸载到 CPU。
# Cost: not measured (not yet run on GPUs). / 开销：未测量（尚未在 GPU 上运行）。
# CPU try-out with tiny models: GKD_EXAMPLE_TINY=DIR bash examples/gkd_seq_kd_full.sh (examples/README.md).
#
# Sequence-level KD: the teacher writes every response, the student (full tuning) learns its token distributions.
# 序列级蒸馏：所有回复由教师生成，学生（全参训练）学习教师的逐 token 分布。
# --offload_teacher_model keeps the teacher on the CPU between uses. / 教师不用时留在 CPU 上以节省显存。
source "$(dirname "${BASH_SOURCE[0]}")/cpu_mode/cpu_mode.sh"  # GKD_EXAMPLE_TINY=DIR: tiny models on CPU
NPROC_PER_NODE=4 \
swift rlhf \
    --rlhf_type gkd \
    --model Qwen/Qwen2.5-0.5B-Instruct \
    --teacher_model Qwen/Qwen2.5-3B-Instruct \
    --dataset 'AI-ModelScope/alpaca-gpt4-data-en#2000' \
    --tuner_type full \
    --torch_dtype bfloat16 \
    --lmbda 0 \
    --seq_kd true \
    --beta 0 \
    --temperature 1.0 \
    --sft_alpha 0.1 \
    --max_completion_length 256 \
    --offload_teacher_model true \
    --per_device_train_batch_size 2 \
    --gradient_accumulation_steps 8 \
    --learning_rate 1e-5 \
    --deepspeed zero3 \
    --output_dir output/gkd-seq-kd
