"""A frozen model's weights: kept on the CPU except while it runs, and exact LoRA round trips for the syncs to vLLM;
a model's weights made trainable again after ZeRO-3 gathered them under ``torch.inference_mode()``.

In: modules. Out: the same modules, their weights where they were.
"""
