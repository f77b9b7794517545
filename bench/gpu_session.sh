#!/usr/bin/env bash
# One GPU session in one device call (<= 10 min): build, check, benchmark, simulate, plot.
#
#   bash bench/gpu_session.sh              # on the H100/H200 machine (device tool: run, timeout_s 600)
#   bash bench/gpu_session.sh --dry-run    # here, on CPU: the same stages at toy sizes (CI runs it:
#                                          #   tests/bench/test_gpu_session.py)
#
# Installs nothing into the image: the GPU image has torch 2.11+cu130, triton 3.6, nvcc 13.0,
# transformers, pytest (see /work/.library/device/KINDS.md). Stages, each with its own time limit
# inside one overall budget; a failed or timed-out stage is reported and the next one runs:
#
#   env       nvidia-smi, versions
#   build     the package as a user gets it from an index: an sdist of this tree, a wheel built from
#             it with MECEFO_REQUIRE_EXT=1 (CUDA build for sm_90 here; CPU build in the dry run),
#             installed into the session's own directory, and mecefo_kernels._C imported from there.
#             Every later stage imports that install (PYTHONSAFEPATH=1 keeps the source tree off
#             sys.path), so they test what the sdist holds; if the build fails they run on the
#             source tree without _C, and the build stage says why
#   info      python -m mecefo_kernels.info
#   tests     tests/kernels and tests/nn (CUDA paths, native Triton)
#   sanitize  compute-sanitizer memcheck and racecheck over bench/sanitize.py: the fused SwiGLU
#             backward and the low-rank chain (split-K included) on Triton, RMSNorm on Triton and
#             the CUDA extension, at small odd shapes, every autotune config (dry run: the same
#             calls under TRITON_INTERPRET=1; the sanitizer stages are reported as skipped)
#   gemm      bench/gemm.py: autotuned TFLOP/s of every GEMM-bearing Triton kernel next to torch.mm
#             at the same shapes (llama-1b, llama-7b, 8192 tokens, bf16; then fp32 as TF32)
#   kernels   bench/kernel_bench.py, one op per run (a timeout loses one op's rows, not all), bf16
#   step      bench/step.py at llama-350m, llama-1b and a 4-layer llama-7b slice, seq 2048, bf16
#   fsdp-group  bench/fsdp_group.py under torchrun: a 2-rank FSDP2 group over NCCL (--shard fsdp's
#             holding, exactness against the unsharded model, neighbour mode, a DCP round trip, bytes
#             and step time per rank) when the machine has 2+ GPUs; skipped, saying why, with one GPU
#             and in the dry run (tests/bench/test_fsdp_group.py runs it on 2 CPU processes)
#   cluster   bench/cluster.py simulate from this GPU's step rows (the trainer's restart, detection
#             and heal costs come from the committed CPU rows: torchft is not on the GPU image)
#   plot      bench/plot.py for this GPU
#
# Output under $OUT (the device tool returns at most 8 files): gpu_rows.csv (the rows this session
# added: append them to bench/results/results.csv), summary.txt (stage status, sanitizer verdicts,
# the GEMM table and the other tables), logs.tar.gz (every stage's full log), kernels_*.png,
# step_*.png, cluster_*.png.
#
# Exit status: 0 when every stage is ok (in a dry run, the stages that need a GPU are skipped and
# say why; with one GPU, so is fsdp-group); 1 when any stage failed, timed out or was cut by the
# budget: the summary's stage table says which. Everything is written either way.

set -u -o pipefail

DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/mecefo-gpu-session}"
WORK="$(mktemp -d /tmp/mecefo-gpu-work.XXXXXX)"
LOGS="$WORK/logs"
mkdir -p "$OUT" "$LOGS"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
if [ "$DRY_RUN" = 1 ]; then
    PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
    # toy sizes on a CPU that other jobs may share: the limits only catch a hang, and one thread per
    # process (a loaded CPU made step-tiny's two OpenMP threads wait on each other: 9 s -> over 180 s)
    BUDGET_S="${BUDGET_S:-1200}"; LIMIT_SCALE=3
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
    PYTHON="${PYTHON:-python3}"
    BUDGET_S="${BUDGET_S:-570}"; LIMIT_SCALE=1  # the device call allows 600 s; keep some for packing the results
