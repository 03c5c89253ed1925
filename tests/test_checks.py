"""The flag checks in process: ranges declared once and the checks generated from them, checks that only check and
resolvers that only resolve, the temperature floor, flags that GKD ignores. The real command lines are in
test_activation_and_bad_input.py and megatron/test_launcher_checks.py."""
import ast
import inspect
import json
import math
import re
import typing
from dataclasses import fields
from types import SimpleNamespace

import pytest
import torch

from swift_gkd_plugin.core.divergence import generalized_jsd
from swift_gkd_plugin.options.flags import (CROSS_TOKENIZER_METHODS, FLAG_DECLARATIONS, GKD_LOSS_IMPLS, MS_SWIFT_FLAGS,
                                    SCALAR_FLAGS, TEMPERATURE_CEILING, TEMPERATURE_FLOOR, GKDPluginArgumentsMixin, Range,
                                    check_gkd_scalars, check_multi_turn_flags, declared_ranges, ignored_flag_warnings)

# the plugin's flags at their defaults (flags added later included), ms-swift's at good values
GOOD = dict({f.name: f.default for f in fields(GKDPluginArgumentsMixin)}, beta=0.5, lmbda=0.5, temperature=0.9,
            sft_alpha=0.0, max_completion_length=8, seq_kd=False, gkd_logits_topk=None, top_k=-1, top_p=1.0)


def good(**changes):
    return SimpleNamespace(**dict(GOOD, **changes))


def test_ms_swift_flags_declared_here_are_fields_of_its_arguments():
    """A flag ms-swift renames or drops fails here, not silently in the check."""
    from swift.arguments import RLHFArguments
    names = {f.name for f in fields(RLHFArguments)}
    assert set(MS_SWIFT_FLAGS) - names == set()
    assert set(SCALAR_FLAGS) <= set(declared_ranges())


@pytest.mark.parametrize('name', SCALAR_FLAGS)
def test_a_declared_flag_missing_from_the_arguments_fails_loudly(name):
    check_gkd_scalars(good())
    args = good()
    delattr(args, name)
    with pytest.raises(AttributeError, match=f'--{name}.*no field {name!r}'):
        check_gkd_scalars(args)


def test_allowed_values_come_from_the_literal_types():
    hints = typing.get_type_hints(GKDPluginArgumentsMixin)
    assert GKD_LOSS_IMPLS == typing.get_args(hints['gkd_loss_impl']) == ('auto', 'fused', 'dense')
    cross = next(f for f in fields(GKDPluginArgumentsMixin) if f.name == 'gkd_cross_tokenizer')
    assert CROSS_TOKENIZER_METHODS == typing.get_args(FLAG_DECLARATIONS['gkd_cross_tokenizer']) == ('uld', 'hybrid')
    # what argparse receives: help, never the declarations (HfArgumentParser passes the metadata's keys as keywords)
    assert dict(cross.metadata) == {'help': cross.metadata['help']}


def every_metadata_key_parser(args_class):
    """transformers 5.23+'s ``HfArgumentParser`` of ``args_class``: every key of a field's metadata but ``aliases``
    reaches ``argparse.add_argument`` as a keyword (its ``kwargs = dict(field.metadata)``, where 5.22 and earlier called
    ``field.metadata.copy()``). The installed parser, each field's metadata given to it as a plain mapping; built as
    ms-swift's ``parse_args`` builds it."""
    import copy
    from types import MappingProxyType

    from swift.utils import utils as swift_utils
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        @staticmethod
        def _parse_dataclass_field(parser, f):
            f = copy.copy(f)
            f.metadata = MappingProxyType(dict(f.metadata))
            HfArgumentParser._parse_dataclass_field(parser, f)

    with swift_utils._patch_get_type_hints():
        return Parser([args_class])


