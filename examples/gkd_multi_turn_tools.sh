#!/usr/bin/env bash
# Hardware: 4 GPUs (NPROC_PER_NODE=4), bf16, ZeRO-2, transformers sampling.
# 硬件：4 卡（NPROC_PER_NODE=4），bf16，ZeRO-2，transformers 采样。
# Cost: not measured (not yet run on GPUs). / 开销：未测量（尚未在 GPU 上运行）。
# CPU try-out (GKD_EXAMPLE_TINY): does not apply, the tiny demo models do not know the calculator task; its CPU run
# on tiny models is `python benchmarks/bench_quality.py --preset tools --quick` (tests/test_multi_turn.py).
#
# Multi-turn tool-use distillation: on-policy GKD whose student drives calculator turns (docs_en/multi_turn.md).
# 多轮工具调用蒸馏：由学生驱动计算器多轮交互的 on-policy GKD，见 docs_zh/multi_turn.md。
#
# Each on-policy step the student answers "Add: 347 + 598" with a call <calc>347+598</calc>; the scheduler
# gkd_calculator (swift_gkd_plugin/demo/tool_scheduler.py, registered through --external_plugins) appends the
# tool's result "= 945" as a user message and the student writes the next turn, until a turn without a call (the
# answer) or --max_turns 3. The student learns the tokens it wrote in every turn against the teacher, which scores
# each of them given the whole trajectory (tool results included); tool results are context, never targets.
# Bring your own tool: write a MultiTurnScheduler (docs_en/multi_turn.md#writing-a-scheduler) and set
# SCHEDULER_PLUGIN and --multi_turn_scheduler.
# 每个 on-policy 步中，学生对 "Add: 347 + 598" 先写出调用 <calc>347+598</calc>；调度器 gkd_calculator
# （swift_gkd_plugin/demo/tool_scheduler.py，经 --external_plugins 注册）把工具结果 "= 945" 作为 user 消息追加，
# 学生再写下一轮，直到某一轮不含调用（即答案）或达到 --max_turns 3。学生在每一轮自己写出的 token 上向教师学习，
# 教师在整条轨迹（含工具结果）的上下文中为每个 token 打分；工具结果只是上下文，从不作为目标。
# 使用自己的工具：编写一个 MultiTurnScheduler（docs_zh/multi_turn.md），并设置 SCHEDULER_PLUGIN 与
# --multi_turn_scheduler。
#
# The prompts are the tool task's (swift_gkd_plugin/demo/tool_task.py, written below when DATASET does not exist);
# --system tells a real model the call format (the task's tiny models learnt it without one). Multi-turn rollouts
# here use transformers sampling (--use_vllm false). Tested on CPU with tiny models only (tests/test_multi_turn.py,
# and these flags in the tools preset of benchmarks/bench_quality.py); this script has not run on GPUs, nor with
# vLLM: start with a few steps and watch gkd/num_turns and gkd/empty_trajectories.
# 提示来自工具任务（swift_gkd_plugin/demo/tool_task.py；DATASET 不存在时由下面的命令写出）；--system 告诉真实模型
# 调用格式（该任务的小模型不需要它就学会了）。这里的多轮 rollout 使用 transformers 采样（--use_vllm false）。
# 仅在 CPU 上用小模型测试过（tests/test_multi_turn.py，以及 benchmarks/bench_quality.py 的 tools 预设中的同样参数）；
# 本脚本尚未在 GPU 上、也未用 vLLM 运行过：请先跑几步，并观察 gkd/num_turns 与 gkd/empty_trajectories。
set -euo pipefail
GKD_TINY_NOT_APPLICABLE='the tiny demo models do not know the calculator task; its CPU run on tiny models: '\
'python benchmarks/bench_quality.py --preset tools --quick'  # in the CPU mode
source "$(dirname "${BASH_SOURCE[0]}")/cpu_mode/cpu_mode.sh"  # GKD_EXAMPLE_TINY=DIR: tiny models on CPU
STUDENT=${STUDENT:-Qwen/Qwen2.5-0.5B-Instruct}
TEACHER=${TEACHER:-Qwen/Qwen2.5-7B-Instruct}
DATASET=${DATASET:-gkd_tool_task_train.jsonl}
if [ -z "${SCHEDULER_PLUGIN:-}" ]; then  # the scheduler file shipped with the plugin
    TESTING=$(python -c 'import swift_gkd_plugin.demo as t, os; print(os.path.dirname(t.__file__))')
    SCHEDULER_PLUGIN=$TESTING/tool_scheduler.py
fi
SYSTEM='You have a calculator. To use it, reply with only <calc>A+B</calc>, for example <calc>347+598</calc>; '\
'its result comes back as "= RESULT". Then reply with only the final number.'

if [ ! -e "$DATASET" ]; then  # 2000 prompt rows "Add: A + B" (the reference answer as the assistant message)
    python -c "import sys; from swift_gkd_plugin.demo import tiny, tool_task
tiny.write_dataset(sys.argv[1], tool_task.make_rows(2000))" "$DATASET"
fi

NPROC_PER_NODE=4 \
swift rlhf \
    --rlhf_type gkd \
    --model "$STUDENT" \
    --teacher_model "$TEACHER" \
    --dataset "$DATASET" \
    --system "$SYSTEM" \
    --external_plugins "$SCHEDULER_PLUGIN" \
    --multi_turn_scheduler gkd_calculator \
    --max_turns 3 \
    --lmbda 1 \
    --beta 0.5 \
    --temperature 1.0 \
    --use_vllm false \
    --max_completion_length 64 \
    --tuner_type full \
    --torch_dtype bfloat16 \
    --per_device_train_batch_size 8 \
    --gradient_accumulation_steps 2 \
    --learning_rate 1e-5 \
    --num_train_epochs 1 \
    --logging_steps 5 \
    --save_steps 100 \
    --deepspeed zero2 \
    --output_dir output/gkd_multi_turn_tools
