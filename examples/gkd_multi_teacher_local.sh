#!/usr/bin/env bash
# Hardware: 8 GPUs: 6 train (NPROC_PER_NODE=6, vLLM colocate), 2 serve the 32B teacher (vllm serve, TP 2).
# 硬件：8 卡：6 卡训练（NPROC_PER_NODE=6，vLLM colocate），2 卡用 vllm serve 提供 32B 教师（TP 2）。
# Cost: not measured (not yet run on GPUs). / 开销：未测量（尚未在 GPU 上运行）。
# CPU try-out (GKD_EXAMPLE_TINY): does not apply, two teachers served by `vllm serve` need GPUs.
#
# Two teachers, one per row, one of them local: rows whose "domain" is "code" are scored by a larger teacher served by
# plain `vllm serve`; rows whose "domain" is "chat" by the LoRA student's own base with its adapter off (the entry
# {"url": "local"}: --teacher_model is --model, one copy of the weights), which keeps the adapter from drifting on chat
# while it learns code. Both give the same signal: the top-k and each sampled token's log-prob at temperature 1.
# 两个教师，每行一个，其中一个在本地："domain" 为 "code" 的行由 `vllm serve` 提供的更大教师打分；"chat" 的行由关闭
# 适配器的 LoRA 学生基座打分（条目 {"url": "local"}：--teacher_model 即 --model，权重只有一份），使适配器在学习代码时
# 不在对话上漂移。两者给出相同的信号：温度 1 下的 top-k 和每个采样 token 的对数概率。
# docs_en/teacher_server.md#one-of-them-local, docs_zh/teacher_server.md#其中一个是本地教师
set -euo pipefail
GKD_TINY_NOT_APPLICABLE='two teachers served by `vllm serve` need GPUs'  # in the CPU mode
source "$(dirname "${BASH_SOURCE[0]}")/cpu_mode/cpu_mode.sh"  # GKD_EXAMPLE_TINY=DIR: tiny models on CPU
DATASET=${DATASET:-my_data.jsonl}  # rows: {"messages": [...], "domain": "chat" | "code"}

# 1) the served teacher (same tokenizer as the student; checked before the trainer loads anything)
#    服务端教师（与学生相同的分词器；trainer 加载任何模型前会检查）
CUDA_VISIBLE_DEVICES=6,7 vllm serve Qwen/Qwen3-32B --tensor-parallel-size 2 --port 8001 --max-logprobs 32 \
    --max-model-len 4096 &
CODE=$!
trap 'kill $CODE' EXIT

# 2) the LoRA student; its base is the "chat" rows' teacher / LoRA 学生；其基座是 "chat" 行的教师
CUDA_VISIBLE_DEVICES=0,1,2,3,4,5 NPROC_PER_NODE=6 \
swift rlhf \
    --rlhf_type gkd \
    --model Qwen/Qwen3-8B \
    --teacher_model Qwen/Qwen3-8B \
    --teacher_model_server '[{"url": "local", "tags": ["chat"]}, {"url": "http://127.0.0.1:8001", "tags": ["code"]}]' \
    --teacher_tag_key domain \
    --gkd_logits_topk 32 \
    --gkd_sampled_kl_coef 1 \
    --beta 0.5 \
    --lmbda 1 \
    --temperature 1.0 \
    --use_vllm true \
    --vllm_mode colocate \
    --vllm_gpu_memory_utilization 0.3 \
    --dataset "$DATASET" \
    --tuner_type lora \
    --lora_rank 64 \
    --torch_dtype bfloat16 \
    --max_length 3072 \
    --max_completion_length 1024 \
    --per_device_train_batch_size 4 \
    --gradient_accumulation_steps 2 \
    --learning_rate 1e-5 \
    --output_dir output/gkd-multi-teacher-local
