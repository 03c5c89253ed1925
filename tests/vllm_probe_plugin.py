"""A probe for vLLM colocate runs (``--external_plugins``): after each weight sync, vLLM's greedy continuation of
two fixed prompts and the trainer's own model's argmax at each position of that continuation (one forward, eval
mode), one json line per sync in the file named by ``GKD_TEST_VLLM_PROBE_LOG``. Equal lists mean the student's
greedy continuation under transformers is vLLM's: the engine samples from the weights being trained."""
import json
import os

import torch

from swift_gkd_plugin.swift.trainer import GKDPluginTrainer
from vllm_greedy import PROMPTS, vllm_greedy  # noqa: E402 (tests/, on the path as the plugin's folder)

_sync = GKDPluginTrainer._move_model_to_vllm


@torch.no_grad()
def _argmax_along(model, continuations):
    was_training = model.training
    model.eval()
    try:
        return [model(input_ids=torch.tensor([p + c]), use_cache=False).logits[0, len(p) - 1:-1].argmax(-1).tolist()
                for p, c in zip(PROMPTS, continuations)]
    finally:
        model.train(was_training)


_post_load_passes = [0]  # calls of vLLM's whole-model post-load pass (ms-swift's finish_vllm_weight_reload makes it)
_syncs = [0]


def _count_post_load_passes():
    from vllm.model_executor.model_loader import utils
    original = utils.process_weights_after_loading

    def counted(*args, **kwargs):
        _post_load_passes[0] += 1
        return original(*args, **kwargs)

    utils.process_weights_after_loading = counted


def _vllm_name(name):
    return name.removeprefix('base_model.model.').replace('.base_layer', '')


@torch.no_grad()
def _merged_reference(model):
    """A LoRA student's merged base weights as ms-swift's in-place merge computes them (on a copy), by the names vLLM
    is sent; and the student's own base weights, to check the sync leaves them as they were."""
    import copy
    from swift.rlhf_trainers.utils import patch_lora_merge
    base = {n: p.detach().clone() for n, p in model.named_parameters() if 'base_layer' in n}
    twin = copy.deepcopy(model)
    with patch_lora_merge(twin):
        twin.merge_adapter()
    merged = {_vllm_name(n): p.detach().clone() for n, p in twin.named_parameters() if 'base_layer' in n}
    return merged, base


def _recording_loads(vllm_model, names, sent):
    """vLLM's ``load_weights`` records (a copy of) each tensor named in ``names`` it is given."""
    load = vllm_model.load_weights

    def load_weights(weights):
        def recorded():
            for name, tensor in weights:
                if name in names:
                    sent[name] = tensor.detach().clone()
                yield name, tensor
        return load(recorded())

    vllm_model.load_weights = load_weights
    return lambda: vars(vllm_model).pop('load_weights', None)


def _probed_sync(self, *args, **kwargs):
    if not _syncs[0]:
        _count_post_load_passes()
    _syncs[0] += 1
    before = _post_load_passes[0]
    model = self.accelerator.unwrap_model(self.model)
    lora = {}
    merges = hasattr(model, 'peft_config') and not self.rollout_enable_lora and self.vllm_mode == 'colocate'
    if merges:  # the merged weights vLLM gets must be ms-swift's merge, bit for bit, and the student left as it was
        expected, base = _merged_reference(model)
        sent = {}
        restore = _recording_loads(self.engine.inner_model, expected, sent)
    try:
        result = _sync(self, *args, **kwargs)
    finally:
        if merges:
            restore()
    if merges:
        unmerged = {_vllm_name(n): t for n, t in base.items()}
        lora = {'merged_sent': sorted(sent) == sorted(expected) and all(torch.equal(sent[n], expected[n])
                                                                         for n in expected),
                'merged_differs_from_base': any(not torch.equal(sent[n], unmerged[n]) for n in sent),
                'base_unchanged': all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)}
    step = int(self.state.global_step)
    request = self.engine._get_grpo_lora_request() if getattr(self.engine, 'enable_lora', False) else None
    vllm = vllm_greedy(self.engine.engine, step, request)
    hf = _argmax_along(model, vllm)
    with open(os.environ['GKD_TEST_VLLM_PROBE_LOG'], 'a') as f:
        f.write(json.dumps({'step': step, 'rank': self.accelerator.process_index, 'vllm': vllm, 'transformers': hf,
                            'lora_request': request is not None,
                            'post_load_passes': _post_load_passes[0] - before, **lora}) + '\n')
    return result


def _failing_load(self, state_dict):
    """GKD_TEST_VLLM_FAIL_SYNC=N: sync N (from 1) loads half of its first parameter group, then fails."""
    if _syncs[0] == int(os.environ['GKD_TEST_VLLM_FAIL_SYNC']):
        items = list(state_dict.items())
        self.engine.inner_model.load_weights(items[:len(items) // 2])
        raise RuntimeError('injected: the sync failed half-way')
    return _load(self, state_dict)


def _rng_fingerprint():
    import hashlib
    state = torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.get_rng_state()
    return hashlib.sha1(state.numpy().tobytes()).hexdigest()[:16]


def _logged_rollout(self, samples, request_config):
    """GKD_TEST_VLLM_SEED_LOG: every vLLM call (one per turn) with the step, its request seed, the fingerprint of the
    process's default generator before the call and whether vLLM drew from it, and the token ids it sampled."""
    before = _rng_fingerprint()
    outputs = _colocate_rollout(self, samples, request_config)
    tokens = [list(c.token_ids or []) for o in outputs for c in o.response.choices]
    with open(os.environ['GKD_TEST_VLLM_SEED_LOG'], 'a') as f:
        f.write(json.dumps({'step': int(self.state.global_step), 'rank': self.accelerator.process_index,
                            'seed': request_config.seed, 'requests': len(samples), 'rng': before,
                            'drew_from_rng': _rng_fingerprint() != before, 'tokens': tokens}) + '\n')
    return outputs


GKDPluginTrainer._move_model_to_vllm = _probed_sync
if os.environ.get('GKD_TEST_VLLM_SEED_LOG'):
    _colocate_rollout = GKDPluginTrainer._colocate_rollout
    GKDPluginTrainer._colocate_rollout = _logged_rollout
if os.environ.get('GKD_TEST_VLLM_FAIL_SYNC'):
    _load = GKDPluginTrainer._load_state_dict_to_vllm
    GKDPluginTrainer._load_state_dict_to_vllm = _failing_load