@pytest.mark.parametrize('who', ['swift', 'megatron'])
def test_the_flags_parse_where_every_metadata_key_reaches_argparse(who):
    """Issue 96 item 2: the declared ranges and choices were hidden from the parser by the metadata's ``copy()``;
    transformers 5.23 reads the metadata without it, and every plugin run crashed parsing its flags
    (``_StoreAction.__init__() got an unexpected keyword argument 'range'``). A field's metadata holds its help only."""
    if who == 'swift':
        from swift_gkd_plugin.swift.setup.arguments import GKDPluginRLHFArguments as args_class
    else:
        from swift_gkd_plugin.megatron.setup.checks import MegatronGKDFlagsMixin as args_class
    parser = every_metadata_key_parser(args_class)
    namespace, remaining = parser.parse_known_args(['--gkd_fused_backend', 'torch', '--teacher_server_timeout', '5',
                                                    '--gkd_cross_tokenizer', 'uld', '--gkd_skew_alpha', '0.2'])
    assert remaining == []
    assert (namespace.gkd_fused_backend, namespace.teacher_server_timeout, namespace.gkd_cross_tokenizer,
            namespace.gkd_skew_alpha) == ('torch', 5.0, 'uld', 0.2)
    for f in fields(GKDPluginArgumentsMixin):
        assert set(f.metadata) == {'help'}, (f.name, set(f.metadata))


def _outside(rule: Range):
    """Values outside ``rule``: just below or above its bounds, a non-integer for an integer range, NaN."""
    values = []
    if rule.low is not None:
        values.append(rule.low if rule.low_open else rule.low - (1 if rule.integer else rule.low / 2 or 1e-3))
    if rule.high is not None:
        values.append(rule.high if rule.high_open else rule.high + (1 if rule.integer else 1e-3))
    values.append(2.5 if rule.integer else float('nan'))
    return values


RANGES = [(name, rule) for name, rule in declared_ranges().items() if isinstance(rule, Range)]


@pytest.mark.parametrize('name,rule', RANGES, ids=[name for name, _ in RANGES])
def test_each_declared_range_refuses_outside_values_naming_flag_value_and_range(name, rule):
    for value in _outside(rule):
        with pytest.raises(ValueError) as info:
            rule.check(name, value)
        message = str(info.value)
        assert message.startswith(f'--{name} must be ') and f'got {value}' in message
        if not (isinstance(value, float) and math.isnan(value)):
            assert rule.allowed() in message
    for value, is_open in ((rule.low, rule.low_open), (rule.high, rule.high_open)):  # closed bounds are allowed
        if value is not None and not is_open:
            rule.check(name, int(value) if rule.integer else value)


@pytest.mark.parametrize('name', SCALAR_FLAGS)
def test_every_declared_flag_is_checked_by_the_shared_check(name):
    """What the shared check (swift rlhf, the megatron launcher and ranks) refuses comes from the declarations: a
    value outside each declared range or choice is refused naming the flag."""
    rule = declared_ranges()[name]
    bad = _outside(rule)[0] if isinstance(rule, Range) else 'no-such-value'
    with pytest.raises(ValueError, match=f'^--{name} must be '):
        check_gkd_scalars(good(**{name: bad}))


def test_choices_refuse_other_values_naming_them():
    with pytest.raises(ValueError, match=re.escape("--gkd_loss_impl must be one of ['auto', 'fused', 'dense'] for "
                                                   "GKD, got 'chunked'")):
        check_gkd_scalars(good(gkd_loss_impl='chunked'))
    with pytest.raises(ValueError, match=re.escape("--gkd_cross_tokenizer must be one of ['uld', 'hybrid'] (or "
                                                   "unset) for GKD, got 'gold'")):
        check_gkd_scalars(good(gkd_cross_tokenizer='gold'))


# ---------------------------------------------------------------------------------------------------- checks, resolvers
def _functions(module):
    tree = ast.parse(inspect.getsource(module))
    return [node for node in tree.body if isinstance(node, ast.FunctionDef)]


CHECK_MODULES = ['swift_gkd_plugin.options.flags', 'swift_gkd_plugin.options.flag_checks', 'swift_gkd_plugin.swift.setup.arguments',
                 'swift_gkd_plugin.megatron.setup.checks', 'swift_gkd_plugin.megatron.setup.layout',
                 'swift_gkd_plugin.swift.setup.vllm', 'swift_gkd_plugin.options.teacher_scores',
                 'swift_gkd_plugin.rollout.colocated_vllm']


