"""A frozen model's weights: kept on the CPU except while it runs, and exact LoRA round trips for the syncs to vLLM.

In: modules. Out: the same modules, their weights where they were.
"""
