"""swift-gkd-plugin: a Generalized Knowledge Distillation trainer for ms-swift (`swift rlhf --rlhf_type gkd`)."""
__version__ = '0.1.0'