fi
DEADLINE=$((SECONDS + BUDGET_S))
# Until the build stage has installed the package, and if it fails: the source tree (mecefo_kernels
# then runs without _C). PYTHONSAFEPATH=1: `python -m ...` and `python -c ...` would otherwise put the
# current directory, the repository root, first on sys.path, and import the source tree after all.
CALLER_PYTHONPATH="${PYTHONPATH:-}"
export PYTHONPATH="$ROOT:$ROOT/python${CALLER_PYTHONPATH:+:$CALLER_PYTHONPATH}"
export PYTHONSAFEPATH=1
export PYTHONUNBUFFERED=1
SITE="$WORK/site"  # where the build stage installs the wheel built from the sdist

# One results file for the session: the committed rows (the cluster stage reads the trainer's
# costs from them) plus this session's, which are cut out at the end.
CSV="$WORK/results.csv"
cp bench/results/results.csv "$CSV"
BASE_LINES=$(wc -l < "$CSV")

STATUS="$WORK/status.txt"
: > "$STATUS"

# run_stage NAME LIMIT_S COMMAND...: runs COMMAND under `timeout`, its output to the stage's log
# (and the log's tail to stdout), records ok / FAILED / TIMEOUT / SKIPPED, never stops the script.
run_stage() {
    local name="$1" limit=$(($2 * LIMIT_SCALE))
    shift 2
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 15 ]; then
        printf '%-22s %-18s %5s\n' "$name" "SKIPPED (budget)" "-" >> "$STATUS"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit="$left"
    local start=$SECONDS
    echo "=== $name (limit ${limit} s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    local status="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status="TIMEOUT"
    elif [ "$rc" -ne 0 ]; then
        status="FAILED (rc $rc)"
    fi
    printf '%-22s %-18s %5ds\n' "$name" "$status" $((SECONDS - start)) >> "$STATUS"
    tail -n 15 "$LOGS/$name.log"
    return 0
}

# gpu_stage NAME REASON LIMIT_S COMMAND...: a stage that needs a GPU: run it, or in a dry run record
# it as skipped with REASON (not a failure).
gpu_stage() {
    local name="$1" reason="$2"
    shift 2
    if [ "$DRY_RUN" = 1 ]; then
        printf '%-22s %-18s %5s  %s\n' "$name" "SKIPPED (no GPU)" "-" "$reason" >> "$STATUS"
        return 0
    fi
    run_stage "$name" "$@"
}

# build_from_sdist: sdist -> wheel (MECEFO_REQUIRE_EXT=1) -> $SITE, then _C imported from $SITE.
# Arguments: environment assignments for the wheel build (architectures, parallel jobs).
build_from_sdist() {
    rm -rf "$WORK/sdist" "$SITE" && mkdir -p "$WORK/sdist" &&
    "$PYTHON" -c "import sys; from setuptools import build_meta; print('sdist', build_meta.build_sdist(sys.argv[1]))" \
        "$WORK/sdist" &&
    rm -rf mecefo_kernels.egg-info &&  # the sdist's metadata, written into the tree: stale after the next edit
    env "$@" MECEFO_REQUIRE_EXT=1 "$PYTHON" -m pip install --no-build-isolation --no-deps --no-cache-dir \
        --target "$SITE" "$WORK"/sdist/mecefo_kernels-*.tar.gz &&
    PYTHONPATH="$SITE" "$PYTHON" -c "import sys, mecefo_kernels, mecefo_kernels._C as c, mecefo
assert all(m.__file__.startswith(sys.argv[1]) for m in (mecefo_kernels, c, mecefo)), (mecefo_kernels, c, mecefo)
print('imported', c.__file__)" "$SITE"
}
export -f build_from_sdist
export PYTHON WORK SITE

