"""Issue 74 item 6: a resume trains the rows an uninterrupted run trains, in its order, past epoch boundaries too.

TRL's ``RepeatSampler`` (ms-swift's GKD sampler) seeded its generator once per process: a run resumed in epoch 1 or
later trained epoch 0's order again. Six rows, two a step: an epoch is three steps; the runs stop at step 6 (epoch
2's first step) and resume from checkpoint-4 (inside epoch 1). The rows each step trains are recorded by
``tests/row_order_probe_plugin.py``."""
import json
import os

from conftest import base_args, run_swift

PROBE = __file__.replace('test_resume_row_order.py', 'row_order_probe_plugin.py')
ROWS = dict(lmbda=0, max_steps=6, per_device_train_batch_size=2, save_strategy='steps', save_steps=4,
            save_only_model='false', seed=5, external_plugins=PROBE)
SP = dict(sequence_parallel_size=2, ddp_backend='gloo', use_cpu='true')


def _six_rows(tmp_path) -> str:
    from swift_gkd_plugin.demo import tiny
    return tiny.write_dataset(str(tmp_path / 'six.jsonl'), tiny.make_rows(6, seed=0, split='train'))


def _run(tiny_ws, tmp_path, name, nproc=1, **flags):
    log = tmp_path / f'{name}.rows.jsonl'
    run = run_swift(base_args(tiny_ws, str(tmp_path / name), **dict(ROWS, **flags)), nproc=nproc,
                    env={'GKD_TEST_ROW_LOG': str(log)})
    run.rows = {}
    for record in map(json.loads, open(log)):
        run.rows.setdefault(record['rank'], {})[record['step']] = record['prompts']
    return run


def _checkpoint_4(run) -> str:
    found = [c for c in run.checkpoints() if c.endswith('checkpoint-4')]
    assert found, run.checkpoints()
    return found[0]


def _assert_epochs_differ(rows):
    """The uninterrupted run's epochs are three steps of different orders (else a replay of epoch 0 would pass)."""
    assert sorted(rows) == list(range(6)), rows
    assert [rows[s] for s in (0, 1, 2)] != [rows[s] for s in (3, 4, 5)], rows
    assert sorted(p for s in (0, 1, 2) for p in rows[s]) == sorted(p for s in (3, 4, 5) for p in rows[s])


def test_a_resume_past_an_epoch_boundary_trains_the_rows_of_the_uninterrupted_run(tiny_ws, tmp_path):
    dataset = _six_rows(tmp_path)
    full = _run(tiny_ws, tmp_path, 'full', dataset=dataset)
    _assert_epochs_differ(full.rows[0])
    resumed = _run(tiny_ws, tmp_path, 'resumed', dataset=dataset, resume_from_checkpoint=_checkpoint_4(full))
    assert resumed.rows[0] == {s: full.rows[0][s] for s in (4, 5)}, (resumed.rows, full.rows)
    for a, b in zip(resumed.logs, full.logs[4:]):  # off-policy: the same rows give the same losses
        assert abs(a['loss'] - b['loss']) <= 1e-4 * abs(b['loss']), (resumed.losses, full.losses)
    assert 'could not restore' not in resumed.output


def test_sequence_parallel_resumes_on_two_ranks_and_on_one_process_train_the_same_rows(tiny_ws, tmp_path):
    """``--sequence_parallel_size 2`` on two ranks: both ranks of the group read one set of rows, each step the
    uninterrupted run's, resumed on two ranks or on one process; the one-process resume finds ``rng_state_0/1.pth``
    and no ``rng_state.pth`` and says so in one warning line."""
    dataset = _six_rows(tmp_path)
    full = _run(tiny_ws, tmp_path, 'full', nproc=2, dataset=dataset, **SP)
    assert full.rows[0] == full.rows[1], full.rows
    _assert_epochs_differ(full.rows[0])
    ckpt = _checkpoint_4(full)
    assert {'rng_state_0.pth', 'rng_state_1.pth'} <= set(os.listdir(ckpt))
    resumed = _run(tiny_ws, tmp_path, 'resumed', nproc=2, dataset=dataset, resume_from_checkpoint=ckpt, **SP)
    expected = {s: full.rows[0][s] for s in (4, 5)}
    assert resumed.rows == {0: expected, 1: expected}, (resumed.rows, full.rows)
    assert 'could not restore' not in resumed.output
    one = _run(tiny_ws, tmp_path, 'one', dataset=dataset, resume_from_checkpoint=ckpt)
    assert one.rows == {0: expected}, (one.rows, full.rows)
    warned = [line for line in one.output.splitlines() if 'could not restore' in line]
    assert len(warned) == 1, one.output[-3000:]
    assert (f'--resume_from_checkpoint {ckpt} was saved by 2 processes (rng_state_0.pth, rng_state_1.pth) and this '
            'run has 1: it could not restore their random number generator states (rng_state.pth is what one '
            'process reads)') in warned[0], warned


