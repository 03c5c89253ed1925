"""The parts of the Megatron trainer that need Megatron-SWIFT itself (megatron-core, transformer-engine, CUDA).

On a machine without that stack these tests skip with the reason; ``tests/gpu/run_megatron_gkd.sh`` runs the trainer
end to end where it exists."""
import pytest

pytest.importorskip('transformer_engine', reason='Megatron-SWIFT needs transformer-engine (CUDA)')
pytest.importorskip('megatron.core', reason='Megatron-SWIFT needs megatron-core')


def test_the_rlhf_pipeline_parses_and_trains_with_the_plugin():
    from swift.megatron.pipelines.train import rlhf

    from swift_gkd_plugin.megatron.setup.arguments import GKDPluginMegatronRLHFArguments
    from swift_gkd_plugin.megatron.trainer import GKDPluginMegatronTrainer
    from swift.megatron.trainers.gkd_trainer import MegatronGKDTrainer
    assert rlhf.MegatronRLHF.args_class is GKDPluginMegatronRLHFArguments
    assert issubclass(GKDPluginMegatronTrainer, MegatronGKDTrainer)


def test_megatron_arguments_refuse_bad_flags_before_loading():
    from swift_gkd_plugin.megatron.setup.arguments import GKDPluginMegatronRLHFArguments
    with pytest.raises(ValueError, match='--teacher_tensor_model_parallel_size 2 differs'):
        GKDPluginMegatronRLHFArguments(model='Qwen/Qwen3-0.6B', rlhf_type='gkd',
                                       teacher_tensor_model_parallel_size=2)
