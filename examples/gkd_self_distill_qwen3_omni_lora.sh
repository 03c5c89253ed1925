#!/usr/bin/env bash
# LoRA self-distillation of Qwen3-Omni-30B-A3B-Instruct (30B multimodal MoE): teacher = the base model with the LoRA
# adapter disabled, student = base + LoRA. The base weights are loaded ONCE (same --model and --teacher_model with
# --tuner_type lora). Start-up logs "Using shared base model architecture:" and the student/teacher lines.
# Qwen3-Omni-30B-A3B-Instruct（30B 多模态 MoE）的 LoRA 自蒸馏：教师 = 关闭 LoRA 的基座模型，学生 = 基座 + LoRA。
# --model 与 --teacher_model 相同且 --tuner_type lora 时基座权重只加载一次；启动日志会打印
# "Using shared base model architecture:" 及学生/教师两行。
# vLLM does not serve Qwen3-Omni: sampling uses ms-swift's transformers engine.
# vLLM 不支持 Qwen3-Omni：采样使用 ms-swift 的 transformers 引擎。
# About 36 GiB per GPU with ZeRO-3 and batch 4 (8 GPUs). / ZeRO-3、batch 4 时每卡约 36 GiB（8 卡）。
set -euo pipefail
MODEL=${MODEL:-Qwen/Qwen3-Omni-30B-A3B-Instruct}

export OMP_NUM_THREADS=1
export PYTORCH_CUDA_ALLOC_CONF='expandable_segments:True'
NPROC_PER_NODE=8 \
swift rlhf \
    --rlhf_type gkd \
    --model "$MODEL" \
    --teacher_model "$MODEL" \
    --tuner_type lora \
    --torch_dtype bfloat16 \
    --lora_rank 8 \
    --lora_alpha 16 \
    --lora_dropout 0.05 \
    --target_modules all-linear \
    --dataset 'AI-ModelScope/alpaca-gpt4-data-zh#2000' \
    --split_dataset_ratio 0.01 \
    --max_length 2048 \
    --max_completion_length 512 \
    --dataloader_num_workers 4 \
    --dataset_num_proc 4 \
    --seq_kd false \
    --lmbda 0.5 \
    --temperature 2.0 \
    --beta 0.5 \
    --num_train_epochs 1 \
    --per_device_train_batch_size 4 \
    --per_device_eval_batch_size 4 \
    --learning_rate 1e-5 \
    --gradient_accumulation_steps 1 \
    --warmup_ratio 0.05 \
    --deepspeed zero3 \
    --attn_impl flash_attention_2 \
    --output_dir output/gkd-omni-self-distill \
    --eval_steps 50 \
    --save_steps 50 \
    --save_total_limit 2 \
    --logging_steps 5 \
    --save_only_model true
# Note: the LoRA starts at zero, so student == teacher and the loss is 0 until the student moves: start from an SFT
# adapter (--adapters PATH), add --sft_alpha, or give the teacher a privileged prompt (teacher_prompt column).
# 注意：LoRA 初始为零时学生与教师相同，损失为 0；可从 SFT 适配器开始（--adapters PATH）、加 --sft_alpha，或在数据中
# 提供 teacher_prompt 列给教师特权提示。
