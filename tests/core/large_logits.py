"""Cases of large tempered logits (``|z / T|`` up to 1e4) for the fused loss, with float64 references in log space.

Logits are exact: the hidden states are unit rows and the head holds the logits, so the fused loss sees precisely the
float32 logits the reference sees (``logits_head``). The teacher is the student plus an O(1) perturbation of the
tempered logits, so every divergence stays finite however large the logits are.
"""
from __future__ import annotations

import math

import torch

from swift_gkd_plugin.core.fused.loss import fused_linear_jsd
from swift_gkd_plugin.core.row_divergence import Divergence
from swift_gkd_plugin.core.teacher_signal import TeacherHead, TeacherTopK
from swift_gkd_plugin.core.topk import teacher_tail_logmass

SCALES = (30.0, 300.0, 1e3, 3e3, 1e4)  # max |z / T| of a row
DIVS = (Divergence('jsd', beta=0.0), Divergence('jsd', beta=0.5), Divergence('jsd', beta=1.0),
        Divergence('skew_kl', alpha=0.1), Divergence('skew_rkl', alpha=0.1))


def case(scale: float, seed: int, family: str = 'peaked', n: int = 6, v: int = 300, temperature: float = 0.5):
    """Student and teacher logits ``[n, v]`` (float32) with ``max |z / T| = scale`` and distributions that are not
    one-hot: ``peaked`` spreads each row over ``[-scale, scale]`` with its top 5 entries within 3 of the max (the
    distribution lives on them, the rest is a far tail); ``offset`` is ``+-scale`` plus O(1) noise (large magnitude,
    soft distribution). ``T = 0.5`` keeps ``z / T`` exact in float32."""
    g = torch.Generator().manual_seed(seed)
    if family == 'offset':
        sign = 1.0 if seed % 2 else -1.0
        u = sign * (scale - 6.0) + 2.0 * torch.randn(n, v, generator=g, dtype=torch.float64)
    else:
        u = (torch.rand(n, v, generator=g, dtype=torch.float64) * 2 - 1) * (scale - 3.0)
        top = torch.rand(n, 5, generator=g, dtype=torch.float64) * 3
        u[:, :5] = scale - top
    ut = u + torch.randn(n, v, generator=g, dtype=torch.float64)
    return (u * temperature).float(), (ut * temperature).float(), temperature


def _kl(p_log, q_log):
    keep = p_log > float('-inf')
    safe = torch.where(keep, p_log, 0.0)
    return torch.where(keep, safe.exp() * (safe - torch.where(keep, q_log, 0.0)), 0.0).sum(-1)


def divergence64(s, t, div: Divergence):
    """Per-row divergence of log-probabilities ``s`` (student), ``t`` (teacher), float64, mixtures in log space."""
    def mix(w, x, y):  # log(w e^x + (1 - w) e^y), exact for every w (1e-300 included)
        if w == 0:
            return y
        if w == 1:
            return x
        both = (x == float('-inf')) & (y == float('-inf'))  # logaddexp's gradient is NaN there
        m = torch.logaddexp(torch.where(both, 0.0, x) + math.log(w), torch.where(both, 0.0, y) + math.log1p(-w))
        return torch.where(both, float('-inf'), m)

    if div.name == 'jsd':
        if div.beta == 0:
            return _kl(t, s)
        if div.beta == 1:
            return _kl(s, t)
        m = mix(div.beta, t, s)
        return div.beta * _kl(t, m) + (1 - div.beta) * _kl(s, m)
    if div.name == 'skew_kl':
        return _kl(t, mix(div.alpha, t, s))
    return _kl(s, mix(1 - div.alpha, t, s))


def reference_full(zs, zt, div, temperature):
    """``(sum of row divergences, d sum / d zs)`` in float64."""
    z = zs.double().requires_grad_()
    d = divergence64(torch.log_softmax(z / temperature, -1), torch.log_softmax(zt.double() / temperature, -1), div)
    d.sum().backward()
    return d.sum().detach(), z.grad


def reference_topk(zs, ids, lp, div, temperature, tail: bool):
    """The same against a top-k teacher (ids, log-probabilities at T = 1), with or without the tail bucket."""
    z = zs.double().requires_grad_()
    y = z.gather(1, ids)
    t = lp.double()
    if tail:  # the teacher's tail as teacher_tail_logmass defines it (never below its storage uncertainty)
        comp = z.scatter(1, ids, float('-inf'))
        y = torch.cat([y, comp.logsumexp(-1, keepdim=True)], 1)
        t_tail = teacher_tail_logmass(lp, torch.full(lp.shape[:1], lp.shape[1]), zs.shape[1]).double()
        t = torch.cat([t, t_tail.unsqueeze(1)], 1)
    d = divergence64(torch.log_softmax(y / temperature, -1), torch.log_softmax(t / temperature, -1), div)
    d.sum().backward()
    return d.sum().detach(), z.grad


def logits_head(z):
    """Unit hidden rows and a head holding ``z``: ``hidden @ head.T == z`` exactly. ``([n, v], [v, v])``."""
    n, v = z.shape
    head = torch.zeros(v, v)
    head[:, :n] = z.T
    return torch.eye(v)[:n], head


def fused_full(zs, zt, div, temperature, backend, device):
    """The fused loss's ``(summed divergence, d / d zs)`` on ``device`` (returned on the CPU)."""
    h, head = logits_head(zs)
    ht, head_t = logits_head(zt)
    w = head.to(device).requires_grad_()
    loss, _ = fused_linear_jsd(h.to(device), w, teacher=TeacherHead(ht.to(device), head_t.to(device)),
                               divergence=div, temperature=temperature, normalizer=1.0, backend=backend)
    loss.backward()
    return loss.detach().double().cpu(), w.grad[:, :zs.shape[0]].T.double().cpu()


def fused_topk(zs, ids, lp, div, temperature, tail, backend, device):
    h, head = logits_head(zs)
    w = head.to(device).requires_grad_()
    loss, _ = fused_linear_jsd(h.to(device), w, teacher=TeacherTopK(ids.to(device), lp.to(device)), divergence=div,
                               temperature=temperature, topk_tail=tail, normalizer=1.0, backend=backend)
    loss.backward()
    return loss.detach().double().cpu(), w.grad[:, :zs.shape[0]].T.double().cpu()


def errors(got, want):
    """Relative errors ``(value, gradient)``: the gradient's max-abs error over its max-abs entry."""
    value = abs(float(got[0]) - float(want[0])) / max(abs(float(want[0])), 1e-30)
    grad = float((got[1] - want[1]).abs().max() / want[1].abs().max().clamp_min(1e-30))
    return value, grad
