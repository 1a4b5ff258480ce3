#!/usr/bin/env bash
# One prepared check of the GPU path on an H100/H200, writing five small files
# to OUTDIR (never more than 8): every figure as a JSON line to
# OUTDIR/results.jsonl, every log line to OUTDIR/log.txt, pytest's report to
# OUTDIR/junit.xml, the gpu preset's loss curve to OUTDIR/loss.png and the
# profiled steps' trace to OUTDIR/trace.json.gz.
#
#     GPU_CHECK_STEPS="tests bench profile" tools/gpu_check.sh OUT1  # about 6 min
#     GPU_CHECK_STEPS=train tools/gpu_check.sh OUT2                  # about 6.5 min
# (each call starts its OUTDIR's files afresh: give the two calls two folders)
#     tools/gpu_check.sh --dry-run OUTDIR   # every step on CPU, tiny sizes
#
# All the steps in one call would overrun 9 minutes on an H200, hence the two
# (docs/gpu.md has what each step took there). Each step has its own time
# limit, so that one hang cannot use up the whole:
#   1. env      versions and the device (always)
#   2. tests    the suite's GPU-relevant tests, run on the GPU
#   3. bench    --bench at the 153M configuration, batch 16 x 1024 (with decoding
#               at batch 1 and 8) and 32 x 1024 (training only), bfloat16;
#               GPU_CHECK_BENCH_FLAGS adds flags (e.g. "--loss-impl plain")
#   4. profile  tools/profile_step.py at 16 x 1024 (GPU_CHECK_PROFILE_BATCH):
#               the step's kernels, summed by kind, and the largest
#   5. train    the gpu preset under --time-budget 5 (GPU_CHECK_BUDGET_MIN),
#               then --eval on shakespeare_heldout.txt; GPU_CHECK_TRAIN_FLAGS
#               adds flags, e.g. "--steps 3000 --lr 8e-3", to tune it. It
#               shares the GPU with no other step: its budget is wall-clock
#   6. summary  the figures against the GPU goals in docs/gpu.md
# The dry run writes the same keys, so a test keeps this script working in CI.
set -uo pipefail

