#!/usr/bin/env bash
# Hardware: 8 GPUs: 6 train (NPROC_PER_NODE=6, vLLM colocate), 1 for each of two 7B teachers (vllm serve).
# 硬件：8 卡：6 卡训练（NPROC_PER_NODE=6，vLLM colocate），两个 7B 教师各占 1 卡（vllm serve）。
# Cost: not measured (not yet run on GPUs). / 开销：未测量（尚未在 GPU 上运行）。
# CPU try-out (GKD_EXAMPLE_TINY): does not apply, two teachers served by `vllm serve` need GPUs.
#
# Two teachers served by plain `vllm serve` (vLLM's OpenAI-compatible server: nothing of this plugin on their side),
# one per row: a "domain" column of the dataset names each row's teacher. Each generation batch sends one request per
# teacher with the trainer's token ids; vLLM's prompt_logprobs give the top-k for the divergence and each sampled
# token's log-prob for the sampled-token term in the same prefill. Metrics per teacher: gkd/math/..., gkd/code/...
# 两个由普通 `vllm serve` 提供的教师（vLLM 的 OpenAI 兼容服务：教师一侧不需要本插件），每行一个：数据集的 "domain"
# 列指定每行的教师。每个生成批次对每个教师发送一个请求（trainer 的 token id）；vLLM 的 prompt_logprobs 在同一次 prefill
# 中给出散度所需的 top-k 和采样 token 项所需的每个 token 对数概率。每个教师有自己的指标：gkd/math/...、gkd/code/...
# docs_en/teacher_server.md#several-teachers-one-per-row, docs_zh/teacher_server.md#多个教师每行一个
set -euo pipefail
GKD_TINY_NOT_APPLICABLE='two teachers served by `vllm serve` need GPUs'  # in the CPU mode
source "$(dirname "${BASH_SOURCE[0]}")/cpu_mode/cpu_mode.sh"  # GKD_EXAMPLE_TINY=DIR: tiny models on CPU
DATASET=${DATASET:-my_data.jsonl}  # rows: {"messages": [...], "domain": "math" | "code"}

# 1) the teachers: --max-logprobs covers --gkd_logits_topk, --max-model-len exceeds --max_length (both checked
#    before the trainer loads anything) / 教师：--max-logprobs 覆盖 --gkd_logits_topk，--max-model-len 大于 --max_length
CUDA_VISIBLE_DEVICES=6 vllm serve Qwen/Qwen2.5-Math-7B-Instruct --port 8001 --max-logprobs 32 --max-model-len 4096 &
MATH=$!
CUDA_VISIBLE_DEVICES=7 vllm serve Qwen/Qwen2.5-Coder-7B-Instruct --port 8002 --max-logprobs 32 --max-model-len 4096 &
CODE=$!
trap 'kill $MATH $CODE' EXIT

# 2) the student (the trainer waits for both servers, --teacher_server_wait); temperature 1: vLLM scores at T 1
#    学生（trainer 会等待两个服务就绪）；温度 1：vLLM 在温度 1 下打分
CUDA_VISIBLE_DEVICES=0,1,2,3,4,5 NPROC_PER_NODE=6 \
swift rlhf \
    --rlhf_type gkd \
    --model Qwen/Qwen2.5-0.5B-Instruct \
    --teacher_model_server '[{"url": "http://127.0.0.1:8001", "tags": ["math"]}, {"url": "http://127.0.0.1:8002", "tags": ["code"]}]' \
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
    --tuner_type full \
    --torch_dtype bfloat16 \
    --max_length 3072 \
    --max_completion_length 1024 \
    --per_device_train_batch_size 4 \
    --gradient_accumulation_steps 2 \
    --learning_rate 1e-6 \
    --output_dir output/gkd-multi-teacher