def test_the_samplers_order_is_a_function_of_the_seed_and_the_epoch():
    """Both layouts (one completion a prompt, and ``--num_generations 2``: each prompt twice in a row): epoch 0 is
    TRL's ``RepeatSampler``'s order; a sampler built afresh at epoch ``e`` (a resumed process) draws what one that
    iterated every epoch before draws; epochs differ."""
    from trl.trainer.utils import RepeatSampler

    from swift_gkd_plugin.swift.rollout.epoch_sampler import EpochSampler
    for g in (1, 2):
        layout = dict(data_source=list(range(12)), mini_repeat_count=g, batch_size=4 // g, repeat_count=1, seed=5)
        assert list(EpochSampler(**layout)) == list(RepeatSampler(**layout))
        epoch = {'e': 0}
        running = EpochSampler(**layout, epoch_of=lambda: epoch['e'])
        orders = []
        for e in range(3):
            epoch['e'] = e
            orders.append(list(running))
            fresh = EpochSampler(**layout)
            fresh.set_epoch(e)
            assert list(fresh) == orders[-1]
        assert orders[0] != orders[1] != orders[2]
        assert g == 1 or all(order[i] == order[i + 1] for order in orders for i in range(0, len(order), 2)), orders


def test_a_score_runs_sampler_fills_its_last_chunk_instead_of_dropping_it():
    """``fill_last`` (swift-gkd score): 10 rows in chunks of 4 are 3 chunks, the last completed with the epoch's first
    rows; RepeatSampler's two chunks left rows 8 and 9 out. Without shuffling: the rows in order."""
    from swift_gkd_plugin.swift.rollout.epoch_sampler import EpochSampler
    layout = dict(data_source=list(range(10)), mini_repeat_count=1, batch_size=4, repeat_count=1, seed=5)
    assert sorted(EpochSampler(**layout)) != list(range(10))  # (what is fixed: 8 of the 10)
    filled = list(EpochSampler(**layout, fill_last=True))
    assert len(filled) == len(EpochSampler(**layout, fill_last=True)) == 12 and set(filled) == set(range(10))
    assert filled[10:] == filled[:2] and filled[:8] == list(EpochSampler(**layout))  # (the same epoch order)
    plain = dict(layout, shuffle=False, batch_size=16, repeat_count=2)  # fewer rows than one chunk, repeated
    assert list(EpochSampler(**plain, fill_last=True)) == (list(range(10)) + list(range(6))) * 2


def test_train_dataloader_shuffle_false_keeps_the_datasets_order_and_a_resume_keeps_it(tiny_ws, tmp_path):
    """Issue 81 item 4: with one completion per prompt ms-swift's GKD sampler shuffled whatever
    ``--train_dataloader_shuffle`` said (its losses were bit-identical to the default run's); ``swift sft`` honours
    it. With it false (and ``--dataset_shuffle false``, ms-swift's shuffle when it loads the rows) each epoch reads
    the file's rows in order, and a run resumed from checkpoint-4 trains the uninterrupted run's rows."""
    import json as _json
    dataset = _six_rows(tmp_path)
    prompts = [[m['content'] for m in _json.loads(line)['messages'] if m['role'] == 'user'][-1]
               for line in open(dataset)]
    in_order = {step: prompts[2 * (step % 3):2 * (step % 3) + 2] for step in range(6)}
    flags = dict(dataset=dataset, train_dataloader_shuffle='false', dataset_shuffle='false')
    full = _run(tiny_ws, tmp_path, 'full', **flags)
    assert full.rows[0] == in_order, full.rows
    resumed = _run(tiny_ws, tmp_path, 'resumed', resume_from_checkpoint=_checkpoint_4(full), **flags)
    assert resumed.rows[0] == {s: in_order[s] for s in (4, 5)}, resumed.rows
