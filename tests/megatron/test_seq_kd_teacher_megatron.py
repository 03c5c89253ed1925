"""``megatron rlhf``'s seq_kd steps are written by the teacher: with greedy sampling (``--top_k 1``) each completion
is the teacher's greedy continuation of its prompt, recomputed here with transformers on the teacher's folder (the
student's own greedy continuation differs)."""
import json
import os

import pytest
import torch
from megatron_runs import ACTIVE, megatron_args, run_megatron

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason='the CPU harness does nothing where CUDA is '
                                'present: tests/gpu/run_megatron_gkd.sh runs Megatron-SWIFT there')


def _greedy(model_dir, prompt_ids, max_new, end_ids):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    ids = list(prompt_ids)
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
            if token in end_ids:
                break
    return out


def test_seq_kd_completions_are_the_teachers(tiny_ws, tmp_path):
    """One seq_kd step on two fixed rows, greedy: each logged completion is the teacher's greedy decode (8 tokens at
    most, up to an end token), not the student's."""
    from swift_gkd_plugin.demo import tiny
    run = run_megatron(megatron_args(tiny_ws, str(tmp_path / 'out'), dataset=tiny_ws.fixed, lmbda=0, seq_kd='true',
                                     top_k=1, train_iters=1, micro_batch_size=2, global_batch_size=2,
                                     log_completions='true'))
    assert run.returncode == 0 and ACTIVE in run.output, run.output[-3000:]
    with open(os.path.join(run.output_dir, 'completions.jsonl')) as f:
        (logged, ) = [json.loads(line) for line in f]
    tok = tiny.load_tokenizer(tiny_ws.student)
    end_ids = {tok.convert_tokens_to_ids('<|im_end|>'), tok.convert_tokens_to_ids('<|endoftext|>')}

    def decoded(model_dir, prompt):
        ids = _greedy(model_dir, tok(prompt, add_special_tokens=False)['input_ids'], 8, end_ids)
        return tok.decode([i for i in ids if i not in end_ids])

    assert len(logged['prompt']) == 2
    for prompt, completion in zip(logged['prompt'], logged['completion']):
        assert completion == decoded(tiny_ws.teacher, prompt), (prompt, completion)
        assert completion != decoded(tiny_ws.student, prompt), (prompt, completion)
