"""The GKD trainer that ``swift rlhf --rlhf_type gkd`` runs once the plugin is active (transformers/DeepSpeed path).

It reuses ms-swift's rollout infrastructure (``RolloutTrainerMixin``: templates, transformers and vLLM engines,
vLLM client, teacher-server client, OPSD encoding) by subclassing ms-swift's ``GKDTrainer``, and replaces the GKD
logic with the plugin's core:

* the mode of each generation batch comes from :func:`swift_gkd_plugin.core.choose_mode` (on-policy, seq_kd with
  the teacher sampling, or off-policy), identical on every rank and reproducible on resume;
* the loss is the generalized JSD of :mod:`swift_gkd_plugin.core` on response tokens, summed in float32 and divided
  by the number of response tokens of the whole optimizer step (all micro-batches, all ranks), so its value and
  gradient do not depend on how the step is split into micro-batches or ranks.

The trainer composes plain objects, each built in the constructor with what it uses (the trainer itself as a
documented collaborator where it reads ms-swift's state or calls ms-swift's hooks) and handed to the stages that use
them: :class:`~.rollout.samplers.Samplers` (engines, request configs, sampling streams),
:class:`~.teacher.placement.TeacherModel` (where the teacher lives, its views and forward),
:class:`~.teacher.store.ScoreStore` (``--teacher_scores``, ``--save_teacher_scores``, score-only runs),
:class:`~.teacher.ahead.TeacherAhead` (a served teacher asked by the producer), :class:`~.rollout.prefetch.Prefetch`
(``--async_generate``) and :class:`~.teacher.reference.Reference` (``--gkd_ref_kl_coef``'s initial student). The mixins
are ms-swift's hooks, one per stage a batch passes: :mod:`.rollout.sampling` (each generation batch's mode and
samples), :mod:`.rollout.batches` (samples to micro-batches), :mod:`.teacher.placement` (a served teacher, the
teacher's top-k on the batch), :mod:`.step.scoring` (rewards, completions log), :mod:`.step.loss` (the loss of a
micro-batch and its metrics), and the hooks the objects take part in (vLLM's weight syncs, the store's and the
prefetch's checkpoints); where ms-swift calls a hook, the mixin's override delegates to the object. This module holds
their composition: the constructor is the list of the objects and set-ups.
"""
from __future__ import annotations

from swift.rlhf_trainers.gkd_trainer import GKDTrainer

from swift_gkd_plugin.options.flags import FlagError
from swift_gkd_plugin.server.client import TeacherServerError
from swift_gkd_plugin.swift.rollout.batches import BatchesMixin
from swift_gkd_plugin.swift.rollout.prefetch import Prefetch, PrefetchMixin, take_async_flag
from swift_gkd_plugin.swift.rollout.rollout_server import RolloutServerError
from swift_gkd_plugin.swift.rollout.samplers import Samplers, WeightSyncMixin
from swift_gkd_plugin.swift.rollout.sampling import RolloutMixin
from swift_gkd_plugin.swift.run.clean_exit import note_run_failed, note_training_finished, setup_clean_exit
from swift_gkd_plugin.swift.run.guards import RunError, install_run_guards, server_failed_message
from swift_gkd_plugin.swift.sequence_parallel import setup_sequence_parallel
from swift_gkd_plugin.swift.setup.adapters import warn_unadapted_experts
from swift_gkd_plugin.swift.setup.command_line import PROG, refuse
from swift_gkd_plugin.swift.step.loss import LossMixin
from swift_gkd_plugin.swift.step.scoring import ScoringMixin
from swift_gkd_plugin.swift.teacher.ahead import TeacherAhead
from swift_gkd_plugin.swift.teacher.placement import TeacherMixin, TeacherModel
from swift_gkd_plugin.swift.teacher.reference import Reference
from swift_gkd_plugin.swift.teacher.store import ScoreStore, TeacherStoreMixin


