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
runs away from the teacher's (both ``swift rlhf`` and ``megatron rlhf``).
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ['ENTROPY_GAP_MARGIN', 'ENTROPY_GAP_STEPS', 'ENTROPY_RISE_GAP', 'ENTROPY_RISE_MARGIN', 'ENTROPY_RISE_STEPS',
           'EntropyGapWatch', 'entropy_terms_', 'tempered_entropy']

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
#: the same positions (``gkd/teacher_entropy``) for :class:`EntropyGapWatch` to count a logged step. Where it comes
#: from: docs_en/quality.md (SmolLM2, supervised start, 12 on-policy steps): the teacher's entropy on the student's
#: temperature-1 samples is 2.88 nats; the runs that degrade reach a student entropy of 5.5-6.4 (a gap of 2.6 or more
#: if the teacher's stays near 2.9), the runs that hold (mixed, SKD, reverse KL, sampling at 0.5) end at 2.5-3.9 (a gap
#: of 1.0 at most). The tiny on-policy runs (12 steps, tests' models): 6.09 vs 6.08 nats against the tiny teacher
#: (a gap of 0.01), 5.99-6.09 vs 3.70-4.35 against that teacher with its head scaled by 10 (gaps of 1.7-2.4).
ENTROPY_GAP_MARGIN = 1.5
#: How many logged steps carrying both metrics in a row the gap must hold (a single noisy step does not warn; at
#: ms-swift's default --logging_steps 5 that is 15 steps, about where the SmolLM2 runs above had doubled their
#: entropy).
ENTROPY_GAP_STEPS = 3
#: The second trigger, measured on the SmolLM2 runs of docs_en/onpolicy_remedies.md, where the first never fired: the
#: teacher's entropy at the student's samples rises with the student's (2.2 -> 4.4-4.9 nats as the student's goes
#: 2.1 -> 5.1-6.2), so their gap stays within 1.6 nats. The runs that ended worse than their start on both forward KL
#: and the teacher's NLL rose by 2.3-3.8 nats while above the teacher by 0.6-1.6; the runs that held rose by 1.3 at
#: most. A logged step counts when the student's entropy is more than ENTROPY_RISE_MARGIN above its first logged
#: on-policy value and more than ENTROPY_RISE_GAP above the teacher's (a student rising to meet a flatter teacher
#: does not count); ENTROPY_RISE_STEPS such steps in a row warn.
ENTROPY_RISE_MARGIN = 2.0
ENTROPY_RISE_GAP = 0.5
ENTROPY_RISE_STEPS = 2


class EntropyGapWatch:
    """Watches the logged ``gkd/entropy`` against ``gkd/teacher_entropy``: :meth:`update` returns a warning when
    the student's entropy has exceeded the teacher's by more than ``margin`` nats for ``steps`` logged steps in a
    row, or has risen more than ``rise`` nats above its first logged value while above the teacher's by more than
    ``rise_gap`` for ``rise_steps`` logged steps in a row; once per episode (an episode ends at a logged step that
    meets neither condition); ``warnings`` counts them. Logged steps without the two metrics (not on-policy) neither
    count nor break a streak. Both trainers feed it their training log rows through :meth:`observe`."""

    def __init__(self, margin: float = ENTROPY_GAP_MARGIN, steps: int = ENTROPY_GAP_STEPS,
                 rise: float = ENTROPY_RISE_MARGIN, rise_gap: float = ENTROPY_RISE_GAP,
                 rise_steps: int = ENTROPY_RISE_STEPS):
        self.margin, self.steps = margin, steps
        self.rise, self.rise_gap, self.rise_steps = rise, rise_gap, rise_steps
        self.first: Optional[float] = None
        self.streak = self.rise_streak = 0
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
        self.streak = self.streak + 1 if gap > self.margin else 0  # NaN: False
        rising = entropy - self.first > self.rise and gap > self.rise_gap if self.first is not None else False
        self.rise_streak = self.rise_streak + 1 if rising else 0
        if self.streak >= self.steps:
            why = f'by more than {self.margin:g} nats for {self.steps} logged on-policy steps in a row'
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
        return (f'swift_gkd_plugin: the student\'s entropy on its own samples (gkd/entropy {entropy:.2f} nats) has '
                f'exceeded the teacher\'s at the same positions (gkd/teacher_entropy {teacher_entropy:.2f}) {why} '
                f'(warning {self.warnings} of this run; gkd/entropy_gap_warnings counts them). Likely cause: the '
                'on-policy feedback loop: the student samples from its own high-entropy tail, and the divergence on those '
                'prefixes raises its entropy further; such runs end worse than they started (docs_en/quality.md). '
                'Remedies (measured in docs_en/onpolicy_remedies.md): nucleus rollouts (--top_p 0.9) or colder '
                'ones (--gkd_sampling_temperature 0.5), not both; a lower --lmbda (mixed: some steps on the dataset\'s '
                'responses), --gkd_skd_top_k (speculative KD: the teacher replaces the tokens it would not propose), '
                '--beta towards 1 (reverse KL, mode-seeking), shorter rollouts (--gkd_rollout_max_tokens), or a '
                'supervised start (SFT the student first).')
