"""The flag reference (``docs_en/flags.md``, ``docs_zh/flags.md``) is generated from the flag declarations
(:mod:`swift_gkd_plugin.options.flag_reference`): regenerated here and compared with both pages, and what its columns
say held to the code (every plugin flag listed once; the launchers column to the refusals of ``megatron rlhf``)."""
from __future__ import annotations

import argparse
import os
from dataclasses import fields

import pytest

from swift_gkd_plugin.options import flag_reference
from swift_gkd_plugin.options.flags import (NO_EFFECT_IN_MEGATRON, SWIFT_RLHF_ONLY, FlagError, GKDPluginArgumentsMixin,
                                            MegatronGKDFlagsMixin)

from test_packaging import PROJECT

REGENERATE = 'regenerate them: python -m swift_gkd_plugin.options.flag_reference'


@pytest.mark.parametrize('language', list(flag_reference.PAGES))
def test_the_pages_are_the_generated_reference(language):
    """The checkout's pages (CI installs the package into site-packages, where the docs sit inside the package)."""
    with open(os.path.join(PROJECT, flag_reference.PAGES[language]), encoding='utf-8') as f:
        assert f.read() == flag_reference.page(language), REGENERATE


def test_every_plugin_flag_is_listed_once_with_its_launchers():
    en = flag_reference.page('en')
    for f in fields(MegatronGKDFlagsMixin):
        rows = [line for line in en.splitlines() if line.startswith(f'| `--{f.name}` |')]
        assert len(rows) == 1, f.name
        assert f.metadata['help'].split()[0] in rows[0]
    assert flag_reference.launchers('teacher_tensor_model_parallel_size') == 'megatron rlhf'
    assert flag_reference.launchers('gkd_skd_top_k') == 'swift rlhf'
    assert flag_reference.launchers('gkd_divergence') == 'swift rlhf, megatron rlhf'
    assert len(en.split()) <= 3000  # compact (issue 97)


#: a value away from the default of each flag of SWIFT_RLHF_ONLY that megatron rlhf refuses, with the flags it needs
REFUSED_IN_MEGATRON = {
    'teacher_api_key': {'teacher_api_key': 'k'}, 'teacher_server_timeout': {'teacher_server_timeout': 5.0},
    'teacher_server_retries': {'teacher_server_retries': 1}, 'teacher_server_wait': {'teacher_server_wait': 1.0},
    'gkd_rl_coef': {'gkd_rl_coef': 0.5, 'reward_funcs': ['accuracy']},
    'gkd_divergence_coef': {'gkd_divergence_coef': 0.5},
    'gkd_sampled_kl_coef': {'gkd_sampled_kl_coef': 0.5, 'lmbda': 1.0},
    'gkd_sampled_kl_discount': {'gkd_sampled_kl_discount': 0.5},
    'gkd_sampled_kl_baseline': {'gkd_sampled_kl_baseline': 'batch'},
    'gkd_cross_tokenizer': {'gkd_cross_tokenizer': 'uld'}, 'teacher_template': {'teacher_template': 'qwen3'},
    'gkd_ref_kl_coef': {'gkd_ref_kl_coef': 0.1}, 'gkd_skd_top_k': {'gkd_skd_top_k': 5},
    'gkd_max_staleness': {'gkd_max_staleness': 2},
    'save_teacher_scores': {'save_teacher_scores': 'out'}, 'teacher_scores_dtype': {'teacher_scores_dtype': 'float32'},
    'teacher_scores_samples': {'teacher_scores_samples': 4}, 'gkd_score_only': {'gkd_score_only': True},
    'gkd_drop_bad_rows': {'gkd_drop_bad_rows': True},
}


def test_the_flags_only_swift_rlhf_acts_on_are_refused_by_megatron_rlhf():
    from swift_gkd_plugin.megatron.setup.checks import check_megatron_gkd, parse_megatron_command_line
    assert set(REFUSED_IN_MEGATRON) == set(SWIFT_RLHF_ONLY) - set(NO_EFFECT_IN_MEGATRON)
    assert set(SWIFT_RLHF_ONLY) <= {f.name for f in fields(GKDPluginArgumentsMixin)}
    base = vars(parse_megatron_command_line(['--rlhf_type', 'gkd', '--dataset', 'rows.jsonl']))
    check_megatron_gkd(argparse.Namespace(**base))  # the defaults pass
    for name, values in REFUSED_IN_MEGATRON.items():
        with pytest.raises(FlagError, match=f'--{name}'):
            check_megatron_gkd(argparse.Namespace(**{**base, **values}))
