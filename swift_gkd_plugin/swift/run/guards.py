"""Guards a GKD run installs on its trainer: exit code 0 only after training on what the user gave, and faults
named by their cause. One hook, called from the trainer's ``__init__``."""
from __future__ import annotations

import inspect
import math
import os
import re
from typing import Optional

import torch
from swift.template import MaxLengthError
from swift.utils import get_logger
from transformers import TrainerCallback

from swift_gkd_plugin.core.entropy import EntropyGapWatch
from swift_gkd_plugin.core.guards.non_finite import loss_terms, non_finite_gradient_message
from swift_gkd_plugin.core.guards.same_weights import (copy_of_the_student, copy_of_the_student_cause,
                                                      privileged_row_count)
from swift_gkd_plugin.swift.run.records import LogResume
from swift_gkd_plugin.swift.setup.checkpoints import guard_checkpoint_saves, guard_log_writes
from swift_gkd_plugin.data.dataset_rows import media_refs
from swift_gkd_plugin.swift.setup.datasets import RefuseEmptyEpochs

logger = get_logger()


def install_run_guards(trainer) -> None:
    """A training set smaller than one batch is refused at the start; a run whose steps learn nothing stops
    (:class:`NothingLearnt`); a checkpoint save, or a step's logs, that cannot write its files
    names the cause (no space left) and the newest complete checkpoint; a row replaced because it fails to encode is
    named in a warning and counted; a NaN or infinite loss stops the run naming its source (the trainer's loss
    calls :func:`~swift_gkd_plugin.core.guards.non_finite.non_finite_loss_message`), and a NaN or infinite gradient
    norm under a finite loss (:func:`guard_gradient_norm`); an on-policy student whose entropy runs away from the
    teacher's is warned about."""
    trainer.add_callback(RefuseEmptyEpochs())
    trainer._nothing_learnt = NothingLearnt(trainer)  # fed by the trainer's compute_loss
    trainer.add_callback(trainer._nothing_learnt)
    trainer.callback_handler.callbacks.insert(0, WarnOnEntropyGap(trainer.args))  # before the callback writing logs
    guard_checkpoint_saves(trainer, RunError)
    guard_log_writes(trainer, RunError)
    trainer.add_callback(LogResume())  # the checkpoint and step a resumed run continues from
    guard_gradient_norm(trainer)
    warn_replaced_rows(trainer)


class RunError(RuntimeError):
    """A run stopped for a cause its message names; the trainer prints it as one ``swift rlhf: error:`` line (exit
    code 1, no traceback)."""


#: overflowing steps in a row that a loss scaler (fp16) gets to find its scale: halved each time, 2**16 -> 2**-16
SCALER_STEPS = 32
#: skipped (non-finite gradient) steps in a row that stop a run which had learnt before; each one is warned of
SKIPPED_STEPS = 8


def _loss_scaled(trainer) -> bool:
    """fp16 training with a loss scaler (torch AMP's GradScaler on a GPU, DeepSpeed's): it skips an overflowing step
    and lowers the scale, by design."""
    if getattr(trainer.accelerator, 'scaler', None) is not None:
        return True
    plugin = getattr(trainer.accelerator.state, 'deepspeed_plugin', None)
    fp16 = (plugin.deepspeed_config.get('fp16') or {}).get('enabled') if plugin is not None else None
    return fp16 is True or (fp16 == 'auto' and bool(trainer.args.fp16))


