"""The calculator tool task (``swift_gkd_plugin.demo.tool_task``), its ms-swift scheduler (``tool_scheduler``) and
the closing line of ``bench_quality.py --preset tools``.  Real ms-swift classes (template, scheduler, multi-turn
driver); the only stand-in is the model of the driver test, whose turns are written out."""
from __future__ import annotations

import pytest

from swift_gkd_plugin.demo import tiny, tool_task

from test_quality_bench import bench


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
    """An untrained tiny model with the task's tokenizer."""
    root = tmp_path_factory.mktemp('tool_task')
    tok = tool_task.build_tokenizer(str(root / 'tok'))
    return tiny.build_model(str(root / 'model'), tok, seed=0, hidden_size=32, num_layers=1, intermediate_size=64)


@pytest.fixture(scope='module')
def template(model_dir):
    from swift.model import get_processor
    from swift.template import get_template
    template = get_template(get_processor(model_dir, model_type='qwen3'), template_type='qwen3_nothinking',
                            max_length=256)
    template.set_mode('train')
    return template


def _reference(a, b):
    return tool_task.trajectory_row({'messages': [{'role': 'user', 'content': f'Add: {a} + {b}'}]})['messages']


def test_rows_are_deterministic_distinct_and_the_splits_disjoint():
    train, test = tool_task.make_rows(300, seed=0), tool_task.make_rows(100, seed=0, split='test')
    assert train == tool_task.make_rows(300, seed=0) and train != tool_task.make_rows(300, seed=1)
    prompts = {r['messages'][0]['content'] for r in train}
    assert len(prompts) == 300 and not prompts & {r['messages'][0]['content'] for r in test}
    for row in train[:20] + test[:20]:
        user, answer = row['messages']
        a, b = tool_task.operands_of(user['content'])
        assert 100 <= a <= 999 and 100 <= b <= 999 and answer == {'role': 'assistant', 'content': str(a + b)}
    assert {tool_task.split_of(*tool_task.operands_of(r['messages'][0]['content'])) for r in test} == {'test'}


def test_tool_parses_arithmetic_and_runs_no_code():
    assert tool_task.run_tool('347+598') == '945' and tool_task.run_tool(' 12 * 3 ') == '36'
    assert tool_task.run_tool('5-7') == '-2'
    for bad in ('__import__("os").getcwd()', '1+2+3', '1e3+1', '', '9' * 10 + '+1'):
        assert tool_task.run_tool(bad) == 'error'
    assert tool_task.parse_tool_call('<calc>1+2</calc>') == '1+2' and tool_task.parse_tool_call('945') is None
    assert tool_task.is_success('Add: 347 + 598', ' 945\n') and not tool_task.is_success('Add: 347 + 598', '944')
    assert not tool_task.is_success('Add: 347 + 598', None)
    assert _reference(347, 598)[1:] == [{'role': 'assistant', 'content': '<calc>347+598</calc>'},
                                        {'role': 'user', 'content': '= 945'}, {'role': 'assistant', 'content': '945'}]


def test_digits_and_markers_are_single_tokens(model_dir):
    tok = tiny.load_tokenizer(model_dir)
    assert tok.convert_ids_to_tokens(tok.encode('<calc>347+598</calc>', add_special_tokens=False)) == [
        '<calc>', '3', '4', '7', '+', '5', '9', '8', '</calc>']


def test_training_rendering_is_ms_swifts_encoding(model_dir, template):
    """The teacher's and the warm start's training tokens and targets are what ms-swift's template gives the same
    trajectory (every assistant turn a target), and the evaluator's prompts are its generation prompts."""
    from swift.infer_engine import InferRequest
    tok = tiny.load_tokenizer(model_dir)
    messages = _reference(347, 598)
    encoded = template.encode(InferRequest(messages=messages))
    ours = tool_task.encode_trajectory(tok, {'messages': messages})
    assert encoded['input_ids'] == ours['input_ids'] and encoded['labels'] == ours['labels']
    template.set_mode('pt')
    try:
        for k in (1, 3):  # the first turn's prompt, the answer turn's prompt (after the tool's result)
            assert template.encode(InferRequest(messages=messages[:k]))['input_ids'] == tool_task._prompt_ids(
                tok, messages[:k])
    finally:
        template.set_mode('train')


