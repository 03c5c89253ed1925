"""Records, for every training step of a real ``swift rlhf`` run (``--external_plugins``), the rows it trains: one
json line per generation batch and rank, ``{"rank", "step", "epoch", "prompts"}`` (each row's last user message, in
the batch's order), appended to the file named by ``GKD_TEST_ROW_LOG``."""
import json
import os

from swift_gkd_plugin.swift.trainer import GKDPluginTrainer

_LOG = os.environ['GKD_TEST_ROW_LOG']
_rollout_samples = GKDPluginTrainer._rollout_samples


def _prompt(row) -> str:
    return [m['content'] for m in row['messages'] if m['role'] == 'user'][-1]


def _recording(self, inputs):
    if self.model.training:
        with open(_LOG, 'a') as f:
            f.write(json.dumps({'rank': self.accelerator.process_index, 'step': int(self.state.global_step),
                                'epoch': float(self.state.epoch or 0), 'prompts': [_prompt(r) for r in inputs]})
                    + '\n')
    return _rollout_samples(self, inputs)


GKDPluginTrainer._rollout_samples = _recording
