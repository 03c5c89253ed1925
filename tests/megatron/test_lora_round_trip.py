"""The LoRA merge/unmerge round trip of every vLLM weight sync, in bf16 with float32 adapters (peft's default on a bf16
base), with real peft layers and ms-swift's own merge and unmerge patches, one parameter group at a time as
``swift rlhf``'s ``_move_full_model_to_vllm`` does with ``--move_model_batches`` (``megatron rlhf`` merges the same
peft ``LoraLayer`` subclass, every layer at once): in place it moves the frozen base (the student's, and a shared-base
teacher's) and rounds the adapters to bf16; with :func:`exact_lora_sync` / :class:`BaseWeightsKeeper` both stay
bit-for-bit the same, holding one group's base at a time in a reused host buffer."""
import re

import pytest
import torch

from swift_gkd_plugin.core.weights.lora_round_trip import (BaseWeightsKeeper, HostBuffer, exact_lora_sync,
                                                    lora_merges_skipped)

ROUND_TRIPS = 3


@pytest.fixture()
def lora_student(tiny_ws):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_ws.student, dtype=torch.bfloat16)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj', 'up_proj'], init_lora_weights=False)
    model = get_peft_model(model, config).eval()  # init_lora_weights=False: a trained-looking adapter (B != 0)
    with torch.no_grad():  # float32 adapters (peft upcasts them) holding values that bf16 cannot, as after training
        for name, param in model.named_parameters():
            if 'lora_' in name:
                param.add_(torch.randn_like(param) * 1e-3)
    return model


def _groups(model):
    """ms-swift's ``split_batches`` with ``--move_model_batches`` = the number of layers: one group per layer."""
    groups = {}
    for name, _ in model.named_parameters():
        match = re.search(r'\.(\d+)\.', name)
        groups.setdefault(match.group(1) if match else 'rest', []).append(name)
    return list(groups.values())


def _sync(model, groups=None, exported=None):
    """What ms-swift does around each export of the merged weights to vLLM, group by group."""
    from swift.rlhf_trainers.utils import patch_lora_merge, patch_lora_unmerge
    with torch.no_grad():
        for group in groups or [None]:
            with patch_lora_merge(model, group):
                model.merge_adapter()
            if exported is not None:
                exported.update({n: p.detach().clone() for n, p in model.named_parameters() if 'base_layer' in n and (
                    group is None or n in group)})
            with patch_lora_unmerge(model):
                model.unmerge_adapter()


def _base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if 'base_layer' in n}


def _adapters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if 'lora_' in n}


def _teacher_logits(model):
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad(), model.disable_adapter():  # the shared-base teacher: the base without the adapter
        return model(input_ids=ids).logits


def _changed_fraction(before, after):
    changed = sum(int((before[n] != after[n]).sum()) for n in before)
    return changed / sum(t.numel() for t in before.values())


def _max_drift(before, after):
    return max(float((before[n].double() - after[n].double()).abs().max()) for n in before)


def test_in_place_round_trips_move_the_base_and_round_the_adapters(lora_student):
    """ms-swift's behaviour, the defect: the frozen base (the student's own, and the teacher that reads it) drifts,
    and the float32 adapters become bf16 at the first sync (with this random adapter 68% of the base entries change
    at the first round trip; after 3 the largest drift is about 2e-3)."""
    before, adapters, teacher_before = _base_weights(lora_student), _adapters(lora_student), _teacher_logits(
        lora_student)
    assert {t.dtype for t in adapters.values()} == {torch.float32}
    for _ in range(ROUND_TRIPS):
        _sync(lora_student, _groups(lora_student))
    assert _changed_fraction(before, _base_weights(lora_student)) > 0.01
    assert _max_drift(before, _base_weights(lora_student)) > 0
    assert not torch.equal(_teacher_logits(lora_student), teacher_before)
    after = _adapters(lora_student)
    assert {t.dtype for t in after.values()} == {torch.bfloat16}
    assert _changed_fraction(adapters, {n: t.float() for n, t in after.items()}) > 0.5


@pytest.mark.parametrize('grouped', [True, False], ids=['move_model_batches', 'whole_model'])
def test_exact_syncs_keep_base_adapters_and_teacher(lora_student, grouped):
    before, adapters, teacher_before = _base_weights(lora_student), _adapters(lora_student), _teacher_logits(
        lora_student)
    buffer = HostBuffer(pin=False)
    for _ in range(ROUND_TRIPS):
        with exact_lora_sync([lora_student], buffer):
            _sync(lora_student, _groups(lora_student) if grouped else None)
    assert _changed_fraction(before, _base_weights(lora_student)) == 0
    after = _adapters(lora_student)
    assert all(after[n].dtype == torch.float32 and torch.equal(after[n], adapters[n]) for n in adapters)
    assert torch.equal(_teacher_logits(lora_student), teacher_before)


