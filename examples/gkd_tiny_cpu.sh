#!/usr/bin/env bash
# Hardware: CPU only, 2 processes (NPROC_PER_NODE=2), one thread each, tiny offline models, no GPU, no network.
# 硬件：仅 CPU，2 个进程（NPROC_PER_NODE=2），每进程一个线程，离线小模型，无需 GPU 与网络。
# Cost: measured 2026-11-26 on a 2-core CPU VM shared with other jobs: 1 min 46 s wall, 45 s CPU, 0.7 GB peak memory,
# the first time (the tiny models' build included); the 20 steps themselves 5.7 s. / 开销：2026-11-26 在与其他任务共用的
# 2 核 CPU 虚拟机上实测：首次运行（含小模型构建）墙钟 1 分 46 秒，CPU 45 秒，峰值内存 0.7 GB；20 步训练本身 5.7 秒。
# Already the CPU run: GKD_EXAMPLE_TINY (the other examples' CPU mode) changes nothing here; WS moves its folder.
#
# A complete GKD run on CPU with the demo's tiny offline teacher and its student, warm-started as the demo's by 60
# supervised steps (build_warm_workspace; held-out exact match 0.210 on seed 0, an untrained one 0.000), on 2
# processes, mixing on-policy and seq_kd steps (`swift-gkd demo` itself runs one process of on-policy steps by plain
# sampling: its command line is printed by the demo). The cost above was measured with an untrained student: the first build now also runs the 60
# warm-start steps.
# 在 CPU 上用演示的离线小教师及其学生（与演示一样先用 60 步监督训练热启动，build_warm_workspace；种子 0 的留出集完全匹配率
# 为 0.210，未训练的为 0.000）、2 个进程完整运行一次 GKD，混合 on-policy 与 seq_kd 步（`swift-gkd demo` 本身是单进程、
# 以普通采样进行的 on-policy 步：演示会打印其命令行）。上面的开销是用未训练学生测得的：现在首次构建还包含这 60 步热启动。
# Its own folder (WS), never the demo's ./swift_gkd_demo, whose trained student it would overwrite.
# 使用自己的目录（WS），而不是演示的 ./swift_gkd_demo（否则会覆盖演示训练好的学生模型）。
set -euo pipefail
WS=${WS:-swift_gkd_tiny_cpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # more threads per process: many times slower on a small machine
python -c "from swift_gkd_plugin.demo.tiny import build_warm_workspace; build_warm_workspace('$WS')"
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