def _choice(tok, text, finish_reason='stop'):
    from swift.infer_engine.protocol import ChatCompletionResponseChoice, ChatMessage
    ids = tok.encode(text, add_special_tokens=False) + [tok.convert_tokens_to_ids('<|im_end|>')]
    return ChatCompletionResponseChoice(index=0, message=ChatMessage(role='assistant', content=text),
                                        finish_reason=finish_reason, token_ids=ids)


def _scheduler(model_dir, template, max_turns=3):
    from swift.rollout import multi_turns

    from swift_gkd_plugin.demo import tool_scheduler
    assert multi_turns['gkd_calculator'] is tool_scheduler.CalculatorScheduler
    return multi_turns['gkd_calculator'](max_turns=max_turns, tokenizer=tiny.load_tokenizer(model_dir),
                                         template=template)


def test_scheduler_appends_the_tools_result_and_stops_on_an_answer(model_dir, template):
    from swift.infer_engine.protocol import RolloutInferRequest
    scheduler = _scheduler(model_dir, template)
    tok = scheduler.tokenizer
    request = RolloutInferRequest(messages=_reference(347, 598)[:2])
    call = _choice(tok, '<calc>347+598</calc>')
    assert not scheduler.check_finished(request, call, 1)
    assert scheduler.check_finished(request, call, 3)  # max_turns
    assert scheduler.check_finished(request, _choice(tok, '<calc>347+598</calc>', 'length'), 1)
    assert scheduler.check_finished(request, _choice(tok, '945'), 1)  # an answer
    assert scheduler.check_finished(request, _choice(tok, '<calc>347+5'), 1)  # no whole call: an answer, wrong
    result = scheduler.step(request, call, 1)
    assert result['infer_request'] is request and request.messages == _reference(347, 598)[:3]
    request = RolloutInferRequest(messages=_reference(2, 3)[:2])
    scheduler.step(request, _choice(tok, '<calc>2+</calc>'), 1)
    assert request.messages[-1] == {'role': 'user', 'content': '= error'}


def test_scheduler_drives_ms_swifts_colocate_multi_turn_loop(model_dir, template):
    """ms-swift's own driver (``run_multi_turn``, what its colocate rollouts use) with this scheduler: the model
    calls the tool, then answers.  The trajectory is the reference one, two turns, the student's tokens of both turns
    returned with a full loss mask, and its encoding is the one the teacher was trained on."""
    from swift.infer_engine import InferRequest, RequestConfig
    from swift.infer_engine.protocol import ChatCompletionResponse, RolloutInferRequest, RolloutOutput, UsageInfo
    from swift.rollout import run_multi_turn
    scheduler = _scheduler(model_dir, template)
    tok = scheduler.tokenizer
    turns = {1: '<calc>347+598</calc>', 2: '945'}

    def output(text):
        return RolloutOutput(response=ChatCompletionResponse(model='m', choices=[_choice(tok, text)],
                                                             usage=UsageInfo(0, 0, 0)))
    seen = []

    def rollout_fn(requests, request_config):
        seen.append([r.messages[-1]['role'] for r in requests])  # the driver's last call has no requests
        return [output(turns[2]) for _ in requests]
    request = RolloutInferRequest(messages=_reference(347, 598)[:1])
    (result, ) = run_multi_turn([request], [output(turns[1])], scheduler, rollout_fn, RequestConfig(), max_turns=3)
    assert seen == [['user'], []] and result.rollout_infos['num_turns'] == 2
    im_end = tok.convert_tokens_to_ids('<|im_end|>')
    assert result.response_token_ids == [tok.encode(t, add_special_tokens=False) + [im_end] for t in turns.values()]
    assert all(set(mask) == {1} for mask in result.response_loss_mask)
    assert template.encode(InferRequest(messages=result.messages))['input_ids'] == tool_task.encode_trajectory(
        tok, {'messages': _reference(347, 598)})['input_ids']