usage() { echo "usage: tools/gpu_check.sh [--dry-run] OUTDIR" >&2; exit 2; }
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
[ $# -eq 1 ] || usage
OUT=$1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
RESULTS=$OUT/results.jsonl
LOG=$OUT/log.txt
: > "$RESULTS"
: > "$LOG"
# The run's checkpoint (hundreds of MB on the GPU) stays out of OUTDIR.
RUN_DIR=$(mktemp -d)
trap 'rm -rf "$RUN_DIR"' EXIT
export PYTHONUNBUFFERED=1
cd "$ROOT" || exit 2
T0=$(date +%s)

STEPS=" ${GPU_CHECK_STEPS:-tests bench profile train} "
has() { [[ "$STEPS" == *" $1 "* ]]; }
if [ $DRY = 1 ]; then
    export JAX_PLATFORMS=cpu
    # Tiny sizes; vocabulary 50,257 as on the GPU.
    BENCH_MODEL=(--dim 32 --n-layers 2 --n-heads 4 --n-kv-heads 2 --ffn-dim 64
                 --max-seq-len 64 --no-tie-embeddings --dtype bfloat16)
    BENCH_BATCHES=(2 4)
    BENCH_SEQ=32
    TRAIN_FLAGS=(--preset gpu --dim 32 --n-layers 2 --n-heads 4 --n-kv-heads 2 --max-seq-len 64
                 --batch-size 2 --seq-len 32 --eval-every 20 --max-new-tokens 8)
    BUDGET=${GPU_CHECK_BUDGET_MIN:-0.25}
    TEST_SELECT="fused_attention_equals_explicit"
    LIMIT_TESTS=120 LIMIT_BENCH=(120 120) LIMIT_TRAIN=120 LIMIT_PROFILE=120
    # The held-out evaluation's plumbing, on the first 20,000 characters.
    HELDOUT_TEXT="$RUN_DIR/heldout_start.txt"
    head -c 20000 shakespeare_heldout.txt > "$HELDOUT_TEXT"
else
    # The 153M configuration (untied; tied it is 114M).
    BENCH_MODEL=(--dim 768 --n-layers 12 --n-heads 12 --n-kv-heads 4 --ffn-dim 2048
                 --max-seq-len 1024 --no-tie-embeddings --dtype bfloat16)
    BENCH_BATCHES=(16 32)
    BENCH_SEQ=1024
    TRAIN_FLAGS=(--preset gpu)
    BUDGET=${GPU_CHECK_BUDGET_MIN:-5}
    TEST_SELECT=""
    LIMIT_TESTS=150 LIMIT_BENCH=(150 90) LIMIT_PROFILE=150
    LIMIT_TRAIN=$(awk "BEGIN { print int($BUDGET * 60 + 50) }")
    HELDOUT_TEXT=shakespeare_heldout.txt
fi
# The tests that exercise what differs on a GPU: fused (cuDNN) vs explicit
# attention, bfloat16 vs float32, the padded vocabulary, cached decoding vs the
# full forward, the NumPy oracle, the package's sharded step on one device, and a
# checkpoint saved and restored.
GPU_TESTS="fused_attention or bfloat16 or padded_vocabulary or cached_decode or prefill"
GPU_TESTS+=" or cache_rows or forward_matches_numpy or greedy_generate"
GPU_TESTS+=" or part_one_step_equals_part_two_step or fsdp_splits or checkpoint_round_trip"
GPU_TESTS+=" or resume_gives_the_same_losses"

note() { echo "== $* ($(( $(date +%s) - T0 ))s)" | tee -a "$LOG"; }

# Appends one JSON object (given as Python keyword arguments' source) to results.
record() {
    "$PY" - "$RESULTS" "$@" <<'EOF'
import json, sys
path, pairs = sys.argv[1], sys.argv[2:]
rec = {}
for pair in pairs:
    k, v = pair.split("=", 1)
    try:
        rec[k] = json.loads(v)
    except ValueError:
        rec[k] = v
open(path, "a").write(json.dumps(rec) + "\n")
EOF
}

# ----------------------------------------------------------------------------- 1. env
note "env"
nvidia-smi >> "$LOG" 2>&1 || echo "(no nvidia-smi)" >> "$LOG"
"$PY" - "$RESULTS" >> "$LOG" 2>&1 <<'EOF'
import json, platform, sys
import jax, jaxlib, numpy
d = jax.devices()[0]
rec = {"kind": "env", "backend": jax.default_backend(),
       "device": getattr(d, "device_kind", d.platform), "device_count": jax.device_count(),
       "jax": jax.__version__, "jaxlib": jaxlib.__version__, "numpy": numpy.__version__,
       "python": platform.python_version()}
print(rec)
open(sys.argv[1], "a").write(json.dumps(rec) + "\n")
EOF
BACKEND=$("$PY" -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["backend"])' "$RESULTS" 2>/dev/null)
if [ $DRY = 0 ] && [ "$BACKEND" != "gpu" ]; then
    note "JAX sees no GPU (backend: ${BACKEND:-none}); stopping. Use --dry-run on a CPU."
    exit 1
fi

# ----------------------------------------------------------------------------- 2. tests
run_tests() {
    # The tests compare float32 against NumPy at float32 tolerances; on a GPU,
    # XLA would otherwise run float32 matmuls as TF32 (10-bit mantissa).
    # -m "slow or not slow": every selected test, the slow ones included (pytest.ini).
    local selected start rc
    selected=$("$PY" -m pytest -q -p no:cacheprovider -m "slow or not slow" --collect-only \
        -k "$GPU_TESTS" test_llama_jax.py tests 2>/dev/null | grep -c '::')
    start=$(date +%s)
    JAX_DEFAULT_MATMUL_PRECISION=highest timeout "$LIMIT_TESTS" "$PY" -m pytest -q \
        -p no:cacheprovider -m "slow or not slow" -k "${TEST_SELECT:-$GPU_TESTS}" \
        --junitxml="$OUT/junit.xml" test_llama_jax.py tests > "$RUN_DIR/tests.log" 2>&1
    rc=$?
    "$PY" - "$RESULTS" "$OUT/junit.xml" "$selected" "$rc" "$(( $(date +%s) - start ))" \
        "${TEST_SELECT:-$GPU_TESTS}" >> "$RUN_DIR/tests.log" 2>&1 <<'EOF'
import json, sys
import xml.etree.ElementTree as ET
path, xml, selected, rc, seconds, expr = sys.argv[1:]
rec = {"kind": "tests", "selected": int(selected), "ran": 0, "passed": 0, "failed": 0,
       "skipped": 0, "failures": [], "exit_code": int(rc), "seconds": int(seconds),
       "expression": expr}
try:
    for case in ET.parse(xml).getroot().iter("testcase"):
        rec["ran"] += 1
        if case.find("failure") is not None or case.find("error") is not None:
            rec["failed"] += 1
            rec["failures"].append(case.get("name"))
        elif case.find("skipped") is not None:
            rec["skipped"] += 1
        else:
            rec["passed"] += 1
except (OSError, ET.ParseError) as err:
    rec["failures"].append(f"no junit report: {err}")
open(path, "a").write(json.dumps(rec) + "\n")
EOF
}

if has tests; then
    note "tests"
    run_tests
    cat "$RUN_DIR/tests.log" >> "$LOG"
fi

# ----------------------------------------------------------------------------- 3. bench
if has bench; then
    for i in 0 1; do
        B=${BENCH_BATCHES[$i]}
        note "bench batch $B x $BENCH_SEQ"
        # Decoding is measured once, with the first batch size (--max-new-tokens 0 skips it).
        DECODE=()
        [ "$i" = 1 ] && DECODE=(--max-new-tokens 0)
        timeout "${LIMIT_BENCH[$i]}" "$PY" llama_jax.py --bench --json "${BENCH_MODEL[@]}" \
            --batch-size "$B" --seq-len "$BENCH_SEQ" "${DECODE[@]}" ${GPU_CHECK_BENCH_FLAGS:-} \
            2>> "$LOG" | tee -a "$LOG" | "$PY" -c '
import json, sys
label = sys.argv[2]
with open(sys.argv[1], "a") as out:
    for line in sys.stdin:
        if line.startswith("{"):
            rec = json.loads(line)
            rec["kind"] = "bench_" + rec["kind"]
            out.write(json.dumps({**rec, "run": label}) + "\n")
' "$RESULTS" "b$B"
        RC=${PIPESTATUS[0]}
        [ "$RC" = 0 ] || record kind=bench_error run="b$B" exit_code="$RC"
    done
fi

# ----------------------------------------------------------------------------- 4. profile
if has profile; then
    B=${GPU_CHECK_PROFILE_BATCH:-${BENCH_BATCHES[0]}}
    note "profile batch $B x $BENCH_SEQ"
    timeout "$LIMIT_PROFILE" "$PY" tools/profile_step.py --json "${BENCH_MODEL[@]}" \
        --batch-size "$B" --seq-len "$BENCH_SEQ" --trace-steps 3 --trace-out "$RUN_DIR/trace.json.gz" \
        ${GPU_CHECK_BENCH_FLAGS:-} 2>> "$LOG" | tee -a "$LOG" | grep '^{' >> "$RESULTS"
    RC=${PIPESTATUS[0]}
    [ "$RC" = 0 ] || record kind=profile_error exit_code="$RC"
    # Kept when small enough to come back from the GPU machine (16 MiB per file).
    if [ -f "$RUN_DIR/trace.json.gz" ] && [ "$(stat -c %s "$RUN_DIR/trace.json.gz")" -lt 16000000 ]; then
        cp "$RUN_DIR/trace.json.gz" "$OUT/trace.json.gz"
    fi
fi

# ----------------------------------------------------------------------------- 5. train
# One training run and its held-out evaluation: train_one NAME [FLAGS...]. Its
# log goes to RUN_DIR/NAME.log, its record to RESULTS.
train_one() {
    local name=$1 dir="$RUN_DIR/$1" start rc seconds left heldout=""
    shift
    mkdir -p "$dir"
    start=$(date +%s)
    # shellcheck disable=SC2086  # GPU_CHECK_TRAIN_FLAGS is a list of flags
    timeout "$LIMIT_TRAIN" "$PY" llama_jax.py "${TRAIN_FLAGS[@]}" ${GPU_CHECK_TRAIN_FLAGS:-} "$@" \
        --time-budget "$BUDGET" --out-dir "$dir" > "$dir.log" 2>&1
    rc=$?
    seconds=$(( $(date +%s) - start ))
    # The held-out plays (never trained on), in what is left of the step's
    # limit, so that the whole stays under its cap.
    left=$(( LIMIT_TRAIN - seconds ))
    if "$PY" -c 'import sys, llamatool as lt; sys.exit(lt.checkpoint_formats.saved_checkpoint(sys.argv[1]) is None)' \
            "$dir" 2>/dev/null && [ "$left" -ge 10 ]; then
        heldout=$(timeout "$left" "$PY" llama_jax.py --eval "$HELDOUT_TEXT" --json \
            --out-dir "$dir" 2>> "$dir.log" | tail -n 1)
        echo "$heldout" >> "$dir.log"
    fi
    "$PY" - "$RESULTS" "$dir" "$rc" "$seconds" "$BUDGET" \
        "${GPU_CHECK_TRAIN_FLAGS:-} $*" "$heldout" "$name" >> "$dir.log" 2>&1 <<'EOF'
import json, sys
path, run_dir, rc, seconds, budget, extra, heldout, name = sys.argv[1:]
rec = {"kind": "train_budget", "run": name, "exit_code": int(rc), "wall_s": int(seconds),
       "budget_min": float(budget), "extra_flags": extra.strip(), "steps": None,
       "schedule_steps": None,
       "val_loss": None, "train_loss": None, "params": None, "tokens": None,
       "heldout_nats_per_token": None, "heldout_bits_per_byte": None, "evals": None}
try:  # --eval's JSON line; empty when it did not run or did not finish
    r = json.loads(heldout)
    rec.update(heldout_nats_per_token=r["nats_per_token"], heldout_bits_per_byte=r["bits_per_byte"])
except (ValueError, KeyError, TypeError):
    pass
try:
    import llama_jax as L
    from llamatool.checkpoint_formats import load_checkpoint, saved_checkpoint
    c = load_checkpoint(saved_checkpoint(run_dir))  # in whichever format the run wrote
    step, train_loss, val_loss = c.history["eval"][-1]
    tc = c.train_config
    rec.update(steps=int(c.opt_state["step"]), schedule_steps=tc.steps,
               val_loss=val_loss, train_loss=train_loss, params=L.count_params(c.params),
               tokens=int(c.opt_state["step"]) * tc.batch_size * tc.seq_len,
               config={k: getattr(c.config, k) for k in
                       ("dim", "n_layers", "n_heads", "n_kv_heads", "dropout_rate",
                        "compute_dtype", "max_seq_len", "tie_embeddings")},
               batch_size=tc.batch_size, seq_len=tc.seq_len, lr=tc.lr,
               evals=[[int(s), round(t, 4), round(v, 4)] for s, t, v in c.history["eval"]])
except Exception as err:  # report, never stop the script: the other figures count
    rec["error"] = f"{type(err).__name__}: {err}"
open(path, "a").write(json.dumps(rec) + "\n")
EOF
}

if has train; then
    note "train the gpu preset for at most $BUDGET min"
    train_one preset
    cp "$RUN_DIR/preset/loss.png" "$OUT/loss.png" 2>/dev/null
    cat "$RUN_DIR/preset.log" >> "$LOG"
fi

# ----------------------------------------------------------------------------- 6. summary
note "summary"
"$PY" - "$RESULTS" "$(( $(date +%s) - T0 ))" <<'EOF' | tee -a "$LOG"
import json, sys
path, seconds = sys.argv[1], int(sys.argv[2])
recs = [json.loads(line) for line in open(path)]
def first(kind, **match):
    return next((r for r in recs if r.get("kind") == kind
                 and all(r.get(k) == v for k, v in match.items())), {})
runs = [r["run"] for r in recs if r.get("kind") == "bench_train"]
train = first("bench_train", run=runs[0]) if runs else {}
train2 = first("bench_train", run=runs[1]) if len(runs) > 1 else {}
decode1, decode8 = first("bench_decode", batch=1), first("bench_decode", batch=8)
tests, budget, profile = first("tests"), first("train_budget", run="preset"), first("profile")
def gigabytes(n):
    return None if not n else n / 1e9
summary = {"kind": "summary", "seconds": seconds, "device": first("env").get("device"),
           "tests_passed": tests.get("passed"), "tests_failed": tests.get("failed"),
           "mfu_153m_b16": train.get("mfu"), "mfu_153m_b32": train2.get("mfu"),
           "train_tokens_per_s_b16": train.get("train_tokens_per_s"),
           "train_tokens_per_s_b32": train2.get("train_tokens_per_s"),
           "peak_memory_gb_b16": gigabytes(train.get("peak_memory_bytes")),
           "peak_memory_gb_b32": gigabytes(train2.get("peak_memory_bytes")),
           "compile_s_b16": train.get("compile_s"),
           "decode_tokens_per_s_b1": decode1.get("decode_tokens_per_s"),
           "decode_hbm_fraction_b1": decode1.get("hbm_fraction"),
           "decode_tokens_per_s_b8": decode8.get("decode_tokens_per_s"),
           "decode_long_context_ratio": first("bench_decode_long_context").get("ratio"),
           "profile_largest": [[t["kind"], t["name"][:60], t["ms"]] for t in profile.get("top", [])[:3]],
           "profile_by_kind_ms": profile.get("by_kind_ms"),
           "budget_val_loss": budget.get("val_loss"), "budget_steps": budget.get("steps"),
           "budget_wall_s": budget.get("wall_s"),
           "budget_heldout_nats_per_token": budget.get("heldout_nats_per_token"),
           "runs": [[r["run"], r["extra_flags"], r["val_loss"], r["heldout_nats_per_token"],
                     r["steps"], r["wall_s"]] for r in recs if r.get("kind") == "train_budget"]}
# The GPU goals (docs/gpu.md); meaningful on an H100/H200 only.
def at_least(value, goal):
    return None if value is None else value >= goal
def at_most(value, goal):
    return None if value is None else value <= goal
best_mfu = max(summary["mfu_153m_b16"] or 0, summary["mfu_153m_b32"] or 0) or None
summary["goal_mfu_45"] = at_least(best_mfu, 0.45)
summary["goal_decode_2000"] = at_least(summary["decode_tokens_per_s_b1"], 2000)
summary["goal_heldout_4_9"] = at_most(budget.get("heldout_nats_per_token"), 4.9)
open(path, "a").write(json.dumps(summary) + "\n")
print(json.dumps(summary, indent=1))
EOF
note "done"
