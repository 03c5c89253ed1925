"""A multi-turn scheduler for the tests (``--external_plugins``), and, with ``GKD_TEST_TRAJ_LOG`` set, a probe that
writes what each generation batch's samples, each micro-batch's loss and the teacher saw (one json line per call) to
that file.

``gkd_test_tool``: after the student's first turn the "tool" answers with the user message :data:`TOOL_RESULT`
(context: never a target); the second turn ends the trajectory. The first turn's first sampled token is marked
``0`` in its loss mask (as a scheduler marks tokens the model did not write). ``gkd_test_bad_mask`` returns a mask
one entry short; ``gkd_test_no_tokens`` masks every token.

Past ``--max_length``: ``gkd_test_endless`` never says a trajectory is finished; ``gkd_test_huge_tool`` answers the
first turn with a tool result of :data:`HUGE_WORDS` words. Bad return values: ``gkd_test_step_none`` (``step``
returns None), ``gkd_test_int_content`` (the tool result's content is an int), ``gkd_test_oov_ids``
(``response_token_ids`` holds an id past the vocabulary), ``gkd_test_finished_none`` (``check_finished`` returns
None); ``gkd_test_empty_ids`` returns an empty ``response_token_ids`` for the first turn (from ``step``),
``gkd_test_empty_last_ids`` for the last (from ``on_turn_end``)."""
import json
import os

import torch
from swift.rollout import MultiTurnScheduler, multi_turns

TOOL_RESULT = 'Tool: h h h h'


class ToolScheduler(MultiTurnScheduler):

    def step(self, infer_request, response_choice, current_turn):
        ids = list(response_choice.token_ids or [])
        infer_request.messages.append({'role': 'user', 'content': TOOL_RESULT})
        return {'infer_request': infer_request, 'response_token_ids': ids,
                'response_loss_mask': self.mask(ids)}

    def mask(self, ids):
        return [0] + [1] * (len(ids) - 1) if ids else []

    def check_finished(self, infer_request, response_choice, current_turn):
        return current_turn >= 2  # even when a turn stops at the length limit (the tiny models never stop)


class BadMaskScheduler(ToolScheduler):

    def mask(self, ids):
        return [1] * (len(ids) - 1)


class NoTokensScheduler(ToolScheduler):

    def mask(self, ids):
        return [0] * len(ids)

    def check_finished(self, infer_request, response_choice, current_turn):
        return True

    async def on_turn_end(self, infer_request, response_choice, current_turn):
        ids = list(response_choice.token_ids or [])
        return {'response_token_ids': ids, 'response_loss_mask': [0] * len(ids)}


class EndlessScheduler(ToolScheduler):

    def check_finished(self, infer_request, response_choice, current_turn):
        return False  # only --max_turns would end it


HUGE_WORDS = 300


class HugeToolScheduler(ToolScheduler):

    def step(self, infer_request, response_choice, current_turn):
        result = super().step(infer_request, response_choice, current_turn)
        infer_request.messages[-1]['content'] = 'Tool:' + ' h' * HUGE_WORDS
        return result


class StepNoneScheduler(ToolScheduler):

    def step(self, infer_request, response_choice, current_turn):
        infer_request.messages.append({'role': 'user', 'content': TOOL_RESULT})  # forgets to return


class IntContentScheduler(ToolScheduler):

    def step(self, infer_request, response_choice, current_turn):
        result = super().step(infer_request, response_choice, current_turn)
        infer_request.messages[-1]['content'] = 42
        return result


class OutOfVocabularyScheduler(ToolScheduler):

    def step(self, infer_request, response_choice, current_turn):
        result = super().step(infer_request, response_choice, current_turn)
        result['response_token_ids'] = result['response_token_ids'][:-1] + [10 ** 6]
        return result


class FinishedNoneScheduler(ToolScheduler):

    def check_finished(self, infer_request, response_choice, current_turn):
        return None if current_turn == 1 else True


