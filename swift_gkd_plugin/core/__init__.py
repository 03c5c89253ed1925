"""Framework-free GKD core: divergences, losses and the mode policy. Imports torch only, never ms-swift."""
from swift_gkd_plugin.core.divergence import align_vocab, generalized_jsd
from swift_gkd_plugin.core.fused.loss import fused_linear_jsd
from swift_gkd_plugin.core.modes import Mode, choose_mode
from swift_gkd_plugin.core.row_divergence import DIVERGENCES, Divergence

__all__ = ['DIVERGENCES', 'Divergence', 'Mode', 'align_vocab', 'choose_mode', 'fused_linear_jsd', 'generalized_jsd']
