#!/usr/bin/env bash
# Hardware: 8 GPUs: 7 train (NPROC_PER_NODE=7), 1 serves the 7B teacher (swift-gkd serve-teacher).
# 硬件：8 卡：7 卡训练（NPROC_PER_NODE=7），1 卡运行 7B 教师服务（swift-gkd serve-teacher）。
# Cost: not measured (not yet run on GPUs). / 开销：未测量（尚未在 GPU 上运行）。
# CPU try-out with tiny models: GKD_EXAMPLE_TINY=DIR bash examples/gkd_teacher_server.sh (examples/README.md).
#
# A teacher served over HTTP (no vLLM needed) on other GPUs, and a student trained against its top-k log-probs.
# 通过 HTTP 提供教师服务（无需 vLLM，可在其他 GPU 上），学生基于其 top-k 对数概率训练。
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/cpu_mode/cpu_mode.sh"  # GKD_EXAMPLE_TINY=DIR: tiny models on CPU
export SWIFT_GKD_TEACHER_API_KEY=${SWIFT_GKD_TEACHER_API_KEY:-change-me}

# 1) the server: another address than 127.0.0.1 requires the API key / 绑定非本机地址必须设置 API key
CUDA_VISIBLE_DEVICES=7 swift-gkd serve-teacher \
    --model Qwen/Qwen2.5-7B-Instruct --template qwen2_5 \
    --host 0.0.0.0 --port 8000 --top_k 64 --max_batch_tokens 16384 &
SERVER=$!
trap 'kill $SERVER' EXIT

# 2) training, started while the 7B server is still loading: the trainer waits for GET /health (at most
#    --teacher_server_wait seconds, default 600, each retry logged), and rides out a server restart the same way.
#    The key comes from the environment (not written to args.json).
#    训练在 7B 服务仍在加载时就启动：trainer 等待 GET /health（最多 --teacher_server_wait 秒，默认 600，每次重试都记录日志），
#    服务重启时同样等待。key 从环境变量读取，不写入 args.json。
CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6 NPROC_PER_NODE=7 \
swift rlhf \
    --rlhf_type gkd \
    --model Qwen/Qwen2.5-0.5B-Instruct \
    --teacher_model_server http://127.0.0.1:8000 \
    --gkd_logits_topk 32 \
    --gkd_topk_tail true \
    --teacher_server_wait 600 \
    --dataset 'AI-ModelScope/alpaca-gpt4-data-en#5000' \
    --tuner_type full \
    --torch_dtype bfloat16 \
    --lmbda 0.5 \
    --beta 0.5 \
    --temperature 0.9 \
    --max_completion_length 512 \
    --per_device_train_batch_size 4 \
    --gradient_accumulation_steps 2 \
    --learning_rate 1e-5 \
    --output_dir output/gkd-served-teacher
