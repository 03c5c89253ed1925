"""``--async_generate true``: the next generation batch is sampled on the rollout server (``--vllm_mode server``) with
the last synced weights while the current one trains.

In: the next optimizer step's rows, read one step ahead of the trainer (:meth:`PrefetchMixin.get_batch_samples`).
Out: that step's on-policy samples, each batch with the weight version it was sampled with (``gkd/staleness``).

At the start of generation step ``g`` the trainer takes step ``g``'s samples (sampled with the weights of step
``g - 1``), syncs the weights of step ``g`` to the server and sends it step ``g + 1``'s prompts; the server samples
them while step ``g`` trains, whatever step ``g``'s own mode. So every on-policy step but the first trains on samples
one weight version old (ms-swift's one step); off-policy and seq_kd steps run as without ``--async_generate``. The
rows, their order and each step's mode are those of the synchronous run: only the weights that sampled differ. A
checkpoint keeps the samples of its next step, so a resumed run trains what the uninterrupted run trained.
"""
from __future__ import annotations

import os
import pickle
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import List, Optional

from accelerate.utils import broadcast_object_list, gather_object
from swift.utils import get_logger

from swift_gkd_plugin.core import Mode
from swift_gkd_plugin.core.modes import choose_mode
from swift_gkd_plugin.swift.step.token_metrics import add_token_sum

logger = get_logger()
SAVED = 'gkd_prefetched.pkl'  # in a checkpoint: the server's samples of its next step (rank 0's file)


@dataclass
class Prefetched:
    """One generation batch sampled ahead: ``step`` it is for, ``version`` (optimizer steps in the weights that sampled
    it), the server's outputs for every rank (rank 0; others None) and the requests each rank sent."""
    step: int
    version: int
    lengths: List[int]
    future: Optional[Future] = None
    outputs: Optional[list] = field(default=None)
    prompts: Optional[List[str]] = None  # this rank's prompts, to check against the step's own rows

    def result(self) -> list:
        if self.outputs is None and self.future is not None:
            self.outputs = self.future.result()
        return self.outputs