def guard_gradient_norm(trainer) -> None:
    """A NaN or infinite gradient norm stops the run (:class:`RunError`) before its optimizer step, naming the step
    and the loss terms present: ms-swift drops a NaN gradient (the weights stay as they are) and the loss guard
    sees nothing when only the backward overflows (``--gkd_divergence_coef 1e38``: loss finite, every grad_norm
    nan, exit code 0). Without a loss scaler it stops at once while no step of the run has had a finite norm (nothing
    learnt yet: the overflow is the run's, not a step's); after that each skipped step is a counted warning and
    :data:`SKIPPED_STEPS` in a row stop it (under a loss scaler, whose skips are by design, :data:`SCALER_STEPS`).
    Wraps transformers' ``Trainer._get_grad_norm`` (transformers 5), which every optimizer step calls; the norm is
    read once a step, right after ms-swift's own read of it (its NaN skip), so no wait is added."""
    original = getattr(trainer, '_get_grad_norm', None)
    if original is None:  # an older transformers computes the norm inline: no guard
        return
    overflows = []  # the steps in a row with a non-finite norm
    state = {'learnt': False, 'skipped': 0}

    def _get_grad_norm(model, grad_norm=None):
        norm = original(model, grad_norm=grad_norm)
        if norm is None or math.isfinite(float(norm)):
            overflows.clear()
            state['learnt'] = True
            return norm
        overflows.append(trainer.state.global_step + 1)
        state['skipped'] += 1
        scaled = _loss_scaled(trainer)
        if (not state['learnt'] and not scaled) or len(overflows) >= (SCALER_STEPS if scaled else SKIPPED_STEPS):
            why = ': the fp16 loss scaler skipped each' if scaled else ''
            step = overflows[-1] if len(overflows) == 1 else f'{overflows[-1]} ({len(overflows)} steps in a row{why})'
            raise RunError(non_finite_gradient_message(step, float(norm), loss_terms(trainer.args)))
        if not scaled:
            logger.warning(f'swift_gkd_plugin: the gradient norm is {float(norm)} on step {overflows[-1]}: ms-swift '
                           f'skips its update ({state["skipped"]} step(s) skipped so far, {len(overflows)} in a row; '
                           f'{SKIPPED_STEPS} in a row stop the run)')
        return norm

    trainer._get_grad_norm = _get_grad_norm


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
        self.zero_steps = self.evidence = self.empty_steps = 0
        self.privileged_rows = self.rows = None  # counted when training starts
        self._reset()

    def _reset(self):
        self.loss, self.viewed, self.tokens = 0.0, False, None

    def add(self, loss, inputs) -> None:
        """One training micro-batch: its loss, whether a row had a privileged teacher view (device tensors, no
        host read) and its step's response tokens over every rank (a number the rollout counted)."""
        if not self.armed:
            return
        self.loss = self.loss + loss.detach().abs().sum()
        if inputs.get('gkd_step_tokens') is not None:
            self.tokens = float(inputs['gkd_step_tokens'])
        student, teacher = inputs['model_inputs']['input_ids'], inputs['teacher_model_inputs']['input_ids']
        self.viewed = self.viewed | (student.shape != teacher.shape or (student != teacher).any())

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.armed:  # (--gkd_score_only: nothing is trained, by design)
            return
        counted = privileged_row_count(self.trainer.train_dataset)
        if counted is None:
            return  # unknown: only steps that drew a privileged view count
        self.privileged_rows, self.rows = counted
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
        empty = self.tokens == 0  # no response token on any rank
        self._reset()
        if args.world_size > 1:
            torch.distributed.all_reduce(values)
        loss, viewed = values.tolist()
        if loss != 0:
            self.armed = False  # it learns
            return
        self.zero_steps += 1
        self.empty_steps += empty
        self.evidence += bool(viewed) or self.privileged_rows == 0 or empty
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
                f'otherwise end with exit code 0. Cause: '
                f'{zero_loss_cause(self.trainer, empty=self.empty_steps == self.zero_steps)}')


def zero_loss_cause(trainer, empty: bool = False) -> str:
    """Why a step's loss is 0 exactly: rows cut to no response token at ``--max_length``; steps without a response
    token (``empty``: their completions were empty or masked out); else what the trainer distils from."""
    emptied = getattr(getattr(trainer, '_replaced_rows', None), 'emptied', 0)
    if emptied:
        cap = trainer._length_cap  # (rollout/max_length.py: it counted them)
        max_length, strategy = cap.max_length, cap.given
        return (f'--max_length {max_length} (--truncation_strategy {strategy}) cut every response token away from '
                f'{emptied} row(s) on this process (their prompts fill --max_length; gkd/cut_empty_rows), leaving '
                'nothing to distil: raise --max_length above the prompts\' length')
    if empty:
        return ('those steps held no response token to learn from: every completion was empty or masked out of the '
                'loss (a multi-turn scheduler whose response_loss_mask is all 0, a sampler that returned no token, '
                'dataset rows without a response), not a teacher that agrees with the student')
    if trainer.use_teacher_api:
        return (f'--teacher_model_server {trainer.teacher_model_server} returns the student\'s distribution at every '
                'response token (the student\'s own model served?)')
    if trainer._teacher_use_disable_adapter:
        return ('the teacher is the student\'s base with its LoRA adapter off, and the adapter is still zero (a fresh '
                'LoRA: its B matrices are 0), so the student is its teacher: start from a trained adapter '
                '(--adapters), give rows a teacher_prompt, or pass another --teacher_model')
    if trainer.teacher.adapter is not None:
        return f'--teacher_adapters {trainer.teacher.adapter} changes nothing in the student\'s outputs'
    if trainer.teacher_model is None:
        return ('the teacher is the student itself (no --teacher_model) and saw what the student saw: give rows a '
                'teacher_prompt, or pass --teacher_model')
    if _copy_of_the_student(trainer, other_terms=True):
        return copy_of_the_student_cause(getattr(trainer.accelerator.unwrap_model(trainer.teacher_model), 'model_dir',
                                                 ''))
    return 'the teacher gives the student\'s distribution at every response token'


