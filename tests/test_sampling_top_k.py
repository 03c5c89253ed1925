"""``--top_k -1`` (ms-swift's rollout default, documented as "no top-k") samples from every token on the
transformers engine too, as under vLLM (the plugin's ``untruncated_top_k``)."""
import torch
from swift.infer_engine import InferRequest, RequestConfig, TransformersEngine

from swift_gkd_plugin.swift.rollout.samplers import untruncated_top_k


def _first_tokens(engine, config, n: int):
    requests = [InferRequest(messages=[{'role': 'user', 'content': 'Reverse: a b c'}]) for _ in range(n)]
    outputs = engine.infer(requests, request_config=config, use_tqdm=False)
    return [out.choices[0].token_ids[0] for out in outputs if out.choices[0].token_ids]


def test_no_top_k_samples_outside_the_model_generation_config_top_k(tiny_ws):
    engine = TransformersEngine(tiny_ws.student, model_type='qwen3', template_type='qwen3_nothinking',
                                max_batch_size=0)
    model = engine.model
    vocab = model.config.vocab_size
    default_top_k = model.generation_config.top_k  # transformers' default, what ms-swift falls back to
    assert default_top_k is not None and default_top_k < vocab

    plain = RequestConfig(max_tokens=1, temperature=1.0, top_k=-1, top_p=1.0, return_details=True)
    fixed = untruncated_top_k(plain, model)
    assert plain.top_k == -1 and fixed.top_k == vocab  # a copy: ms-swift's own config is untouched
    assert engine._prepare_generation_config(plain).top_k == default_top_k  # ms-swift's truncation
    assert engine._prepare_generation_config(fixed).top_k == vocab
    assert untruncated_top_k(RequestConfig(top_k=5), model).top_k == 5  # a user's top-k is kept

    # what the engine samples: the first token of one prompt, against the model's top-k at that position
    template = engine.template
    encoded = template.encode(InferRequest(messages=[{'role': 'user', 'content': 'Reverse: a b c'}]))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([encoded['input_ids']])).logits[0, -1]
    allowed = set(logits.topk(default_top_k).indices.tolist())
    torch.manual_seed(0)
    truncated = _first_tokens(engine, plain, 48)
    torch.manual_seed(0)
    full = _first_tokens(engine, fixed, 48)
    assert len(truncated) == len(full) == 48
    assert all(t in allowed for t in truncated)
    outside = sum(t not in allowed for t in full)
    # the tiny random model spreads its mass: most of it lies outside its top-50 of 448 tokens
    expected = 48 * (1 - logits.softmax(-1)[list(allowed)].sum().item())
    assert outside >= max(5, expected / 3), (outside, expected)