if [ "$DRY_RUN" = 1 ]; then
    KERNEL_PRESETS=(tiny); KERNEL_TOKENS=(256); BASIS_PRESETS=(tiny); KERNEL_REP_MS=5
    # a dry run checks the pipeline, not speed: ratios of 3 rounds are taken whatever their spread
    STEP_PRESETS=(tiny); STEP_SEQ=32; STEP_ARGS=(--rep-ms 10 --rounds 3 --reruns 0 --max-spread inf --scopes model step)
    BUILD_ENV=(MAX_JOBS=2)
    CLUSTER_ARGS=(--hours 50 --seeds 2)
    TESTS=(tests/kernels/test_memory.py)
    GEMM_ARGS=(--rep-ms 5); GEMM_TF32_ARGS=(--rep-ms 5 --tf32)
else
    KERNEL_PRESETS=(llama-350m llama-1b llama-7b); KERNEL_TOKENS=(8192); BASIS_PRESETS=(llama-1b llama-7b)
    KERNEL_REP_MS=50
    STEP_PRESETS=(llama-350m llama-1b llama-7b); STEP_SEQ=2048; STEP_ARGS=()
    CLUSTER_ARGS=()
    TESTS=(tests/kernels tests/nn)
    GEMM_ARGS=(--presets llama-1b llama-7b --tokens 8192 --dtype bfloat16)
    GEMM_TF32_ARGS=(--presets llama-7b --tokens 8192 --dtype float32 --tf32)
    BUILD_ENV=(TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16)
fi

run_stage env 30 bash -c "nvidia-smi || echo 'no nvidia-smi (dry run?)'; nvcc --version || true; \
  $PYTHON -c 'import torch, triton, sys; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpu\", torch.cuda.get_device_name() if torch.cuda.is_available() else None); print(\"triton\", triton.__version__)'"

run_stage build 210 bash -c 'build_from_sdist "$@"' build "${BUILD_ENV[@]}"
if [ -f "$SITE/mecefo_kernels/__init__.py" ]; then
    export PYTHONPATH="$SITE${CALLER_PYTHONPATH:+:$CALLER_PYTHONPATH}"
else
    echo "build failed: the stages below import the source tree, without _C"
fi
run_stage info 30 "$PYTHON" -m mecefo_kernels.info
run_stage tests 150 "$PYTHON" -m pytest -q -p no:cacheprovider --timeout 120 "${TESTS[@]}"

# Races and out-of-bounds accesses, before any timing: a kernel that fails here is not worth timing.
if [ "$DRY_RUN" = 1 ]; then
    run_stage sanitize-interpreter 120 env TRITON_INTERPRET=1 "$PYTHON" bench/sanitize.py
fi
for tool in memcheck racecheck; do
    gpu_stage "sanitize-$tool" "compute-sanitizer checks CUDA launches (sanitize-interpreter ran the same calls)" \
        90 compute-sanitizer --tool "$tool" --error-exitcode 1 "$PYTHON" bench/sanitize.py
done
run_stage gemm 60 "$PYTHON" bench/gemm.py --csv "$CSV" "${GEMM_ARGS[@]}"
run_stage gemm-tf32 45 "$PYTHON" bench/gemm.py --csv "$CSV" "${GEMM_TF32_ARGS[@]}"

for op in rmsnorm swiglu swiglu_ffn lowrank_linear residual_skip; do
    run_stage "kernels-$op" 60 "$PYTHON" bench/kernel_bench.py --csv "$CSV" --ops "$op" --presets "${KERNEL_PRESETS[@]}" \
        --tokens "${KERNEL_TOKENS[@]}" --rep-ms "$KERNEL_REP_MS"
done
run_stage kernels-lowrank_basis 40 "$PYTHON" bench/kernel_bench.py --csv "$CSV" --ops lowrank_basis \
    --presets "${BASIS_PRESETS[@]}" --rep-ms "$KERNEL_REP_MS"

for preset in "${STEP_PRESETS[@]}"; do
    run_stage "step-$preset" 60 "$PYTHON" bench/step.py --csv "$CSV" --presets "$preset" --seq "$STEP_SEQ" \
        ${STEP_ARGS[@]+"${STEP_ARGS[@]}"}
