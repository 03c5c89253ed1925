"""ms-swift's process-wide state that GKD runs change and both argument adapters read: GRPO's ``num_generations``
default (saved before activation unsets it) and the dataset columns ms-swift keeps. ms-swift is imported inside the
functions only."""
from __future__ import annotations

_GRPO_NUM_GENERATIONS = {}  # ms-swift's default num_generations (GRPO's G), read before it is unset


def remember_grpo_num_generations(default: int) -> int:
    """Save ms-swift's default ``num_generations`` before activation unsets it (the first value saved stays)."""
    return _GRPO_NUM_GENERATIONS.setdefault('value', default)


def grpo_num_generations() -> int:
    """ms-swift's default ``num_generations`` (GRPO's G), also after activation has unset it
    (:func:`swift_gkd_plugin.entry.activation.on_rlhf_arguments_imported`)."""
    if 'value' not in _GRPO_NUM_GENERATIONS:
        from swift.arguments import RLHFArguments
        _GRPO_NUM_GENERATIONS['value'] = RLHFArguments.__dataclass_fields__['num_generations'].default
    return _GRPO_NUM_GENERATIONS['value']


def keep_teacher_messages_column() -> None:
    """ms-swift keeps only the dataset columns it knows (``teacher_prompt`` among them); GKD runs also keep
    ``teacher_messages``, the teacher's whole prompt conversation. Called by both argument classes' GKD checks."""
    from swift.dataset.preprocessor.core import RowPreprocessor
    if 'teacher_messages' not in RowPreprocessor.standard_keys:
        RowPreprocessor.standard_keys.append('teacher_messages')


def data_source(mode):
    """ms-swift's ``DataSource`` of a GKD mode (:data:`swift_gkd_plugin.core.modes.DATA_SOURCES`: on-policy is the
    student's, seq_kd the teacher's, off-policy the dataset's), as ms-swift's GKD loss and encoding take it."""
    from swift.rlhf_trainers.gkd_loss import DataSource

    from swift_gkd_plugin.core.modes import DATA_SOURCES
    return DataSource(DATA_SOURCES[mode])


def mode_of(source):
    """The GKD mode of an ms-swift ``DataSource`` (the inverse of :func:`data_source`)."""
    from swift_gkd_plugin.core.modes import DATA_SOURCES
    value = getattr(source, 'value', source)
    return next(mode for mode, name in DATA_SOURCES.items() if name == value)
