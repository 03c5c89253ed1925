"""A vision-language student and teacher (tiny LLaVA-1.5, images in the dataset rows) through the real
``swift rlhf`` pipeline: a separate teacher in every mode, and the shared base (teacher = base, LoRA off).

The tiny models are ms-swift's ``llava1_5_hf`` model type / template (CLIP vision tower + Llama decoder): its
image path needs only Pillow (the Qwen-VL templates need torchvision, see
:mod:`harness.tiny_multimodal`).  The task -- name the colour of a square -- can only be solved
from the image, so models trained on it show whether the image reached each forward and each sampler.
"""
import json
import math
import os
import re
import shutil
from collections import Counter

import pytest
from conftest import Workspace, base_args, run_swift

from harness import tiny_multimodal as tmm

N_ROWS = 8  # one batch of 8 rows per step: each step sees every row once
MODES = {'off_policy': {'lmbda': 0}, 'on_policy': {'lmbda': 1}, 'seq_kd': {'lmbda': 0, 'seq_kd': 'true'}}
LORA = dict(tuner_type='lora', lora_dropout=0, seed=3, learning_rate=5e-3)


def _build(root):
    import torch
    from peft import LoraConfig, get_peft_model

    tok = tmm.build_tokenizer(os.path.join(root, 'tok'))
    tmm.build_model(os.path.join(root, 'student'), tok, seed=0, **tmm.STUDENT_KWARGS)
    teacher = tmm.build_model(os.path.join(root, 'teacher'), tok, seed=1, **tmm.TEACHER_KWARGS)
    trained_student = tmm.build_model(os.path.join(root, 'trained_student'), tok, seed=2, **tmm.STUDENT_KWARGS)
    images = tmm.write_images(os.path.join(root, 'images'))
    every_image = tmm.make_rows(images, len(images), seed=0)
    for path in (teacher, trained_student):
        # 120 steps name every colour on most CPUs; the rounding of another CPU's kernels can leave one square
        # wrong (seen: 11 of 12 on an AMD EPYC): a few more steps then, up to 3 rounds
        for _ in range(3):
            tmm.train(path, every_image, steps=120)
            if tmm.accuracy(path, every_image) == 1.0:
                break
        assert tmm.accuracy(path, every_image) == 1.0, f'{path} did not learn the colours'

    model = tmm.load_model(teacher)
    with torch.no_grad():  # the image features become zeros: the decoder sees no image at all
        model.model.multi_modal_projector.linear_2.weight.zero_()
        model.model.multi_modal_projector.linear_2.bias.zero_()
    model.save_pretrained(os.path.join(root, 'blind_teacher'))
    tok.save_pretrained(os.path.join(root, 'blind_teacher'))
    tmm.build_processor(os.path.join(root, 'blind_teacher'), tok)

    rows = tmm.make_rows(images, N_ROWS, seed=1)
    assert len({r['messages'][-1]['content'] for r in rows}) >= 3
    tmm.write_dataset(os.path.join(root, 'train.jsonl'), rows)

    torch.manual_seed(0)
    lora = get_peft_model(tmm.load_model(trained_student), LoraConfig(
        r=4, lora_alpha=32, target_modules=r'.*language_model.*\.(q_proj|v_proj|down_proj)', init_lora_weights=False))
    lora.save_pretrained(os.path.join(root, 'adapter_fit'))
    # the trained student's files under another name: ms-swift then loads a separate teacher
    os.symlink(trained_student, os.path.join(root, 'trained_student_alias'))
    image_prone = _build_image_prone(os.path.join(root, 'student'), os.path.join(root, 'image_prone_student'))
    # a teacher as image-prone but with other weights (a copy would agree with the student: nothing to learn)
    _build_image_prone(trained_student, os.path.join(root, 'image_prone_teacher'))


def _build_image_prone(source, out_dir):
    """A copy of ``source`` made to draw its ``<image>`` token at about half of the response positions: every text
    token's embedding leans along coordinate 0, and the head's ``<image>`` row reads only that coordinate."""
    import torch
    model = tmm.load_model(source)
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight[:, 0] += 4.0
        image_row = model.lm_head.weight[model.config.image_token_id]
        image_row.zero_()
        image_row[0] = math.log(model.lm_head.weight.shape[0]) / math.sqrt(model.config.text_config.hidden_size)
    model.save_pretrained(out_dir)
    tmm.load_processor(source).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope='module')