def test_what_vllm_receives_is_what_the_in_place_merge_gives(lora_student):
    import copy
    reference = copy.deepcopy(lora_student)
    expected, got = {}, {}
    _sync(reference, _groups(reference), exported=expected)
    with exact_lora_sync([lora_student], HostBuffer(pin=False)):
        _sync(lora_student, _groups(lora_student), exported=got)
    assert expected.keys() == got.keys() and all(torch.equal(expected[n], got[n]) for n in expected)
    assert _changed_fraction(_base_weights(lora_student), got) > 0.5  # they are merged weights


def test_the_host_buffer_holds_one_group_and_is_reused(lora_student):
    """With one group per layer the buffer holds the largest group's LoRA base weights, not the whole base (the old
    keeper copied every base weight to fresh host memory at each sync), and later syncs reuse it."""
    groups = _groups(lora_student)
    base = _base_weights(lora_student)
    per_group = [sum(base[n].numel() * base[n].element_size() for n in g if n in base) for g in groups]
    buffer = HostBuffer(pin=False, min_chunk=0)
    with exact_lora_sync([lora_student], buffer):
        _sync(lora_student, groups)
    held, chunks = buffer.num_bytes, [c.data_ptr() for c in buffer._chunks]
    assert max(per_group) <= held <= max(per_group) + 64 * len(base)
    assert held < 0.6 * sum(per_group)
    for _ in range(2):
        with exact_lora_sync([lora_student], buffer):
            _sync(lora_student, groups)
    assert buffer.num_bytes == held and [c.data_ptr() for c in buffer._chunks] == chunks


def test_adapter_only_syncs_do_not_merge(lora_student):
    from peft import get_peft_model_state_dict
    before, adapters = _base_weights(lora_student), _adapters(lora_student)
    expected = get_peft_model_state_dict(lora_student)
    with lora_merges_skipped([lora_student]):
        _sync(lora_student)
        assert not any(m.merged for m in lora_student.modules() if hasattr(m, 'merged_adapters'))
        sent = get_peft_model_state_dict(lora_student)
    assert _changed_fraction(before, _base_weights(lora_student)) == 0
    assert all(torch.equal(_adapters(lora_student)[n], adapters[n]) for n in adapters)
    assert sent.keys() == expected.keys() and all(torch.equal(sent[k], expected[k].to(sent[k].dtype)) for k in expected)


def test_keeper_for_merges_of_every_layer_at_once(lora_student):
    """``megatron rlhf``'s order: save everything, merge all, unmerge all, restore."""
    before, adapters, teacher_before = _base_weights(lora_student), _adapters(lora_student), _teacher_logits(
        lora_student)
    keeper = BaseWeightsKeeper(HostBuffer(pin=False))
    for _ in range(ROUND_TRIPS):
        keeper.save([lora_student])
        _sync(lora_student)
        keeper.restore()
    assert _changed_fraction(before, _base_weights(lora_student)) == 0
    after = _adapters(lora_student)
    assert all(after[n].dtype == torch.float32 and torch.equal(after[n], adapters[n]) for n in adapters)
    assert torch.equal(_teacher_logits(lora_student), teacher_before)


def _sync_out_of_place(model, groups, sent, max_bytes=1 << 40, during=None):
    """``swift rlhf``'s sync with the out-of-place merge: ms-swift's merge per group, its state dict (the parameters'
    ``.data``, as ``_collect_state_dict_for_vllm`` reads them), sent part by part through
    :meth:`LoraSync.merged_chunks` as the plugin's ``_load_state_dict_to_vllm`` does, then ms-swift's unmerge."""
    from swift.rlhf_trainers.utils import patch_lora_merge, patch_lora_unmerge
    parts = []
    with exact_lora_sync([model], HostBuffer(pin=False, min_chunk=0), out_of_place=True) as sync, torch.no_grad():
        for group in groups:
            with patch_lora_merge(model, group):
                model.merge_adapter()
            state_dict = {n: p.data for n, p in model.named_parameters() if n in group and 'lora_' not in n}
            if during is not None:
                during(sync, state_dict)
            for chunk in sync.merged_chunks(state_dict, max_bytes):
                parts.append(sum(v.numel() * v.element_size() for n, v in chunk.items()
                                 if v.data_ptr() != state_dict[n].data_ptr()))
                sent.update({n: v.clone() for n, v in chunk.items() if 'base_layer' in n})
                del chunk
            with patch_lora_unmerge(model):
                model.unmerge_adapter()
    return sync, parts