@pytest.mark.parametrize('module_name', CHECK_MODULES)
def test_checks_only_check_and_resolvers_only_resolve(module_name):
    """A ``check_*`` function assigns no attribute of its arguments; a ``resolve_*`` function raises nothing."""
    import importlib
    module = importlib.import_module(module_name)
    checks = resolvers = 0
    for fn in _functions(module):
        param = fn.args.args[0].arg if fn.args.args else None
        if fn.name.startswith('check_'):
            checks += 1
            written = [ast.unparse(t) for node in ast.walk(fn) if isinstance(node, ast.Assign) for t in node.targets
                       if any(isinstance(n, ast.Name) and n.id == param for n in ast.walk(t))
                       and not isinstance(t, ast.Name)]
            setattrs = [ast.unparse(node) for node in ast.walk(fn) if isinstance(node, ast.Call)
                        and getattr(node.func, 'id', None) == 'setattr']
            assert not written and not setattrs, f'{fn.name} changes its arguments: {written + setattrs}'
        elif fn.name.startswith('resolve_'):
            resolvers += 1
            assert not any(isinstance(node, ast.Raise) for node in ast.walk(fn)), f'{fn.name} raises'
    assert checks


def test_the_swift_rlhf_order_resolves_first_then_checks():
    from swift_gkd_plugin.swift.setup import arguments
    body = inspect.getsource(arguments.GKDPluginRLHFArguments._check_gkd)
    assert body.index('resolve_gkd_arguments(self)') < body.index('check_gkd_arguments(self)')
    resolvers = [f.__name__ for f in arguments.SWIFT_RLHF_PHASES['resolve']]  # what resolve_gkd_arguments runs
    assert 'run_phase(\'resolve\', args)' in inspect.getsource(arguments.resolve_gkd_arguments)
    assert [r for r in resolvers if r.startswith('resolve_')] == [
        'resolve_num_generations', 'resolve_reward_columns', 'resolve_teacher_adapters', 'resolve_cross_tokenizer',
        'resolve_vllm_environment', 'resolve_sequence_parallel', 'resolve_teacher_scores', 'resolve_check_model']


#: the folders whose check_* functions run before a model loads (or are the runners of the phases)
CHECK_FOLDERS = ('options', 'data', 'swift/setup', 'megatron/setup')
#: the phase runners; the parser's refusal of unknown flags (before any phase, in the process too) and the refusal of
#: plugin flags with another --rlhf_type (no GKD phase runs then); the store's checks that run once a teacher is loaded
#: or connected (run time, not a phase)
NOT_IN_A_PHASE = {'check_flags_only', 'check_command_line_flags', 'check_gkd_arguments', 'check_launcher_command_line',
                  'check_megatron_command_line', 'check_unknown_flags', 'check_no_plugin_flags_outside_gkd',
                  'check_loaded_teacher', 'check_store_served_teacher'}


def _calls_by_function():
    """Every function defined in :data:`CHECK_FOLDERS` -> the names it calls or mentions (read from the source)."""
    import os

    import swift_gkd_plugin
    root = os.path.dirname(swift_gkd_plugin.__file__)
    calls = {}
    for folder in CHECK_FOLDERS:
        for name in sorted(os.listdir(os.path.join(root, folder))):
            if name.endswith('.py'):
                with open(os.path.join(root, folder, name), encoding='utf-8') as f:
                    tree = ast.parse(f.read())
                for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
                    calls.setdefault(fn.name, set()).update(
                        n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(fn)
                        if isinstance(n, (ast.Name, ast.Attribute)))
    return calls


def test_every_check_before_loading_runs_in_a_phase_of_its_launcher():
    """Issue 95 item 2: which check runs when is one ordered list per launcher (``SWIFT_RLHF_PHASES``,
    ``MEGATRON_RLHF_PHASES``), of checks and resolvers only; every ``check_*`` function of the check folders is run by
    a phase (directly or through a function it calls), but the runners and the run-time store checks."""
    from swift_gkd_plugin.megatron.setup.checks import MEGATRON_RLHF_PHASES
    from swift_gkd_plugin.swift.setup.arguments import SWIFT_RLHF_PHASES
    entries = set()
    for phases in (SWIFT_RLHF_PHASES, MEGATRON_RLHF_PHASES):
        for name, functions in phases.items():
            assert functions and all(f.__name__.startswith(('check_', 'resolve_')) for f in functions), name
            entries.update(f.__name__ for f in functions)
    # what runs outside the lists: swift's launcher on the raw command line, and the bf16 check of _init_torch_dtype
    entries.update({'check_launcher_early', 'check_bf16_device'})
    calls = _calls_by_function()
    reached, todo = set(), list(entries)
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo.extend(c for c in calls.get(name, ()) if c in calls)
    unreached = sorted(n for n in calls if n.startswith('check_') and n not in reached and n not in NOT_IN_A_PHASE)
    assert unreached == []
    assert NOT_IN_A_PHASE <= set(calls)  # (each exemption names a check that exists)


