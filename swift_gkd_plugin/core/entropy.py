"""The entropy of a tempered distribution, per row: one definition for every loss path's ``gkd/entropy`` (the
student's, on its own samples) and ``gkd/teacher_entropy`` (the teacher's, at the same positions).

``H(softmax(z / T)) = -sum_v p_v log p_v`` in nats, ``p = softmax(z / T)`` over the last dimension; ``-inf`` (or the
``-1e30`` stand-in) entries have probability 0 and contribute 0. Summed as per-entry ``entr(p) = -p log p >= 0`` terms,
so no cancellation (``logsumexp(u) - E_p[u]`` subtracts two numbers of the size of the logits).

Where it is computed: :func:`tempered_entropy` (dense rows, top-k buckets), :func:`entropy_terms_` in the chunk loops
(the fused PyTorch backend, :func:`~swift_gkd_plugin.core.policy_gradient.sampled_token_stats`, the vocabulary-parallel
:func:`~swift_gkd_plugin.core.tensor_parallel.vocab_parallel_entropy`); the Triton kernels sum the same per-entry terms
in registers (``core/kernels``).

:class:`EntropyGapWatch` turns the two logged metrics into the warning of an on-policy run whose student's entropy
runs away from the teacher's, judged on the trend of the logged steps (both ``swift rlhf`` and ``megatron rlhf``).
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ['ENTROPY_GAP_GROWTH', 'ENTROPY_GAP_MARGIN', 'ENTROPY_GAP_STEPS', 'ENTROPY_RISE_GAP', 'ENTROPY_RISE_MARGIN',
           'ENTROPY_RISE_STEPS', 'REMEDIES', 'EntropyGapWatch', 'entropy_terms_', 'tempered_entropy']

#: float32 bytes of one ``[rows, V]`` temporary of :func:`tempered_entropy` (32 MiB).
_CHUNK_BYTES = 2**25


def entropy_terms_(u: torch.Tensor, lse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sum_v entr(exp(u_v - lse))`` per row of ``u`` ``[C, V]`` (float32 or float64 scratch, **overwritten**).

    ``u`` is the tempered logits ``z / T``; ``lse`` ``[C]`` their log-normaliser, by default ``logsumexp(u)`` over
    the row, given when the row is one slice of a vocabulary split across ranks (the sum is then that slice's share of
    the entropy). Rows whose normaliser is ``-inf`` (all entries ``-inf``) give 0. Returns ``[C]`` in ``u``'s dtype.
    """
    if lse is None:  # in place, no [C, V] temporary (torch.logsumexp makes one): the chunk loops' scratch is large
        m = u.amax(-1, keepdim=True) if u.shape[-1] else u.new_zeros(u.shape[:-1] + (1, ))
        u.sub_(torch.where(torch.isfinite(m), m, 0.0)).exp_()
        u.div_(u.sum(-1, keepdim=True).clamp_min_(torch.finfo(u.dtype).tiny))  # an all -inf row: 0 / tiny = 0
    else:
        u.sub_(torch.where(torch.isfinite(lse), lse, 0.0).unsqueeze(-1)).exp_()  # -inf - 0: exp 0, no nan
    return torch.special.entr(u, out=u).sum(-1)


