"""Guards a GKD run installs on its trainer: exit code 0 only after training on what the user gave, and faults
named by their cause. One hook, called from the trainer's ``__init__``."""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

from swift.template import MaxLengthError
from swift.utils import get_logger
from transformers import TrainerCallback

from swift_gkd_plugin.core.entropy import EntropyGapWatch
from swift_gkd_plugin.swift.setup.checkpoints import guard_checkpoint_saves
from swift_gkd_plugin.swift.setup.datasets import PRIVILEGED_COLUMNS, RefuseEmptyEpochs, media_refs

logger = get_logger()


def install_run_guards(trainer) -> None:
    """A training set smaller than one batch is refused at the start; a run whose steps learn nothing stops
    (:class:`NothingLearnt`); a checkpoint save that cannot write its files
    names the cause (no space left) and the newest complete checkpoint; a row replaced because it fails to encode is
    named in a warning and counted; a NaN or infinite loss stops the run naming its source (the trainer's loss
    calls :func:`non_finite_loss_message`); an on-policy student whose entropy runs away from the teacher's is
    warned about."""
    trainer.add_callback(RefuseEmptyEpochs())
    trainer._nothing_learnt = NothingLearnt(trainer)  # fed by the trainer's compute_loss
    trainer.add_callback(trainer._nothing_learnt)
    trainer.callback_handler.callbacks.insert(0, WarnOnEntropyGap())  # before the callback that writes the logs
    guard_checkpoint_saves(trainer)
    warn_replaced_rows(trainer)


class RunError(RuntimeError):
    """A run stopped for a cause its message names; the trainer prints it as one ``swift rlhf: error:`` line (exit
    code 1, no traceback)."""


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


def non_finite_loss_message(step: int, mode: str, training: bool, parts, outputs_checked: bool = True) -> str:
    """The error of a NaN or infinite loss: the first of ``parts`` (``(who, what, tensor, logprobs)``: response rows
    of the micro-batch, or an output head) that holds a non-finite value, else the loss terms; with
    ``outputs_checked=False`` the models' outputs could not be checked (sharded weights)."""
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
                'or inf in a checkpoint), --torch_dtype (float16 overflows) and --temperature, --sft_alpha, '
                '--gkd_rl_coef, --gkd_ref_kl_coef; the run stops here instead of training on grad_norm nan')
    return (f'the loss is not finite on {when} although the teacher\'s and the student\'s outputs are: a loss term '
            'overflowed (check --temperature, --sft_alpha, --gkd_rl_coef, --gkd_ref_kl_coef); the run stops here '
            'instead of training on grad_norm nan')


