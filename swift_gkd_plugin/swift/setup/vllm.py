"""``swift rlhf --use_vllm true`` before anything loads: the checks that only ``swift rlhf`` needs (a launcher for
colocate mode, a GPU for server mode); the checks and the environment resolver shared with ``megatron rlhf`` are in
:mod:`swift_gkd_plugin.rollout.colocated_vllm`. Framework-free, but in the adapter: the tests' stand-in for the NCCL
weight sync registers itself here by this module's name (``tests/harness/rollout_cpu.py``).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import List

from swift_gkd_plugin.options.flags import FlagError

#: ``bench_quality.py --preset staleness`` (5 seeds, 120 steps): exact match at K 4 minus the synchronous run's, paired
#: by seed, mean ± std, for --beta 1 and --beta 0 (docs_en/vllm.md, quality under staleness)
STALE_RKL_LOSS = '-0.061 ± 0.113'
STALE_FKL_LOSS = '+0.026 ± 0.094'


def stale_sample_warnings(args) -> List[str]:
    """``--async_generate true --gkd_max_staleness K`` > 1 with a divergence weighted by the student (``jsd`` at
    ``--beta`` > 0.5, ``skew_rkl``): warned, not refused. Measured with ``benchmarks/bench_quality.py --preset
    staleness`` (docs_en/vllm.md, quality under staleness); AsyncOPD (arXiv 2606.24143) reports reverse KL vulnerable
    to stale samples and forward KL robust."""
    k = int(getattr(args, 'gkd_max_staleness', 1) or 1)
    if not getattr(args, 'async_generate', False) or k <= 1:
        return []
    divergence, beta = getattr(args, 'gkd_divergence', 'jsd'), getattr(args, 'beta', None)
    if divergence == 'jsd' and beta is not None and beta > 0.5:
        loss = f'--beta {beta:g} ({"" if beta == 1 else "mostly "}reverse KL)'
    elif divergence == 'skew_rkl':
        loss = '--gkd_divergence skew_rkl (reverse KL)'
    else:
        return []
    return [f'--async_generate true --gkd_max_staleness {k} with {loss}: samples up to {k} weight versions old, '
            'and reverse KL is reported vulnerable to stale samples (AsyncOPD). On the tiny quality benchmark at K 4 '
            f'it had the lowest exact match of the grid, {STALE_RKL_LOSS} against the synchronous run paired by seed '
            f'(5 seeds: within the spread, not significant), where forward KL (--beta 0) had {STALE_FKL_LOSS} and K 1 '
            'changed neither (docs_en/vllm.md, quality under staleness). --beta 0 or --gkd_max_staleness 1 avoid it']


def check_vllm_launcher(args) -> None:
    """Colocate mode builds vLLM in every training process with torchrun's rank variables (ms-swift's
    ``external_launcher``): without a launcher it fails with ``KeyError: 'RANK'`` after the models loaded."""
    if args.use_vllm and args.vllm_mode == 'colocate' and 'RANK' not in os.environ:
        raise FlagError('--use_vllm true --vllm_mode colocate runs vLLM inside each training process, started by '
                        'torchrun: set NPROC_PER_NODE (e.g. NPROC_PER_NODE=1 swift rlhf ..., or the number of '
                        'GPUs) so that swift launches it')


#: whether a stand-in for the NCCL weight sync that works without CUDA is installed in this process: set only through
#: :func:`allow_server_mode_without_cuda`, which the test suite's gloo stand-in calls (``tests/harness/rollout_cpu.py``,
#: never in a user's process)
_SERVER_SYNC_WITHOUT_CUDA = False


def allow_server_mode_without_cuda() -> None:
    """Lets :func:`check_vllm_server_mode` pass without CUDA: for a process that swapped ms-swift's NCCL weight sync for
    one that runs on the CPU (the test suite's gloo stand-in registers itself here)."""
    global _SERVER_SYNC_WITHOUT_CUDA
    _SERVER_SYNC_WITHOUT_CUDA = True


def check_vllm_server_mode(args) -> None:
    """ms-swift 4.6 syncs the student's weights to a ``swift rollout`` server through vLLM's ``PyNcclCommunicator``
    (or what it swaps in for Ascend or Kunlun devices), and ``swift rollout`` refuses to start without a device. Without
    CUDA only the tests pass, whose processes run with a gloo stand-in for that communicator installed (it calls
    :func:`allow_server_mode_without_cuda`; never in a user's process)."""
    if not (args.use_vllm and args.vllm_mode == 'server'):
        return
    import torch
    if torch.cuda.is_available() or _SERVER_SYNC_WITHOUT_CUDA:
        return
    raise FlagError('--vllm_mode server needs a CUDA GPU here: ms-swift syncs the student\'s weights to the '
                    'rollout server over NCCL, and swift rollout needs a GPU too. On this machine use '
                    '--vllm_mode colocate (vLLM\'s CPU build) or --use_vllm false')


def check_vllm_tensor_parallel_size(args) -> None:
    """Colocate mode splits the training processes into vLLM groups of ``--vllm_tensor_parallel_size``, and ms-swift
    refuses a size that does not divide their number (``rlhf_trainers/rollout_mixin.py``, a traceback once both
    models are loaded). The number is torchrun's ``WORLD_SIZE`` (the launcher sets rank 0's), 1 without a launcher."""
    if not (args.use_vllm and args.vllm_mode == 'colocate'):
        return
    size, processes = args.vllm_tensor_parallel_size, int(os.environ.get('WORLD_SIZE') or 1)
    if processes % size:
        divisors = [d for d in range(1, processes + 1) if processes % d == 0]
        raise FlagError(f'--vllm_tensor_parallel_size {size} does not divide the {processes} training process'
                        f'{"es" if processes > 1 else ""} (NPROC_PER_NODE x NNODES): colocate mode splits them into '
                        f'vLLM groups of that size (allowed: {", ".join(map(str, divisors))})')


def check_vllm_rollout(args) -> None:
    """With ``--use_vllm true``: its mode's needs (:func:`check_vllm_server_mode`) and tensor-parallel size
    (:func:`check_vllm_tensor_parallel_size`)."""
    if args.use_vllm:
        check_vllm_server_mode(args)
        check_vllm_tensor_parallel_size(args)


@contextmanager
def rollout_server_named(args):
    """ms-swift's connection to the ``swift rollout`` server (rank 0), which raises a ``ConnectionError`` traceback
    when none answers within ``--vllm_server_timeout``: one line naming the address flags instead."""
    import requests
    try:
        yield
    except (ConnectionError, requests.ConnectionError) as exc:
        if args.rlhf_type != 'gkd':
            raise
        where = (f'--vllm_server_base_url {" ".join(args.vllm_server_base_url)}' if args.vllm_server_base_url
                 else f'--vllm_server_host {" ".join(map(str, args.vllm_server_host))} --vllm_server_port '
                 f'{" ".join(map(str, args.vllm_server_port))}')
        raise FlagError(f'{where}: no rollout server answered within --vllm_server_timeout '
                        f'{args.vllm_server_timeout:g} s ({exc}): start it first (swift rollout --model <the student> '
                        '...) on devices of its own, or correct the address') from exc


def check_async_generate(args) -> None:
    """``--async_generate true`` (:mod:`swift_gkd_plugin.swift.rollout.prefetch`): the next on-policy step is sampled on
    a rollout server while this one trains, one optimizer step per generation batch; what it cannot run beside is
    refused."""
    if not args.async_generate:
        return
    if not (args.use_vllm and args.vllm_mode == 'server'):
        raise FlagError('--async_generate true samples the next step on a rollout server while this one trains: it '
                        'needs --use_vllm true --vllm_mode server (swift rollout on devices of its own); a colocated '
                        'or transformers sampler shares the training devices (allowed there: --async_generate false)')
    if args.lmbda == 0:
        raise FlagError('--async_generate true with --lmbda 0: no step samples from the student, nothing to prefetch '
                        '(allowed: --lmbda > 0, or --async_generate false)')
    refused = [(int(getattr(args, 'sequence_parallel_size', 1) or 1) > 1,
                f'--sequence_parallel_size {getattr(args, "sequence_parallel_size", 1)}'),
               (args.multi_turn_scheduler is not None, f'--multi_turn_scheduler {args.multi_turn_scheduler}'),
               (bool(getattr(args, 'gkd_skd_top_k', None)), f'--gkd_skd_top_k {getattr(args, "gkd_skd_top_k", None)}')]
    spg, ga = getattr(args, 'steps_per_generation', None), args.gradient_accumulation_steps
    refused.append((spg is not None and ga is not None and spg != ga, f'--steps_per_generation {spg}'))
    for given, flag in refused:
        if given:
            raise FlagError(f'--async_generate true does not run beside {flag} yet (allowed: --async_generate false): '
                            'it prefetches one whole generation batch per optimizer step, sampled in one call to the '
                            'rollout server')