# ---------------------------------------------------------------------------------------------------- the temperature
@pytest.mark.parametrize('temperature', [1e-9, 5e-4, 1e-3, 0.01, TEMPERATURE_FLOOR * 0.99])
def test_a_temperature_below_the_floor_is_refused_naming_it(temperature):
    with pytest.raises(ValueError) as info:
        check_gkd_scalars(good(temperature=temperature))
    assert f'--temperature must be >= {TEMPERATURE_FLOOR:g} (the loss divides the logits by it' in str(info.value)
    assert f'got {temperature}' in str(info.value)
    check_gkd_scalars(good(temperature=TEMPERATURE_FLOOR))


def test_the_floor_is_where_a_gap_of_2_saturates():
    """Top two logits 2 apart (bf16 values of an LM's range): below the floor the loss's float32 softmax is exactly
    one-hot on both sides (zero gradient); at the floor the second token still has a probability. Most positions of a
    real model's answers have larger gaps (docs_en/quality_results.md): at 1e-3 they all learn nothing."""
    top = torch.tensor([20.0, 18.0, 10.0, 3.0], dtype=torch.bfloat16)
    swapped = top[[1, 0, 2, 3]]
    student, teacher = torch.stack([top, swapped]).float(), torch.stack([swapped, top]).float()

    def grad(temperature):
        z = student.clone().requires_grad_()
        generalized_jsd(z, teacher, 0.5, temperature).sum().backward()
        return z.grad.abs().max().item()

    assert grad(TEMPERATURE_FLOOR * 0.9) == grad(1e-3) == 0.0
    assert grad(TEMPERATURE_FLOOR) > 0.0


@pytest.mark.parametrize('flag', ['temperature', 'gkd_sampling_temperature'])
@pytest.mark.parametrize('value', [TEMPERATURE_CEILING * 1.01, 1e6])
def test_a_temperature_above_the_ceiling_is_refused_naming_it(flag, value):
    with pytest.raises(ValueError) as info:
        check_gkd_scalars(good(**{flag: value}))
    assert f'--{flag} must be <= {TEMPERATURE_CEILING:g} (the tempered distributions approach uniform' in str(info.value)
    assert f'got {value}' in str(info.value)
    check_gkd_scalars(good(**{flag: TEMPERATURE_CEILING}))


def test_the_ceiling_is_where_the_gradient_falls_below_adams_epsilon():
    """Logits 1 nat apart over a 151,936-token vocabulary: the largest logit gradient shrinks as 1/T^2, 8e-10 at the
    ceiling (already below AdamW's epsilon, 1e-8; summed over tokens a parameter's gradient can still exceed it) and
    8e-18 at 1e6 (where a run logged grad_norm 0 and learnt nothing)."""
    g = torch.Generator().manual_seed(0)
    student = torch.randn(4, 151936, generator=g) * 3
    teacher = student + torch.randn(4, 151936, generator=g)

    def grad(temperature):
        z = student.clone().requires_grad_()
        generalized_jsd(z, teacher, 0.5, temperature).sum().backward()
        return z.grad.abs().max().item()

    at_ceiling, far = grad(TEMPERATURE_CEILING), grad(1e6)
    assert 1e-10 < at_ceiling < 1e-8 and far < 1e-16
    assert 0.5 < at_ceiling / grad(TEMPERATURE_CEILING / 10) * 100 < 2  # 1 / T^2


