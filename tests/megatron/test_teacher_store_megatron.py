"""``megatron rlhf --teacher_scores``: the teacher-score store ``swift-gkd score`` wrote (its ``swift rlhf`` run, shared
with tests/test_teacher_store.py: top-8 in float32 of the tiny teacher over ``train.jsonl``) read by the real
``megatron rlhf`` on the tiny pair, and the store flags it refuses before any rank starts.

Two runs, at learning rate 0 with ``--gkd_logits_topk 4`` (each position's 4 most likely of the stored 8) and the tail:

* ``alone`` (one rank): the store and no teacher flag at all: every training row is found, no teacher is loaded, and
  the held-out rows of ``--val_dataset`` (not in the store) stop the run at its evaluation in one error line naming
  the row;
* ``mixed`` (two ranks, context parallel 2): ``--teacher_model`` and a store holding about half of the rows: the
  teacher scores the rows the store lacks, whole steps of them at this seed; the stored top-k is cut over the two
  ranks as the micro-batch is (each row padded to a multiple of 2 x CP, chunks r and 2CP-1-r).

Both log the same losses (the live teacher's where it scores, the store's elsewhere): the rows as ms-swift's Megatron
template lays them out (right-padded, labels unshifted, ``seq_lens``) key to the rows ``swift rlhf`` scored."""
import dataclasses
import os

import pytest
import torch
from conftest import run_swift
from megatron_runs import ACTIVE, megatron_args, run_megatron, train_rows
from test_hardening_megatron import assert_refused, launch
from test_launcher_checks import assert_passed_the_checks
from test_teacher_store import HUB_TEACHER, SAMPLES, changed_in_one_middle_tensor, hub_cache, score_argv

from swift_gkd_plugin.core.scores.store import StoreWriter, TeacherStore
from swift_gkd_plugin.demo import tiny

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason='the CPU harness does nothing where CUDA is '
                                'present: tests/gpu/run_megatron_gkd.sh runs Megatron-SWIFT there')

K = 4
STEPS = 4
FROM_STORE = dict(lmbda=0, lr=0, train_iters=STEPS, gkd_logits_topk=K, gkd_topk_tail='true')
NO_TEACHER = 'no teacher model is loaded: every row must be in the store'
#: the partial store's rows per step at seed 42 (its rule: keys below 7 in their first hex digit, ~7/16 of them)
PARTIAL_SHARES = [0.5, 0.0, 0.0, 0.5]


def score_store(ws, shared_runs) -> str:
    """The folder of the shared ``swift-gkd score`` run (tests/test_teacher_store.py starts the same one)."""

    def scored(out):
        return dataclasses.replace(run_swift(score_argv(ws, out, teacher_scores_samples=SAMPLES)), output_dir=out)

    run = shared_runs('teacher_store', {'score': scored})['score']
    assert run.returncode == 0, run.output[-4000:]
    return run.output_dir


def partial_store(score: str, out: str) -> str:
    """The score's top-k rows whose key starts with a hex digit below 7, in a store of their own (no ``covered``
    list: a run with ``--teacher_model`` loads it)."""
    source = TeacherStore(score)
    path = os.path.join(out, 'partial_store')
    writer = StoreWriter(path, dataclasses.replace(source.identity, samples=0))
    for key in sorted(source.keys()):
        if int(key[0], 16) < 7:
            row = source.get(key)
            writer.add(key, dataclasses.replace(row, samples=None, entropy=None))
    writer.flush()
    return path


def held_out(ws) -> str:
    """Two rows of the test split, which the store (the train split) does not hold."""
    path = os.path.join(ws.root, 'held_out.jsonl')
    if not os.path.exists(path):
        tiny.write_dataset(path, tiny.make_rows(2, seed=0, split='test'))
    return path


@pytest.fixture(scope='module')
def store(tiny_ws, shared_runs) -> str:
    return score_store(tiny_ws, shared_runs)


@pytest.fixture(scope='module')
def runs(tiny_ws, shared_runs, store):
    return shared_runs('megatron_teacher_store', {
        'alone': lambda out: run_megatron(megatron_args(
            tiny_ws, out, **FROM_STORE, teacher_scores=store, teacher_model=None, teacher_model_type=None,
            val_dataset=held_out(tiny_ws), eval_steps=STEPS, eval_iters=1), check=False, launcher=False),
        # the teacher named by a hub id (a hub cache that holds it, offline): compared with the store's once loaded
        'mixed': lambda out: run_megatron(megatron_args(
            tiny_ws, out, **FROM_STORE, teacher_scores=partial_store(store, out), context_parallel_size=2,
            teacher_model=HUB_TEACHER), nproc=2, env=hub_cache(os.path.join(out, 'hub'), HUB_TEACHER, tiny_ws.teacher)),
    })


