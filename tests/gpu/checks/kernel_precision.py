"""Print the fused loss's relative errors against float64 at large tempered logits (tests/core/large_logits.py), for
each backend that runs here (the package's, and the experiment ``triton2``): full teacher head and top-k (+ tail),
every divergence form, |z / T| up to 1e4."""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..', 'core'))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'experiments', 'triton2'))
import large_logits as L  # noqa: E402
import triton2_backend  # noqa: E402  (the second kernel design: an experiment, outside the package)

triton2_backend.enable()
device = sys.argv[1] if len(sys.argv) > 1 else ('cuda' if torch.cuda.is_available() else 'cpu')
backends = ['torch', 'triton', 'triton2'] if device == 'cuda' or os.environ.get('TRITON_INTERPRET') == '1' else ['torch']
print(f'device {device}, backends {backends}')
worst = {}
for family, div, scale in [(f, d, s) for f in ('peaked', 'offset') for d in L.DIVS for s in L.SCALES]:
    if True:
        zs, zt, temp = L.case(scale, seed=int(scale) % 97, family=family)
        ref = L.reference_full(zs, zt, div, temp)
        lp, ids = torch.log_softmax(zt.double(), -1).float().topk(8, -1)
        refk = {tail: L.reference_topk(zs, ids, lp, div, temp, tail) for tail in (False, True)}
        for b in backends:
            row = [f'{family:>6} {str(div):>18} |z/T| {scale:>7g} {b:>6}']
            e = L.errors(L.fused_full(zs, zt, div, temp, b, device), ref)
            row.append(f'full v {e[0]:.1e} g {e[1]:.1e}')
            worst[(b, 'full')] = max(worst.get((b, 'full'), (0, 0)), e, key=lambda x: x[1])
            for tail in (False, True):
                e = L.errors(L.fused_topk(zs, ids, lp, div, temp, tail, b, device), refk[tail])
                name = 'topk_tail' if tail else 'topk'
                row.append(f'{name} v {e[0]:.1e} g {e[1]:.1e}')
                worst[(b, name)] = max(worst.get((b, name), (0, 0)), e, key=lambda x: x[1])
            print(' | '.join(row), flush=True)
for k, v in sorted(worst.items()):
    print('worst', k, f'value {v[0]:.2e} grad {v[1]:.2e}')
