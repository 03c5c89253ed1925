#!/usr/bin/env bash
# Hardware: 8 GPUs (NPROC_PER_NODE=8), bf16, vLLM colocate, ZeRO-2.
# 硬件：8 卡（NPROC_PER_NODE=8），bf16，vLLM colocate，ZeRO-2。
# Cost: not measured (not yet run on GPUs). / 开销：未测量（尚未在 GPU 上运行）。
# CPU try-out with tiny models: GKD_EXAMPLE_TINY=DIR bash examples/gkd_rl_reward.sh (examples/README.md).
#
# RL + distillation in one trainer: on-policy GKD plus a policy-gradient term on a verifiable reward (docs_en/rl.md).
# 一个 trainer 中同时做 RL 与蒸馏：on-policy GKD 加上基于可验证奖励的策略梯度项（见 docs_zh/rl.md）。
#
# Qwen2.5-7B-Instruct teacher -> Qwen2.5-1.5B-Instruct student (full tuning) on AI-MO/NuminaMath-TIR, whose
# `solution` column holds the reference answer in \boxed{}; the reward is examples/plugins/exact_match_reward.py.
# 教师 Qwen2.5-7B-Instruct -> 学生 Qwen2.5-1.5B-Instruct（全参训练），数据集 AI-MO/NuminaMath-TIR，其 `solution` 列
# 的 \boxed{} 中是参考答案；奖励函数见 examples/plugins/exact_match_reward.py。
#
# Loss of every step (all on-policy here, --lmbda 1) / 每步的损失（此处全为 on-policy，--lmbda 1）:
#   L = sum_i JSD_beta(i) / N + c * sum_i A(i) * (-log pi_T(y_i | prefix)) / N,   c = --gkd_rl_coef
# A = the completion's reward minus its group's mean, divided by the group's std (--scale_rewards group); the group is
# the G = --num_generations samples of one prompt. c = 0.1 is the "RL + distillation" mode (`rl_loss_coef 0.1,
# distill_loss_coef 1.0`) of "Simplified GKD Training for veRL" (veRL Team, 2025, https://github.com/volcengine/verl;
# GKD paper: alpha = 1 / (1 + c)); it is not tuned: raise it if gkd/reward does not move.
# A = 该补全的奖励减去组内均值，再除以组内标准差（--scale_rewards group）；一组是同一提示的 G = --num_generations 个
# 采样。c = 0.1 对应 "Simplified GKD Training for veRL"（veRL Team，2025，https://github.com/volcengine/verl）的
# "RL + 蒸馏" 模式（`rl_loss_coef 0.1, distill_loss_coef 1.0`；GKD 论文：alpha = 1 / (1 + c)）；未调参：
# 若 gkd/reward 不动，请调大。
#
# vLLM samples in bf16 with its own kernels: --rollout_importance_sampling_mode token_truncate weights each token's term
# by min(pi / mu, 2), pi the trained student, mu vLLM's sampler (GRPO's correction); gkd/rollout_k3_kl shows the gap.
# vLLM 以 bf16 和自己的 kernel 采样：--rollout_importance_sampling_mode token_truncate 给每个词元的项乘以 min(pi / mu, 2)，
# pi 为被训练的学生，mu 为 vLLM 采样器（GRPO 的修正）；gkd/rollout_k3_kl 显示两者的差异。
#
# Batch: 8 GPUs x per_device_train_batch_size 4 x GA 2 = 64 completions per optimizer step = 8 prompts x G 8.
# 批次：8 卡 x per_device_train_batch_size 4 x 梯度累积 2 = 每个优化步 64 个补全 = 8 个提示 x G 8。
# Not yet run on GPUs (vLLM sampling with G > 1 included): start with a few steps and watch gkd/reward.
# 尚未在 GPU 上运行过（包括 G > 1 时的 vLLM 采样）：请先跑几步，观察 gkd/reward。
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/cpu_mode/cpu_mode.sh"  # GKD_EXAMPLE_TINY=DIR: tiny models on CPU
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STUDENT=${STUDENT:-Qwen/Qwen2.5-1.5B-Instruct}
TEACHER=${TEACHER:-Qwen/Qwen2.5-7B-Instruct}
DATASET=${DATASET:-AI-MO/NuminaMath-TIR#5000}  # any dataset with a `solution` column / 任何带 `solution` 列的数据集

NPROC_PER_NODE=8 \
swift rlhf \
    --rlhf_type gkd \
    --model "$STUDENT" \
    --teacher_model "$TEACHER" \
    --dataset "$DATASET" \
    --system 'Please reason step by step, and put your final answer within \boxed{}.' \
    --external_plugins "$HERE/plugins/exact_match_reward.py" \
    --reward_funcs exact_match \
    --num_generations 8 \
    --scale_rewards group \
    --gkd_rl_coef 0.1 \
    --rollout_importance_sampling_mode token_truncate \
    --lmbda 1 \
    --beta 0.5 \
    --temperature 1.0 \
    --max_completion_length 1024 \
    --tuner_type full \
    --torch_dtype bfloat16 \
    --use_vllm true \
    --vllm_mode colocate \
    --vllm_gpu_memory_utilization 0.3 \
    --vllm_max_model_len 2048 \
    --sleep_level 1 \
    --per_device_train_batch_size 4 \
    --gradient_accumulation_steps 2 \
    --learning_rate 1e-6 \
    --warmup_ratio 0.05 \
    --num_train_epochs 1 \
    --deepspeed zero2 \
    --log_completions true \
    --logging_steps 1 \
    --save_steps 100 \
    --save_total_limit 2 \
    --output_dir output/gkd-rl-numina