def _copy_of_the_student(trainer, other_terms: bool = False) -> bool:
    """A separate, whole teacher whose parameters equal the student's (unless another term learns, where
    ``other_terms`` is False)."""
    args = trainer.args
    if (trainer.teacher_model is None or trainer.use_teacher_api or trainer.teacher.partitioned
            or not other_terms and (args.sft_alpha > 0 or args.gkd_rl_coef > 0)):
        return False
    return copy_of_the_student(dict(trainer.accelerator.unwrap_model(trainer.teacher_model).named_parameters()),
                               dict(trainer.accelerator.unwrap_model(trainer.model).named_parameters()))


class WarnOnEntropyGap(TrainerCallback):
    """The warning of :class:`~swift_gkd_plugin.core.entropy.EntropyGapWatch` on the logged training steps that carry
    ``gkd/entropy`` and ``gkd/teacher_entropy`` (on-policy steps), and ``gkd/entropy_gap_warnings`` in the logs
    once it has fired (the count since the start); ``args`` (the trainer's) leaves the remedies in effect out."""

    def __init__(self, args=None):
        self.watch = EntropyGapWatch(args=args)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or 'loss' not in logs:
            return
        message = self.watch.observe(logs)
        if message and state.is_world_process_zero:
            logger.warning(message)


class ReplacedRows(TrainerCallback):
    """The rows the run did not train as given, counted since the start on this process, in the training logs once
    non-zero: ``gkd/replaced_rows`` (failed to encode, replaced by another row), ``gkd/deleted_rows`` (longer than
    ``--max_length`` under ``--truncation_strategy delete``, replaced by another row) and ``gkd/cut_rows`` (encodings
    cut at ``--max_length``: :mod:`swift_gkd_plugin.swift.rollout.max_length`), and of those ``gkd/cut_empty_rows``
    (cut to no response token). Runs before ms-swift's own logging callback, which writes ``logging.jsonl``."""

    def __init__(self):
        self.count = self.deleted = self.cut = self.emptied = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or 'loss' not in logs:
            return
        for key, value in (('gkd/replaced_rows', self.count), ('gkd/deleted_rows', self.deleted),
                           ('gkd/cut_rows', self.cut), ('gkd/cut_empty_rows', self.emptied)):
            if value:
                logs[key] = value


#: rows that fail to encode (or are too long under delete) before any row of the run encodes, that stop the run: a
#: dataset none of whose rows can encode (every image URL unreachable on an offline machine: ~6 s a row with
#: ms-swift's download retries) would otherwise be drawn again and again
FAILED_ROWS = 8
_LENGTH = re.compile(r'Current length of row\((\d+)\)')


class _NoRowEncodes(BaseException):
    """Raised from within a row's encode, which ms-swift's resampling wraps in ``except Exception``: becomes a
    :class:`RunError` once out of it."""


class Failures:
    """Rows that failed to encode: how many, how many of them were too long (and the longest), the first one's error
    and media."""

    def __init__(self):
        self.count = self.too_long = self.longest = 0
        self.first = None

    def add(self, exc: Exception, media, length: Optional[int]) -> None:
        self.count += 1
        self.first = self.first or (exc, media)
        if length is not None:
            self.too_long += 1
            self.longest = max(self.longest, length)

    def message(self, drawn: str, max_length) -> str:
        """Why no row is left to train on: every row drawn too long (the longest), or the first failure."""
        if self.too_long == self.count:
            return (f'{drawn} are all longer than --max_length {max_length} (the longest: {self.longest} tokens), so '
                    '--truncation_strategy delete leaves no row to train on: raise --max_length, or pass '
                    '--truncation_strategy right or left (cut as swift sft cuts)')
        exc, media = self.first
        media = f' (its media: {", ".join(map(str, media))})' if media else ''
        too_long = f', {self.too_long} of them longer than --max_length {max_length}' if self.too_long else ''
        return (f'{drawn} all fail to encode{too_long}, so no row can be trained on; the first: '
                f'{type(exc).__name__}: {exc}{media}')


