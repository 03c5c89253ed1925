"""The model's own vocabulary in ``megatron rlhf``, read from the objects Megatron-SWIFT builds: the arguments'
``model_info`` (``get_model_info_meta``, as ``MegatronArguments.__post_init__`` calls it) and the template over the
processor (``args.get_model_processor(load_model=False)`` on the meta device, as ``MegatronSft.__init__`` does).
Megatron pads its output layer beyond this size (a multiple of ``make_vocab_size_divisible_by`` x TP)."""
import types

import pytest
import torch

from swift_gkd_plugin.megatron.step.vocab import model_vocab_size


@pytest.fixture(scope='module')
def megatron_swift_objects(tiny_ws):
    from swift.model import get_model_info_meta, get_model_processor
    from swift.template import get_template
    info, _ = get_model_info_meta(tiny_ws.student, model_type='qwen3', use_hf=True)
    with torch.device('meta'):
        _, processor = get_model_processor(tiny_ws.student, model_type='qwen3', load_model=False,
                                           download_model=False)
    return types.SimpleNamespace(model_info=info), get_template(processor, template_type='qwen3_nothinking')


def test_the_arguments_model_info_has_no_config(megatron_swift_objects):
    """The cause of the defect: the trainer read ``args.model_info.config``, always None in megatron rlhf, so the
    padded vocabulary rows were never masked."""
    args, _ = megatron_swift_objects
    assert args.model_info.config is None


def test_the_vocabulary_comes_from_the_processors_config(megatron_swift_objects, tiny_ws):
    import json
    args, template = megatron_swift_objects
    with open(f'{tiny_ws.student}/config.json') as f:
        expected = json.load(f)['vocab_size']
    assert model_vocab_size(template, args) == expected == 448
    assert model_vocab_size(template) == expected


def test_nothing_known_gives_none():
    nothing = types.SimpleNamespace(model_info=types.SimpleNamespace(config=None))
    assert model_vocab_size(nothing, nothing) is None


def test_a_multimodal_config_gives_its_language_models_vocabulary():
    """Qwen3-VL keeps ``vocab_size`` in ``text_config`` only (the old lookup's fallback covered one nesting)."""
    from transformers import Qwen3VLConfig
    config = Qwen3VLConfig()
    assert not hasattr(config, 'vocab_size')
    template = types.SimpleNamespace(model_info=types.SimpleNamespace(config=config))
    assert model_vocab_size(template) == config.text_config.vocab_size