def mm(tmp_path_factory) -> Workspace:
    """Tiny LLaVA models, built once for all xdist workers: ``student`` (random), ``teacher`` (wider, trained: names
    every colour), ``blind_teacher`` (the trained teacher with its image features zeroed), ``trained_student``
    (student size, trained), ``image_prone`` (the student, made to draw ``<image>`` at about half of its response
    positions; ``image_prone_teacher``: the trained student made so), ``adapter`` (a non-zero LoRA on the trained
    student's decoder), ``alias`` (a symlink to the trained student) and ``train`` (8 image rows; ``answers`` counts
    their colours)."""
    from filelock import FileLock
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get('PYTEST_XDIST_WORKER'):
        shared = shared.parent  # common to the xdist workers of this run (and to no other run)
    root = str(shared / 'tiny_mm')
    with FileLock(str(shared / 'tiny_mm.lock')):
        done = os.path.join(root, 'done')
        if not os.path.exists(done):
            shutil.rmtree(root, ignore_errors=True)
            _build(root)
            open(done, 'w').close()
    train = os.path.join(root, 'train.jsonl')
    ws = Workspace(root, os.path.join(root, 'student'), os.path.join(root, 'teacher'), '', train, train)
    ws.blind_teacher = os.path.join(root, 'blind_teacher')
    ws.trained_student = os.path.join(root, 'trained_student')
    ws.adapter = os.path.join(root, 'adapter_fit')
    ws.alias = os.path.join(root, 'trained_student_alias')
    ws.image_prone = os.path.join(root, 'image_prone_student')
    ws.image_prone_teacher = os.path.join(root, 'image_prone_teacher')
    ws.answers = Counter(r['messages'][-1]['content'] for r in tmm.read_dataset(train))
    return ws


def mm_args(ws, output_dir, **overrides):
    flags = dict(model_type=tmm.MODEL_TYPE, teacher_model_type=tmm.MODEL_TYPE, template=tmm.TEMPLATE,
                 per_device_train_batch_size=N_ROWS, max_steps=2, seed=7, learning_rate=1e-3)
    return base_args(ws, output_dir, **{**flags, **overrides})


def _weights_loaded(run) -> int:
    return len(re.findall(r'Loading weights:\s+0%', run.output))


