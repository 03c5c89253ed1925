"""vLLM's greedy continuation of two fixed prompts, straight from a colocated engine: what the sync probes
(``vllm_probe_plugin.py``, ``megatron/megatron_vllm_probe_plugin.py``) compare with the trained model's argmax."""
PROMPTS = [[5, 17, 33, 41, 9], [3, 8, 12]]
NEW_TOKENS = 12


def vllm_greedy(engine, step, lora=None):
    """``engine``: vLLM's ``LLMEngine``; ``lora``: the adapter request ms-swift's engine sends with its own requests
    (``--vllm_enable_lora``)."""
    from vllm import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    ids = [f'probe-{step}-{i}' for i in range(len(PROMPTS))]
    for request_id, prompt in zip(ids, PROMPTS):
        engine.add_request(request_id, {'prompt_token_ids': prompt}, params, lora_request=lora)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
    return [done[i] for i in ids]
