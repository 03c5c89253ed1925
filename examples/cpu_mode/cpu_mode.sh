# The tiny CPU mode of the example scripts, sourced by each of them (examples/README.md, "Run any example on CPU").
# Unset GKD_EXAMPLE_TINY: nothing happens. GKD_EXAMPLE_TINY=DIR: the tiny offline models of `swift-gkd demo`, its
# student warm-started as the demo's (built in DIR on first use, about a minute; a workspace already there is reused), and `swift` / `swift-gkd` become shell
# functions that run the script's command lines rewritten by rewrite.py: tiny models and train set, CPU, one process,
# no DeepSpeed, no vLLM, GKD_EXAMPLE_TINY_STEPS steps (10) of batch 4, 16-token completions, outputs under DIR/runs.
# A script whose programs cannot run on CPU sets GKD_TINY_NOT_APPLICABLE to the reason before sourcing this: the
# CPU mode then exits there with code 2 and that reason, before anything is built.

if [ -n "${GKD_EXAMPLE_TINY:-}" ] && [ -n "${GKD_TINY_NOT_APPLICABLE:-}" ]; then
    echo "$(basename "$0"): GKD_EXAMPLE_TINY does not apply to this example: $GKD_TINY_NOT_APPLICABLE" >&2
    exit 2
fi

if [ -n "${GKD_EXAMPLE_TINY:-}" ]; then
    GKD_TINY_REWRITE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/rewrite.py"
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MODELSCOPE_OFFLINE=1 USE_HF=1
    export TOKENIZERS_PARALLELISM=false
    # one thread per process: these models are too small to profit from more, and several threads per process on a
    # small machine are many times slower (10x on 2 cores)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    if [ ! -f "$GKD_EXAMPLE_TINY/tiny_workspace.json" ]; then
        echo "[tiny mode] building the tiny models in $GKD_EXAMPLE_TINY (once) ..." >&2
        python -c 'import sys; from swift_gkd_plugin.demo.tiny import build_warm_workspace
build_warm_workspace(sys.argv[1])' "$GKD_EXAMPLE_TINY"
    fi
    SOURCE_DATASET=${SOURCE_DATASET:-$GKD_EXAMPLE_TINY/train.jsonl}  # the self-distillation scripts' source rows

    gkd_tiny_run() {  # PROGRAM ARG...: run the rewritten command line, one process, no GPU
        local program=$1 argv=()
        shift
        mapfile -d '' argv < <(python "$GKD_TINY_REWRITE" "$program" "$@")
        [ "${#argv[@]}" -gt 0 ] || { echo "[tiny mode] could not rewrite: $program $*" >&2; return 2; }
        echo "[tiny mode] OMP_NUM_THREADS=$OMP_NUM_THREADS $program ${argv[*]}" >&2
        if [ "$BASHPID" != "$$" ]; then  # a background job (a server): the script's `kill $!` must reach it
            exec env -u NPROC_PER_NODE -u CUDA_VISIBLE_DEVICES "$program" "${argv[@]}"
        fi
        env -u NPROC_PER_NODE -u CUDA_VISIBLE_DEVICES "$program" "${argv[@]}"
    }
    swift() { gkd_tiny_run swift "$@"; }
    swift-gkd() { gkd_tiny_run swift-gkd "$@"; }
fi