done

# ---- fsdp-group (issue 19): one 2-rank FSDP2 group over NCCL, self-contained (on CPU over gloo:
# tests/bench/test_fsdp_group.py, in CI)
GPU_COUNT=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
if [ "$DRY_RUN" = 0 ] && [ "$GPU_COUNT" -lt 2 ]; then
    echo "=== fsdp-group: skipped: this machine has $GPU_COUNT GPU(s); a 2-rank FSDP group needs 2"
    printf '%-22s %-18s %5s  %s\n' fsdp-group "SKIPPED ($GPU_COUNT GPU)" "-" \
        "this machine has $GPU_COUNT GPU(s); a 2-rank FSDP group needs 2" >> "$STATUS"
else
    gpu_stage fsdp-group "a 2-rank FSDP2 group over NCCL needs 2 GPUs (tests/bench/test_fsdp_group.py runs it on CPU)" \
        120 "$PYTHON" -m torch.distributed.run --nproc-per-node 2 --master-addr 127.0.0.1 --master-port 29631 \
        bench/fsdp_group.py --csv "$CSV" --device cuda --preset llama-60m --seq 512 --steps 10
fi

if [ "$DRY_RUN" = 1 ]; then
    DEVICE_MATCH="cpu"
else
    DEVICE_MATCH="$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null || echo cuda)"
fi
run_stage cluster 60 "$PYTHON" bench/cluster.py --csv "$CSV" simulate --device "$DEVICE_MATCH" \
    --presets "${STEP_PRESETS[@]}" --seq "$STEP_SEQ" ${CLUSTER_ARGS[@]+"${CLUSTER_ARGS[@]}"}
run_stage plot 30 "$PYTHON" bench/plot.py --csv "$CSV" --device "$DEVICE_MATCH" --out "$WORK/charts"

# ---- results: this session's rows, charts, logs, and a summary whose end is what the tool shows
tail -n +"$((BASE_LINES + 1))" "$CSV" > "$WORK/new_rows.csv"
{ head -n 1 "$CSV"; cat "$WORK/new_rows.csv"; } > "$OUT/gpu_rows.csv"
cp "$WORK"/charts/*.png "$OUT"/ 2>/dev/null
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs status.txt
{
    echo "# mecefo_kernels GPU session ($( [ "$DRY_RUN" = 1 ] && echo 'DRY RUN, CPU' || echo "$DEVICE_MATCH" ))," \
         "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%FT%TZ)"
    echo "# $(wc -l < "$WORK/new_rows.csv") new rows in gpu_rows.csv; append them to bench/results/results.csv"
    for name in tests cluster; do
        [ -f "$LOGS/$name.log" ] && { echo; echo "## $name (log tail)"; tail -n 30 "$LOGS/$name.log"; }
    done
    for log in "$LOGS"/sanitize-*.log; do
        [ -f "$log" ] && { echo; echo "## $(basename "$log" .log)"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|^ran on|Error|error" "$log" | tail -n 12; }
    done
    for name in gemm gemm-tf32; do
        [ -f "$LOGS/$name.log" ] && { echo; echo "## $name"; grep -vE "^appended" "$LOGS/$name.log" | tail -n 14; }
    done
    [ -f "$LOGS/step-llama-1b.log" ] && { echo; echo "## step llama-1b"; grep -E "^llama-1b" "$LOGS/step-llama-1b.log"; }
    [ -f "$LOGS/fsdp-group.log" ] && { echo; echo "## fsdp-group"; grep -E "^fsdp group|^  " "$LOGS/fsdp-group.log"; }
    echo
    echo "## stages"
    cat "$STATUS"
} > "$SUMMARY"
cat "$SUMMARY"
failed=$(grep -vE '^\S+ +(ok|SKIPPED \((no|[01]) GPU\)) ' "$STATUS" | awk '{print $1}' | tr '\n' ' ')
echo "# stage(s) not ok: ${failed:-none}; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
rm -rf "$WORK"
[ -z "$failed" ]