@torch.no_grad()
def tempered_entropy(logits: torch.Tensor, temperature: float = 1.0, chunk_rows: Optional[int] = None
                     ) -> torch.Tensor:
    """Per-row entropy ``-sum_v p_v log p_v`` of ``p = softmax(logits / temperature)`` over the last dimension.

    Args:
        logits: ``[..., V]`` in any float dtype (not modified); ``-inf`` entries have probability 0.
        temperature: ``T > 0`` (finite).
        chunk_rows: rows per pass (default: 32 MiB float32 temporaries); never a float32 copy of all of ``logits``.

    Returns:
        ``[...]`` in nats, float32 (float64 for float64 input), detached; in ``[0, log V]``.
    """
    if not 0 < temperature < float('inf'):  # NaN too
        raise ValueError(f'temperature must be a finite number > 0, got {temperature}')
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.reshape(-1, logits.shape[-1])
    rows = int(chunk_rows) if chunk_rows else max(1, _CHUNK_BYTES // (4 * max(z.shape[-1], 1)))
    out = torch.zeros(z.shape[0], dtype=dtype, device=z.device)
    for start in range(0, z.shape[0], rows):
        out[start:start + rows] = entropy_terms_(z[start:start + rows].to(dtype, copy=True).div_(temperature))
    return out.view(logits.shape[:-1])


#: The gap, in nats, by which the student's entropy on its own samples (``gkd/entropy``) must exceed the teacher's at
#: the same positions (``gkd/teacher_entropy``) on each step of the window. Where it comes from: docs_en/quality_results.md
#: (SmolLM2, supervised start, 12 on-policy steps): the teacher's entropy on the student's temperature-1 samples is
#: 2.88 nats at the start; the runs that degrade reach a student entropy of 5.5-6.4, the runs that hold end at 2.5-3.9
#: (a gap of 1.0 at most against that teacher); 1.5 lies between.
ENTROPY_GAP_MARGIN = 1.5
#: The window: how many logged steps carrying both metrics the gap must stay above the margin and grow over (at
#: ms-swift's default --logging_steps 5 that is 15 steps, about where the SmolLM2 runs above had doubled their
#: entropy).
ENTROPY_GAP_STEPS = 3
#: How much the gap must grow across the window (its least-squares line, first to last logged step), in nats: a gap
#: that holds or closes is a student that has not yet learnt the teacher's certainty, not a run going wrong. The
#: swift-gkd demo (a near-deterministic teacher, 0.01 nats) starts 2.6 nats above it and closes the gap steadily
#: (2.58 -> 0.64 over 80 steps, seed 0) while exact match climbs 0.21 -> 0.94; the tiny tests' flat gap against a
#: peaked teacher moves by -0.47 to +0.30 across any 3 logged steps (noise); a student climbing 2.1 -> 5.9 nats in 12
#: steps from a supervised start against a teacher that stays near 2.9 (the SmolLM2 pattern of docs_en/quality_results.md)
#: grows it by about 3 nats across a window at --logging_steps 5. 0.5 lies between the two; not tuned further.
ENTROPY_GAP_GROWTH = 0.5
#: The second trigger, measured on the SmolLM2 runs of docs_en/methods_results.md, where the first never fired: the
#: teacher's entropy at the student's samples rises with the student's (2.2 -> 4.4-4.9 nats as the student's goes
#: 2.1 -> 5.1-6.2), so their gap stays within 1.6 nats. The runs that ended worse than their start on both forward KL
#: and the teacher's NLL rose by 2.3-3.8 nats while above the teacher by 0.6-1.6; the runs that held rose by 1.3 at
#: most. A logged step counts when the student's entropy is more than ENTROPY_RISE_MARGIN above its first logged
#: on-policy value and more than ENTROPY_RISE_GAP above the teacher's (a student rising to meet a flatter teacher
#: does not count); ENTROPY_RISE_STEPS such steps in a row warn. A student whose entropy falls (the demo's) never
#: counts.
ENTROPY_RISE_MARGIN = 2.0
ENTROPY_RISE_GAP = 0.5
ENTROPY_RISE_STEPS = 2

#: The warning's remedies (measured in docs_en/onpolicy_remedies.md), each with the test of the run's arguments that
#: says it is already in effect (then it is left out of the warning).
REMEDIES = (
    ('nucleus rollouts (--top_p 0.9) or colder ones (--gkd_sampling_temperature 0.5), not both',
     lambda a: _arg(a, 'top_p', 1.0) < 1 or _arg(a, 'gkd_sampling_temperature', 1.0) < 1),
    ('a lower --lmbda (mixed: some steps on the dataset\'s responses)', lambda a: _arg(a, 'lmbda', 1.0) < 1),
    ('--gkd_skd_top_k (speculative KD: the teacher replaces the tokens it would not propose)',
     lambda a: _arg(a, 'gkd_skd_top_k', 0) > 0),
    ('--beta towards 1 (reverse KL, mode-seeking)', lambda a: _arg(a, 'beta', 0.5) >= 1),
    ('shorter rollouts (--gkd_rollout_max_tokens)', lambda a: _arg(a, 'gkd_rollout_max_tokens', 0) > 0),
    ('a supervised start (SFT the student first)', lambda a: False),
)


def _arg(args, name: str, default: float) -> float:
    """``args.name`` as a number; ``default`` when absent or unset (None)."""
    value = getattr(args, name, None)
    return default if value is None else float(value)


def _slope(values) -> float:
    """Least-squares slope of ``values`` against 0, 1, 2, ... (per logged step)."""
    n = len(values)
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    return sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values)) / sum((i - mean_x)**2 for i in range(n))


