"""Framework-free GKD core: divergences, losses and the mode policy. Imports torch only, never ms-swift."""
from .divergence import align_vocab, generalized_jsd
from .fused_loss import fused_linear_jsd
from .modes import Mode, choose_mode
from .row_divergence import DIVERGENCES, Divergence

__all__ = ['DIVERGENCES', 'Divergence', 'Mode', 'align_vocab', 'choose_mode', 'fused_linear_jsd', 'generalized_jsd']
