#!/usr/bin/env bash
# GKD with all three modes: on-policy half of the time (vLLM colocate), otherwise the teacher samples (seq_kd).
# GKD 三种模式混合：一半步数 on-policy（vLLM colocate 采样），其余步由教师模型采样（seq_kd）。
# 8 GPUs, LoRA student, separate 7B teacher. / 8 卡，LoRA 学生，独立的 7B 教师。
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
