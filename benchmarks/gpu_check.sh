#!/usr/bin/env bash
# The GPU part of the Triton target in one go, for a lent GPU machine (offline, its own torch/triton):
# install nlcompile (no deps), the GPU benchmark, the autotuning candidates' check, then the Triton
# test files on the GPU.
#
#   bash benchmarks/gpu_check.sh            # logs and bench.json under $OUT (default: gpu-logs/)
#
# Wheels in .whl/ (fla_core and its dependency einops, for the benchmark's flash-linear-attention
# columns: pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
# -d .whl fla-core==0.6.0 einops==0.8.1) are installed first, without their dependencies.
# BENCH_S / CANDIDATES_S / TEST_S bound the three stages in seconds, 0 skipping one (so that a lease's
# 10-minute calls can split them); the second, benchmarks/gpu_candidates.py, forces every autotuning
# candidate of every kernel in turn and checks it against the fp32 reference (CANDIDATE_MODELS narrows
# it); DOTS lists
# the tl.dot precisions the benchmark times (auto = the choice by input dtype), WARPS the warps per
# program (auto = autotuned, fixed = the untuned launch), CHUNKS the chunk lengths (auto = the
# launchers' choice; all three crossed); MODELS and LENGTHS narrow the rows, DTYPE (bf16, fp16,
# fp32) and DIM (128) set the inputs' dtype and head dim; PROFILE=T[,T...] adds each
# kernel's device time at those T; COMPILED=1 adds the zoo's loop compiled by nlcompile.compile;
# RECOMPUTE=1 adds each variant of our kernels with the chunk states recomputed in the backward;
# FLA_UNCHECKED=1 adds fla's Gated DeltaNet with its refusal of the backward on Triton < 3.7.1 on
# Hopper turned off (timing only; its gradients' error shows whether Triton compiled it wrong).  The
# tests run the untuned launch (NLCOMPILE_TRITON_TUNE=0: tuning every test shape would take minutes)
# and test_triton_tuning.py the tuned one, every candidate.  Seen on an H200 (2026-11-27): the
# benchmark with DOTS=auto, both models and lengths, PROFILE=8192 and FLA_UNCHECKED=1 about 300 s
# (kernel compiles, our tuning about 30 s a model, fla's autotuning); the tests 55 s with 16 workers
# where the benchmark had run before, over 100 s on a fresh machine (compiles).
# Autotuning results (ours and fla's: Triton's *.autotune.json files, keyed on the kernel source, the
# Triton version, the GPU architecture and the shapes) are packed from Triton's cache into
# $OUT/triton-autotune.tgz after the benchmark (one file: the device tool returns at most 8, so the
# install log is kept only when the install fails); a folder .triton-autotune/ holding them (carried
# from an earlier run) is put into the cache first, so a rerun skips the tuning of unchanged kernels
# (its "first fwd call" times are then not cold; seen 2026-11-28: a fresh H100 used an H100's results
# but tuned again over an H200's, so carry the kind's own).
# To carry them: `mkdir -p .triton-autotune && tar xzf triton-autotune.tgz -C .triton-autotune`
# (git-ignored) and add .triton-autotune to the run's carry list beside .whl.
set -u
OUT=${OUT:-gpu-logs}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
if [ -d .triton-autotune ]; then
    mkdir -p "$TRITON_CACHE_DIR" && cp -r .triton-autotune/. "$TRITON_CACHE_DIR"/ && chmod -R u+w "$TRITON_CACHE_DIR"
    echo "autotuning results carried: $(find .triton-autotune -name '*.autotune.json' | wc -l) files"
fi
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
    || { cat "$OUT/install.log"; exit 1; }
rm "$OUT/install.log"
nvidia-smi -L
$PY -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '|',
                                   torch.cuda.get_device_name())"
if [ "${BENCH_S:-300}" != 0 ]; then
    NLCOMPILE_VERBOSE=1 timeout "${BENCH_S:-300}" $PY benchmarks/bench_triton.py \
        --dots "${DOTS:-auto,ieee}" --warps "${WARPS:-auto}" --chunks "${CHUNKS:-auto}" \
        --models "${MODELS:-DeltaNet,GatedDeltaNet}" --lengths "${LENGTHS:-2048,8192}" \
        --dtype "${DTYPE:-bf16}" --dim "${DIM:-128}" --json "$OUT/bench.json" \
        ${PROFILE:+--profile "$PROFILE"} ${COMPILED:+--compiled} ${RECOMPUTE:+--recompute} \
        ${FLA_UNCHECKED:+--fla-unchecked} \
        2>"$OUT/bench.err" | tee "$OUT/bench.md"
    bench_rc=${PIPESTATUS[0]}
    echo "bench rc=$bench_rc"; grep -v "^nlcompile: tuned" "$OUT/bench.err" | tail -5
    if [ "$bench_rc" != 0 ] && [ -s "$OUT/bench.json" ]; then   # cut short: the rows measured so far
        $PY benchmarks/bench_triton.py --render "$OUT/bench.json" | tee "$OUT/bench.md"
    fi
    grep "^nlcompile: tuned" "$OUT/bench.err" | head -40   # each kernel's tuning time and choice
    saved=$(cd "$OUT" && pwd)/triton-autotune.tgz
    (cd "$TRITON_CACHE_DIR" 2>/dev/null && find . -name '*.autotune.json' -print0 | tar czf "$saved" --null -T -)
    echo "autotuning results saved: $(tar tzf "$saved" 2>/dev/null | wc -l) files in triton-autotune.tgz"
fi
if [ "${CANDIDATES_S:-180}" != 0 ]; then   # every autotuning candidate forced in turn, checked against the reference
    timeout "${CANDIDATES_S:-180}" $PY benchmarks/gpu_candidates.py ${CANDIDATE_MODELS:+--models "$CANDIDATE_MODELS"} \
        >"$OUT/candidates.md" 2>"$OUT/candidates.err"
    echo "candidates rc=$? (1: a candidate WRONG or FAULT, 124: cut short; verdicts so far in candidates.err)"
    grep -E " (WRONG$|FAULT )" "$OUT/candidates.err" | head -20
fi
if [ "${TEST_S:-240}" != 0 ]; then
    # -v: each failure is named as it happens (a run cut short by TEST_S names those it reached)
    NLCOMPILE_TRITON_TUNE=0 timeout "${TEST_S:-240}" $PY -m pytest -v -n "${WORKERS:-12}" -p no:cacheprovider \
        -p no:benchmark tests/test_triton_forward.py tests/test_triton_backward.py tests/test_triton_target.py \
        tests/test_triton_tuning.py >"$OUT/tests.log" 2>&1
    echo "pytest rc=$? ($(grep -c " PASSED " "$OUT/tests.log") passed before any cut)"
    grep -E "^\[gw[0-9]+\].* (FAILED|ERROR) " "$OUT/tests.log" | head -60   # as they happened (errors: tests.log)
    grep -E "[0-9]+ (passed|failed)" "$OUT/tests.log" | tail -1
fi
