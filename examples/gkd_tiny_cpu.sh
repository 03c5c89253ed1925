#!/usr/bin/env bash
# A complete GKD run on CPU with the demo's tiny offline models, on 2 processes, mixing on-policy and seq_kd steps
# (`swift-gkd demo` itself runs one process with SKD: its command line is printed by the demo).
# 在 CPU 上用演示的离线小模型、2 个进程完整运行一次 GKD，混合 on-policy 与 seq_kd 步
# （`swift-gkd demo` 本身是单进程 SKD：演示会打印其命令行）。
# Its own folder (WS), never the demo's ./swift_gkd_demo, whose trained student it would overwrite.
# 使用自己的目录（WS），而不是演示的 ./swift_gkd_demo（否则会覆盖演示训练好的学生模型）。
set -euo pipefail
WS=${WS:-swift_gkd_tiny_cpu}
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