def test_ms_swifts_engine_through_the_scheduler_writes_the_evaluators_trajectories(model_dir, tmp_path):
    """A student briefly trained on the reference trajectories (it calls the tool, mostly wrongly), rolled out greedily
    by ms-swift's ``TransformersEngine`` through ``run_multi_turn`` and this scheduler (the colocate path of its
    trainers): the same trajectories as :func:`tool_task.rollout`, which scores the benchmark, and the template
    encodes each as :func:`tool_task.encode_trajectory` does."""
    from swift.infer_engine import InferRequest, RequestConfig, TransformersEngine
    from swift.infer_engine.protocol import RolloutInferRequest, RolloutOutput
    from swift.rollout import run_multi_turn
    student = tiny.build_model(str(tmp_path / 'student'), tiny.load_tokenizer(model_dir), seed=1,
                               **tool_task.STUDENT_KWARGS)
    tiny.train_teacher(student, [tool_task.trajectory_row(r) for r in tool_task.make_rows(512)], steps=80,
                       batch_size=32, seed=1, encode=tool_task.encode_trajectory)
    prompts = [r['messages'][0]['content'] for r in tool_task.make_rows(8, split='test')]
    ours = tool_task.rollout(student, None, prompts)
    assert sum(tool_task.trajectory_metrics([t])['turns'] for t in ours) > len(prompts)  # it called the tool

    engine = TransformersEngine(student, model_type='qwen3', template_type='qwen3_nothinking', max_batch_size=8)
    scheduler = _scheduler(model_dir, engine.template)
    config = RequestConfig(max_tokens=tool_task.MAX_NEW_TOKENS, temperature=0, return_details=True)

    def rollout_fn(requests, request_config):
        with tiny._Threads(1):  # as tool_task.rollout: the same float sums, the same greedy picks
            return [RolloutOutput(response=r) for r in engine.infer(requests, request_config, use_tqdm=False)]
    requests = [RolloutInferRequest(messages=[{'role': 'user', 'content': p}]) for p in prompts]
    outputs = run_multi_turn(requests, rollout_fn(requests, config), scheduler, rollout_fn, config,
                             max_turns=tool_task.MAX_TURNS)
    tok = engine.tokenizer
    texts = [[dict(m, content=tok.decode(m['content'], skip_special_tokens=True) if isinstance(m['content'], list)
                   else m['content']) for m in o.messages] for o in outputs]
    assert texts == ours
    engine.template.set_mode('train')
    for output, messages in zip(outputs, texts):
        assert engine.template.encode(InferRequest(messages=output.messages))['input_ids'] == \
            tool_task.encode_trajectory(tok, {'messages': messages})['input_ids']


def test_evaluator_runs_the_tool_loop(model_dir):
    rows = tool_task.make_rows(6, split='test')
    result = tool_task.evaluate(model_dir, None, rows, max_turns=2)
    assert len(result['trajectories']) == 6 and 1 <= result['turns'] <= 2
    assert all(0 <= result[k] <= 1 for k in ('success', 'tool_call_rate', 'tool_call_correct'))
    reference = [_reference(347, 598), _reference(100, 200)]
    wrong = [{'role': 'user', 'content': 'Add: 1 + 2'}, {'role': 'assistant', 'content': '<calc>1+3</calc>'},
             {'role': 'user', 'content': '= 4'}, {'role': 'assistant', 'content': '4'}]
    no_answer = [{'role': 'user', 'content': 'Add: 1 + 2'}, {'role': 'assistant', 'content': '<calc>1+2</calc>'}]
    guess = [{'role': 'user', 'content': 'Add: 1 + 2'}, {'role': 'assistant', 'content': '3'}]
    assert tool_task.trajectory_metrics(reference) == dict(success=1.0, tool_call_rate=1.0, tool_call_correct=1.0,
                                                           turns=2.0)
    assert tool_task.trajectory_metrics([wrong, no_answer, guess, reference[0]]) == dict(
        success=0.5, tool_call_rate=0.75, tool_call_correct=2 / 3, turns=1.5)


def test_tools_closing_line_gives_each_methods_success_with_its_seeds():
    curves = {'onpolicy_tools': {0: [{'success': 0.75}], 1: [{'success': 0.85}]},
              'single_turn': {0: [{'success': 0.4}]}}
    curves = {m: {s: [dict.fromkeys(bench.TOOLS_METRICS, 0.5) | p for p in c] for s, c in by_seed.items()}
              for m, by_seed in curves.items()}
    summary = bench.tools_summary(curves)
    ws = {'teacher_eval': {'success': 0.97}, 'student_eval': {'success': 0.2}}
    assert bench.tools_closing_line(summary, ws) == (
        'quality[tools]: success rate (held-out): teacher 0.970, start 0.200, onpolicy_tools 0.800±0.071 (2 seeds), '
        'single_turn 0.400±0.000 (1 seed)')
    assert set(bench.tools_methods({'teacher_trajectories': 't.jsonl'})) == set(bench.TOOLS_METHOD_NAMES)
