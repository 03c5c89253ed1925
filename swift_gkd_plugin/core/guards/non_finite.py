"""A NaN or infinite loss, named by its source: the model whose outputs hold the first non-finite value, the step
and the position. Pure torch; reads the device, so for errors only."""
from __future__ import annotations

import math
from typing import Optional, Tuple

#: what the rows of each step's mode are, for the position named in an error
_ROWS_OF = {'off_policy': 'a dataset response', 'on_policy': 'a student sample', 'seq_kd': 'a teacher sample'}


def first_non_finite(tensor, logprobs: bool = False) -> Optional[Tuple[str, int, int]]:
    """``(value, i, n)``: the first row ``i`` of the ``n`` rows of ``tensor`` (one per response token, or per output
    of a head's weight) holding NaN or an infinity (log-probabilities: NaN or +inf; ``-inf`` is an unused top-k slot),
    else None. Reads the device: for errors only."""
    if tensor is None or tensor.dim() == 0 or tensor.numel() == 0:
        return None
    data = tensor.detach().float().reshape(tensor.shape[0], -1)
    bad = data.isnan() | (data == float('inf')) if logprobs else ~data.isfinite()
    rows = bad.any(-1)
    if not bool(rows.any()):
        return None
    i = int(rows.nonzero()[0])
    value = data[i][bad[i]][0].item()
    return ('NaN' if math.isnan(value) else str(value)), i, data.shape[0]


#: the coefficients of the loss's terms: a term is present when its coefficient is not 0 (the divergence's default: 1)
LOSS_TERM_FLAGS = ('gkd_divergence_coef', 'sft_alpha', 'gkd_rl_coef', 'gkd_sampled_kl_coef', 'gkd_ref_kl_coef')
#: what the messages name without a run's arguments
ANY_TERMS = '--temperature, --sft_alpha, --gkd_rl_coef, --gkd_ref_kl_coef'


def loss_terms(args) -> str:
    """``--temperature`` and the coefficient of each loss term present in this run, with their values: what may have
    overflowed (a coefficient of 1e39 leaves the loss finite and the gradient NaN)."""
    present = [('temperature', args.temperature)]
    present += [(name, getattr(args, name)) for name in LOSS_TERM_FLAGS if getattr(args, name, 0)]
    return ', '.join(f'--{name} {value:g}' for name, value in present)


def non_finite_gradient_message(step, norm: float, terms: str) -> str:
    """The error of a NaN or infinite gradient norm under a finite loss: the step and the terms present."""
    return (f'the gradient norm is {norm} on step {step} although the loss is finite: the backward of a loss term '
            f'overflowed (the terms present: {terms}). ms-swift skips the update of a NaN gradient (an infinite one is '
            'clipped to 0 or NaN), so the weights would stay as they are and the run would end with exit code 0 '
            'having learnt nothing; lower the coefficient that overflows. The run stops here')


def non_finite_loss_message(step: int, mode: str, training: bool, parts, outputs_checked: bool = True,
                            terms: str = ANY_TERMS) -> str:
    """The error of a NaN or infinite loss: the first of ``parts`` (``(who, what, tensor, logprobs)``: response rows
    of the micro-batch, or an output head) that holds a non-finite value, else the loss ``terms`` present
    (:func:`loss_terms`); with ``outputs_checked=False`` the models' outputs could not be checked (sharded
    weights)."""
    when = f'{"step" if training else "evaluation at step"} {step} ({mode} step)'
    for who, what, tensor, logprobs in parts:
        found = first_non_finite(tensor, logprobs)
        if found:
            value, i, n = found
            where = (f'output row {i + 1} of {n}' if what == 'output head' else
                     f'response token {i + 1} of {n} ({_ROWS_OF.get(mode, "a response")})')
            return (f'{who}: its {what} hold {value} at {where} on {when}, so the loss is not finite. '
                    'Check its weights (a NaN or inf in the checkpoint) and --torch_dtype (float16 overflows); the '
                    'run stops here instead of training on grad_norm nan')
    if not outputs_checked:
        return (f'the loss is not finite on {when}; with weights sharded over the ranks its micro-batch is not run '
                'again to find the model whose outputs hold the first NaN or inf. Check both models\' weights (a NaN '
                f'or inf in a checkpoint), --torch_dtype (float16 overflows) and the terms present ({terms}); the '
                'run stops here instead of training on grad_norm nan')
    return (f'the loss is not finite on {when} although the teacher\'s and the student\'s outputs are: a loss term '
            f'overflowed (the terms present: {terms}); the run stops here instead of training on grad_norm nan')