def scalars(run, tag: str):
    """A logged training value at full float32 precision (``logging.jsonl`` rounds to 8 decimals: 3e-6 of these
    losses), from the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(run.output_dir, 'runs'))
    events.Reload()
    return [event.value for event in events.Scalars(f'train/{tag}')]


def test_the_store_alone_answers_every_row_without_a_teacher(runs, store, tiny_ws):
    run = runs['alone']
    assert ACTIVE in run.output and f'teacher scores from {store}: 64 rows' in run.output, run.output[-4000:]
    assert NO_TEACHER in run.output and f"Loading model from '{tiny_ws.teacher}'" not in run.output
    rows = train_rows(run)
    assert [r['iteration'] for r in rows] == [f'{s}/{STEPS}' for s in range(1, STEPS + 1)], rows
    assert all(r['gkd/teacher_store_rows'] == 1.0 and r['loss'] > 0 for r in rows), rows
    assert scalars(run, 'gkd_teacher_store_rows') == [1.0] * STEPS


def test_a_row_the_store_lacks_without_a_teacher_stops_the_run_naming_it(runs, store):
    """The held-out rows (evaluation after the last step) are not in the store and nothing can score them."""
    run = runs['alone']
    assert run.returncode == 1, run.output[-4000:]
    errors = [line for line in run.output.splitlines() if 'megatron rlhf: error: ' in line]
    assert len(errors) == 1, run.output[-4000:]
    assert (f'megatron rlhf: error: swift_gkd_plugin: evaluation after step {STEPS}: row 0 of micro-batch 0 is not '
            f'in --teacher_scores {store} (2 of the 2 rows this rank holds are not; key ') in errors[0]
    assert 'this run has no teacher to score it: pass --teacher_model, or score the dataset' in errors[0]


def test_the_teacher_scores_the_rows_a_partial_store_lacks(runs):
    run = runs['mixed']
    assert run.returncode == 0 and ACTIVE in run.output, run.output[-4000:]
    assert 'a row missing from it is scored by the teacher' in run.output
    assert [r['gkd/teacher_store_rows'] for r in train_rows(run)] == PARTIAL_SHARES
    # the hub id's weights, compared once loaded (the launcher gets its config, not its weights)
    assert f'--teacher_model {HUB_TEACHER} has the weights that scored --teacher_scores' in run.output


def test_a_hub_teacher_that_is_not_the_stores_stops_the_run_before_step_1(tiny_ws, store, tmp_path):
    """``--teacher_model`` a hub id whose weights (downloaded with the model, after the launcher's checks) are the
    store's teacher with one middle tensor changed: through the ``megatron`` launcher, one error line naming the
    store, the id and the folder, exit code 1, no step, and no report of torchrun's."""
    changed = changed_in_one_middle_tensor(tiny_ws.teacher, str(tmp_path / 'changed'))
    cache = str(tmp_path / 'hub')
    run = run_megatron(megatron_args(tiny_ws, str(tmp_path / 'out'), **FROM_STORE, teacher_scores=store,
                                     teacher_model=HUB_TEACHER), env=hub_cache(cache, HUB_TEACHER, changed),
                       check=False, launcher=True)
    errors = [line for line in run.output.splitlines() if 'megatron rlhf: error: ' in line]
    assert run.returncode == 1 and len(errors) == 1, run.output[-4000:]
    assert (f'megatron rlhf: error: --teacher_scores {store} was scored by another teacher' in errors[0]
            and f'than --teacher_model {HUB_TEACHER} (loaded from {cache}' in errors[0]), errors[0]
    assert not train_rows(run) and 'Traceback' not in run.output


def test_losses_from_the_store_are_the_live_teachers(runs):
    """At learning rate 0 every step trains the same rows: the store alone (one rank) and the partial store with the
    live teacher (context parallel 2; steps 2 and 3 wholly the teacher's) log the same losses and gradient norms
    (measured: 3e-7 apart at most)."""
    alone, mixed = runs['alone'], runs['mixed']
    for tag in ('loss', 'grad_norm'):
        stored, live = scalars(alone, tag), scalars(mixed, tag)
        assert len(stored) == len(live) == STEPS
        for step, (a, b) in enumerate(zip(stored, live), 1):
            assert a == pytest.approx(b, rel=1e-6), (tag, step, stored, live)


# ------------------------------------------------------------------ the rows of every Megatron layout
def test_the_rows_key_alike_in_every_megatron_layout(tiny_ws, store):
    """ms-swift's Megatron collator on rows of three lengths: right-padded, packed (``--padding_free``, Megatron-SWIFT's
    default, which the CPU harness cannot run), each row padded for context parallelism 2, and packed with trailing
    padding: the same rows and keys (the store's for the training rows), found where the store holds them."""
    import json
    from swift.model import get_processor
    from swift.template import get_template
    from swift_gkd_plugin.core.scores.lookup import row_request
    from swift_gkd_plugin.core.scores.store import row_key
    from swift_gkd_plugin.megatron.step.stored_teacher import StoredTeacher, micro_batch_rows
    with open(tiny_ws.train) as f:
        rows = [json.loads(line) for line in f][:2]
    rows += [{'messages': [{'role': 'user', 'content': f'Reverse: {" ".join(seq)}'},
                           {'role': 'assistant', 'content': ' '.join(reversed(seq))}]} for seq in ('ab', 'abcdefg')]
    processor = get_processor(tiny_ws.student, model_type='qwen3')
    stored = StoredTeacher(store)

    def collated(padding_free, cp=1, padding_to=None):
        template = get_template(processor, template_type='qwen3_nothinking', max_length=128,
                                padding_free=padding_free, sequence_parallel_size=cp)
        template.use_megatron = True  # as Megatron-SWIFT's pipeline sets it
        template.set_mode('train')
        encoded = [template.encode(row, return_length=True) for row in rows]  # (ms-swift's encode_sample)
        batch = template.data_collator(encoded, padding_to=padding_to)
        keys = [row_key(*row_request(batch['input_ids'][b, s:s + n], batch['labels'][b, s:s + n]))
                for b, s, n in micro_batch_rows(batch, padding_free)]
        return padding_free, batch, keys

    layouts = {'padded': collated(False), 'packed': collated(True), 'packed_cp2': collated(True, 2, 4),
               'padded_cp2': collated(False, 2, 4), 'packed_padded_to_64': collated(True, 1, 64)}
    _, batch, keys = layouts['padded']
    assert len(set(batch['seq_lens'])) == 3 and batch['input_ids'].shape[0] == 4
    assert layouts['packed_padded_to_64'][1]['input_ids'].shape[1] > layouts['packed'][1]['input_ids'].shape[1] > 0
    stored_positions = sum(stored.store.get(key).ids.shape[0] for key in keys[:2])
    for name, (padding_free, batch, layout_keys) in layouts.items():
        assert layout_keys == keys, name
        answer = stored.answer(batch, K, padding_free)
        assert [m[0] for m in answer.missing] == [2, 3] and answer.rows_found == 2, name
        assert int(answer.found.sum()) == stored_positions, name
        assert bool(torch.isfinite(answer.topk_logprobs[answer.found]).all()), name


# ------------------------------------------------------------------ the launcher's refusals that read the store
def _store_flags(ws, store, *flags):
    return ('--model', ws.student, '--dataset', ws.train, '--use_vllm', 'false', '--lmbda', '0',
            '--teacher_scores', store, *flags)


@pytest.mark.parametrize('flags, says', [
    (('--gkd_logits_topk', '16'), '--gkd_logits_topk 16 is larger than --teacher_scores STORE holds (top-8): pass '
     '--gkd_logits_topk 1 to 8, or score again with a larger k'),
    (('--template', 'chatml'), '--teacher_scores STORE was scored with --template qwen3_nothinking, this run uses '
     '--template chatml'),
    (('--model', 'OTHER'), '--teacher_scores STORE was scored on the token ids of another tokenizer than --model '
     'OTHER\'s'),
    (('--teacher_scores', 'NONE'), '--teacher_scores NONE: NONE is not a teacher-score store'),
    # issue 89: the store's teacher with one middle tensor scaled by 3 (the old sampled fingerprint passed it)
    (('--teacher_model', 'CHANGED'), '--teacher_scores STORE was scored by another teacher'),
], ids=['k', 'template', 'tokenizer', 'not_a_store', 'changed_teacher'])
def test_a_store_that_does_not_fit_is_refused_before_any_rank_starts(tiny_ws, store, tmp_path, flags, says):
    names = {'STORE': store, 'OTHER': tiny_ws.other_vocab_teacher, 'NONE': str(tmp_path / 'none')}
    if 'CHANGED' in flags:
        names['CHANGED'] = changed_in_one_middle_tensor(tiny_ws.teacher, str(tmp_path / 'changed'))
    flags = [names.get(f, f) for f in flags]
    for name, value in names.items():
        says = says.replace(name, value)
    assert_refused(*launch(*_store_flags(tiny_ws, store, *flags)), says)


def test_the_store_without_a_teacher_passes_the_launcher(tiny_ws, store):
    """No --teacher_model: the store is the teacher (without it the launcher refuses a run with no teacher)."""
    assert_passed_the_checks(launch(*_store_flags(tiny_ws, store, '--template', 'qwen3_nothinking'))[1])
