"""A probe for ``--vllm_mode server`` runs (``--external_plugins``): after each weight sync, the rollout server's greedy
continuation of two fixed prompts (through ms-swift's own client, ``/infer/``) and the trainer's own model's argmax at
each position of it (one forward, eval mode), one json line per sync in the file named by
``GKD_TEST_VLLM_PROBE_LOG``. Equal lists mean the server samples from the weights being trained.
``GKD_TEST_KILL_ROLLOUT_SERVER=PID:STEP``: after the sync of step STEP the server's process group is killed."""
import json
import os

import torch
from swift.infer_engine import RequestConfig
from swift.infer_engine.protocol import RolloutInferRequest

from swift_gkd_plugin.swift.trainer import GKDPluginTrainer

PROMPTS = ['abc', 'hello world']
_sync = GKDPluginTrainer._move_model_to_vllm


@torch.no_grad()
def _argmax_along(model, prompt, continuation):
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=torch.tensor([prompt + continuation]), use_cache=False).logits
        return logits[0, len(prompt) - 1:-1].argmax(-1).tolist()
    finally:
        model.train(was_training)


def _probed_sync(self, *args, **kwargs):
    result = _sync(self, *args, **kwargs)
    if self.accelerator.process_index != 0:
        return result
    requests = [RolloutInferRequest(messages=[{'role': 'user', 'content': p}]) for p in PROMPTS]
    config = RequestConfig(temperature=0, max_tokens=12, return_details=True)
    request = self._get_grpo_lora_request() if hasattr(self, '_get_grpo_lora_request') and self.rollout_enable_lora \
        else None
    outputs = self.vllm_client.infer(requests, config, adapter_request=request)
    model = self.accelerator.unwrap_model(self.model)
    rows = []
    for out in outputs:
        response = getattr(out, 'response', out)
        tokens = list(response.choices[0].token_ids)
        rows.append((list(response.prompt_token_ids), tokens))
    server = [t for _, t in rows]
    hf = [_argmax_along(model, p, t) for p, t in rows]
    with open(os.environ['GKD_TEST_VLLM_PROBE_LOG'], 'a') as f:
        f.write(json.dumps({'step': int(self.state.global_step), 'server': server, 'transformers': hf}) + '\n')
    kill = os.environ.get('GKD_TEST_KILL_ROLLOUT_SERVER')
    if kill and int(kill.split(':')[1]) == int(self.state.global_step):
        import signal
        os.killpg(int(kill.split(':')[0]), signal.SIGKILL)
    return result


GKDPluginTrainer._move_model_to_vllm = _probed_sync
