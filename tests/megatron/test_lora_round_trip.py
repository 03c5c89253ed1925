"""The LoRA merge/unmerge round trip of every vLLM weight sync, in bf16, with real peft layers and ms-swift's own merge
and unmerge patches (the sequence of ``swift rlhf``'s ``_move_full_model_to_vllm``; ``megatron rlhf`` merges the same
peft ``LoraLayer`` subclass): in place it moves the frozen base, hence a shared-base teacher; with
:func:`exact_lora_round_trip` the base and the teacher's logits stay bit-for-bit the same."""
import pytest
import torch

from swift_gkd_plugin.core.lora_round_trip import exact_lora_round_trip

ROUND_TRIPS = 3


@pytest.fixture()
def lora_student(tiny_ws):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_ws.student, dtype=torch.bfloat16)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj', 'up_proj'], init_lora_weights=False)
    return get_peft_model(model, config).eval()  # init_lora_weights=False: a trained-looking adapter (B != 0)


def _sync_round_trip(model):
    """What ms-swift does around each export of the merged weights to vLLM."""
    from swift.rlhf_trainers.utils import patch_lora_merge, patch_lora_unmerge
    with torch.no_grad():
        with patch_lora_merge(model):
            model.merge_adapter()
        with patch_lora_unmerge(model):
            model.unmerge_adapter()


def _base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if 'base_layer' in n}


def _teacher_logits(model):
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad(), model.disable_adapter():  # the shared-base teacher: the base without the adapter
        return model(input_ids=ids).logits


def _changed_fraction(before, after):
    changed = sum(int((before[n] != after[n]).sum()) for n in before)
    return changed / sum(t.numel() for t in before.values())


def test_in_place_round_trips_move_the_bf16_base(lora_student):
    """ms-swift's behaviour (and the keeper's when disabled), the defect: the frozen base, and the teacher that reads
    it, drift (with this random adapter 68% of the base entries change at the first round trip)."""
    before, teacher_before = _base_weights(lora_student), _teacher_logits(lora_student)
    for _ in range(ROUND_TRIPS):
        with exact_lora_round_trip([lora_student], enabled=False):
            _sync_round_trip(lora_student)
    assert _changed_fraction(before, _base_weights(lora_student)) > 0.01
    assert not torch.equal(_teacher_logits(lora_student), teacher_before)


def test_exact_round_trips_keep_the_base_and_the_teacher(lora_student):
    before, teacher_before = _base_weights(lora_student), _teacher_logits(lora_student)
    for _ in range(ROUND_TRIPS):
        with exact_lora_round_trip([lora_student]):
            _sync_round_trip(lora_student)
    assert _changed_fraction(before, _base_weights(lora_student)) == 0
    assert torch.equal(_teacher_logits(lora_student), teacher_before)


def test_what_vllm_receives_is_still_the_merged_model(lora_student):
    """The keeper only restores after the unmerge: inside the round trip the weights are merged as before."""
    reference = _base_weights(lora_student)
    with exact_lora_round_trip([lora_student]):
        with torch.no_grad():
            lora_student.merge_adapter()
        merged = _base_weights(lora_student)
        with torch.no_grad():
            lora_student.unmerge_adapter()
    assert _changed_fraction(reference, merged) > 0.5
    assert _changed_fraction(reference, _base_weights(lora_student)) == 0
