"""The copy-of-the-student check (``core/guards/same_weights.py``) on real PEFT LoRA models: a LoRA student whose
adapter is fresh computes with its base, so a teacher holding those base weights is a copy (issue 65 item 4: the
names never matched, and the Megatron run trained every step to end with NothingLearnt)."""
import copy

import torch
from peft import LoraConfig, get_peft_model

from swift_gkd_plugin.core.guards.same_weights import computed_parameters, copy_of_the_student


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 8)
        self.q_proj = torch.nn.Linear(8, 8)
        self.o_proj = torch.nn.Linear(8, 8, bias=False)


def _pair(**lora):
    torch.manual_seed(0)
    teacher = Tiny()
    student = get_peft_model(copy.deepcopy(teacher), LoraConfig(r=2, target_modules=['q_proj', 'o_proj'], **lora))
    return dict(teacher.named_parameters()), student


def test_a_fresh_lora_student_computes_with_its_base():
    teacher, student = _pair()
    named = dict(student.named_parameters())
    assert any('.base_layer.' in n for n in named) and teacher.keys() != named.keys()  # what the old check compared
    assert computed_parameters(named).keys() == teacher.keys()
    assert copy_of_the_student(teacher, named)


def test_a_trained_adapter_or_another_base_is_not_a_copy():
    teacher, student = _pair()
    named = dict(student.named_parameters())
    with torch.no_grad():
        next(p for n, p in named.items() if 'lora_B' in n)[0, 0] = 1e-3
    assert computed_parameters(named) is None and not copy_of_the_student(teacher, named)
    teacher, student = _pair()
    with torch.no_grad():
        teacher['o_proj.weight'][1, 2] += 1e-6
    assert not copy_of_the_student(teacher, dict(student.named_parameters()))


def test_plain_models_and_layouts_not_read():
    torch.manual_seed(0)
    plain = dict(Tiny().named_parameters())
    assert computed_parameters(plain) is plain and copy_of_the_student(plain, dict(plain))
    teacher, student = _pair(modules_to_save=['embed'])
    assert computed_parameters(dict(student.named_parameters())) is None


def test_megatron_style_names():
    """mcore-bridge's LoRA on megatron-core layers names the base ``<layer>.base_layer.weight`` too."""
    w = torch.randn(4, 4, dtype=torch.float64)
    student = {'base_model.model.decoder.layers.0.self_attention.linear_qkv.base_layer.weight': w.clone(),
               'base_model.model.decoder.layers.0.self_attention.linear_qkv.lora_A.default.weight': torch.randn(2, 4),
               'base_model.model.decoder.layers.0.self_attention.linear_qkv.lora_B.default.weight': torch.zeros(4, 2)}
    assert copy_of_the_student({'decoder.layers.0.self_attention.linear_qkv.weight': w.clone()}, student)
