"""Guards a GKD run installs on its trainer: exit code 0 only after training on what the user gave, and faults
named by their cause. One hook, called from the trainer's ``__init__``."""
from __future__ import annotations

from swift.template import MaxLengthError
from swift.utils import get_logger
from transformers import TrainerCallback

from swift_gkd_plugin.core.entropy import EntropyGapWatch
from swift_gkd_plugin.swift.checkpoints import guard_checkpoint_saves
from swift_gkd_plugin.swift.datasets_check import RefuseEmptyEpochs, media_refs

logger = get_logger()


def install_run_guards(trainer) -> None:
    """A training set smaller than one batch is refused at the start; a run whose first logged steps learn nothing
    stops; a checkpoint save that cannot write its files
    names the cause (no space left) and the newest complete checkpoint; a row replaced because it fails to encode is
    named in a warning and counted; an on-policy student whose entropy runs away from the teacher's is warned about."""
    trainer.add_callback(RefuseEmptyEpochs())
    trainer.add_callback(StopWhenNothingIsLearnt())
    trainer.callback_handler.callbacks.insert(0, WarnOnEntropyGap())  # before the callback that writes the logs
    guard_checkpoint_saves(trainer)
    warn_replaced_rows(trainer)


class StopWhenNothingIsLearnt(TrainerCallback):
    """Stops a run whose first :attr:`STEPS` logged training steps (fewer if ``--max_steps`` is smaller) all have a
    loss and a gradient norm of exactly 0: it learns nothing, whatever the cause (the student as its own teacher
    without a privileged prompt on data the pre-load check cannot read, a shared base with a zero adapter, no valid
    teacher position), and would otherwise end with exit code 0. Exactly 0, not small: a real loss is never exactly
    0 on every token of several steps."""
    STEPS = 3

    def __init__(self):
        self.seen = 0
        self.zero = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or 'loss' not in logs or 'grad_norm' not in logs or self.seen >= self.STEPS:
            return
        self.seen += 1
        self.zero += float(logs['loss']) == 0.0 and float(logs['grad_norm']) == 0.0
        needed = min(self.STEPS, args.max_steps) if args.max_steps and args.max_steps > 0 else self.STEPS
        if self.seen == needed and self.zero == needed:
            raise RuntimeError(
                f'swift_gkd_plugin: the first {needed} logged step(s) have loss 0 and grad_norm 0 exactly: the run '
                'learns nothing, so it stops here instead of ending with exit code 0. Usual causes: the teacher sees '
                'exactly what the student sees (no --teacher_model and no teacher_prompt column; a shared base with '
                'a zero LoRA adapter: pass --adapters or a teacher_prompt), or no position has a teacher signal.')


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
