#!/usr/bin/env bash
# Hardware: 8 GPUs: 7 train (NPROC_PER_NODE=7, vLLM colocate), 1 serves the 7B teacher (swift-gkd serve-teacher).
# 硬件：8 卡：7 卡训练（NPROC_PER_NODE=7，vLLM colocate），1 卡运行 7B 教师服务（swift-gkd serve-teacher）。
# Cost: not measured (not yet run on GPUs). / 开销：未测量（尚未在 GPU 上运行）。
# CPU try-out with tiny models: GKD_EXAMPLE_TINY=DIR bash examples/gkd_sampled_kl_served_teacher.sh
# (examples/README.md).
#
# Sampled-token on-policy distillation (Tinker / veRL style): the teacher, served on its own GPU, scores only the
# tokens the student sampled (one log-probability each, in the same request as its top-k); the student is trained
# on those log-ratios alone, as a policy gradient whose expectation is the reverse KL's gradient.
# 采样 token 的 on-policy 蒸馏（Tinker / veRL 风格）：教师在独立 GPU 上提供服务，只为学生采出的 token 打分（每个 token 一个
# 对数概率，与 top-k 在同一次请求中返回）；学生只用这些对数比训练，作为期望等于反向 KL 梯度的策略梯度。
# docs_en/sampled_kl.md, docs_zh/sampled_kl.md
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/cpu_mode/cpu_mode.sh"  # GKD_EXAMPLE_TINY=DIR: tiny models on CPU
export SWIFT_GKD_TEACHER_API_KEY=${SWIFT_GKD_TEACHER_API_KEY:-change-me}

# 1) the teacher server (this plugin's: POST /v1/topk answers with_targets) / 教师服务（本插件的服务，支持 with_targets）
CUDA_VISIBLE_DEVICES=7 swift-gkd serve-teacher \
    --model Qwen/Qwen2.5-7B-Instruct --template qwen2_5 \
    --host 0.0.0.0 --port 8000 --top_k 16 --max_batch_tokens 16384 &
SERVER=$!
trap 'kill $SERVER' EXIT

# 2) the student samples with vLLM at temperature 1 (the server scores at temperature 1); --gkd_divergence_coef 0
#    trains on the sampled-token term alone (the top-k divergence is still logged as gkd/distill_loss); a lower
#    learning rate than for the dense losses: the one-sample estimator is noisier (docs_en/methods_results.md#quality-cpu-the-default-preset).
#    学生用 vLLM 在温度 1 下采样（服务端在温度 1 下打分）；--gkd_divergence_coef 0 只用采样 token 项训练（top-k 散度仍记录为
#    gkd/distill_loss）；学习率低于 dense 损失：单样本估计量噪声更大。
CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6 NPROC_PER_NODE=7 \
swift rlhf \
    --rlhf_type gkd \
    --model Qwen/Qwen2.5-0.5B-Instruct \
    --teacher_model_server http://127.0.0.1:8000 \
    --gkd_logits_topk 16 \
    --gkd_sampled_kl_coef 1 \
    --gkd_sampled_kl_discount 0 \
    --gkd_divergence_coef 0 \
    --lmbda 1 \
    --temperature 1.0 \
    --use_vllm true \
    --vllm_mode colocate \
    --vllm_gpu_memory_utilization 0.3 \
    --dataset 'AI-ModelScope/alpaca-gpt4-data-en#5000' \
    --tuner_type full \
    --torch_dtype bfloat16 \
    --max_completion_length 512 \
    --per_device_train_batch_size 4 \
    --gradient_accumulation_steps 2 \
    --learning_rate 1e-6 \
    --output_dir output/gkd-sampled-kl
