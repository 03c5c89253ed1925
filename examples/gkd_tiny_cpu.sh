#!/usr/bin/env bash
# A complete GKD run on CPU with tiny offline models (what `swift-gkd demo` runs), 2 processes.
# 在 CPU 上用离线小模型完整运行一次 GKD（即 `swift-gkd demo` 所做的事），2 个进程。
set -euo pipefail
WS=${WS:-swift_gkd_demo}
python -c "from swift_gkd_plugin.testing.tiny import build_demo_workspace; build_demo_workspace('$WS')"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MODELSCOPE_OFFLINE=1 USE_HF=1
NPROC_PER_NODE=2 \
swift rlhf \
    --rlhf_type gkd \
    --model "$WS/student" --model_type qwen3 \
    --teacher_model "$WS/teacher" --teacher_model_type qwen3 \
    --template qwen3_nothinking \
    --dataset "$WS/train.jsonl" \
    --tuner_type full --torch_dtype float32 --check_model false \
    --use_cpu true \
    --lmbda 0.5 --seq_kd true --beta 0.5 --temperature 1.0 \
    --max_completion_length 16 \
    --max_steps 20 --learning_rate 3e-3 --lr_scheduler_type constant \
    --per_device_train_batch_size 4 --gradient_accumulation_steps 1 \
    --logging_steps 5 --save_steps 10 --report_to none \
    --output_dir "$WS/output-2proc"
