"""Sampling without vLLM in ``megatron rlhf``, everything but the Megatron forward: ms-swift's real template and
sample classes, the plugin's sampling loop, and a tiny transformers model standing in for the forward's logits."""
import copy

import pytest
import torch

from swift_gkd_plugin.megatron.rollout.generation import generate
from swift_gkd_plugin.megatron.rollout.samples import (collate_for_forward, encode_prompts, last_logits, prompt_request,
                                               rollout_outputs)


@pytest.fixture(scope='module')
def parts(tiny_ws):
    from swift.model import get_model_processor
    from swift.rl_core.data import GKDSample
    from swift.template import get_template
    model, processor = get_model_processor(tiny_ws.student, model_type='qwen3', torch_dtype=torch.float32)
    template = get_template(processor, template_type='qwen3_nothinking', max_length=128)
    template.set_mode('train')  # as in megatron rlhf --rlhf_type gkd
    rows = [{'messages': [{'role': 'user', 'content': q}, {'role': 'assistant', 'content': 'a b c'}]}
            for q in ('reverse: a b c d', 'reverse: x y', 'reverse: q r s t u v')]
    return model.eval(), template, [GKDSample.from_row(r) for r in rows]


def _next_logits(model, template, padding_to=None):
    """What the Megatron trainer's callback does, with a transformers forward instead of Megatron's."""

    def next_logits(sequences):
        batch, positions = collate_for_forward(template, sequences, padding_to)
        logits = model(input_ids=batch['input_ids'], attention_mask=batch.get('attention_mask'),
                       position_ids=batch.get('position_ids')).logits
        return last_logits(logits, positions)

    return next_logits


def test_prompts_end_with_the_generation_prompt_and_hold_no_response(parts):
    model, template, samples = parts
    prompts = encode_prompts(template, samples)
    for sample, ids in zip(samples, prompts):
        text = template.tokenizer.decode(ids)
        assert text.endswith('<|im_start|>assistant\n'), text
        assert sample.messages[0]['content'] in text and 'a b c<|im_end|>' not in text
    assert template.mode == 'train'  # restored


def test_the_teacher_prompt_replaces_the_students(parts):
    from swift_gkd_plugin.core.views import prepare_teacher_view
    _, template, samples = parts
    sample = copy.deepcopy(samples[0])
    sample.teacher_prompt = 'reverse the letters: a b c d'
    prepare_teacher_view(sample)
    student, teacher = encode_prompts(template, [sample]), encode_prompts(template, [sample], teacher=True)
    assert 'reverse the letters: a b c d' in template.tokenizer.decode(teacher[0])
    assert 'reverse the letters' not in template.tokenizer.decode(student[0])
    assert prompt_request(sample, teacher=True).messages[-1]['role'] == 'user'


@pytest.mark.parametrize('padding_free', [False, True])
def test_collated_positions_are_each_sequences_last_token(parts, padding_free):
    _, template, _ = parts
    template = copy.copy(template)
    template.padding_free = padding_free
    template.use_megatron = True  # as megatron rlhf sets it: Megatron's masks, padding to multiples of padding_to
    sequences = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    batch, positions = collate_for_forward(template, sequences, padding_to=4)
    for seq, (row, col) in zip(sequences, positions):
        assert int(batch['input_ids'][row, col]) == seq[-1]
    assert batch['input_ids'].shape[-1] % 4 == 0


def test_greedy_sampling_equals_transformers_generate_and_trains_on_exactly_the_sampled_tokens(parts):
    """prompt tokens -> the plugin's loop over collated batches -> ms-swift rollout outputs -> samples -> ms-swift's
    GKD encoding: the response labels are the sampled tokens, which are transformers' greedy continuation."""
    from swift.rlhf_trainers.gkd_helpers import encode_gkd_samples
    model, template, samples = parts
    samples = copy.deepcopy(samples)
    prompts = encode_prompts(template, samples)
    eos = [template.tokenizer.convert_tokens_to_ids('<|im_end|>')]
    with torch.no_grad():
        completions = generate(_next_logits(model, template), prompts, max_new_tokens=6,
                               eos_token_ids=eos, temperature=0.0, seed=0)
        for prompt, completion in zip(prompts, completions):
            reference = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=6,
                                       eos_token_id=eos[0], pad_token_id=eos[0])[0, len(prompt):].tolist()
            assert completion == reference
    outputs = rollout_outputs(template.tokenizer, prompts, completions, eos)
    for sample, output in zip(samples, outputs):
        sample.apply_rollout_output(rollout_output=output)
    encoded, _, _ = encode_gkd_samples(samples, template)
    for enc, prompt, completion in zip(encoded, prompts, completions):
        response = [t for t, label in zip(enc['input_ids'], enc['labels']) if label != -100]
        assert enc['input_ids'][:len(prompt)] == prompt
        assert response == completion
    finished = [o.response.choices[0].finish_reason for o in outputs]
    assert finished == ['stop' if c and c[-1] in eos else 'length' for c in completions]


def test_samples_with_images_ask_for_vllm(parts):
    _, template, samples = parts
    sample = copy.deepcopy(samples[0])
    sample.images = ['/tmp/some.png']
    with pytest.raises(ValueError, match='--use_vllm true'):
        encode_prompts(template, [sample])