# ---------------------------------------------------------------------------------------------------- ignored flags
def test_flags_that_have_no_effect_are_named():
    assert ignored_flag_warnings(good()) == []
    assert ignored_flag_warnings(good(gkd_cross_tokenizer='hybrid', beta=0.1)) == []
    assert ignored_flag_warnings(good(gkd_cross_tokenizer='uld', beta=None)) == []  # not given
    uld, = ignored_flag_warnings(good(gkd_cross_tokenizer='uld', beta=0.1))
    assert uld.startswith('--beta 0.1 is ignored with --gkd_cross_tokenizer uld')
    seq_kd, = ignored_flag_warnings(good(seq_kd=True, lmbda=1.0))
    assert seq_kd.startswith('--seq_kd true has no effect with --lmbda 1')
    assert ignored_flag_warnings(good(seq_kd=True, lmbda=0.9)) == []


def test_use_liger_kernel_names_the_loss_used_instead():
    """ms-swift's switch for Liger's fused JSD: the plugin computes its own loss, and says so once at start-up."""
    assert ignored_flag_warnings(good(use_liger_kernel=False)) == []
    liger, = ignored_flag_warnings(good(use_liger_kernel=True, gkd_loss_impl='auto'))
    assert liger.startswith("--use_liger_kernel true: the GKD loss is the plugin's (--gkd_loss_impl auto: ")
    assert "not Liger's fused JSD" in liger


_NO_MULTI_TURN = dict(multi_turn_scheduler=None, max_turns=None, gkd_skd_top_k=0, gkd_cross_tokenizer=None)


@pytest.mark.parametrize('given,needle', [
    (dict(max_turns=3), '--max_turns 3 needs --multi_turn_scheduler NAME'),
    (dict(multi_turn_scheduler='x', max_turns=0), '--max_turns must be an integer >= 1 (turns of one trajectory), '
     'got 0'),
    (dict(multi_turn_scheduler='x', max_turns=2.5), '--max_turns must be an integer >= 1'),
    (dict(multi_turn_scheduler='x', gkd_skd_top_k=4), '--multi_turn_scheduler x cannot be combined with '
     '--gkd_skd_top_k 4: SKD\'s decoding loop'),
    (dict(multi_turn_scheduler='x', gkd_cross_tokenizer='uld'), '--multi_turn_scheduler x cannot be combined with '
     '--gkd_cross_tokenizer uld'),
])
def test_multi_turn_flags_are_checked(given, needle):
    check_multi_turn_flags(SimpleNamespace(**_NO_MULTI_TURN))
    check_multi_turn_flags(SimpleNamespace(**dict(_NO_MULTI_TURN, multi_turn_scheduler='x', max_turns=1)))
    with pytest.raises(ValueError, match=re.escape(needle)):
        check_multi_turn_flags(SimpleNamespace(**dict(_NO_MULTI_TURN, **given)))


def test_a_scheduler_without_sampling_is_warned():
    args = SimpleNamespace(gkd_cross_tokenizer=None, use_liger_kernel=False, multi_turn_scheduler='x', lmbda=0,
                           seq_kd=False, beta=0.5)
    warning, = ignored_flag_warnings(args)
    assert warning.startswith('--multi_turn_scheduler x has no effect with --lmbda 0 and --seq_kd false')
    assert ignored_flag_warnings(SimpleNamespace(**dict(vars(args), lmbda=0.5))) == []
    assert ignored_flag_warnings(SimpleNamespace(**dict(vars(args), seq_kd=True))) == []
    scope = SimpleNamespace(**dict(vars(args), lmbda=1, completion_length_limit_scope='total', use_vllm=False))
    warning, = ignored_flag_warnings(scope)
    assert warning.startswith('--completion_length_limit_scope total applies to vLLM colocate sampling only')
    assert ignored_flag_warnings(SimpleNamespace(**dict(vars(scope), use_vllm=True))) == []


def test_ms_swifts_arguments_leave_num_generations_to_the_resolver():
    """ms-swift's own RLHFArguments, as the plugin leaves it: unset num_generations in its parser and constructor
    (the resolver gives GKD 1 and the other rlhf types GRPO's 8; the run itself: test_activation_and_bad_input)."""
    from swift.arguments import RLHFArguments

    from swift_gkd_plugin.options.flags import resolve_num_generations
    from swift_gkd_plugin.runtime.ms_swift_state import grpo_num_generations
    assert RLHFArguments.__dataclass_fields__['num_generations'].default is None
    assert inspect.signature(RLHFArguments.__init__).parameters['num_generations'].default is None
    assert grpo_num_generations() == 8
    for rlhf_type, expected in (('gkd', 1), ('grpo', 8)):
        args = SimpleNamespace(rlhf_type=rlhf_type, num_generations=None)
        resolve_num_generations(args, grpo_num_generations())
        assert args.num_generations == expected
    args = SimpleNamespace(rlhf_type='gkd', num_generations=4)
    resolve_num_generations(args, 8)
    assert args.num_generations == 4


