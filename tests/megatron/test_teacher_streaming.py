"""Full-vocabulary teacher logits streamed per micro-batch in ``megatron rlhf`` (issue 21 item 6): the schedule's
consumption of micro-batches as ms-swift's ``forward_step`` and loss do it (pop ``teacher_output``, loss, backward,
drop), with a real teacher module and real logits, from the iterator Megatron's schedules hand ``forward_step``
(megatron-core's ``RerunDataIterator``: ``next()`` only, no ``iter()``). The trainer's glue runs end to end in
tests/megatron/test_megatron_rlhf.py."""
import gc
import weakref

import torch
from megatron.core.rerun_state_machine import RerunDataIterator

from swift_gkd_plugin.core import generalized_jsd
from swift_gkd_plugin.megatron.step.loss import (DEFERRED_TEACHER, defer_teacher, fill_deferred_teacher,
                                            has_deferred_teacher, teacher_on_demand)

N_MICRO, TOKENS, HIDDEN, VOCAB = 6, 16, 8, 50


def setup():
    torch.manual_seed(0)
    teacher = torch.nn.Linear(HIDDEN, VOCAB)
    student = torch.nn.Linear(HIDDEN, VOCAB)
    batches = [{'teacher_model_inputs': {'hidden': torch.randn(TOKENS, HIDDEN)}, 'hidden': torch.randn(TOKENS, HIDDEN)}
               for _ in range(N_MICRO)]
    return teacher, student, batches


class Teacher:
    """The teacher forward of one micro-batch, keeping weak references to count the logits alive."""

    def __init__(self, module):
        self.module, self.alive, self.peak = module, weakref.WeakSet(), 0

    def __call__(self, micro_batch):
        with torch.no_grad():
            logits = self.module(micro_batch['teacher_model_inputs']['hidden'])
        self.alive.add(logits)
        gc.collect()
        self.peak = max(self.peak, len(self.alive))
        return {'full_logits': logits}


def _schedule(data_iterator, n_micro):
    """How Megatron's schedules consume the data iterator: ``next()`` once per micro-batch, as each is trained on."""
    for _ in range(n_micro):
        yield next(data_iterator)


def train_step(micro_batches, student):
    """ms-swift's schedule without pipeline stages: per micro-batch forward_step, loss, backward."""
    losses = []
    for micro_batch in micro_batches:
        teacher_output = micro_batch.pop('teacher_output')  # ms-swift's forward_step
        loss = generalized_jsd(student(micro_batch['hidden']), teacher_output['full_logits'], 0.5).sum()
        loss.backward()
        losses.append(loss.detach())
        del teacher_output, loss
    return torch.stack(losses)


def test_on_demand_holds_one_micro_batch_of_teacher_logits():
    teacher, student, batches = setup()
    up_front = Teacher(teacher)
    fill_deferred_teacher(defer_and_return(batches), up_front)  # ms-swift: every micro-batch before training
    expected = train_step(batches, student)
    grad = student.weight.grad.clone()
    assert up_front.peak == N_MICRO

    student.weight.grad = None
    student.bias.grad = None
    _, _, fresh = setup()
    defer_teacher(fresh)
    assert has_deferred_teacher(fresh) and all(b['teacher_output'] is DEFERRED_TEACHER for b in fresh)
    streamed = Teacher(teacher)
    losses = train_step(_schedule(teacher_on_demand(RerunDataIterator(iter(fresh)), streamed), N_MICRO), student)
    assert streamed.peak == 1
    assert torch.equal(losses, expected) and torch.equal(student.weight.grad, grad)
    assert not has_deferred_teacher(fresh) and not any('teacher_output' in b for b in fresh)


def test_per_step_fill_computes_only_deferred_outputs():
    """With pipeline stages the deferred outputs are filled per train step, outside the schedule; outputs already
    there (another source) are left alone."""
    teacher, _, batches = setup()
    defer_teacher(batches[:3])
    batches[3]['teacher_output'] = 'kept'
    calls = Teacher(teacher)
    fill_deferred_teacher(batches[:4], calls)
    assert batches[3]['teacher_output'] == 'kept' and all('full_logits' in b['teacher_output'] for b in batches[:3])
    assert not has_deferred_teacher(batches)


def defer_and_return(batches):
    defer_teacher(batches)
    return batches