class PrefetchMixin:
    """The rows one optimizer step ahead, their samples prefetched on the server, taken by the step they are for."""

    @staticmethod
    def take_async_flag(args) -> bool:
        """``--async_generate`` is the plugin's to run: ms-swift's trainer would start its own GRPO prefetch (a
        callback and a queue its ``_fast_infer`` reads) when it sees the flag, so the trainer's arguments hold
        False and the plugin keeps the value."""
        value, args.async_generate = bool(getattr(args, 'async_generate', False)), False
        return value

    def _setup_prefetch(self, on: bool) -> None:
        self._prefetch_on = on
        self._request_step = None  # the step a request config is made for, when not the current one
        self._ahead = (None, [])  # (the epoch's iterator, the batches already read for the next optimizer step)
        self._next_rows = None  # the next generation batch's rows on this rank
        self._prefetched: Optional[Prefetched] = None
        self._prefetch_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix='gkd-prefetch') \
            if self._prefetch_on else None
        self._last_rollout_start = None
        if self._prefetch_on and self.args.process_index == 0:
            logger.info('swift_gkd_plugin: --async_generate true: each on-policy step\'s samples are drawn on the '
                        'rollout server while the step before trains, with its weights (one version old: '
                        'gkd/staleness); the rows and modes are those of the synchronous run')

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The Trainer's batches of this optimizer step, and (async) the next step's read one step early."""
        if not self._prefetch_on:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        source, read = self._ahead
        read = list(read) if source is epoch_iterator else []
        batches, read = read[:num_batches], read[num_batches:]
        batches += _take(epoch_iterator, num_batches - len(batches))
        following = int(self.state.global_step) + 1  # the optimizer step after this one
        if self.state.max_steps <= 0 or following < self.state.max_steps:
            read += _take(epoch_iterator, self.args.gradient_accumulation_steps - len(read))
        self._ahead = (epoch_iterator, read)
        self._next_rows = read[0] if read else None
        return batches, self._get_num_items_in_batch(batches, device)

    # --- the sampling side ------------------------------------------------------------------------------------------

    def _student_samples(self, samples, step: int):
        """Step ``step``'s on-policy samples: prefetched ones where there are, else sampled now."""
        prefetched = self._take_prefetched(step)
        if prefetched is None:
            return self._generate_completions(samples)
        samples = self._preprocess_inputs(samples)
        lengths = gather_object([len(samples)])
        same = prefetched.prompts is None or prefetched.prompts == _prompts(samples)
        if lengths != prefetched.lengths or not all(gather_object([same])):
            # the step's rows are not those read ahead (a row replaced since): sampled now rather than mixed up
            logger.warning(f'swift_gkd_plugin: the samples prefetched for step {step} are not for its rows (a row '
                           'was replaced since): sampled now')
            return self._generate_completions(samples)
        outputs = prefetched.result() if self.accelerator.is_main_process else [None] * sum(lengths)
        outputs = broadcast_object_list(outputs, from_process=0)
        start = sum(lengths[:self.accelerator.process_index])
        staleness = step - prefetched.version
        metrics = self.custom_metrics['train']
        add_token_sum(metrics['gkd/staleness'], float(staleness), 1)
        self._staleness_max = max(getattr(self, '_staleness_max', None) or 0, staleness)
        return self._postprocess_rollout_outputs(samples, outputs[start:start + lengths[self.accelerator.process_index]])

    def _take_prefetched(self, step: int) -> Optional[Prefetched]:
        """The batch prefetched for ``step`` (waited for: ``gkd/sample_wait_s``), or one a checkpoint kept."""
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is None:
            prefetched = self._load_prefetched(step)
        if prefetched is None or prefetched.step != step:
            self._wait(prefetched)
            return None
        self._wait(prefetched)
        return prefetched

    def _wait(self, prefetched: Optional[Prefetched]) -> None:
        """Wait until the server is done with ``prefetched`` (nothing may sync while it samples)."""
        if prefetched is None or prefetched.future is None:
            return
        started = time.perf_counter()
        prefetched.result()
        waited = time.perf_counter() - started
        add_token_sum(self.custom_metrics['train']['gkd/sample_wait_s'], waited, 1)

    def _prefetch_next(self, step: int) -> None:
        """Send the next step's prompts to the server when that step is on-policy: the weights of this step synced
        first (after any batch still sampling), then sampled in the background (rank 0 talks to the server)."""
        if not self._prefetch_on or self._next_rows is None:
            return
        rows, self._next_rows = self._next_rows, None
        following = step + 1
        if choose_mode(self.args.seed, following, self.args.lmbda, self.args.seq_kd) is not Mode.ON_POLICY:
            return
        self._wait(self._prefetched)
        samples = self._preprocess_inputs(self.to_samples(rows))
        requests = self.samples2requests(samples)
        lengths = gather_object([len(requests)])
        all_requests = gather_object(requests)
        if self._last_loaded_step != self.state.global_step:
            self._move_model_to_vllm(skip_async_check=True)
            self._last_loaded_step = self.state.global_step
        # the request config of the step it samples (its mode's budget, its seeds)
        saved, (self._gkd_mode, self._request_step) = (self._gkd_mode, self._request_step), (Mode.ON_POLICY, following)
        try:
            config = self._get_request_config()
        finally:
            self._gkd_mode, self._request_step = saved
        future = None
        if self.accelerator.is_main_process:
            future = self._prefetch_pool.submit(self._engine_infer, infer_requests=all_requests,
                                                request_config=config)
        self._prefetched = Prefetched(following, int(self.state.global_step), lengths, future,
                                      prompts=_prompts(samples))

    # --- checkpoints ------------------------------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        """A checkpoint also keeps the samples prefetched for its next step (rank 0 holds them): a resumed run trains
        them, as the uninterrupted run does."""
        result = super()._save_checkpoint(model, trial)
        prefetched = self._prefetched
        if prefetched is not None and self.accelerator.is_main_process:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
            folder = os.path.join(self._get_output_dir(trial=trial),
                                  f'{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}')
            self._wait(prefetched)
            with open(os.path.join(folder, SAVED), 'wb') as f:
                pickle.dump({'step': prefetched.step, 'version': prefetched.version, 'lengths': prefetched.lengths,
                             'outputs': prefetched.result()}, f)
        return result

    def _load_prefetched(self, step: int) -> Optional[Prefetched]:
        """The prefetched batch of the checkpoint this run resumed from, if it is for ``step`` (read once)."""
        path = getattr(self, '_resumed_from', None)
        self._resumed_from = None
        if not path or not os.path.exists(os.path.join(path, SAVED)):
            return None
        lengths = None
        if self.accelerator.is_main_process:
            with open(os.path.join(path, SAVED), 'rb') as f:
                saved = pickle.load(f)
            lengths = [saved['step'], saved['version'], saved['lengths'], saved['outputs']]
        saved_step, version, lengths, outputs = broadcast_object_list(
            lengths if lengths is not None else [None] * 4, from_process=0)
        if saved_step != step:
            return None
        return Prefetched(step, version, lengths, outputs=outputs if self.accelerator.is_main_process else None)

    def _load_rng_state(self, checkpoint):
        self._resumed_from = checkpoint if self._prefetch_on else None
        return super()._load_rng_state(checkpoint)

    def _log_prefetch(self, logs) -> None:
        """``gkd/staleness_max``: the most weight versions a step's samples lagged since the last log (the mean is
        ``gkd/staleness``)."""
        if getattr(self, '_staleness_max', None) is not None:
            logs['gkd/staleness_max'] = self._staleness_max
            self._staleness_max = None


def _prompts(samples) -> List[str]:
    import json
    return [json.dumps(s.messages, sort_keys=True, default=str) for s in samples]


def _take(iterator, n: int) -> list:
    out = []
    for _ in range(max(n, 0)):
        try:
            out.append(next(iterator))
        except StopIteration:
            break
    return out