# ---------------------------------------------------------------------------------------------------- SKD's placements
@pytest.mark.parametrize('where', ['vllm', 'megatron'])
def test_skd_is_refused_where_it_cannot_run_naming_the_flag_the_value_and_where_it_runs(where):
    """``--gkd_skd_top_k`` with vLLM sampling (swift rlhf) or in megatron rlhf: refused by the flag checks (before any
    model loads), naming the flag, its value, why, and every placement where SKD runs (one sentence, SKD_PLACEMENTS,
    also the docs' table)."""
    from swift_gkd_plugin.options.flags import SKD_PLACEMENTS, check_sampling_flags
    from swift_gkd_plugin.megatron.setup.checks import check_megatron_command_line
    with pytest.raises(ValueError) as refused:
        if where == 'vllm':
            check_sampling_flags(good(gkd_skd_top_k=7, use_vllm=True, teacher_model_server=None,
                                      gkd_cross_tokenizer=None, repetition_penalty=1.0, sequence_parallel_size=1))
        else:
            check_megatron_command_line(['--rlhf_type', 'gkd', '--gkd_skd_top_k', '7'])
    message = str(refused.value)
    assert message.startswith('--gkd_skd_top_k 7 is supported by swift rlhf only: megatron rlhf samples' if
                              where == 'megatron' else '--gkd_skd_top_k 7 is not supported with --use_vllm true: ')
    assert f'SKD runs in {SKD_PLACEMENTS}; pass ' in message and message.endswith('--gkd_skd_top_k 0' + (
        ' here' if where == 'megatron' else ''))
    for placement in ('--use_vllm false', '--teacher_model', '--offload_teacher_model', '--teacher_adapters',
                      '--teacher_model_server with `swift-gkd serve-teacher`'):
        assert placement in SKD_PLACEMENTS


def _compile_args(**changes):
    return SimpleNamespace(**dict(dict(torch_compile=True, gradient_checkpointing=True,
                                       gradient_checkpointing_kwargs=None, deepspeed=None, fsdp=''), **changes))


@pytest.mark.parametrize('world, changes, refused', [
    ('1', {}, True),  # one process: ms-swift's reentrant checkpoint (the run fails at step 1, measured)
    ('2', {}, False),  # DDP: ms-swift picks the non-reentrant one
    ('2', dict(deepspeed='zero3'), True),
    ('1', dict(gradient_checkpointing_kwargs='{"use_reentrant": false}'), False),  # the fix, as the CLI gives it
    ('1', dict(gradient_checkpointing_kwargs={'use_reentrant': False}), False),
    ('2', dict(gradient_checkpointing_kwargs={'use_reentrant': True}), True),
    ('1', dict(gradient_checkpointing=False), False),
    ('1', dict(torch_compile=False), False),
])
def test_torch_compile_with_reentrant_checkpointing_is_refused(monkeypatch, world, changes, refused):
    from swift_gkd_plugin.options.flags import check_torch_compile_checkpointing
    monkeypatch.setenv('WORLD_SIZE', world)
    args = _compile_args(**changes)
    if not refused:
        check_torch_compile_checkpointing(args)
        return
    with pytest.raises(ValueError, match=re.escape("--torch_compile true with --gradient_checkpointing true")) as e:
        check_torch_compile_checkpointing(args)
    assert '{"use_reentrant": false}' in str(e.value) and '--gradient_checkpointing false' in str(e.value)


