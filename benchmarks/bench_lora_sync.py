"""Host memory, time and base drift of the LoRA merge/unmerge round trips of vLLM weight syncs (issue 21, items 2, 20).

Builds a bf16 Qwen3-style model with float32 LoRA adapters on every linear layer (peft's default), perturbs the adapters
as training would, and runs ``--syncs`` weight syncs the way ``swift rlhf``'s ``_move_full_model_to_vllm`` does
(ms-swift's own merge/unmerge patches, one parameter group per ``--move_model_batches`` group), without vLLM (the
export itself is left out). Four variants, each in a fresh process (peak RSS is per process):

* ``in_place``: ms-swift as it is: the base drifts, the adapters are rounded to bf16;
* ``copy_all``: the plugin's previous keeper: every LoRA base weight copied to fresh host memory at each sync;
* ``exact_sync``: :func:`~swift_gkd_plugin.core.weights.lora_round_trip.exact_lora_sync` in place: one group at a time,
  in a host buffer reused across syncs (the plugin before issue 47);
* ``out_of_place``: the same, ``out_of_place=True`` (the plugin now): a merge writes nothing; the state dict goes out
  in parts of ``--bucket_mb`` with each base weight swapped for a merged temporary.

Reports the host memory each variant holds to restore the base (on a GPU machine, the host memory the sync costs),
the extra peak RSS of the process (on CPU it also counts peft's float32 merge temporaries, which on a GPU live on the
device), the median sync time (the three variants interleaved on one model), the largest absolute drift of any base
weight after the syncs and the adapters' dtype.

    python benchmarks/bench_lora_sync.py [--syncs N] [--move_model_batches G] [--layers L] [--bucket_mb M]
                                         [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ('in_place', 'copy_all', 'exact_sync', 'out_of_place')


def build(layers: int, device: str = 'cpu'):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen3Config
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=1024, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=4, head_dim=64, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to(device)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules='all-linear', init_lora_weights=False)
    model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if 'lora_' in name:
                param.add_(torch.randn_like(param) * 1e-3)  # float32 values bf16 cannot hold, as after training
    return model


def groups_of(model, n_groups: int):
    """ms-swift's ``split_batches``: layers split into ``n_groups`` ranges, the rest in one more group."""
    n_layers = model.config.num_hidden_layers
    per = -(-n_layers // n_groups)
    groups = {}
    for name, _ in model.named_parameters():
        match = re.search(r'\.(\d+)\.', name)
        groups.setdefault(int(match.group(1)) // per if match else 'rest', []).append(name)
    return list(groups.values())


def sync(model, groups, lora_sync=None, bucket_mb: int = 512):
    """ms-swift's merge, the group's state dict (``param.data``, as ``_collect_state_dict_for_vllm`` reads it) and
    ms-swift's unmerge, per group; with ``lora_sync`` (out of place) the state dict is sent in parts with the merged
    values swapped in, as the plugin's ``_load_state_dict_to_vllm`` does (the export itself is left out)."""
    import torch
    from swift.rlhf_trainers.utils import patch_lora_merge, patch_lora_unmerge
    with torch.no_grad():
        for group in groups:
            with patch_lora_merge(model, group):
                model.merge_adapter()
            state_dict = {n: p.data for n, p in model.named_parameters() if n in group}
            if lora_sync is not None:
                for part in lora_sync.merged_chunks(state_dict, bucket_mb << 20):
                    del part
            del state_dict
            with patch_lora_unmerge(model):
                model.unmerge_adapter()


def copy_all_round_trip(model, groups):
    """The previous keeper (main before issue 21): every LoRA base weight to fresh pageable memory, per sync."""
    import torch
    from peft.tuners.lora import LoraLayer
    saved = [(layer, p, p.detach().to('cpu', copy=True)) for layer in model.modules() if isinstance(layer, LoraLayer)
             for p in layer.get_base_layer().parameters()]
    sync(model, groups)
    with torch.no_grad():
        for layer, p, s in saved:
            p.data.copy_(s)


BUCKET_MB = [512]  # ms-swift's SWIFT_UPDATE_WEIGHTS_BUCKET_SIZE default; --bucket_mb


def _round_trip(variant: str, model, groups, buffer) -> None:
    from swift_gkd_plugin.core.weights.lora_round_trip import exact_lora_sync
    if variant == 'in_place':
        sync(model, groups)
    elif variant == 'copy_all':
        copy_all_round_trip(model, groups)
    elif variant == 'exact_sync':
        with exact_lora_sync([model], buffer):
            sync(model, groups)
    else:
        with exact_lora_sync([model], buffer, out_of_place=True) as lora_sync:
            sync(model, groups, lora_sync, BUCKET_MB[0])


def run_variant(variant: str, syncs: int, n_groups: int, layers: int, device: str = 'cpu') -> dict:
    """Memory and drift of one variant, alone in this process."""
    from swift_gkd_plugin.core.weights.lora_round_trip import HostBuffer
    model = build(layers, device)
    groups = groups_of(model, n_groups)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if 'base_layer' in n}
    lora_bytes = sum(t.numel() * t.element_size() for t in base.values())
    group_bytes = max(sum(base[n].numel() * base[n].element_size() for n in g if n in base) for g in groups)
    buffer = HostBuffer()
    cuda = device.startswith('cuda')
    if cuda:
        import torch
        torch.cuda.reset_peak_memory_stats()
        device_before = torch.cuda.memory_allocated()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(syncs):
        _round_trip(variant, model, groups, buffer)
    extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    extra_device = (torch.cuda.max_memory_allocated() - device_before) / 2**20 if cuda else None
    drift = max(float((p.detach().double() - base[n].double()).abs().max()) for n, p in model.named_parameters()
                if n in base)
    held = {'in_place': 0, 'copy_all': lora_bytes, 'exact_sync': buffer.num_bytes, 'out_of_place': buffer.num_bytes}[
        variant]
    dtypes = sorted({str(p.dtype).replace('torch.', '') for n, p in model.named_parameters() if 'lora_' in n})
    return dict(variant=variant, extra_peak_rss_mb=extra / 2**20, held_mb=held / 2**20, lora_base_mb=lora_bytes / 2**20,
                largest_group_mb=group_bytes / 2**20, max_base_drift=drift, adapter_dtypes=dtypes, groups=len(groups),
                extra_peak_device_mb=extra_device)


def time_variants(syncs: int, n_groups: int, layers: int, device: str = 'cpu') -> dict:
    """Sync times of the three variants on one model, interleaved (the machine's load hits all alike): medians."""
    import torch
    from swift_gkd_plugin.core.weights.lora_round_trip import HostBuffer
    model = build(layers, device)
    groups = groups_of(model, n_groups)
    buffer = HostBuffer()
    sync_device = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)
    times = {v: [] for v in VARIANTS}
    for _ in range(syncs + 1):
        for variant in VARIANTS:
            sync_device()
            start = time.perf_counter()
            _round_trip(variant, model, groups, buffer)
            sync_device()
            times[variant].append(time.perf_counter() - start)
    return {v: statistics.median(t[1:]) for v, t in times.items()}  # the first round allocates the buffer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--syncs', type=int, default=3)
    parser.add_argument('--move_model_batches', type=int, default=4)
    parser.add_argument('--layers', type=int, default=8)
    parser.add_argument('--device', default='cpu', help='cuda: the model on the GPU (RSS then counts host memory only)')
    parser.add_argument('--bucket_mb', type=int, default=512, help='out_of_place: merged MB per part sent')
    parser.add_argument('--variant', default=None, help=argparse.SUPPRESS)  # internal: one variant, in this process
    args = parser.parse_args()
    BUCKET_MB[0] = args.bucket_mb
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.syncs, args.move_model_batches, args.layers, args.device)))
        return 0
    results = {}
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, '--variant', variant, '--syncs', str(args.syncs),
                              '--move_model_batches', str(args.move_model_batches), '--layers', str(args.layers),
                              '--device', args.device, '--bucket_mb', str(args.bucket_mb)],
                             capture_output=True, text=True, check=True,
                             env=dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536'))  # freed memory leaves the RSS
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(results[variant]))
    times = time_variants(args.syncs, args.move_model_batches, args.layers, args.device)
    print(json.dumps({'median_sync_s': times}))
    old, new, ms, oop = results['copy_all'], results['exact_sync'], results['in_place'], results['out_of_place']
    print(f"LoRA base weights {new['lora_base_mb']:.0f} MB, largest of {new['groups']} groups "
          f"{new['largest_group_mb']:.0f} MB; {args.syncs} syncs")
    print(f"host memory held for the restore: copy_all {old['held_mb']:.0f} MB, exact_sync {new['held_mb']:.0f} MB, "
          f"out_of_place {oop['held_mb']:.0f} MB")
    print(f"extra peak RSS (on CPU it includes the merge temporaries, which on a GPU live on the device): in_place "
          f"{ms['extra_peak_rss_mb']:.0f} MB, copy_all {old['extra_peak_rss_mb']:.0f} MB, exact_sync "
          f"{new['extra_peak_rss_mb']:.0f} MB, out_of_place {oop['extra_peak_rss_mb']:.0f} MB")
    if args.device.startswith('cuda'):
        print('extra peak device memory: ' + ', '.join(f"{v} {results[v]['extra_peak_device_mb']:.0f} MB"
                                                       for v in VARIANTS))
    print(f"median sync time: " + ', '.join(f'{v} {times[v]:.3f} s' for v in VARIANTS) +
          f" (exact_sync/out_of_place {times['exact_sync'] / times['out_of_place']:.2f}x)")
    print(f"max |base drift| after {args.syncs} syncs: " + ', '.join(
        f"{v} {results[v]['max_base_drift']:.3g}" for v in VARIANTS) + '; adapters after: ' + ', '.join(
        f"{v} {results[v]['adapter_dtypes']}" for v in VARIANTS))
    return 0

if __name__ == '__main__':
    sys.exit(main())