class GKDPluginTrainer(TeacherStoreMixin, PrefetchMixin, LossMixin, RolloutMixin, WeightSyncMixin, ScoringMixin,
                       BatchesMixin, TeacherMixin, GKDTrainer):
    """ms-swift's GKD trainer with the plugin's modes (seq_kd included), loss, normalisation and metrics."""

    def __init__(self, *args, **kwargs):
        """ms-swift's trainer, then each feature's object or set-up, in its own room (a new feature adds one line
        here)."""
        ref_model = kwargs.pop('ref_model', None)  # --gkd_ref_kl_coef's copy (ms-swift's GKDTrainer takes none)
        self._sampling_turn = 0  # a multi-turn rollout's later turn, while it samples (vLLM's request seeds)
        self.samplers = Samplers(self)  # rollout/samplers.py: engines, request configs (ms-swift's asks for one)
        async_generate = take_async_flag(kwargs['args'])  # before ms-swift's trainer reads it
        super().__init__(*args, **kwargs)
        setup_sequence_parallel(self.args, self.template)  # sequence_parallel.py: a group reads one set of rows
        self.reference = Reference(self, ref_model)  # teacher/reference.py: --gkd_ref_kl_coef's anchor
        setup_clean_exit(self)  # run/clean_exit.py: process groups and a colocated engine shut down at exit
        install_run_guards(self)  # run/guards.py: a training set smaller than one batch, a save out of space, ...
        self._setup_sampling()  # rollout/sampling.py: modes, sampling temperature, scheduler guard, sampler log-probs
        self.teacher = TeacherModel(self)  # teacher/placement.py: views, teacher adapter, offload, cross-tokenizer
        self.score_store = ScoreStore(self)  # teacher/store.py: --teacher_scores, --save_teacher_scores, score-only
        warn_unadapted_experts(self)  # setup/adapters.py: a MoE student's LoRA without its fused experts
        self._setup_loss()  # step/loss.py: fused or dense, the divergence, normalisation over the step
        self._setup_scoring()  # step/scoring.py: rewards, token-weighted metrics, the completions window
        self.teacher_ahead = TeacherAhead(self, async_generate)  # teacher/ahead.py: served teachers asked ahead
        self.prefetch = Prefetch(self, async_generate)  # rollout/prefetch.py: --async_generate

    def train(self, *args, **kwargs):
        """Training; a run stopped by a guard (:class:`RunError`, a :class:`FlagError` known only now) or by a teacher
        server that stayed unreachable or a rollout server that failed ends with its one ``swift rlhf: error:`` line and
        exit code 1, no traceback."""
        try:
            self.score_store.check_teacher()  # teacher/store.py: a loaded teacher that is not the store's stops here
            result = super().train(*args, **kwargs)
            if self.args.gkd_score_only:
                self.score_store.finish_score_only()  # teacher/store.py: the last shards, the datasets the store covers
        except (RunError, FlagError) as exc:
            note_run_failed()
            refuse(PROG, exc, code=1)
        except TeacherServerError as exc:  # its retries and wait spent: the error, and where to resume from
            note_run_failed()
            refuse(PROG, server_failed_message(self, exc), code=1)
        except RolloutServerError as exc:  # the student's vLLM server (--vllm_mode server) failed or went away
            note_run_failed()
            refuse(PROG, server_failed_message(self, exc, 'the student\'s rollout server'), code=1)
        finally:
            self.score_store.flush()  # what the teacher scored is kept, whatever stopped the run
        note_training_finished()  # a clean exit may now skip interpreter finalization (see clean_exit)
        return result

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """The plugin's ``README.md`` in the run folder (:func:`~swift_gkd_plugin.swift.run.records.write_model_card`:
        student, teacher, GKD settings, a snippet that runs on a CPU) in place of TRL's, which its ``_save_checkpoint``
        writes before each checkpoint."""
        from swift_gkd_plugin.swift.run.records import write_model_card
        write_model_card(self)
