"""Tests of llamatool/bench.py."""

import json

import jax
import numpy as np
import pytest

from conftest import finished


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_figure(programs_beside):
    code, printed, folder = finished(programs_beside, "test_gpu_check_dry_run_writes_every_figure")
    out = folder / "gpu"
    log = (out / "log.txt").read_text()
    assert code == 0, printed + log[-3000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds == ["env", "tests", "bench_train", "bench_loss_memory", "bench_decode",
                     "bench_decode", "bench_decode_long_context", "bench_summary", "bench_train",
                     "bench_loss_memory", "bench_summary", "profile", "train_budget", "summary"]
    env_rec, tests, profile, budget, summary = (records[0], records[1], records[-3], records[-2],
                                                records[-1])
    # The profile's kernels (on a CPU, XLA's work on the host threads), largest first.
    assert profile["step_ms"] > 0 and len(profile["top"]) >= 3
    assert [t["ms"] for t in profile["top"]] == sorted((t["ms"] for t in profile["top"]),
                                                      reverse=True)
    # Decoding at batch 1 reads every weight once per token: at least the
    # untied output matrix (32 x 50,304 in float32 on a CPU).
    decode1 = next(r for r in records if r["kind"] == "bench_decode")
    assert decode1["bytes_per_token"] >= 32 * 50304 * 4
    assert env_rec["backend"] == "cpu" and env_rec["jax"] == jax.__version__
    # The GPU selection still names the tests it is meant to (renames would empty it).
    assert tests["selected"] >= 12 and tests["passed"] >= 1 and tests["failed"] == 0
    assert [r["batch"] for r in records if r["kind"] == "bench_decode"] == [1, 8]
    assert budget["exit_code"] == 0 and np.isfinite(budget["val_loss"])
    assert 1 <= budget["steps"] <= budget["schedule_steps"]
    assert summary["tests_failed"] == 0 and summary["mfu_153m_b16"] > 0
    assert summary["decode_tokens_per_s_b1"] > 0 and summary["budget_val_loss"] is not None
    assert (out / "loss.png").is_file() and (out / "junit.xml").is_file()
    assert "Traceback" not in log