class EmptyIdsScheduler(ToolScheduler):

    def step(self, infer_request, response_choice, current_turn):
        result = super().step(infer_request, response_choice, current_turn)
        result['response_token_ids'], result['response_loss_mask'] = [], []
        return result


class EmptyLastIdsScheduler(ToolScheduler):

    async def on_turn_end(self, infer_request, response_choice, current_turn):
        return {'response_token_ids': [], 'response_loss_mask': []} if current_turn == 2 else {}


multi_turns['gkd_test_tool'] = ToolScheduler
multi_turns['gkd_test_endless'] = EndlessScheduler
multi_turns['gkd_test_huge_tool'] = HugeToolScheduler
multi_turns['gkd_test_step_none'] = StepNoneScheduler
multi_turns['gkd_test_int_content'] = IntContentScheduler
multi_turns['gkd_test_oov_ids'] = OutOfVocabularyScheduler
multi_turns['gkd_test_finished_none'] = FinishedNoneScheduler
multi_turns['gkd_test_empty_ids'] = EmptyIdsScheduler
multi_turns['gkd_test_empty_last_ids'] = EmptyLastIdsScheduler
multi_turns['gkd_test_bad_mask'] = BadMaskScheduler
multi_turns['gkd_test_no_tokens'] = NoTokensScheduler

_LOG = os.environ.get('GKD_TEST_TRAJ_LOG')
if _LOG:
    from swift_gkd_plugin.swift.teacher.placement import TeacherModel
    from swift_gkd_plugin.swift.trainer import GKDPluginTrainer

    def _rows(t):
        return t.detach().cpu().tolist()

    def _mask(model_inputs):
        mask = model_inputs.get('attention_mask')
        return None if mask is None else _rows(mask)

    _compute_loss, _teacher_forward = GKDPluginTrainer.compute_loss, TeacherModel.forward
    _encode_samples = GKDPluginTrainer._encode_samples

    def encode_samples(self, samples):
        result = _encode_samples(self, samples)  # the views are final once encoded
        record = {'kind': 'samples', 'mode': str(self._gkd_mode), 'messages': [s.messages for s in samples],
                  'teacher_messages': [s.teacher_messages for s in samples],
                  'response_token_ids': [s.response_token_ids for s in samples],
                  'response_loss_mask': [s.response_loss_mask for s in samples]}
        with open(_LOG, 'a') as f:
            f.write(json.dumps(record) + '\n')
        return result

    def compute_loss(self, model, inputs, *args, **kwargs):
        record = {'kind': 'batch', 'mode': str(inputs.get('gkd_mode')), 'training': bool(self.model.training),
                  'input_ids': _rows(inputs['model_inputs']['input_ids']),
                  'attention_mask': _mask(inputs['model_inputs']),
                  'labels': _rows(inputs['model_inputs']['labels']),
                  'teacher_input_ids': _rows(inputs['teacher_model_inputs']['input_ids']),
                  'teacher_labels': _rows(inputs['teacher_model_inputs']['labels']),
                  'teacher_attention_mask': _mask(inputs['teacher_model_inputs'])}
        with open(_LOG, 'a') as f:
            f.write(json.dumps(record) + '\n')
        return _compute_loss(self, model, inputs, *args, **kwargs)

    def teacher_forward(self, model, teacher_inputs, hidden=False):
        out = _teacher_forward(self, model, teacher_inputs, hidden)
        if not hidden:
            keep = teacher_inputs.get('logits_to_keep')
            keep = _rows(keep) if isinstance(keep, torch.Tensor) else keep
            record = {'kind': 'teacher', 'input_ids': _rows(teacher_inputs['input_ids']), 'logits_to_keep': keep,
                      'logprobs': _rows(torch.log_softmax(out.float(), -1))}
            with open(_LOG, 'a') as f:
                f.write(json.dumps(record) + '\n')
        return out

    GKDPluginTrainer.compute_loss = compute_loss
    GKDPluginTrainer._encode_samples = encode_samples
    TeacherModel.forward = teacher_forward
