"""The cost of SKD sampling against plain on-policy sampling: time, student and teacher forwards, replaced tokens.

Samples one batch of prompts with transformers' ``generate`` as ms-swift's transformers engine does (plain), and with
the plugin's SKD decoding loop (``swift_gkd_plugin.swift.rollout.speculative.skd_decoding``, the one the trainer runs) for a few
``K``. Models: the demo workspace's trained teacher and a student warm-started for ``--student_steps`` (built once under
``--workdir``), or with ``--random`` the test suite's random tiny models.

    python benchmarks/bench_skd_cost.py [--workdir DIR] [--random] [--batch 8] [--tokens 32] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--workdir', default=None)
    parser.add_argument('--random', action='store_true', help='random tiny models (no training)')
    parser.add_argument('--student_steps', type=int, default=60)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--tokens', type=int, default=32)
    parser.add_argument('--temperature', type=float, default=1.0)
    parser.add_argument('--ks', type=int, nargs='*', default=[1, 5, 25])
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from swift_gkd_plugin.swift.rollout.speculative import cached_forward, skd_decoding
    from swift_gkd_plugin.demo import tiny

    torch.set_num_threads(1)
    root = args.workdir or tempfile.mkdtemp(prefix='bench_skd_')
    if args.random:
        tok_dir = tiny.build_tokenizer(os.path.join(root, 'tok'))
        student_dir = tiny.build_model(os.path.join(root, 'student'), tok_dir, seed=0)
        teacher_dir = tiny.build_model(os.path.join(root, 'teacher'), tok_dir, seed=1, hidden_size=96,
                                       intermediate_size=192)
        rows = tiny.make_rows(args.batch, seed=0, split='test')
    else:
        ws = tiny.build_demo_workspace(os.path.join(root, 'demo'), student_steps=args.student_steps)
        student_dir, teacher_dir = ws['student'], ws['teacher']
        rows = tiny.make_rows(args.batch, seed=0, split='test')
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    tokenizer.padding_side = 'left'
    student = AutoModelForCausalLM.from_pretrained(student_dir, torch_dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, torch_dtype=torch.float32).eval()
    prompts = [tokenizer.apply_chat_template(r['messages'][:-1], tokenize=False, add_generation_prompt=True)
               for r in rows]
    batch = tokenizer(prompts, return_tensors='pt', padding=True)
    eos = tokenizer.convert_tokens_to_ids('<|im_end|>')
    config = GenerationConfig(do_sample=True, temperature=args.temperature, top_k=None, top_p=None,
                              max_new_tokens=args.tokens, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                              return_dict_in_generate=True)

    def count_forwards(model):
        calls = [0]
        handle = model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        return calls, handle

    def run(k):
        results = []
        s_calls, s_handle = count_forwards(student)
        t_calls, t_handle = count_forwards(teacher)
        kwargs = {}
        if k:
            kwargs['custom_generate'] = skd_decoding(lambda m: cached_forward(teacher), top_k=k,
                                                     temperature=args.temperature,
                                                     generator=torch.Generator().manual_seed(0),
                                                     on_result=results.append)
        torch.manual_seed(0)
        start = time.perf_counter()
        with torch.no_grad():
            out = student.generate(**batch, generation_config=config, **kwargs)
        elapsed = time.perf_counter() - start
        s_handle.remove()
        t_handle.remove()
        new = out.sequences[:, batch['input_ids'].shape[1]:]
        tokens = int((new != tokenizer.pad_token_id).sum())
        replaced = results[0].replaced / max(results[0].proposed, 1) if results else 0.0
        return elapsed, s_calls[0], t_calls[0], tokens, replaced

    models = 'random tiny models' if args.random else f'demo teacher, student warm-started {args.student_steps} steps'
    print(f'batch {args.batch}, up to {args.tokens} new tokens per row, sampling temperature {args.temperature}, '
          f'{models}')
    print(f'{"sampler":>10} {"time ms":>9} {"x plain":>8} {"student fw":>11} {"teacher fw":>11} {"tokens":>7} '
          f'{"replaced":>9}')
    plain = None
    vocab = student.get_output_embeddings().weight.shape[0]
    for k in [0] + list(args.ks) + [vocab]:  # K = the vocabulary: every token accepted
        runs = [run(k) for _ in range(args.repeats)]
        ms = statistics.median(r[0] for r in runs) * 1000
        plain = plain or ms
        _, s_fw, t_fw, tokens, replaced = runs[-1]
        name = 'plain' if k == 0 else f'skd K={k}' if k < vocab else 'skd K=V'
        print(f'{name:>10} {ms:9.1f} {ms / plain:8.2f} {s_fw:11d} {t_fw:11d} {tokens:7d} {replaced:9.3f}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