class EntropyGapWatch:
    """Watches the logged ``gkd/entropy`` against ``gkd/teacher_entropy``: :meth:`update` returns a warning when
    the evidence says the on-policy run is going wrong, not merely that the student is less certain than its
    teacher: the gap has stayed above ``margin`` nats for ``steps`` logged steps in a row and grown by more than
    ``growth`` nats across them (least-squares), or the student's entropy has risen more than ``rise`` nats above its
    first logged value while above the teacher's by more than ``rise_gap`` for ``rise_steps`` logged steps in a
    row (``steps`` >= 2). Once per episode (an episode ends at a logged step that meets neither condition);
    ``warnings`` counts them. Logged steps without the two metrics (not on-policy) neither count nor break a streak.
    ``args`` (the run's arguments, optional) leaves out of the warning the remedies already in effect. Both trainers
    feed it their training log rows through :meth:`observe`."""

    def __init__(self, margin: float = ENTROPY_GAP_MARGIN, steps: int = ENTROPY_GAP_STEPS,
                 growth: float = ENTROPY_GAP_GROWTH, rise: float = ENTROPY_RISE_MARGIN,
                 rise_gap: float = ENTROPY_RISE_GAP, rise_steps: int = ENTROPY_RISE_STEPS, args=None):
        self.margin, self.steps, self.growth = margin, steps, growth
        self.rise, self.rise_gap, self.rise_steps = rise, rise_gap, rise_steps
        self.args = args
        self.first: Optional[float] = None
        self.gaps: list = []  # the last ``steps`` logged gaps
        self.rise_streak = 0
        self.firing = False
        self.warnings = 0

    def observe(self, logs: dict) -> Optional[str]:
        """One training log row: :meth:`update` with its two metrics if it has them; once a warning has fired, the
        row gets ``gkd/entropy_gap_warnings`` (the count since the start). Returns the warning, if any."""
        message = None
        if 'gkd/entropy' in logs and 'gkd/teacher_entropy' in logs:
            message = self.update(float(logs['gkd/entropy']), float(logs['gkd/teacher_entropy']))
        if self.warnings:
            logs['gkd/entropy_gap_warnings'] = self.warnings
        return message

    def update(self, entropy: float, teacher_entropy: float) -> Optional[str]:
        if self.first is None and entropy == entropy:
            self.first = entropy
        gap = entropy - teacher_entropy
        self.gaps = (self.gaps + [gap])[-self.steps:]
        grown = _slope(self.gaps) * (self.steps - 1) if len(self.gaps) == self.steps > 1 else float('nan')
        rising = entropy - self.first > self.rise and gap > self.rise_gap if self.first is not None else False
        self.rise_streak = self.rise_streak + 1 if rising else 0
        if all(g > self.margin for g in self.gaps) and grown > self.growth:  # NaN: False
            why = (f'by more than {self.margin:g} nats for {self.steps} logged on-policy steps in a row, the gap '
                   f'growing by {grown:.2f} nats across them')
        elif self.rise_streak >= self.rise_steps:
            why = (f'by more than {self.rise_gap:g} nats after rising more than {self.rise:g} nats above its first '
                   f'logged value ({self.first:.2f}) for {self.rise_steps} logged on-policy steps in a row')
        else:
            self.firing = False
            return None
        if self.firing:  # once per episode
            return None
        self.firing = True
        self.warnings += 1
        remedies = [text for text, in_effect in REMEDIES if self.args is None or not in_effect(self.args)]
        return (f'swift_gkd_plugin: the student\'s entropy on its own samples (gkd/entropy {entropy:.2f} nats) has '
                f'exceeded the teacher\'s at the same positions (gkd/teacher_entropy {teacher_entropy:.2f}) {why} '
                f'(warning {self.warnings} of this run; gkd/entropy_gap_warnings counts them). Likely cause: the '
                'on-policy feedback loop: the student samples from its own high-entropy tail, and the divergence on '
                'those prefixes raises its entropy further; the measured runs whose entropy ran away like this ended '
                'worse than they started (docs_en/quality_results.md#seeing-the-feedback-loop). Remedies not yet in effect '
                '(measured in docs_en/onpolicy_remedies.md): ' + '; '.join(remedies) + '.')