def test_out_of_place_sync_sends_the_in_place_merge_and_writes_nothing(lora_student):
    """Out of place, vLLM receives exactly what ms-swift's in-place merge gives (its first sync, before any drift),
    the student's base is never written (not even during the sync: a shared-base teacher reading it meanwhile sees
    the base), no host memory is taken, and the adapters keep their float32 tensors."""
    import copy
    reference = copy.deepcopy(lora_student)
    expected = {}
    _sync(reference, _groups(reference), exported=expected)
    before, adapters, teacher_before = _base_weights(lora_student), _adapters(lora_student), _teacher_logits(
        lora_student)
    pointers = {n: p.data_ptr() for n, p in lora_student.named_parameters()}

    def during(sync, state_dict):  # merged, not yet sent: the parameters still hold the base
        assert sync.pending == any('base_layer' in n for n in state_dict)
        assert all(torch.equal(state_dict[n], before[n]) for n in state_dict if n in before)

    for _ in range(ROUND_TRIPS):
        got = {}
        sync, _ = _sync_out_of_place(lora_student, _groups(lora_student), got, during=during)
        assert got.keys() == expected.keys() and all(torch.equal(expected[n], got[n]) for n in expected)
        assert sync.merged_out_of_place == len(expected) and sync.buffer.num_bytes == 0
    assert _changed_fraction(before, _base_weights(lora_student)) == 0
    assert {n: p.data_ptr() for n, p in lora_student.named_parameters()} == pointers
    after = _adapters(lora_student)
    assert all(after[n].dtype == torch.float32 and torch.equal(after[n], adapters[n]) for n in adapters)
    assert torch.equal(_teacher_logits(lora_student), teacher_before)


def test_out_of_place_parts_hold_about_the_budget(lora_student):
    """One group holding the whole model, a budget of its largest base weight: each part's merged temporaries
    stay under the budget plus one weight, and every LoRA base weight is sent once."""
    base = _base_weights(lora_student)
    largest = max(t.numel() * t.element_size() for t in base.values())
    got = {}
    _, parts = _sync_out_of_place(lora_student, [[n for n, _ in lora_student.named_parameters()]], got,
                                  max_bytes=largest)
    assert len(parts) > 2 and max(parts) < 2 * largest
    assert sum(parts) == sum(t.numel() * t.element_size() for t in base.values())
    assert got.keys() == base.keys()


def test_out_of_place_falls_back_in_place_for_converted_weights_and_dora(tiny_ws):
    """A sync that sends converted weights (a copy, not the parameter: here the last layer's) gets those layers
    merged in place after all, and DoRA layers (merge: more than an addition) always are; the base and the adapters
    still come back bit for bit, and what is sent equals the in-place merge."""
    import copy
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_ws.student, dtype=torch.bfloat16)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj'], init_lora_weights=False,
                        use_dora=True, exclude_modules=['model.layers.0.self_attn.v_proj'])
    model = get_peft_model(model, config).eval()
    peft_dora_off = model.base_model.model.model.layers[0].self_attn.v_proj
    assert not hasattr(peft_dora_off, 'lora_A')  # excluded: plain base
    model2 = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_ws.student, dtype=torch.bfloat16),
                            LoraConfig(r=4, lora_alpha=8, target_modules=['up_proj'], init_lora_weights=False))
    # one model with plain LoRA layers (up_proj) and DoRA layers (q_proj, v_proj)
    model.base_model.model.model.layers[0].mlp.up_proj = model2.base_model.model.model.layers[0].mlp.up_proj
    model.base_model.model.model.layers[1].mlp.up_proj = model2.base_model.model.model.layers[1].mlp.up_proj
    reference = copy.deepcopy(model)
    expected = {}
    _sync(reference, _groups(reference), exported=expected)
    before, adapters = _base_weights(model), _adapters(model)

    def during(sync, state_dict):
        if any('layers.1.' in n for n in state_dict):  # a conversion: the sender's tensors are copies
            assert sync.unsent({n: t.clone() for n, t in state_dict.items()}.values())
            sync.merge_pending_in_place()
            state_dict.update({n: p.data for n, p in model.named_parameters() if n in state_dict})

    got = {}
    sync, _ = _sync_out_of_place(model, _groups(model), got, during=during)
    assert got.keys() == expected.keys() and all(torch.equal(expected[n], got[n]) for n in expected)
    assert 0 < sync.merged_out_of_place < len(expected)
    assert _changed_fraction(before, _base_weights(model)) == 0
    assert all(torch.equal(_adapters(model)[n], adapters[n]) for n in adapters)


def test_out_of_place_merge_never_sent_is_an_error(lora_student):
    from swift.rlhf_trainers.utils import patch_lora_merge, patch_lora_unmerge
    with pytest.raises(RuntimeError, match='never sent merged'):
        with exact_lora_sync([lora_student], HostBuffer(pin=False), out_of_place=True):
            with patch_lora_merge(lora_student, None):
                lora_student.merge_adapter()
            with patch_lora_unmerge(lora_student):
                lora_student.unmerge_adapter()
