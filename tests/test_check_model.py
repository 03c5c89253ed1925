"""``--check_model`` (ms-swift's, on by default) on a local folder ModelScope did not download: the plugin turns it
off and says so, instead of asking the hub about a model it reads as ``unknown`` and waiting through its retries
(an offline machine's every run spent them)."""
from types import SimpleNamespace

from conftest import base_args, run_swift

from swift_gkd_plugin.options.hub_models import resolve_check_model


def test_a_local_folder_is_not_checked_against_the_hub(tiny_ws, tmp_path):
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), max_steps=1, lmbda=0, check_model=None))
    assert f'--check_model false: --model {tiny_ws.student} is not a ModelScope download' in run.output
    assert 'Repo unknown' not in run.output and 'listing failed' not in run.output, run.output[-3000:]


def test_a_modelscope_download_keeps_the_check(tmp_path):
    """A folder with ModelScope's snapshot meta (``.mdl``) or a git clone keeps ms-swift's check; ``--check_model
    false`` stays false; ms-swift built the trainer's copy of the arguments first: it follows."""
    for marker in ('.mdl', '.git'):
        folder = tmp_path / marker.strip('.')
        folder.mkdir()
        (folder / marker).mkdir() if marker == '.git' else (folder / marker).write_bytes(b'')
        args = SimpleNamespace(model_dir=str(folder), check_model=True, training_args=SimpleNamespace(check_model=True))
        resolve_check_model(args)
        assert args.check_model and args.training_args.check_model
    plain = tmp_path / 'plain'
    plain.mkdir()
    args = SimpleNamespace(model_dir=str(plain), check_model=True, training_args=SimpleNamespace(check_model=True))
    resolve_check_model(args)
    assert not args.check_model and not args.training_args.check_model
    args = SimpleNamespace(model_dir=str(plain), check_model=False)
    resolve_check_model(args)
    assert args.check_model is False
