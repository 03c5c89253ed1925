#!/usr/bin/env bash
# Hardware: 4 GPUs (NPROC_PER_NODE=4), bf16, DeepSpeed ZeRO-2, the 7B teacher offloaded between uses.
# 硬件：4 卡（NPROC_PER_NODE=4），bf16，DeepSpeed ZeRO-2，7B 教师不用时卸载到 CPU。
# Cost: not measured (not yet run on GPUs). / 开销：未测量（尚未在 GPU 上运行）。
# CPU try-out with tiny models: GKD_EXAMPLE_TINY=DIR bash examples/gkd_cross_tokenizer.sh (examples/README.md).
#
# Distillation across tokenizers: a Qwen2.5-7B-Instruct teacher (Qwen's byte-level BPE, 151k tokens) into a
# Llama-3.2-1B-Instruct student (Llama 3's tokenizer, 128k tokens), see docs_en/cross_tokenizer.md.
# 跨分词器蒸馏：教师 Qwen2.5-7B-Instruct（Qwen 的字节级 BPE，15.1 万词）蒸馏到学生 Llama-3.2-1B-Instruct（Llama 3 分词器，
# 12.8 万词），见 docs_zh/cross_tokenizer.md。
#
# The teacher reads every conversation through its own template and tokenizer; each student response token is compared
# with the teacher position that predicts the same text (exact where both tokens start at the same character, else the
# covering teacher token: watch gkd/xtok_exact_fraction). hybrid = generalized JSD on the tokens both vocabularies share
# (most of English text here) + ULD on the rest; uld alone ignores token identity. --lmbda 0.5: half the steps
# on-policy (student samples, decoded and re-encoded for the teacher), half on the dataset responses.
# 教师用自己的模板和分词器读取每段对话；学生的每个回复 token 与预测同一段文本的教师位置比较（两者起始于同一字符时为精确
# 对齐，否则取覆盖该字符的教师 token：请关注 gkd/xtok_exact_fraction）。hybrid = 两个词表共有 token 上的广义 JSD
# （此处英文文本大多如此）+ 其余部分的 ULD；单独的 uld 不区分 token 身份。--lmbda 0.5：一半步骤 on-policy（学生采样，解码后
# 为教师重新编码），一半使用数据集回复。
# A sentencepiece teacher that writes an answer's first word with a prefix space (Llama-2, Mistral) works the same: its
# first word is compared without that space (logged at start-up). --teacher_template <type> names the teacher's
# template when its model type has several.
# 首词带前缀空格的 sentencepiece 教师（Llama-2、Mistral）同样适用：其第一个词去掉该空格后再比较（启动日志会写出）。
# 教师的模型类型有多个模板时，用 --teacher_template <type> 指定。
# Not yet run on GPUs: start with a few steps. / 尚未在 GPU 上运行过：请先跑几步。
source "$(dirname "${BASH_SOURCE[0]}")/cpu_mode/cpu_mode.sh"  # GKD_EXAMPLE_TINY=DIR: tiny models on CPU
NPROC_PER_NODE=4 \
swift rlhf \
    --rlhf_type gkd \
    --model LLM-Research/Llama-3.2-1B-Instruct \
    --teacher_model Qwen/Qwen2.5-7B-Instruct \
    --gkd_cross_tokenizer hybrid \
    --dataset 'AI-ModelScope/alpaca-gpt4-data-en#2000' \
    --tuner_type full \
    --torch_dtype bfloat16 \
    --lmbda 0.5 \
    --beta 0.5 \
    --temperature 1.0 \
    --max_completion_length 256 \
    --offload_teacher_model true \
    --per_device_train_batch_size 2 \
    --gradient_accumulation_steps 8 \
    --learning_rate 1e-5 \
    --deepspeed zero2 \
    --output_dir output/gkd-cross-tokenizer
