#!/usr/bin/env bash
# The GPU kit (issue 18): the wheels the GPU image lacks, prepared on a CPU machine, installed there with no network,
# and the GPU checks. See tests/gpu/README.md.
#
#   bash tests/gpu/kit.sh prepare      CPU, PyPI reachable: wheels for CPython 3.12 manylinux x86-64 into .gpukit/
#                                      (git-ignored), the plugin's wheel built from this checkout; fails above 60 MiB
#   bash tests/gpu/kit.sh selfcheck    CPU, after prepare: installs the kit with no index into fresh environments
#                                      and runs one tiny `swift rlhf --rlhf_type gkd` step with the plugin active
#   bash tests/gpu/kit.sh run PART     GPU: installs the kit into /tmp (no network), runs part a|b|c|d|e|f|v|s|all;
#                                      results (markdown + JSON) go to $GPUKIT_OUT, else $OUT, else ./gpukit_results
#   bash tests/gpu/kit.sh prepare-big  CPU, PyPI reachable: transformer-engine (cu13 wheel + torch sdist) and the
#                                      newest vLLM that pins the image's torch, with their missing dependencies,
#                                      split into parts of < 60 MiB in bundles .gpukit/big/carry/NN (tests/gpu/big.py)
#   bash tests/gpu/kit.sh assemble     GPU, once per carried bundle: parts into /tmp/gpukit-big, then (all there)
#                                      join, sha256, install; transformer-engine-torch built from its sdist (timed)
#   bash tests/gpu/kit.sh kernels      GPU: the CUDA cases of tests/core and of the kernel experiments in
#                                      tests/gpu/experiments (compiled Triton kernels against float64), summary into
#                                      $GPUKIT_OUT/kernels.txt
#   bash tests/gpu/kit.sh install      installs the kit into $GPUKIT_SITE (default /tmp/gpukit-site) and prints the
#                                      two exports that make it active in a shell
#
# Environment: GPUKIT (the kit folder, default <repo>/.gpukit), PYTHON (default python3), GPUKIT_SITE,
# GPUKIT_OUT, GPUKIT_WORK (run's models and logs, default /tmp/gpukit-work), GPUKIT_WHEELS (run: another wheel
# folder, e.g. selfcheck's CPython 3.11 set to try `run` on CPU), GPUKIT_LIMIT_MIB (60), GPUKIT_SELFCHECK (selfcheck's scratch folder, default /tmp/gpukit-selfcheck),
# GPUKIT_PY312 (a CPython 3.12 for selfcheck, default pyenv's 3.12.1), GPUKIT_PY311 (selfcheck's Python for the
# training step, default python3.11).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
KIT=${GPUKIT:-$REPO/.gpukit}
PY=${PYTHON:-python3}
LIMIT_MIB=${GPUKIT_LIMIT_MIB:-60}
REQS=$REPO/tests/gpu/kit_requirements.txt
# pip matches manylinux tags exactly: the glibc levels wheels of the kit's packages are published for
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
    manylinux2014_x86_64 manylinux1_x86_64)
OFFLINE=(HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MODELSCOPE_OFFLINE=1 USE_HF=1
    TOKENIZERS_PARALLELISM=false)

die() {
    echo "kit.sh: $*" >&2
    exit 1
}

# fingerprint of the plugin's sources: the kit's plugin wheel is used only while it matches the checkout
fingerprint() {
    "$1" - "$REPO" <<'EOF'
import hashlib, os, sys
repo = sys.argv[1]
h = hashlib.sha256()
paths = [os.path.join(repo, p) for p in ('setup.py', 'pyproject.toml', 'swift_gkd_plugin.pth')]
for root, dirs, files in os.walk(os.path.join(repo, 'swift_gkd_plugin')):
    dirs[:] = sorted(d for d in dirs if d != '__pycache__')
    paths += [os.path.join(root, f) for f in sorted(files) if not f.endswith('.pyc')]
for p in paths:
    h.update(os.path.relpath(p, repo).encode() + b'\0' + open(p, 'rb').read() + b'\0')
print(h.hexdigest())
EOF
}

