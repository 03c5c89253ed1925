"""Records what each training forward of a real ``swift rlhf`` run (``--external_plugins``) receives: one json line per
call of the student's or the teacher's model (``*ForCausalLM``, ``*ForConditionalGeneration``) inside the loss, to the
file named by ``GKD_TEST_MAXLEN_LOG``: ``{"who": "student" | "teacher", "shape": [B, S], "rows": [tokens of each row
(its attention mask)], "image_tokens": [...]}``. Forwards of sampling are not recorded."""
import json
import os

import torch

from swift_gkd_plugin.swift.teacher.placement import TeacherModel
from swift_gkd_plugin.swift.trainer import GKDPluginTrainer

_LOG = os.environ['GKD_TEST_MAXLEN_LOG']
_who = []  # 'student' inside compute_loss, 'teacher' inside the teacher's forward
_image_id = []  # the model's image token id, where it has one


def _on_forward(module, args, kwargs):
    name = type(module).__name__
    if not _who or not (name.endswith('ForCausalLM') or name.endswith('ForConditionalGeneration')):
        return
    ids = kwargs.get('input_ids', args[0] if args else None)
    if not isinstance(ids, torch.Tensor):
        return
    mask = kwargs.get('attention_mask')
    rows = (mask.sum(-1) if isinstance(mask, torch.Tensor) and mask.dim() == 2 else
            torch.full(ids.shape[:1], ids.shape[-1]))
    image_id = getattr(module.config, 'image_token_id', None) or getattr(module.config, 'image_token_index', None)
    line = {'who': _who[-1], 'shape': list(ids.shape), 'rows': rows.tolist(),
            'image_tokens': (ids == image_id).sum(-1).tolist() if image_id is not None else None}
    with open(_LOG, 'a') as f:
        f.write(json.dumps(line) + '\n')


_call = torch.nn.Module.__call__


def _call_impl(self, *args, **kwargs):
    if _who:  # (a global forward pre-hook does not see the keyword arguments)
        _on_forward(self, args, kwargs)
    return _call(self, *args, **kwargs)


torch.nn.Module.__call__ = _call_impl


def _phase(name, method, trainer_of=lambda trainer: trainer):

    def wrapper(self, *args, **kwargs):
        if not trainer_of(self).model.training:
            return method(self, *args, **kwargs)
        _who.append(name)
        try:
            return method(self, *args, **kwargs)
        finally:
            _who.pop()

    return wrapper


GKDPluginTrainer.compute_loss = _phase('student', GKDPluginTrainer.compute_loss)
TeacherModel.forward = _phase('teacher', TeacherModel.forward, trainer_of=lambda teacher: teacher.trainer)
