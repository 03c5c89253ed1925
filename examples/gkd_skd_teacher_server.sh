#!/usr/bin/env bash
# Hardware: 5 GPUs: 4 train (NPROC_PER_NODE=4, ZeRO-2), 1 serves the 7B teacher (swift-gkd serve-teacher).
# 硬件：5 卡：4 卡训练（NPROC_PER_NODE=4，ZeRO-2），1 卡运行 7B 教师服务（swift-gkd serve-teacher）。
# Cost: not measured (not yet run on GPUs). / 开销：未测量（尚未在 GPU 上运行）。
# CPU try-out with tiny models: GKD_EXAMPLE_TINY=DIR bash examples/gkd_skd_teacher_server.sh (examples/README.md).
#
# Speculative KD (docs_en/skd.md) with the teacher on this plugin's server: the student drafts, the server scores each
# draft (POST /v1/topk) and the trainer keeps the drafted tokens inside the teacher's top-25, replacing the first one
# outside by a sample from the server's top-64 (the top-64 truncation of the teacher's distribution).
# 教师在本插件的服务上的推测式 KD（docs_zh/skd.md）：学生起草，服务为每段草稿打分（POST /v1/topk），trainer 保留落在
# 教师 top-25 之内的草稿 token，并把第一个落在其外的 token 换成从服务返回的 top-64 中采样的 token（教师分布的 top-64 截断）。
#
# The server's --top_k must be at least --gkd_skd_top_k (and --gkd_logits_topk): checked before any model loads, as is
# that the server offers /v1/topk (`swift deploy` or a vLLM teacher, which speak only ms-swift's /infer/, are refused).
# Tested on CPU with tiny models only; not yet run on GPUs: start with a few steps.
# 服务的 --top_k 必须不小于 --gkd_skd_top_k（以及 --gkd_logits_topk）：在加载任何模型之前检查，同时检查服务是否提供
# /v1/topk（只支持 ms-swift /infer/ 协议的 `swift deploy` 或 vLLM 教师会被拒绝）。仅在 CPU 上用小模型测试过，尚未在 GPU
# 上运行：请先跑几步。
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/cpu_mode/cpu_mode.sh"  # GKD_EXAMPLE_TINY=DIR: tiny models on CPU
export SWIFT_GKD_TEACHER_API_KEY=${SWIFT_GKD_TEACHER_API_KEY:-change-me}
STUDENT=${STUDENT:-Qwen/Qwen2.5-0.5B-Instruct}
TEACHER=${TEACHER:-Qwen/Qwen2.5-7B-Instruct}
DATASET=${DATASET:-AI-ModelScope/alpaca-gpt4-data-en#5000}

# 1) the teacher server on its own GPU / 教师服务占用单独的 GPU
CUDA_VISIBLE_DEVICES=7 swift-gkd serve-teacher \
    --model "$TEACHER" --template qwen2_5 \
    --host 0.0.0.0 --port 8000 --top_k 64 --max_batch_tokens 16384 &
SERVER=$!
trap 'kill $SERVER' EXIT

# 2) training with SKD against it (transformers sampling: --use_vllm false); the trainer waits for the server
# 2) 使用 SKD 训练（transformers 采样：--use_vllm false）；trainer 会等待服务就绪
CUDA_VISIBLE_DEVICES=0,1,2,3 NPROC_PER_NODE=4 \
swift rlhf \
    --rlhf_type gkd \
    --model "$STUDENT" \
    --teacher_model_server http://127.0.0.1:8000 \
    --teacher_server_wait 600 \
    --gkd_logits_topk 32 \
    --dataset "$DATASET" \
    --lmbda 1 \
    --gkd_skd_top_k 25 \
    --gkd_sampling_temperature 1.0 \
    --beta 0.5 \
    --temperature 1.0 \
    --use_vllm false \
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
    --output_dir output/gkd_skd_teacher_server
