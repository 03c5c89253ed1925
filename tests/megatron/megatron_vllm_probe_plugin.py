"""A probe for ``megatron rlhf`` vLLM colocate runs (``--external_plugins``), one json line per event in the file
named by ``GKD_TEST_VLLM_PROBE_LOG``:

* ``sync``: after each weight sync, vLLM's greedy continuation of two fixed prompts and the Megatron model's own
  argmax at each position of that continuation (one forward, eval mode). Equal lists mean vLLM samples from the
  weights being trained (``tests/vllm_probe_plugin.py`` does the same for ``swift rlhf``);
* ``rollout``: the token ids vLLM returned for the step's prompts;
* ``scored``: the response token ids of the samples the step then trains on (teacher signal, loss);
* ``model_sampler``: a step that sampled from the Megatron model instead (none is expected)."""
import json
import os
import sys

import torch
from swift.megatron.utils import forward_step_helper, get_padding_to
from swift.utils import to_device

from swift_gkd_plugin.megatron.rollout.samples import collate_for_forward
from swift_gkd_plugin.megatron.trainer import GKDPluginMegatronTrainer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
from vllm_greedy import PROMPTS, vllm_greedy  # noqa: E402

_originals = {name: getattr(GKDPluginMegatronTrainer, name)
              for name in ('_move_model_to_vllm', '_colocate_rollout', '_score', '_sample_from_model')}


def _write(self, kind, **row):
    with open(os.environ['GKD_TEST_VLLM_PROBE_LOG'], 'a') as f:
        f.write(json.dumps({'kind': kind, 'step': int(self.state.iteration),
                            'rank': torch.distributed.get_rank(), **row}) + '\n')


@torch.no_grad()
def _megatron_argmax_along(self, continuations):
    """The Megatron model's argmax after each token of ``prompt + continuation`` (TP 1: the whole vocabulary)."""
    model = self.unwrapped_models[0]
    was_training = model.training
    model.eval()
    try:
        batch, _ = collate_for_forward(self.template, [p + c for p, c in zip(PROMPTS, continuations)],
                                       get_padding_to(self.args))
        data = self._prepare_batch(to_device(batch, self.device), None)
        data.pop('loss_scale', None)
        data.pop('labels', None)
        logits = forward_step_helper(model, data)[..., :self._real_vocab]
        return [logits[row, len(p) - 1:len(p) + len(c) - 1].argmax(-1).tolist()
                for row, (p, c) in enumerate(zip(PROMPTS, continuations))]
    finally:
        model.train(was_training)


def _move_model_to_vllm(self, *args, **kwargs):
    result = _originals['_move_model_to_vllm'](self, *args, **kwargs)
    lora = self.engine._get_grpo_lora_request() if getattr(self.engine, 'enable_lora', False) else None
    vllm = vllm_greedy(self.engine.engine, int(self.state.iteration), lora)
    _write(self, 'sync', vllm=vllm, megatron=_megatron_argmax_along(self, vllm), lora_request=lora is not None)
    return result


def _colocate_rollout(self, samples, request_config):
    outputs = _originals['_colocate_rollout'](self, samples, request_config)
    _write(self, 'rollout', token_ids=[list(o.response.choices[0].token_ids) for o in outputs])
    return outputs


def _score(self, samples, data_source):
    _write(self, 'scored', data_source=str(data_source.value), token_ids=[_flat(s.response_token_ids) for s in samples])
    return _originals['_score'](self, samples, data_source)


def _flat(ids):
    return [t for item in ids for t in (item if isinstance(item, (list, tuple)) else [item])]


def _sample_from_model(self, samples, teacher):
    _write(self, 'model_sampler', teacher=teacher)
    return _originals['_sample_from_model'](self, samples, teacher)


GKDPluginMegatronTrainer._move_model_to_vllm = _move_model_to_vllm
GKDPluginMegatronTrainer._colocate_rollout = _colocate_rollout
GKDPluginMegatronTrainer._score = _score
GKDPluginMegatronTrainer._sample_from_model = _sample_from_model