# ------------------------------------------------------------------------------------------------------- prepare
prepare() {
    local tmp
    tmp=$(mktemp -d)
    rm -rf "$KIT/wheels" "$KIT/plugin"
    mkdir -p "$KIT/wheels" "$KIT/plugin"
    local plat=() p
    for p in "${PLATFORMS[@]}"; do plat+=(--platform "$p"); done
    local req name
    while read -r req; do
        req=${req%%#*}
        req=$(echo "$req" | xargs)
        [ -n "$req" ] || continue
        if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            "${plat[@]}" -d "$KIT/wheels" "$req" >"$tmp/log" 2>&1; then
            # sdist only (oss2, crcmod, transformers-stream-generator): build its wheel with a CPython 3.12
            echo "no wheel on PyPI for $req: building one from its sdist with $PY312"
            "$PY312" -m pip wheel -q --no-deps --no-binary=:all: -w "$KIT/wheels" "$req" >"$tmp/log" 2>&1 ||
                { cat "$tmp/log"; die "could not get a wheel of $req"; }
        fi
    done <"$REQS"
    # DeepSpeed ships an sdist only: its wheel, built without ops (they compile on first use, nvcc is there)
    name=deepspeed==$(grep -i '^deepspeed==' "$REPO/requirements/constraints.txt" | cut -d= -f3)
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-binary=:all: -w "$KIT/wheels" "$name" >"$tmp/log" 2>&1 ||
        { cat "$tmp/log"; die "could not build a wheel of $name"; }
    # the plugin, from this checkout
    "$PY" -m pip wheel -q --no-deps -w "$KIT/plugin" "$REPO" >"$tmp/log" 2>&1 ||
        { cat "$tmp/log"; die "could not build the plugin's wheel"; }
    fingerprint "$PY" >"$KIT/plugin/fingerprint"
    rm -rf "$REPO/build" "$tmp"
    size_report
}

size_report() {
    "$PY" - "$KIT" "$LIMIT_MIB" <<'EOF'
import glob, os, sys
kit, limit = sys.argv[1], float(sys.argv[2])
files = sorted(glob.glob(os.path.join(kit, 'wheels', '*.whl')) + glob.glob(os.path.join(kit, 'plugin', '*.whl')),
               key=os.path.getsize, reverse=True)
total = sum(map(os.path.getsize, files)) / 2**20
for f in files:
    print(f'{os.path.getsize(f) / 2**20:7.2f} MiB  {os.path.basename(f)}')
print(f'{total:7.2f} MiB  total, {len(files)} wheels (limit {limit:g} MiB)')
names = [os.path.basename(f).split('-')[0].lower() for f in files]
dupes = {n for n in names if names.count(n) > 1}
banned = [n for n in names if n in ('torch', 'transformers', 'triton') or n.startswith('nvidia')]
if dupes or banned or total > limit:
    sys.exit(f'kit.sh: {"two versions of " + str(sorted(dupes)) if dupes else ""} '
             f'{"forbidden in the kit: " + str(banned) if banned else ""} '
             f'{f"{total:.2f} MiB is above the {limit:g} MiB limit" if total > limit else ""}')
EOF
}

# ------------------------------------------------------------------------------------------------------- install
# install PYTHON SITE [WHEEL_DIR]: the kit's wheels into SITE with no index and no dependency resolution, as on the
# GPU machine; a sitecustomize.py in SITE.boot processes SITE's .pth files (the plugin's activation file among
# them), which a PYTHONPATH folder would not. Prints the exports to make it active.
install() {
    local py=$1 site=$2 wheels=${3:-$KIT/wheels}
    [ -d "$wheels" ] && compgen -G "$wheels/*.whl" >/dev/null || die "no wheels in $wheels: run \`bash tests/gpu/kit.sh prepare\` on a machine with PyPI, then name .gpukit in carry"
    local plugin
    plugin=$(ls "$KIT"/plugin/*.whl 2>/dev/null | head -n 1 || true)
    if [ -z "$plugin" ] || [ "$(fingerprint "$py")" != "$(cat "$KIT/plugin/fingerprint" 2>/dev/null)" ]; then
        # the checkout changed since prepare: build the plugin's wheel here (setuptools + wheel: the image has them)
        echo "kit.sh: the kit's plugin wheel does not match this checkout; building it from $REPO (no index)" >&2
        rm -rf "$site.plugin" && mkdir -p "$site.plugin"
        "$py" -m pip wheel -q --no-index --no-deps --no-build-isolation -w "$site.plugin" "$REPO" >&2 ||
            die "could not build the plugin's wheel from $REPO"
        rm -rf "$REPO/build"
        plugin=$(ls "$site.plugin"/*.whl | head -n 1)
    fi
    local stamp
    stamp=$(cd "$KIT" && ls -l "$wheels" "$plugin" | md5sum | cut -c1-32)
    if [ -f "$site.boot/sitecustomize.py" ] && [ "$(cat "$site.boot/stamp" 2>/dev/null)" = "$stamp" ]; then
        echo "export PYTHONPATH=$site.boot:$site\${PYTHONPATH:+:\$PYTHONPATH} PATH=$site/bin:\$PATH"
        return  # installed by an earlier call on this (warm) machine
    fi
    rm -rf "$site" "$site.boot"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl \
        "$plugin" >&2 || die "pip could not install the kit into $site"
    mkdir -p "$site.boot"
    cat >"$site.boot/sitecustomize.py" <<EOF
# written by tests/gpu/kit.sh install: makes $site a site directory (its .pth files run: the plugin activates)
import os as _os
import site as _site
import sys as _sys

_site.addsitedir('$site')
# then the sitecustomize this one shadows, if the interpreter has one
_here = _os.path.dirname(_os.path.abspath(__file__))
for _d in list(_sys.path):
    _f = _os.path.join(_d, 'sitecustomize.py')
    if _d and _os.path.abspath(_d) != _here and _os.path.isfile(_f):
        exec(compile(open(_f).read(), _f, 'exec'))
        break
EOF
    echo "$stamp" >"$site.boot/stamp"
    echo "export PYTHONPATH=$site.boot:$site\${PYTHONPATH:+:\$PYTHONPATH} PATH=$site/bin:\$PATH"
}

activate() {
    local exports
    exports=$(install "$@") || exit 1
    eval "$exports"
    export "${OFFLINE[@]}"
}

# ------------------------------------------------------------------------------------------------------- selfcheck
selfcheck() {
    local start=$SECONDS work=${GPUKIT_SELFCHECK:-/tmp/gpukit-selfcheck}
    [ -d "$KIT/wheels" ] || die "no kit in $KIT: run \`bash tests/gpu/kit.sh prepare\` first"
    unset PYTHONPATH
    if [ "${GPUKIT_SELFCHECK_REUSE:-0}" = 1 ] && [ -x "$work/venv/bin/python" ]; then
        echo "(GPUKIT_SELFCHECK_REUSE=1: keeping the stand-in venv of an earlier selfcheck; the kit is reinstalled)"
        rm -rf "$work/site" "$work/site.boot" "$work/cp312" "$work/wheels311" "$work/out"
    else
        rm -rf "$work" && mkdir -p "$work"
    fi
    echo "== 1. every wheel installs with no index on CPython 3.12 ($PY312), and its compiled modules import"
    "$PY312" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$work/cp312" "$KIT"/wheels/*.whl \
        "$KIT"/plugin/*.whl || die "the kit does not install on CPython 3.12"
    PYTHONPATH=$work/cp312 "$PY312" - "$work/cp312" <<'EOF' ||
import ctypes, glob, os, sys
import msgspec, jiter  # compiled, no dependency on the image's packages
libs = glob.glob(os.path.join(sys.argv[1], '**', '*.so'), recursive=True)
for lib in libs:
    ctypes.CDLL(lib)  # every shared library of the kit links on CPython 3.12 (glibc symbols resolve)
print(f'  {len(libs)} shared libraries load; msgspec {msgspec.__version__}, jiter {jiter.__version__}')
EOF
        die "a compiled module of the kit does not import on CPython 3.12"

    echo "== 2. a fresh venv standing for the GPU image ($PY311; torch 2.13.0+cpu: no CPU torch for CPython 3.12 is"
    echo "      reachable here), tests/gpu/image_packages.txt from the index, then the kit with no index"
    local vpy=$work/venv/bin/python
    if [ ! -x "$vpy" ]; then
        "$PY311" -m venv "$work/venv"
        "$vpy" -m pip install -q --upgrade pip >/dev/null
        "$vpy" -m pip install -q torch==2.13.0 >/dev/null || die "could not install a CPU torch into the venv"
    fi
    "$vpy" -c 'import torch, sys; sys.exit(0 if "+cpu" in torch.__version__ else "not a CPU torch: " + torch.__version__)'
    "$vpy" -m pip install -q -r "$REPO/tests/gpu/image_packages.txt" torch=="$("$vpy" -c 'import torch; print(torch.__version__)')" ||
        die "could not install the image's stand-in packages"
    # The cp312-only wheels (compiled modules, and multiprocess's py312 build) have the same name and version for
    # CPython 3.11: the venv gets those twins, the rest of the kit as it is.
    local twins=$work/wheels311
    mkdir -p "$twins"
    "$vpy" - "$KIT/wheels" "$twins" <<'EOF' || die "could not fetch the CPython 3.11 twins of the kit's cp312 wheels"
import glob, os, shutil, subprocess, sys
from packaging.tags import sys_tags
from packaging.utils import parse_wheel_filename
kit, twins = sys.argv[1:]
supported = set(sys_tags())
for whl in sorted(glob.glob(os.path.join(kit, '*.whl'))):
    name, version, _, tags = parse_wheel_filename(os.path.basename(whl))
    if tags & supported:
        shutil.copy(whl, twins)
        continue
    print(f'  {os.path.basename(whl)}: its CPython 3.11 twin {name}=={version}')
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '-w', twins, f'{name}=={version}'],
                   check=True)
EOF
    activate "$vpy" "$work/site" "$twins"
    echo "== 3. the kit imports (ms-swift, the GKD trainer, the plugin, the server, DeepSpeed, Liger, Megatron)"
    (cd "$work" && "$vpy" -c '
import sys
# before any import (importing _bootstrap installs its finder by itself): the .pth of the kit folder ran
assert any(type(f).__name__ == "_PostImportFinder" for f in sys.meta_path), "the plugin is not activated"
import swift, swift.rlhf_trainers, swift_gkd_plugin, swift_gkd_plugin.swift.trainer, swift_gkd_plugin.server.app
import deepspeed, liger_kernel, megatron.core
assert swift_gkd_plugin.__file__.startswith(sys.argv[1]), swift_gkd_plugin.__file__
print("  imported: ms-swift", swift.__version__, "plugin", swift_gkd_plugin.__version__, "deepspeed", deepspeed.__version__)
' "$work/site") || die "the kit is incomplete: an import failed (above)"
    # mcore-bridge imports transformer_engine unconditionally (mcore_bridge/patcher.py): not carried, see part f
    "$vpy" -c 'import mcore_bridge' >/dev/null 2>&1 && echo "  mcore_bridge imports" ||
        echo "  mcore_bridge does not import here: $("$vpy" -c 'import mcore_bridge' 2>&1 | tail -n 1)"
    echo "== 4. one tiny swift rlhf --rlhf_type gkd step (tiny offline models, CPU)"
    (cd "$work" && "$vpy" - "$work" <<'EOF') || die "the swift rlhf step failed"
import glob, json, math, os, subprocess, sys
from swift_gkd_plugin.demo import tiny
work = sys.argv[1]
tok = tiny.build_tokenizer(os.path.join(work, 'tok'))
student = tiny.build_model(os.path.join(work, 'student'), tok, seed=0)
teacher = tiny.build_model(os.path.join(work, 'teacher'), tok, seed=1, hidden_size=96, intermediate_size=192)
data = tiny.write_dataset(os.path.join(work, 'train.jsonl'), tiny.make_rows(16, seed=0, split='train'))
out = os.path.join(work, 'out')
cmd = ['swift', 'rlhf', '--rlhf_type', 'gkd', '--model', student, '--model_type', 'qwen3', '--teacher_model', teacher,
       '--teacher_model_type', 'qwen3', '--template', 'qwen3_nothinking', '--dataset', data, '--tuner_type', 'full',
       '--torch_dtype', 'float32', '--check_model', 'false', '--lmbda', '0.5', '--seq_kd', 'true', '--max_steps', '2',
       '--per_device_train_batch_size', '2', '--gradient_accumulation_steps', '1', '--max_length', '128',
       '--max_completion_length', '8', '--logging_steps', '1', '--save_strategy', 'no', '--report_to', 'none',
       '--dataloader_num_workers', '0', '--dataset_num_proc', '1', '--output_dir', out, '--add_version', 'false']
proc = subprocess.run(cmd, capture_output=True, text=True)
log = proc.stdout + proc.stderr
open(os.path.join(work, 'swift_rlhf.log'), 'w').write(log)
rows = [json.loads(l) for p in glob.glob(os.path.join(out, '**', 'logging.jsonl'), recursive=True)
        for l in open(p) if l.strip()]
losses = [r['loss'] for r in rows if 'loss' in r]
active = 'GKD trainer active' in log
print(f'  exit {proc.returncode}, plugin active: {active}, losses {losses}')
if proc.returncode != 0 or not active or not losses or not all(math.isfinite(x) for x in losses):
    print(log[-4000:])
    sys.exit(1)
EOF
    echo "selfcheck: PASS in $((SECONDS - start)) s (kit $KIT; scratch $work)"
}

# ------------------------------------------------------------------------------------------------------- run
run() {
    local part=${1:-all} out=${GPUKIT_OUT:-${OUT:-$REPO/gpukit_results}}
    mkdir -p "$out"
    activate "$PY" "${GPUKIT_SITE:-/tmp/gpukit-site}" "${GPUKIT_WHEELS:-$KIT/wheels}"
    export GPUKIT_WORK=${GPUKIT_WORK:-/tmp/gpukit-work}  # models built once per machine, reused by later parts
    cd "$REPO"
    PYTHONUNBUFFERED=1 "$PY" tests/gpu/checks/run.py "$part" --out "$out" "${@:2}"
}

# ------------------------------------------------------------------------------------------------------- kernels
# the CUDA cases of tests/core and tests/gpu/experiments (compiled kernels against float64 and the PyTorch path; a GPU
# machine leaves TRITON_INTERPRET unset, so the cpu cases skip), or the pytest paths given: into $out/kernels.txt,
# pytest's exit code
kernels() {
    local out=${GPUKIT_OUT:-${OUT:-$REPO/gpukit_results}} paths=("$@")
    [ ${#paths[@]} -gt 0 ] || paths=(tests/core tests/gpu/experiments)
    mkdir -p "$out"
    activate "$PY" "${GPUKIT_SITE:-/tmp/gpukit-site}" "${GPUKIT_WHEELS:-$KIT/wheels}"
    cd "$REPO"
    # -v: a line per test, so that a run stopped at its time limit still names what failed
    "$PY" -m pytest -v -rfE -n "${GPUKIT_KERNEL_WORKERS:-auto}" -p no:cacheprovider --durations 10 "${paths[@]}" \
        >"$out/kernels.txt" 2>&1 && rc=0 || rc=$?
    tail -n 30 "$out/kernels.txt"
    return "$rc"
}

PY312=${GPUKIT_PY312:-/root/.pyenv/versions/3.12.1/bin/python3}
PY311=${GPUKIT_PY311:-python3.11}
case "${1:-}" in
prepare) prepare ;;
size) size_report ;;
selfcheck) selfcheck ;;
install) install "$PY" "${GPUKIT_SITE:-/tmp/gpukit-site}" ;;
run) run "${@:2}" ;;
kernels) kernels "${@:2}" ;;
prepare-big) "$PY" "$REPO/tests/gpu/big.py" prepare --kit "$KIT" "${@:2}" ;;
assemble)
    # the kit first (the built sdist imports torch and the carried wheels from the same site), then the parts
    [ -d "$KIT/wheels" ] && activate "$PY" "${GPUKIT_SITE:-/tmp/gpukit-site}" "${GPUKIT_WHEELS:-$KIT/wheels}"
    "$PY" "$REPO/tests/gpu/big.py" assemble --kit "$KIT" --site "${GPUKIT_SITE:-/tmp/gpukit-site}" "${@:2}"
    ;;
*) die "usage: bash tests/gpu/kit.sh prepare|selfcheck|install|run [a|b|c|d|e|f|v|s|all]|kernels|prepare-big|assemble" \
    "(see tests/gpu/README.md)" ;;
esac
