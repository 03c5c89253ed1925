#!/usr/bin/env bash
# Hardware: 8 GPUs (NPROC_PER_NODE=8), bf16, LoRA on a 30B MoE, DeepSpeed ZeRO-3, flash attention.
# 硬件：8 卡（NPROC_PER_NODE=8），bf16，30B MoE 上的 LoRA，DeepSpeed ZeRO-3，flash attention。
# Cost: not measured (not yet run on GPUs); memory: about 36 GiB per GPU, the estimate of the Qwen3-Omni LoRA
# self-distillation write-up this script follows, not a measurement. / 开销：未测量（尚未在 GPU 上运行）；显存：每卡约
# 36 GiB，为本脚本所依据的 Qwen3-Omni LoRA 自蒸馏文档的估算值，并非实测。
# CPU try-out with tiny models: GKD_EXAMPLE_TINY=DIR bash examples/gkd_self_distill_qwen3_omni_lora.sh
# (examples/README.md): the tiny student is its own teacher, with the privileged prompts written from the tiny rows.
#
# LoRA self-distillation of Qwen3-Omni-30B-A3B-Instruct (30B multimodal MoE) with a PRIVILEGED TEACHER CONTEXT.
# Qwen3-Omni-30B-A3B-Instruct（30B 多模态 MoE）的 LoRA 自蒸馏，教师带有特权上下文。
#
# Placement: student = base + LoRA, teacher = the same base with the adapter disabled. The base weights are loaded
# ONCE (same --model and --teacher_model with --tuner_type lora); start-up logs "Using shared base model architecture:".
# 放置：学生 = 基座 + LoRA，教师 = 关闭 LoRA 的同一基座；基座权重只加载一次（--model 与 --teacher_model 相同且
# --tuner_type lora），启动日志打印 "Using shared base model architecture:"。
#
# What drives the loss: a fresh LoRA is zero, so on the SAME prompt the student equals its teacher and the loss is
# exactly 0 (nothing is learned). Here every row gets a `teacher_prompt` column: the question plus the dataset's
# reference answer, which only the teacher reads. The student's response (its own sample on on-policy steps, the
# dataset answer otherwise) is scored by the student on the bare question and by the teacher with the reference in
# view; the divergence between the two is the loss, so the LoRA learns to answer, without the hint, as the base model
# does when it has seen the reference. Other ways to move a zero LoRA away from its teacher: TEACHER_ADAPTERS=PATH
# (a fine-tuned teacher LoRA on the same base), or a student that starts from an SFT adapter (--adapters PATH).
# 损失从何而来：新 LoRA 为零，同一提示下学生与教师完全相同，损失恰为 0（学不到东西）。本脚本给每行加
# `teacher_prompt` 列：问题 + 数据集的参考答案，只有教师能看到。学生的回答（on-policy 步为学生自己的采样，其余为数据集
# 答案）由学生在只有问题的提示下打分、由看到参考答案的教师打分，二者的散度即损失：LoRA 学会在没有提示时像看过参考
# 答案的基座一样作答。其他让零 LoRA 偏离教师的方法：TEACHER_ADAPTERS=PATH（同一基座上微调过的教师 LoRA），或学生从
# SFT 适配器开始（--adapters PATH）。
#
# vLLM does not serve Qwen3-Omni: on-policy sampling uses ms-swift's transformers engine.
# vLLM 不支持 Qwen3-Omni：on-policy 采样使用 ms-swift 的 transformers 引擎。
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/cpu_mode/cpu_mode.sh"  # GKD_EXAMPLE_TINY=DIR: tiny models on CPU
MODEL=${MODEL:-Qwen/Qwen3-Omni-30B-A3B-Instruct}
SOURCE_DATASET=${SOURCE_DATASET:-AI-ModelScope/alpaca-gpt4-data-zh#2000}  # any dataset with answers / 任何带答案的数据集
OUTPUT_DIR=${OUTPUT_DIR:-output/gkd-omni-self-distill}
DATA=${DATA:-$OUTPUT_DIR/privileged_train.jsonl}
TEACHER_ADAPTERS=${TEACHER_ADAPTERS:-}

if [ ! -f "$DATA" ]; then
    # ms-swift's loader turns the source rows into `messages`; the teacher's prompt is the last user turn + the answer.
    # 用 ms-swift 的加载器把源数据转为 `messages`；教师提示 = 最后一个用户轮 + 答案。
    mkdir -p "$(dirname "$DATA")"
    python "$(dirname "${BASH_SOURCE[0]}")/privileged_teacher_data.py" "$SOURCE_DATASET" "$DATA"
fi

# The experts: transformers 5 keeps each MoE layer's experts as fused 3-D weights, which --target_modules all-linear
# does not reach (LoRA on attention only; the run says so in a warning). To adapt them too, add
# --target_parameters mlp.experts.gate_up_proj mlp.experts.down_proj and set --lora_dropout 0 (peft's LoRA on
# parameters takes no dropout); tested on tiny Qwen3-MoE / Qwen3-VL-MoE models (docs_en/teacher_placement.md), not on
# this model. / 专家：transformers 5 把每个 MoE 层的专家存为融合的 3 维权重，--target_modules all-linear 覆盖不到（LoRA 只在
# 注意力上；运行时会警告）。如需同时适配专家，加上 --target_parameters mlp.experts.gate_up_proj mlp.experts.down_proj
# 并设 --lora_dropout 0（peft 在参数上的 LoRA 不支持 dropout）；已在微型 Qwen3-MoE / Qwen3-VL-MoE 上测试
# （docs_zh/teacher_placement.md），未在本模型上测试。
EXTRA=()
if [ -n "$TEACHER_ADAPTERS" ]; then
    EXTRA+=(--teacher_adapters "$TEACHER_ADAPTERS")
fi

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
    --dataset "$DATA" \
    --split_dataset_ratio 0.01 \
    --max_length 4096 \
    --max_completion_length 512 \
    --dataloader_num_workers 4 \
    --dataset_num_proc 4 \
    --seq_kd false \
    --lmbda 0.5 \
    --temperature 1.0 \
    --beta 0.5 \
    "${EXTRA[@]}" \
    --num_train_epochs 1 \
    --per_device_train_batch_size 4 \
    --per_device_eval_batch_size 4 \
    --learning_rate 1e-4 \
    --gradient_accumulation_steps 1 \
    --warmup_ratio 0.05 \
    --deepspeed zero3 \
    --attn_impl flash_attention_2 \
    --output_dir "$OUTPUT_DIR" \
    --eval_steps 50 \
    --save_steps 50 \
    --save_total_limit 2 \
    --logging_steps 5 \
    --save_only_model true