@pytest.mark.parametrize('env, refused', [({}, True), ({'WORLD_SIZE': '1'}, False), ({'LOCAL_RANK': '0'}, False)])
def test_deepspeed_without_a_launcher_is_refused(monkeypatch, env, refused):
    """Measured: ``swift rlhf --deepspeed zero2`` without NPROC_PER_NODE fails in deepspeed.initialize (mpi4py) after
    both models load; with NPROC_PER_NODE=1 torchrun gives DeepSpeed its rank."""
    import importlib.util

    from swift_gkd_plugin.options.flags import check_deepspeed_launch
    if importlib.util.find_spec('mpi4py') is not None:
        pytest.skip('mpi4py is installed: DeepSpeed can discover its rank over MPI')
    for name in ('WORLD_SIZE', 'LOCAL_RANK'):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    check_deepspeed_launch(SimpleNamespace(deepspeed=None))
    if not refused:
        check_deepspeed_launch(SimpleNamespace(deepspeed='zero2'))
        return
    with pytest.raises(ValueError, match=re.escape('--deepspeed zero2 in one process started without a launcher')):
        check_deepspeed_launch(SimpleNamespace(deepspeed='zero2'))


def test_head_dim_of_reads_the_text_models_heads(tmp_path):
    """vLLM's CPU head-size check reads config.json: an explicit head_dim, else hidden_size / heads, in the text
    model's config of multimodal models (Qwen2.5-VL's text_config, Qwen3-Omni's thinker_config.text_config)."""
    from swift_gkd_plugin.rollout.colocated_vllm import head_dim_of

    def head_dim(config):
        (tmp_path / 'config.json').write_text(json.dumps(config))
        return head_dim_of(str(tmp_path))

    assert head_dim({'hidden_size': 896, 'num_attention_heads': 14}) == 64
    assert head_dim({'hidden_size': 64, 'num_attention_heads': 4, 'head_dim': 32}) == 32
    assert head_dim({'vision_config': {'hidden_size': 1280, 'num_heads': 16},
                     'text_config': {'hidden_size': 2048, 'num_attention_heads': 16}}) == 128
    assert head_dim({'thinker_config': {'text_config': {'hidden_size': 2048, 'num_attention_heads': 32,
                                                        'head_dim': 128}}}) == 128
    assert head_dim({'model_type': 'unknown'}) is None
    assert head_dim_of(str(tmp_path / 'missing')) is None


def test_rollout_budget_resolves_and_is_checked():
    from swift_gkd_plugin.options.flags import FlagError, rollout_max_tokens
    assert rollout_max_tokens(good()) == 8  # unset: --max_completion_length
    assert rollout_max_tokens(good(gkd_rollout_max_tokens=3)) == 3
    check_gkd_scalars(good(gkd_rollout_max_tokens=8, lmbda=1))  # the whole length is allowed
    with pytest.raises(FlagError, match='--gkd_rollout_max_tokens 9 must be <= --max_completion_length 8'):
        check_gkd_scalars(good(gkd_rollout_max_tokens=9, lmbda=1))
    with pytest.raises(FlagError, match='--lmbda 0 has none'):
        check_gkd_scalars(good(gkd_rollout_max_tokens=3, lmbda=0))
    check_gkd_scalars(good(gkd_entropy_fkl_threshold=0.0, gkd_fused_backend='torch'))
    with pytest.raises(FlagError, match='--gkd_entropy_fkl_threshold 1.5 runs on the PyTorch loss paths'):
        check_gkd_scalars(good(gkd_entropy_fkl_threshold=1.5, gkd_fused_backend='triton'))


def test_the_sampling_floor_is_where_sampling_stays_finite():
    """Issue 45: --gkd_sampling_temperature 1e-40 passed '> 0' and overflowed at the first rollout. transformers'
    temperature warper on float32 logits (30 nats apart at most, as a real model's): finite probabilities at the
    floor, NaN at 1e-40."""
    from transformers.generation.logits_process import TemperatureLogitsWarper

    from swift_gkd_plugin.options.flags import SAMPLING_TEMPERATURE_FLOOR
    logits = torch.randn(4, 151936, generator=torch.Generator().manual_seed(0)) * 10

    def probs(temperature):
        return torch.softmax(TemperatureLogitsWarper(temperature)(None, logits.clone()), -1)

    assert torch.isfinite(probs(SAMPLING_TEMPERATURE_FLOOR)).all()
    assert torch.isnan(probs(1e-40)).any()
    with pytest.raises(ValueError, match='--gkd_sampling_temperature must be >= 1e-06'):
        check_gkd_scalars(good(gkd_sampling_temperature=1e-40))
    check_gkd_scalars(good(gkd_sampling_temperature=SAMPLING_TEMPERATURE_FLOOR))
