#!/usr/bin/env bash
# Hardware: 8 GPUs (NPROC_PER_NODE=8), bf16, LoRA student, 7B teacher, vLLM colocate, ZeRO-2.
# 硬件：8 卡（NPROC_PER_NODE=8），bf16，LoRA 学生，7B 教师，vLLM colocate，ZeRO-2。
# Cost: not measured (not yet run on GPUs). / 开销：未测量（尚未在 GPU 上运行）。
# CPU try-out with tiny models: GKD_EXAMPLE_TINY=DIR bash examples/gkd_mixed_modes_lora.sh (examples/README.md).
#
# GKD mixing two of its three modes: on-policy on half of the steps (--lmbda 0.5: the student samples, with vLLM
# colocate), the teacher samples the others (--seq_kd true). The third mode, off-policy (the dataset's responses),
# never occurs here: it takes the steps that are not on-policy only with --seq_kd false.
# GKD 混合三种模式中的两种：一半步数 on-policy（--lmbda 0.5：学生用 vLLM colocate 采样），其余步由教师模型采样
# （--seq_kd true）。第三种模式 off-policy（使用数据集回复）在此不会出现：只有 --seq_kd false 时非 on-policy 步才用它。
# 8 GPUs, LoRA student, separate 7B teacher. / 8 卡，LoRA 学生，独立的 7B 教师。
source "$(dirname "${BASH_SOURCE[0]}")/cpu_mode/cpu_mode.sh"  # GKD_EXAMPLE_TINY=DIR: tiny models on CPU
NPROC_PER_NODE=8 \
swift rlhf \
    --rlhf_type gkd \
    --model Qwen/Qwen2.5-1.5B-Instruct \
    --teacher_model Qwen/Qwen2.5-7B-Instruct \
    --dataset 'AI-ModelScope/alpaca-gpt4-data-en#5000' \
    --tuner_type lora \
    --torch_dtype bfloat16 \
    --lmbda 0.5 \
    --seq_kd true \
    --beta 0.5 \
    --temperature 0.9 \
    --max_completion_length 512 \
    --use_vllm true \
    --vllm_mode colocate \
    --vllm_gpu_memory_utilization 0.4 \
    --sleep_level 1 \
    --per_device_train_batch_size 4 \
    --gradient_accumulation_steps 4 \
    --learning_rate 1e-4 \
    --num_train_epochs 1 \
    --deepspeed zero2 \
    --save_steps 200 \
    --logging_steps 5 \
    --output_dir output/gkd-mixed
