"""Constants shared by the core, both adapters and the server: defined once here (no ms-swift import)."""
from __future__ import annotations

#: Label of a position that has no loss (transformers' and ms-swift's ignore index).
IGNORE_INDEX = -100

#: The dataset columns that give a teacher a view of its own (a privileged prompt): ms-swift's OPSD columns.
PRIVILEGED_COLUMNS = ('teacher_prompt', 'teacher_messages')

#: Finite stand-in for -inf logits: exp() underflows to exactly 0 and differences stay finite (no NaN from inf - inf).
NEG_LOGIT = -1e30

#: How group advantages are scaled (``--scale_rewards``): by the group's std, the batch's std, or not at all.
SCALE_REWARDS = ('group', 'batch', 'none')

#: Corrections of the gap between the sampler and the trained policy (``--rollout_importance_sampling_mode``, the
#: names and meanings of ms-swift's GRPO): truncate or mask the per-token or per-sequence importance ratio at a threshold.
ROLLOUT_IS_MODES = ('token_truncate', 'token_mask', 'sequence_truncate', 'sequence_mask')
