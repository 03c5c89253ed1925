#!/usr/bin/env bash
# Hardware: 4 GPUs (NPROC_PER_NODE=4), bf16, ZeRO-2, transformers sampling, the 7B teacher offloaded between uses.
# 硬件：4 卡（NPROC_PER_NODE=4），bf16，ZeRO-2，transformers 采样，7B 教师不用时卸载到 CPU。
# Cost: not measured (not yet run on GPUs). / 开销：未测量（尚未在 GPU 上运行）。
# CPU try-out with tiny models: GKD_EXAMPLE_TINY=DIR bash examples/gkd_skd.sh (examples/README.md).
#
# Speculative knowledge distillation (SKD, Xu et al., ICLR 2025) on on-policy steps (docs_en/skd.md).
# 在 on-policy 步上做推测式知识蒸馏（SKD，Xu 等，ICLR 2025），见 docs_zh/skd.md。
#
# The student samples; each of its tokens outside the teacher's top-25 at that position is replaced by a token sampled
# from the teacher, and the student continues from the corrected prefix. Early in training most bad tokens are
# replaced (close to supervised KD on good prefixes), later few are (close to on-policy GKD): watch
# gkd/skd_replaced_fraction fall.
# 学生采样；凡不在教师该位置 top-25 之内的学生 token，都换成从教师分布中采样的 token，学生再从纠正后的前缀继续生成。
# 训练初期多数坏 token 被替换（接近在好前缀上的监督式 KD），后期替换很少（接近 on-policy GKD）：
# 观察 gkd/skd_replaced_fraction 逐步下降。
#
# --temperature is the loss temperature; --gkd_sampling_temperature the temperature the student (and the teacher's
# replacements) sample at. SKD needs transformers sampling (--use_vllm false) and a teacher with the student's
# tokenizer: a local one, as here, or this plugin's teacher server (gkd_skd_teacher_server.sh). Tested on CPU with tiny
# models only; not yet run on GPUs: start with a few steps.
# --temperature 是损失的温度；--gkd_sampling_temperature 是学生（及教师替换 token）采样的温度。SKD 需要 transformers
# 采样（--use_vllm false）和与学生同一分词器的教师：如此处的本地教师，或本插件的教师服务（gkd_skd_teacher_server.sh）。
# 仅在 CPU 上用小模型测试过，尚未在 GPU 上运行：请先跑几步。
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/cpu_mode/cpu_mode.sh"  # GKD_EXAMPLE_TINY=DIR: tiny models on CPU
STUDENT=${STUDENT:-Qwen/Qwen2.5-0.5B-Instruct}
TEACHER=${TEACHER:-Qwen/Qwen2.5-7B-Instruct}
DATASET=${DATASET:-AI-ModelScope/alpaca-gpt4-data-en#5000}

NPROC_PER_NODE=4 \
swift rlhf \
    --rlhf_type gkd \
    --model "$STUDENT" \
    --teacher_model "$TEACHER" \
    --dataset "$DATASET" \
    --lmbda 1 \
    --gkd_skd_top_k 25 \
    --gkd_sampling_temperature 1.0 \
    --beta 0.5 \
    --temperature 1.0 \
    --use_vllm false \
    --offload_teacher_model true \
    --max_completion_length 256 \
    --tuner_type full \
    --torch_dtype bfloat16 \
    --per_device_train_batch_size 4 \
    --gradient_accumulation_steps 4 \
    --learning_rate 1e-5 \
    --num_train_epochs 1 \
    --logging_steps 5 \
    --save_steps 200 \
    --deepspeed zero2 \
    --output_dir output/gkd_skd