class NothingLearnt(TrainerCallback):
    """Stops a run whose steps all have a loss of exactly 0: it learns nothing, whatever the cause, and would
    otherwise end with exit code 0. The trainer feeds it every training micro-batch (:meth:`add`); each optimizer
    step is read once, whatever ``--logging_steps``. A step counts as evidence when it had loss 0 and either drew a
    row with a privileged teacher view (``teacher_prompt`` / ``teacher_messages``) or the training set has none: a
    teacher that sees what the student sees may legitimately agree with it until such a row comes up. After
    :attr:`STEPS` pieces of evidence the run stops; a run that ends with every step at loss 0 (a short run, one
    whose privileged rows never came up) stops at its end. The first step with a loss stops the watch. Exactly 0,
    not small: a real loss is never exactly 0 on every token of a step."""
    STEPS = 3

    def __init__(self, trainer):
        self.trainer = trainer
        self.armed = True
        self.zero_steps = self.evidence = 0
        self.privileged_rows = self.rows = None  # counted when training starts
        self._reset()

    def _reset(self):
        self.loss, self.viewed = 0.0, False

    def add(self, loss, inputs) -> None:
        """One training micro-batch: its loss, and whether a row had a privileged teacher view (device tensors, no
        host read)."""
        if not self.armed:
            return
        self.loss = self.loss + loss.detach().abs().sum()
        student, teacher = inputs['model_inputs']['input_ids'], inputs['teacher_model_inputs']['input_ids']
        self.viewed = self.viewed | (student.shape != teacher.shape or (student != teacher).any())

    def on_train_begin(self, args, state, control, **kwargs):
        dataset = self.trainer.train_dataset
        if not hasattr(dataset, '__len__') or not hasattr(dataset, 'column_names'):
            return  # unknown: only steps that drew a privileged view count
        self.rows = len(dataset)
        names = [name for name in PRIVILEGED_COLUMNS if name in (dataset.column_names or [])]
        self.privileged_rows = sum(1 for name in names for value in dataset[name] if value)
        if self.privileged_rows == 0 and _copy_of_the_student(self.trainer):
            raise RunError(f'{zero_loss_cause(self.trainer)}; no training row has a teacher_prompt or teacher_messages '
                           'and no other term learns (--sft_alpha, --gkd_rl_coef): every step would have loss 0 (the '
                           'first exactly, the next ones only from weight decay), and the run would end with exit '
                           'code 0 having learnt nothing')

    def on_step_end(self, args, state, control, **kwargs):
        if not self.armed:
            return
        import torch
        values = torch.stack([torch.as_tensor(self.loss, dtype=torch.float32, device=args.device).reshape(()),
                              torch.as_tensor(self.viewed, dtype=torch.float32, device=args.device).reshape(())])
        self._reset()
        if args.world_size > 1:
            torch.distributed.all_reduce(values)
        loss, viewed = values.tolist()
        if loss != 0:
            self.armed = False  # it learns
            return
        self.zero_steps += 1
        self.evidence += bool(viewed) or self.privileged_rows == 0
        if self.evidence >= self.STEPS:
            raise RunError(self._message(state))

    def on_train_end(self, args, state, control, **kwargs):
        if self.armed and self.zero_steps:
            raise RunError(self._message(state, ended=True))

    def _message(self, state, ended: bool = False) -> str:
        if self.privileged_rows:
            drawn = (f'{self.evidence} of them drew a row with a teacher_prompt or teacher_messages '
                     f'({self.privileged_rows} of the {self.rows} training rows have one)')
        else:
            drawn = 'the training set has no teacher_prompt or teacher_messages column'
        when = 'the run ended after' if ended else 'the run stops after'
        return (f'{when} {self.zero_steps} step(s) with loss 0 exactly ({drawn}): it learns nothing, and would '
                f'otherwise end with exit code 0. Cause: {zero_loss_cause(self.trainer)}')


def zero_loss_cause(trainer) -> str:
    """Why a step's loss is 0 exactly, from what the trainer distils from."""
    if trainer.use_teacher_api:
        return (f'--teacher_model_server {trainer.teacher_model_server} returns the student\'s distribution at every '
                'response token (the student\'s own model served?)')
    if trainer._teacher_use_disable_adapter:
        return ('the teacher is the student\'s base with its LoRA adapter off, and the adapter is still zero (a fresh '
                'LoRA: its B matrices are 0), so the student is its teacher: start from a trained adapter '
                '(--adapters), give rows a teacher_prompt, or pass another --teacher_model')
    if trainer._teacher_adapter is not None:
        return f'--teacher_adapters {trainer._teacher_adapter} changes nothing in the student\'s outputs'
    if trainer.teacher_model is None:
        return ('the teacher is the student itself (no --teacher_model) and saw what the student saw: give rows a '
                'teacher_prompt, or pass --teacher_model')
    if _copy_of_the_student(trainer, other_terms=True):
        return (f'--teacher_model {getattr(trainer.accelerator.unwrap_model(trainer.teacher_model), "model_dir", "")} '
                'has the student\'s weights exactly (a copy of --model): distil from another model')
    return 'the teacher gives the student\'s distribution at every response token'