def _rel(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def _completions_per_step(run):
    with open(os.path.join(run.output_dir, 'completions.jsonl')) as f:
        return [[c.strip() for c in json.loads(line)['completion']] for line in f]


def _assert_samples_name_the_images(run, mm):
    """Every step's logged samples name exactly the colours of its images, which only the images tell."""
    for step in _completions_per_step(run):
        assert Counter(step) == mm.answers, step


def _assert_trained(run, mode, steps=2):
    assert [m['mode'] for m in run.modes()] == [mode] * steps
    assert len(run.losses) == steps and all(math.isfinite(x) and x >= 0 for x in run.losses), run.losses
    for row in run.logs:
        assert not any(k.startswith('eval_') for k in row), f'the training step ran in eval mode: {row}'
        assert row[f'gkd/mode_{mode}'] == 1.0, row


# ---------------------------------------------------------------- separate teacher
@pytest.fixture(scope='module')
def separate_teacher_runs(mm, shared_runs):
    """The separate-teacher runs, one per mode, each also the run of another test below (a multimodal run costs
    ~30 s): off-policy with the trained student (``off_policy``, beside ``blind``: the same with the blind teacher),
    on-policy with the trained student sampling nearly greedily, seq_kd with a random student and the teacher
    sampling nearly greedily. The sampling runs log their samples."""
    # nearly greedy samples, the loss at temperature 1 (at 0.05 the trained student's distribution is one-hot where
    # the teacher's is: a loss and gradient of exactly 0, which the trainer now stops)
    sampling = dict(temperature=1.0, gkd_sampling_temperature=0.05, log_completions='true')
    off_policy = dict(model=mm.trained_student, temperature=1.0, **MODES['off_policy'])
    return shared_runs('mm_separate_teacher', {
        'off_policy': lambda out: run_swift(mm_args(mm, out, **off_policy)),
        'blind': lambda out: run_swift(mm_args(mm, out, teacher_model=mm.blind_teacher, **off_policy)),
        'on_policy': lambda out: run_swift(mm_args(mm, out, model=mm.trained_student, **sampling,
                                                   **MODES['on_policy'])),
        'seq_kd': lambda out: run_swift(mm_args(mm, out, **sampling, **MODES['seq_kd'])),
    })


@pytest.mark.parametrize('mode', list(MODES))
def test_separate_teacher_trains_in_every_mode(separate_teacher_runs, mm, mode):
    """The trained teacher as a separate model trains the student in every mode. With seq_kd (a random student) the
    teacher samples (nearly greedily): in every step its 8 samples name exactly the colours of the 8 images, which
    only the images tell (the text prompt is the same in every row)."""
    run = separate_teacher_runs[mode]
    assert 'Teacher model: a separate frozen model' in run.output
    assert _weights_loaded(run) == 2
    _assert_trained(run, mode)
    if mode == 'seq_kd':
        _assert_samples_name_the_images(run, mm)


def test_the_student_samples_from_the_image(separate_teacher_runs, mm):
    """On-policy with a trained student: its own samples name the colours of the images."""
    run = separate_teacher_runs['on_policy']
    _assert_trained(run, 'on_policy')
    _assert_samples_name_the_images(run, mm)


def test_the_separate_teacher_forward_sees_each_rows_image(separate_teacher_runs):
    """Off-policy, trained student and trained teacher: their top-1 tokens agree on every response token only if the
    teacher's forward got each row's own image; a teacher that cannot see images gives other losses."""
    seeing, blind = separate_teacher_runs['off_policy'], separate_teacher_runs['blind']
    assert all(row['gkd/top1_agreement'] == 1.0 for row in seeing.logs), seeing.logs
    assert _rel(seeing.losses[0], blind.losses[0]) > 1e-2, (seeing.losses, blind.losses)
    assert seeing.losses[0] < blind.losses[0]


# ---------------------------------------------------------------- shared base
def test_shared_base_teacher_is_the_base_with_the_adapter_disabled(mm, tmp_path):
    """Student = trained base + a non-zero LoRA; teacher = the same module with the adapter off: one copy of the
    base, and exactly the losses of a separately loaded base teacher."""
    common = dict(model=mm.trained_student, adapters=mm.adapter, **LORA, **MODES['off_policy'])
    shared = run_swift(mm_args(mm, str(tmp_path / 'shared'), teacher_model=mm.trained_student, **common))
    separate = run_swift(mm_args(mm, str(tmp_path / 'separate'), teacher_model=mm.alias, **common))
    assert ('Using shared base model architecture:\n  - Student model: base_model + LoRA (trainable)\n'
            '  - Teacher model: base_model with LoRA disabled (frozen)') in shared.output
    assert _weights_loaded(shared) == 1 and _weights_loaded(separate) == 2
    _assert_trained(shared, 'off_policy')
    assert shared.losses[0] > 0
    assert len(shared.losses) == len(separate.losses)
    for a, b in zip(shared.losses, separate.losses):
        assert _rel(a, b) < 1e-5, (shared.losses, separate.losses)


@pytest.mark.parametrize('mode', ['on_policy', 'seq_kd'])
def test_shared_base_trains_with_sampling(mm, tmp_path, mode):
    """A LoRA student on the base it shares with the teacher, in the sampling modes. With seq_kd the teacher (the
    trained base, adapter off) samples: its samples name the colours of the images. The student must be back in
    train mode after the teacher sampled with its module (else the step's metrics are logged as eval_*)."""
    run = run_swift(mm_args(mm, str(tmp_path / 'out'), model=mm.trained_student, teacher_model=mm.trained_student,
                            adapters=mm.adapter, temperature=0.05, log_completions='true', **LORA, **MODES[mode]))
    assert 'Teacher model: base_model with LoRA disabled (frozen)' in run.output
    assert _weights_loaded(run) == 1
    _assert_trained(run, mode)
    if mode == 'seq_kd':
        _assert_samples_name_the_images(run, mm)


# ---------------------------------------------------------------- samplers that would draw media placeholders
# ms-swift's multimodal GKD example (examples/train/multimodal/rlhf/gkd/full.sh), scaled down: 4 rows per batch,
# --max_length 4096 (here the tiny models' 512 positions: a --max_length above the student's context is refused with
# on-policy sampling, issue 89 item 13), vision tower and projector frozen. A sampled <image> made the re-encoded
# sample ask for one image more than it has, and the forward failed ("Image features and image tokens do not match").
EXAMPLE = dict(per_device_train_batch_size=4, max_length=512, max_completion_length=12, freeze_vit='true',
               freeze_aligner='true', log_completions='true')


def _assert_no_image_tokens_sampled(run, mm, n_samples):
    from transformers import AutoTokenizer
    image_id = AutoTokenizer.from_pretrained(mm.image_prone).convert_tokens_to_ids(tmm.IMAGE_TOKEN)
    completions = [c for step in _completions_per_step(run) for c in step]
    assert len(completions) == n_samples
    # the log shows a placeholder token as '[id * count]'
    assert not any(tmm.IMAGE_TOKEN in c or f'[{image_id} *' in c for c in completions), completions
    assert 'held a media placeholder token' not in run.output  # the samplers were told, nothing had to be cut


def _weights(model_dir):
    from safetensors.torch import load_file
    return load_file(os.path.join(model_dir, 'model.safetensors'))


def test_student_and_teacher_samplers_never_draw_image_tokens(mm, tmp_path):
    """One process, dense loss: a student and a separate teacher (the trained student made so) that would draw
    <image> at about half of their response positions; step 0 is seq_kd (the teacher samples), step 1 on-policy (the student samples)."""
    run = run_swift(mm_args(mm, str(tmp_path / 'out'), model=mm.image_prone, teacher_model=mm.image_prone_teacher,
                            lmbda=0.5, seq_kd='true', seed=0, gkd_loss_impl='dense', **EXAMPLE))
    assert [m['mode'] for m in run.modes()] == ['seq_kd', 'on_policy']
    assert len(run.losses) == 2 and all(math.isfinite(x) and x >= 0 for x in run.losses), run.losses
    _assert_no_image_tokens_sampled(run, mm, n_samples=2 * 4)


def test_on_policy_image_prone_student_under_zero2(mm, tmp_path):
    """The same example on 2 processes with ZeRO-2 (4 rows per rank), on-policy: it trains, no sample holds <image>,
    and only the decoder's weights change (tower and projector frozen)."""
    pytest.importorskip('deepspeed')
    import torch
    run = run_swift(mm_args(mm, str(tmp_path / 'out'), model=mm.image_prone, deepspeed='zero2', fp16='false',
                            use_cpu='true', save_strategy='steps', save_steps=2, save_only_model='true',
                            **EXAMPLE, **MODES['on_policy']), nproc=2)
    _assert_trained(run, 'on_policy')
    _assert_no_image_tokens_sampled(run, mm, n_samples=2 * 2 * 4)
    before, after = _weights(mm.image_prone), _weights(run.checkpoints()[-1])
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all('language_model' in name or 'lm_head' in name for name in changed), sorted(changed)
    with open(os.path.join(run.checkpoints()[-1], 'generation_config.json')) as f:
        assert 'suppress_tokens' not in json.load(f)  # the samplers' setting is not saved with the model


def test_a_response_holding_an_image_token_is_cut_before_it(mm):
    """The net under samplers that cannot be told (vLLM, a rollout server): ms-swift's template expands a sampled
    ``<image>`` into a second image slot of a one-image row; the plugin cuts the response (ids, log-probs, text)
    before it, and the re-encoded sample has one slot and the response's text tokens as labels."""
    from copy import deepcopy

    from swift import get_processor, get_template
    from swift.rl_core.data import GKDSample
    from swift.rlhf_trainers.utils import encode_sample

    from swift_gkd_plugin.swift.rollout.media_tokens import cut_at_media_placeholders
    template = get_template(get_processor(mm.student, model_type=tmm.MODEL_TYPE), template_type=tmm.TEMPLATE,
                            max_length=4096)
    template.set_mode('train')
    tok = template.tokenizer
    image_id = tok.convert_tokens_to_ids(tmm.IMAGE_TOKEN)
    text = tok.encode(' red green', add_special_tokens=False)
    drawn = text + [image_id] + text
    row = tmm.read_dataset(mm.train)[0]
    sample = GKDSample(messages=[row['messages'][0], {'role': 'assistant', 'content': tok.decode(drawn)}],
                       images=row['images'], response_token_ids=drawn, rollout_logprobs=[[-1.0] * len(drawn)],
                       add_eos=False)
    assert encode_sample(deepcopy(sample), template)['input_ids'].count(image_id) == 2 * tmm.NUM_IMAGE_TOKENS

    assert cut_at_media_placeholders([sample], template) == 1
    assert sample.response_token_ids == text and sample.rollout_logprobs == [[-1.0] * len(text)]
    assert sample.messages[-1]['content'] == tok.decode(text)
    encoded = encode_sample(sample, template)
    assert encoded['input_ids'].count(image_id) == tmm.NUM_IMAGE_TOKENS
    assert [t for t, label in zip(encoded['input_ids'], encoded['labels']) if label != -100] == text


# ---------------------------------------------------------------- bad media
def _with_image(mm, tmp_path, line, image):
    """The training rows with the image of ``line`` (1-based) replaced by ``image``."""
    rows = tmm.read_dataset(mm.train)
    rows[line - 1]['images'] = [image]
    return tmm.write_dataset(str(tmp_path / 'train.jsonl'), rows)


@pytest.mark.parametrize('problem', ['missing', 'corrupt'])
def test_an_unreadable_image_is_refused_before_any_model_loads(mm, tmp_path, problem):
    """ms-swift replaced a row whose image it could not read by another row (an INFO line only) and the run ended
    with exit code 0; the row is refused before any model loads, by file, line and image."""
    image = str(tmp_path / 'gone.png')
    if problem == 'corrupt':
        with open(image, 'wb') as f:
            f.write(b'not a png')
    data = _with_image(mm, tmp_path, 3, image)
    run = run_swift(mm_args(mm, str(tmp_path / 'out'), dataset=data), check=False)
    assert run.returncode != 0
    words = 'no such file' if problem == 'missing' else 'not a readable image'
    assert f'--dataset {data}: 1 media file(s) cannot be read: line 3: images {image!r}: {words}' in run.output, \
        run.output[-3000:]
    assert 'Loading weights' not in run.output


def test_image_rows_for_a_text_only_model_are_refused(mm, tiny_ws, tmp_path):
    """A text-only model trained on image rows with the literal <image> tag in its prompts, silently."""
    run = run_swift(base_args(tiny_ws, str(tmp_path / 'out'), dataset=mm.train), check=False)
    assert run.returncode != 0
    assert (f'--dataset {mm.train}: {N_ROWS} row(s) have images, videos or audios (lines 1, 2, 3, 4, 5, 6, 7, 8), '
            f'but --model {tiny_ws.student} (model type qwen3) is a text-only model') in run.output, run.output[-3000:]
    assert 'Loading weights' not in run.output


def test_a_row_whose_inline_image_does_not_decode_is_named_when_replaced(mm, tmp_path):
    """Inline (base64) media is read only when a row is encoded, where ms-swift replaces a row that fails by another
    one: each replacement is now a warning naming the error and the row's media, and counted in the logs."""
    image = 'data:image/png;base64,bm90IGEgcG5n'  # "not a png"
    data = _with_image(mm, tmp_path, 3, image)
    run = run_swift(mm_args(mm, str(tmp_path / 'out'), dataset=data, lmbda=0, max_steps=1))
    assert re.search(r"swift_gkd_plugin: a dataset row cannot be encoded \(UnidentifiedImageError: .*\); its media: "
                     r"\['data:image/png;base64,bm90IGEgcG5n'\]; ms-swift trains on another row in its place "
                     r"\(1 row\(s\) replaced so far\)", run.output), run.output[-3000:]
    assert [row['gkd/replaced_rows'] for row in run.logs] == [1]


def test_skd_is_refused_for_multimodal_models_before_they_load(mm, tmp_path):
    """SKD's teacher verifies token ids only: with images in the prompts it would judge the student's tokens without
    them."""
    run = run_swift(mm_args(mm, str(tmp_path / 'out'), lmbda=1, gkd_skd_top_k=4), check=False, timeout=300)
    assert run.returncode != 0
    assert '--gkd_skd_top_k 4 supports text-only models yet' in run.output, run.output[-3000:]
    assert 'Loading weights' not in run.output


def test_a_served_teacher_of_token_ids_is_refused_for_multimodal_rows_before_loading(mm, tiny_ws, tmp_path):
    """Issue 74 item 9: the trainer's ``POST /v1/topk`` (and ``vllm serve``'s ``/v1/completions``) requests carry the
    rows' token ids alone, so a served teacher read the image tokens without the images and the run trained on that
    blind teacher's answers. Refused in one line when the server's route is known, before any model loads (the plugin's
    server of the tiny text teacher: the route, not the model, decides)."""
    from server.test_teacher_server import TEMPLATE, InProcessServer
    from test_activation_and_bad_input import assert_refused_in_one_line

    from swift_gkd_plugin.server.backend import TransformersTeacher
    teacher = TransformersTeacher.load(tiny_ws.teacher, model_type='qwen3', template=TEMPLATE, torch_dtype='float32',
                                       device='cpu')
    server = InProcessServer(teacher, topk=8)
    try:
        run = run_swift(mm_args(mm, str(tmp_path / 'out'), teacher_model=None, teacher_model_type=None,
                                teacher_model_server=server.url, gkd_logits_topk=8), check=False)
    finally:
        server.stop()
    assert_refused_in_one_line(run, [f"--teacher_model_server {server.url} scores token ids only (POST /v1/topk (this "
                                     f"plugin's server)), and the student (--model_type {tmm.MODEL_TYPE}) is "
                                     "multimodal: the teacher would read its rows' image tokens without the images"])


@pytest.mark.timeout(300)
def test_a_swift_deploy_teacher_encodes_the_image_rows_as_the_trainer_but_gives_no_prompt_logprobs(mm, tmp_path):
    """Issue 74 item 9: ms-swift's ``/infer/`` (a real ``swift deploy`` of the trained teacher, transformers backend,
    CPU) receives the rows' messages and images and encodes them itself. Its ``prompt_token_ids`` equal the trainer's
    rows (the image expanded alike: the tokenization check passes), but ms-swift's transformers engine ignores
    ``prompt_logprobs``: answers without any, which the client retried as failed answers and named without a cause
    (ms-swift's assembly would read every position as probability 0). Now the first step stops naming the request,
    both counts and the backend that gives them (``--infer_backend vllm``), without a retry."""
    import subprocess
    import time

    import httpx
    from conftest import OFFLINE_ENV, _free_port, launcher_child_command
    port = _free_port()
    log_path = tmp_path / 'deploy.log'
    env = {**os.environ, **OFFLINE_ENV}
    t0 = time.monotonic()
    # what `swift deploy ...` starts (its route file in a fresh interpreter), without the launcher's own start-up
    cmd = launcher_child_command('deploy', ['--model', mm.teacher, '--model_type', tmm.MODEL_TYPE, '--template',
                                            tmm.TEMPLATE, '--infer_backend', 'transformers', '--torch_dtype', 'float32',
                                            '--host', '127.0.0.1', '--port', str(port)], env)
    with open(log_path, 'w') as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        while True:
            assert server.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() - t0 < 180, log_path.read_text()[-3000:]
            try:
                if httpx.get(f'http://127.0.0.1:{port}/health', timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        print(f'swift deploy answered /health after {time.monotonic() - t0:.1f}s')
        run = run_swift(mm_args(mm, str(tmp_path / 'out'), model=mm.trained_student, teacher_model=None,
                                teacher_model_type=None, teacher_model_server=f'http://127.0.0.1:{port}',
                                gkd_logits_topk=8, temperature=1.0, **MODES['off_policy']), check=False)
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)
    assert "scored through ms-swift's /infer/ protocol" in run.output, run.output[-3000:]
    assert run.returncode != 0 and not run.losses, run.output[-3000:]
    found = re.search(rf'the teacher server http://127.0.0.1:{port} answered request 0 of this step without prompt '
                      r"log-probs \(its prompt_token_ids: (\d+) tokens; the trainer's row: (\d+) tokens, \d+ read by "
                      r'the loss\): .*--infer_backend transformers` ignores prompt_logprobs: serve the teacher with '
                      r'`swift deploy --infer_backend vllm`', run.output)
    assert found and found[1] == found[2], run.output[-3000:]
    assert 'attempt 1 failed' not in run.output  # asked once: a server that computes none never will
    assert run.returncode == 1 and 'Traceback' not in run.output, run.output[-3000:]  # one line (TeacherAnswerError)


def _teacher_with_another_processor(mm, out_dir, change):
    """``patch``: a trained-size teacher of patch 7 (its processor expands an image into 16 tokens, the student's into
    4; the same 28 x 28 pixels); ``normalisation``: the trained teacher whose processor normalises with mean and std
    0.5 (4 tokens from other pixel values)."""
    if change == 'patch':
        return tmm.build_model(out_dir, os.path.join(mm.root, 'tok'), seed=1, patch_size=7, **tmm.TEACHER_KWARGS)
    shutil.copytree(mm.teacher, out_dir)
    with open(os.path.join(out_dir, 'processor_config.json')) as f:
        config = json.load(f)
    config['image_processor'].update(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    with open(os.path.join(out_dir, 'processor_config.json'), 'w') as f:
        json.dump(config, f)
    return out_dir


@pytest.mark.parametrize('change,needle', [
    ('patch', f'into 16 media tokens, the student\'s processor into {tmm.NUM_IMAGE_TOKENS}. '),
    ('normalisation', f'into as many media tokens ({tmm.NUM_IMAGE_TOKENS}) but other pixel_values (differing by up '),
], ids=['patch', 'normalisation'])
def test_a_local_teacher_whose_processor_expands_images_otherwise_is_refused_before_loading(mm, tmp_path, change,
                                                                                            needle):
    """Issue 74 item 9: a separate local teacher scores the student's encoding of each row (its image tokens and
    pixel values). One whose processor expands an image into 16 tokens failed in its first forward after both models
    loaded ("Image features and image tokens do not match, tokens: 32, features: 12288"); one that normalises otherwise
    trained silently on pixels it was not made for. Refused in one line naming the row, both counts and the settings
    that differ."""
    from test_activation_and_bad_input import assert_refused_in_one_line
    teacher = _teacher_with_another_processor(mm, str(tmp_path / 'teacher'), change)
    setting = ("patch_size 14 (student) / 7 (teacher)" if change == 'patch' else
               'image_processor.image_mean (0.48145466, 0.4578275, 0.40821073) (student) / (0.5, 0.5, 0.5) (teacher)')
    run = run_swift(mm_args(mm, str(tmp_path / 'out'), teacher_model=teacher, lmbda=0, max_steps=1), check=False)
    assert_refused_in_one_line(run, [f'--teacher_model {teacher}: its processor encodes the media of --dataset '
                                     f'{mm.train} line 1 {needle}', f'The processors differ in {setting}'])


# ---------------------------------------------------------------- --max_length, rows that never encode (issue 74)
@pytest.mark.parametrize('name,flags,needle', [
    ('image_cut', dict(truncation_strategy='right', max_length=tmm.NUM_IMAGE_TOKENS - 1),
     f'holds {tmm.NUM_IMAGE_TOKENS} image tokens, more than --max_length {tmm.NUM_IMAGE_TOKENS - 1} '
     '(--truncation_strategy right): its images cannot be cut'),
    ('all_too_long', dict(max_length=6), 'the first 8 rows drawn are all longer than --max_length 6 (the longest: '),
    ('response_cut', dict(truncation_strategy='right', max_length=tmm.NUM_IMAGE_TOKENS + 2),
     f'Cause: --max_length {tmm.NUM_IMAGE_TOKENS + 2} (--truncation_strategy right) cut every response token away '
     'from 8 row(s) on this process'),
], ids=['image_cut', 'all_too_long', 'response_cut'])
def test_image_rows_that_cannot_fit_max_length_stop_the_run_in_one_line(mm, tmp_path, name, flags, needle):
    """``right`` (or ``left``) with fewer tokens allowed than an image's: refused, the image is never cut; ``delete``
    with every row too long: one line at the first batch saying so and the longest row's length (before: ms-swift's
    resampling traceback, "resample: only collected 0/8"); ``right`` leaving no response token (the image rows'
    lengths are not known before loading): the run-end guard names the cut (issue 81; before: it blamed the
    teacher, "the teacher gives the student's distribution")."""
    run = run_swift(mm_args(mm, str(tmp_path / 'out'), lmbda=0, max_steps=1, **flags), check=False)
    assert run.returncode == 1, run.output[-3000:]
    errors = [line for line in run.output.splitlines() if 'error:' in line]
    assert len(errors) == 1 and needle in errors[0], run.output[-3000:]
    assert 'Traceback' not in run.output


def test_image_rows_are_cut_around_their_images(mm, tmp_path):
    """``left`` at a few tokens over the image's: every forward of the loss holds at most ``--max_length`` tokens, the
    image's tokens all of them (before: the whole rows)."""
    from test_max_length import PROBE
    log = str(tmp_path / 'forwards.jsonl')
    cap = tmm.NUM_IMAGE_TOKENS + 6
    run = run_swift(mm_args(mm, str(tmp_path / 'out'), lmbda=0, max_steps=1, truncation_strategy='left',
                            max_length=cap, external_plugins=PROBE), env={'GKD_TEST_MAXLEN_LOG': log})
    with open(log) as f:
        forwards = [json.loads(line) for line in f]
    assert {line['who'] for line in forwards} == {'student', 'teacher'}, forwards
    for line in forwards:
        assert max(line['rows']) <= cap and line['shape'][1] <= cap, line
        assert line['image_tokens'] == [tmm.NUM_IMAGE_TOKENS] * len(line['rows']), line
    assert run.logs[0]['gkd/cut_rows'] == N_ROWS and run.losses[0] > 0, run.logs


def test_rows_that_never_encode_stop_the_run_naming_the_first(mm, tmp_path):
    """Every image a dead link (a local web server that answers 404): the run used to draw rows without end ("row(s)
    replaced so far"); it stops after 8 rows with none encoded, naming the first URL. (A 404 fails at once; an
    unreachable host fails the same way after ms-swift's fixed retries, ~6 s a row, which this test need not wait.)"""
    import http.server
    import threading
    served = []

    class DeadLinks(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            served.append(self.path)
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), DeadLinks)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        rows = tmm.read_dataset(mm.train)
        for i, row in enumerate(rows):
            row['images'] = [f'http://127.0.0.1:{server.server_address[1]}/square{i}.png']
        data = tmm.write_dataset(str(tmp_path / 'urls.jsonl'), rows)
        run = run_swift(mm_args(mm, str(tmp_path / 'out'), dataset=data, lmbda=0, max_steps=1), check=False)
    finally:
        server.shutdown()
    assert run.returncode == 1, run.output[-3000:]
    errors = [line for line in run.output.splitlines() if 'error:' in line]
    assert len(errors) == 1, run.output[-3000:]
    assert ('the first 8 rows drawn all fail to encode, so no row can be trained on; the first: HTTPError: 404 '
            in errors[0] and f'(its media: http://127.0.0.1:{server.server_address[1]}/square' in errors[0]), errors
    assert len(set(served)) >= 8, served  # every row drawn asked for its image


def test_an_image_tag_without_its_image_is_refused_before_loading(mm, tmp_path):
    """A prompt with ``<image>`` and no image trained on the tag as text, silently."""
    rows = tmm.read_dataset(mm.train)
    del rows[2]['images']
    data = tmm.write_dataset(str(tmp_path / 'train.jsonl'), rows)
    run = run_swift(mm_args(mm, str(tmp_path / 'out'), dataset=data), check=False)
    assert run.returncode == 2, run.output[-3000:]
    assert (f'--dataset {data}: 1 row(s) have a media tag without its media: line 3: its messages hold 1 <image> '
            'tag(s) and the row 0 images (the "images" column)') in run.output, run.output[-3000:]
    assert 'Loading weights' not in run.output
