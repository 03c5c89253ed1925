"""How far the student moves in one optimizer step against how far it is from the teacher: the scale of
``bench_quality.py --preset staleness``'s staleness (docs_en/vllm.md, quality under staleness).

    python benchmarks/staleness_drift.py --workdir bench_quality_out --beta 1

A synchronous on-policy run of the staleness preset's flags (transformers sampling, seed 0, a checkpoint every step),
then at every 10th step t: 64 held-out prompts sampled by the student at temperature 1, and per completion token (the
first end of turn included) KL(pi_t || pi_t+1) and KL(pi_t || pi_t+4) (what a sample one or four versions stale
differs by), the mean |log pi_t+1(y) - log pi_t(y)| of the sampled tokens, and the student's reverse and forward KL
to the teacher.  Prints one JSON line per step and the means; writes ``<run>.drift.json``.
"""
import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_quality as bq  # noqa: E402
from quality_presets import staleness  # noqa: E402

from swift_gkd_plugin.demo import quality_task, tiny  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--workdir', default='bench_quality_out', help="bench_quality.py's (the workspace is reused)")
parser.add_argument('--beta', default='1')
parser.add_argument('--learning_rate', default=staleness.DEFAULT_LEARNING_RATE)
parser.add_argument('--steps', type=int, default=staleness.STALENESS_PRESETS['full']['steps'])
args = parser.parse_args()
WORK, beta, lr, steps = os.path.abspath(args.workdir), args.beta, args.learning_rate, args.steps
cfg = dict(staleness.STALENESS_PRESETS['full'], steps=steps, eval_every=1)
ws = staleness.staleness_workspace(WORK, cfg)
methods = {'drift': ('rlhf', {'lmbda': '1', 'beta': beta, 'use_vllm': 'false'})}
bq.LEARNING_RATE = lr
out = os.path.join(WORK, 'staleness_drift', f'beta{beta}_lr{lr}')
if not os.path.exists(os.path.join(out, f'checkpoint-{steps}')):
    argv = bq.method_command('drift', ws, cfg, 0, out, methods)
    code, output = bq.run_command(argv)
    if code != 0:
        raise SystemExit(f'the run failed ({code}):\n{output[-3000:]}')
tok = tiny.load_tokenizer(ws['tokenizer'])
rows = tiny.read_dataset(ws['test'])[:64]
prompts = [quality_task.prompt_of(r) for r in rows]
teacher = tiny.load_model(ws['teacher'])
pad = tok.pad_token_id
stop = [tok.convert_tokens_to_ids('<|im_end|>'), pad]
encoded = [tok.encode(tiny._render_prompt([{'role': 'user', 'content': p}, {'role': 'assistant', 'content': ''}])[0],
                      add_special_tokens=False) for p in prompts]
width = max(map(len, encoded))
ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])


def model_at(step):
    return tiny.load_model(os.path.join(out, f'checkpoint-{step}')) if step else tiny.load_model(ws['student'])


def logp(model, seq, attn):
    with torch.no_grad():
        logits = model(input_ids=seq, attention_mask=attn).logits[:, width - 1:-1].float()
    return torch.log_softmax(logits, -1)


def kl(p, q, m):  # KL(p || q) per token, mean over completion tokens
    return float(((p.exp() * (p - q)).sum(-1) * m).sum() / m.sum())


torch.manual_seed(0)
res = []
for t in list(range(0, steps - 4, 10)):
    pt = model_at(t)
    with torch.no_grad():
        seq = pt.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=True, temperature=1.0,
                          top_k=0, eos_token_id=stop, pad_token_id=pad)
    comp = seq[:, width:]
    # completion tokens up to and including the first stop token
    done = torch.cumsum((comp == stop[0]) | (comp == pad), 1)
    m = ((done == 0) | ((done == 1) & ((comp == stop[0]) | (comp == pad)))).float()
    attn = torch.cat([mask, torch.ones_like(comp)], 1)
    lp = {k: logp(mod, seq, attn) for k, mod in (('t', pt), ('t1', model_at(t + 1)), ('t4', model_at(t + 4)),
                                                ('T', teacher))}
    ytok = comp.unsqueeze(-1)
    diff = float(((lp['t1'].gather(-1, ytok) - lp['t'].gather(-1, ytok)).abs().squeeze(-1) * m).sum() / m.sum())
    r = dict(step=t, kl_t_t1=kl(lp['t'], lp['t1'], m), kl_t_t4=kl(lp['t'], lp['t4'], m),
             logprob_diff_1=diff, rkl_to_teacher=kl(lp['t1'], lp['T'], m), fkl_to_teacher=kl(lp['T'], lp['t1'], m))
    res.append(r)
    print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
summary = {k: statistics.fmean(r[k] for r in res) for k in res[0] if k != 'step'}
print('mean', json.dumps({k: round(v, 5) for k, v in summary.items()}))
with open(out + '.drift.json', 'w') as f:
    json.dump({'beta': beta, 'learning_rate': lr, 'rows': res, 'mean': summary}, f, indent=1)
