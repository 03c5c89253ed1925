"""TEST-ONLY (``--external_plugins``): at the end of training step ``GKD_TEST_OUTPUT_FAULT_AFTER_STEP`` (after its
callbacks' ``on_step_end``, before the step's logs are written and its checkpoint saved) the run's ``--output_dir``
stops taking writes, as ``GKD_TEST_OUTPUT_FAULT`` says: ``fill`` fills its filesystem (a file of zeros written until
the disk is full: for a small tmpfs), ``file`` puts a file where the folder was (the folder removed)."""
import errno
import os
import shutil

from transformers.trainer_callback import CallbackHandler

_STEP = int(os.environ['GKD_TEST_OUTPUT_FAULT_AFTER_STEP'])
_FAULT = os.environ['GKD_TEST_OUTPUT_FAULT']


def _fault(output_dir: str) -> None:
    if _FAULT == 'file':
        shutil.rmtree(output_dir)
        with open(output_dir, 'w') as f:
            f.write('not a folder')
        return
    with open(os.path.join(output_dir, 'filler'), 'wb', buffering=0) as f:
        try:
            while True:
                f.write(b'\0' * 4096)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise


_on_step_end = CallbackHandler.on_step_end


def on_step_end(self, args, state, control):
    control = _on_step_end(self, args, state, control)
    if state.global_step == _STEP:
        _fault(args.output_dir)
    return control


CallbackHandler.on_step_end = on_step_end