class EncodeWatch:
    """The rows the trainer's resampling encodes: each failure warned about and counted (:class:`ReplacedRows`), and
    the run stopped (:class:`RunError`, one line) where no row can encode: :data:`FAILED_ROWS` failures before any row
    of the run encoded, or ms-swift's resampling out of draws (:meth:`out_of_draws`)."""

    def __init__(self, counter: ReplacedRows, max_length):
        self.counter, self.max_length = counter, max_length
        self.encoded = 0  # rows encoded since the start
        self.before = Failures()  # before the first row encoded
        self.call = Failures()  # in the current resampling

    def ok(self) -> None:
        self.encoded += 1

    def too_long_row(self, exc: Exception) -> None:
        self.counter.deleted += 1
        if self.counter.deleted == 1:
            logger.warning(f'swift_gkd_plugin: a dataset row is longer than --max_length {self.max_length} ({exc}); '
                           '--truncation_strategy delete: ms-swift trains on another row in its place (said once; '
                           'counted in gkd/deleted_rows)')
        match = _LENGTH.search(str(exc))
        self._failed(exc, [], int(match.group(1)) if match else 0)

    def failed_row(self, exc: Exception, media) -> None:
        self.counter.count += 1
        logger.warning(f'swift_gkd_plugin: a dataset row cannot be encoded ({type(exc).__name__}: {exc}); its '
                       f'media: {media}; ms-swift trains on another row in its place ({self.counter.count} row(s) '
                       'replaced so far)')
        self._failed(exc, media, None)

    def _failed(self, exc: Exception, media, length: Optional[int]) -> None:
        self.call.add(exc, media, length)
        if self.encoded:
            return
        self.before.add(exc, media, length)
        if self.before.count >= FAILED_ROWS:  # past ms-swift's `except Exception` around each encode
            raise _NoRowEncodes(self.before.message(f'the first {self.before.count} rows drawn', self.max_length))

    def out_of_draws(self, rows: int) -> str:
        return self.call.message(f'a batch of {rows} row(s) could not be filled: the {self.call.count} rows that '
                                 'failed', self.max_length)


def warn_replaced_rows(trainer) -> None:
    """ms-swift encodes each batch's rows in the trainer and replaces a row that fails to encode by another one, with
    an INFO line only (an image URL that does not answer, inline media that does not decode: what the pre-load check
    cannot read). Each such row is named here in a warning (its error and media) and counted (:class:`ReplacedRows`);
    rows too long for ``--max_length`` (``MaxLengthError``, ``--truncation_strategy delete``) are counted too, warned
    about once. Where no row can encode the run stops in one line (:class:`EncodeWatch`), not in ms-swift's
    resampling traceback or after minutes of draws."""
    counter = ReplacedRows()
    trainer._replaced_rows = counter  # also counts the rows cut at --max_length (rollout/max_length.py)
    trainer.callback_handler.callbacks.insert(0, counter)
    resample = trainer.resample_encode_failed_inputs
    template = trainer.template
    watch = EncodeWatch(counter, template.max_length)
    # ms-swift's encode retries a failing row 3 times (retry_decorator), on top of its media download's own 3
    # retries: 18 s for each row whose image URL does not answer. Here a row that fails is replaced by another one,
    # so each is encoded once (its download still retried)
    encode_once = inspect.unwrap(type(template).encode)

    def encode_or_warn(row, *args, **kwargs):
        try:
            with torch.inference_mode():
                encoded = encode_once(template, row, *args, **kwargs)
        except MaxLengthError as exc:
            watch.too_long_row(exc)
            raise
        except Exception as exc:
            watch.failed_row(exc, [ref if len(ref) <= 200 else ref[:200] + '...' for _, ref in media_refs(row, {})])
            raise
        watch.ok()
        return encoded

    def resample_and_warn(inputs, *args, **kwargs):
        template.encode = encode_or_warn  # for this call only: the template's other encodes are left alone
        watch.call = Failures()
        try:
            return resample(inputs, *args, **kwargs)
        except _NoRowEncodes as exc:
            raise RunError(str(exc)) from None
        except RuntimeError as exc:  # ms-swift's (or the group resampling's) draws ran out
            if isinstance(exc, RunError) or not watch.call.count:
                raise
            raise RunError(watch.out_of_draws(len(inputs))) from exc
        finally:
            del template.encode

    trainer.resample_encode_failed_inputs = resample_and_warn


def server_failed_message(trainer, error: BaseException, server: str = 'the teacher server') -> str:
    """A server that failed (a teacher server through its retries and ``--teacher_server_wait``, the student's
    rollout server): the step, the server's error, and the checkpoint to resume from (the weights of the completed
    steps; the failed step's accumulated gradients were never applied)."""
    from transformers.trainer_utils import get_last_checkpoint
    out = trainer.args.output_dir
    last = get_last_checkpoint(out) if out and os.path.isdir(out) else None
    done = trainer.state.global_step
    if last:
        when = getattr(error, 'resume_when', 'once the server answers again')
        kept = f'The last checkpoint, {last}, is kept: {when}, resume with --resume_from_checkpoint {last}'
    else:
        kept = (f'No checkpoint was saved before it ({done} step(s) done; --save_strategy '
                f'{getattr(trainer.args.save_strategy, "value", trainer.args.save_strategy)}, --save_steps '
                f'{trainer.args.save_steps}): save more often against a server')
    return f'{server} failed during step {done + 1}: {error}. {kept}'