def _copy_of_the_student(trainer, other_terms: bool = False) -> bool:
    """A separate, whole teacher whose parameters equal the student's (unless another term learns, where
    ``other_terms`` is False)."""
    args = trainer.args
    if (trainer.teacher_model is None or trainer.use_teacher_api or trainer._teacher_partitioned
            or not other_terms and (args.sft_alpha > 0 or args.gkd_rl_coef > 0)):
        return False
    ours = dict(trainer.accelerator.unwrap_model(trainer.teacher_model).named_parameters())
    theirs = dict(trainer.accelerator.unwrap_model(trainer.model).named_parameters())
    return ours.keys() == theirs.keys() and all(
        p.shape == theirs[n].shape and p.numel() > 0 and bool((p.detach() == theirs[n].detach().to(p.device)).all())
        for n, p in ours.items())


class WarnOnEntropyGap(TrainerCallback):
    """The warning of :class:`~swift_gkd_plugin.core.entropy.EntropyGapWatch` on the logged training steps that carry
    ``gkd/entropy`` and ``gkd/teacher_entropy`` (on-policy steps), and ``gkd/entropy_gap_warnings`` in the logs
    once it has fired (the count since the start)."""

    def __init__(self):
        self.watch = EntropyGapWatch()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or 'loss' not in logs:
            return
        message = self.watch.observe(logs)
        if message and state.is_world_process_zero:
            logger.warning(message)


class ReplacedRows(TrainerCallback):
    """``gkd/replaced_rows`` in the training logs once a row was replaced: the count since the start on this
    process. Runs before ms-swift's own logging callback, which writes ``logging.jsonl``."""

    def __init__(self):
        self.count = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.count and logs is not None and 'loss' in logs:
            logs['gkd/replaced_rows'] = self.count


def warn_replaced_rows(trainer) -> None:
    """ms-swift encodes each batch's rows in the trainer and replaces a row that fails to encode by another one, with
    an INFO line only (an image URL that does not answer, inline media that does not decode: what the pre-load check
    cannot read). Each such row is named here in a warning (its error and media) and counted (:class:`ReplacedRows`).
    Rows too long for ``--max_length`` (``MaxLengthError``) are ms-swift's expected skip and are not counted."""
    counter = ReplacedRows()
    trainer.callback_handler.callbacks.insert(0, counter)
    resample = trainer.resample_encode_failed_inputs
    template = trainer.template

    def encode_or_warn(row, *args, **kwargs):
        try:
            return type(template).encode(template, row, *args, **kwargs)
        except MaxLengthError:
            raise
        except Exception as exc:
            counter.count += 1
            media = [ref if len(ref) <= 200 else ref[:200] + '...' for _, ref in media_refs(row, {})]
            logger.warning(f'swift_gkd_plugin: a dataset row cannot be encoded ({type(exc).__name__}: {exc}); its '
                           f'media: {media}; ms-swift trains on another row in its place ({counter.count} row(s) '
                           'replaced so far)')
            raise

    def resample_and_warn(*args, **kwargs):
        template.encode = encode_or_warn  # for this call only: the template's other encodes are left alone
        try:
            return resample(*args, **kwargs)
        finally:
            del template.encode

    trainer.resample_encode_failed_inputs = resample_and_warn


def teacher_server_failed_message(trainer, error: BaseException) -> str:
    """A teacher server that stayed unreachable or failing through its retries and ``--teacher_server_wait``: the
    step, the server's error, and the checkpoint to resume from (the weights of the completed steps; the failed
    step's accumulated gradients were never applied)."""
    from transformers.trainer_utils import get_last_checkpoint
    out = trainer.args.output_dir
    last = get_last_checkpoint(out) if out and os.path.isdir(out) else None
    done = trainer.state.global_step
    if last:
        kept = (f'The last checkpoint, {last}, is kept: once the server answers again, resume with '
                f'--resume_from_checkpoint {last}')
    else:
        kept = (f'No checkpoint was saved before it ({done} step(s) done; --save_strategy '
                f'{getattr(trainer.args.save_strategy, "value", trainer.args.save_strategy)}, --save_steps '
                f'{trainer.args.save_steps}): save more often against a remote teacher')
    return f'the teacher server failed during step {done + 1}: {error}. {kept}'
