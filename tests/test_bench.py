"""Tests of llamatool/bench.py."""

import dataclasses
import json

import jax
import numpy as np
import pytest

import llama_jax as L
import llamatool as lt

from conftest import TINY, finished


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
    # Which attention ran, read from the compiled step: XLA's on a CPU.
    assert {r["attention"] for r in records if r["kind"] == "bench_train"} == {"XLA"}
    # The GPU selection still names the tests it is meant to (renames would empty it).
    assert tests["selected"] >= 12 and tests["passed"] >= 1 and tests["failed"] == 0
    assert [r["batch"] for r in records if r["kind"] == "bench_decode"] == [1, 8]
    assert budget["exit_code"] == 0 and np.isfinite(budget["val_loss"])
    assert 1 <= budget["steps"] <= budget["schedule_steps"]
    assert summary["tests_failed"] == 0 and summary["mfu_153m_b16"] > 0
    assert summary["decode_tokens_per_s_b1"] > 0 and summary["budget_val_loss"] is not None
    assert (out / "loss.png").is_file() and (out / "junit.xml").is_file()
    assert "Traceback" not in log


def test_the_cuda_lowering_of_the_step_calls_cudnns_attention(monkeypatch):
    """Lowered for CUDA on this CPU, as a GPU would trace it (cudnn_takes
    sees a GPU), the bfloat16 training step calls cuDNN's fused attention
    forward and backward, and attention_kernel reads that from the program;
    the CPU's own step runs XLA's. jax checks cuDNN's version and the GPU's
    compute capability when it traces implementation="cudnn"; with no CUDA
    here, those two checks (jax internals) are answered as an H100's would
    be. Skips where the installed jax differs."""
    fused = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    if not all(hasattr(fused, f) for f in ("check_cudnn_version", "check_compute_capability")):
        pytest.skip("this jax checks cuDNN differently; the lowering is checked on a GPU")
    config = dataclasses.replace(lt.settings.run_configs(TINY)[0], compute_dtype="bfloat16",
                                 attention="fused", dim=64, n_heads=4, n_kv_heads=2,
                                 max_seq_len=64)
    tc = lt.settings.RunTrainConfig(batch_size=2, seq_len=64, health=False)
    params = L.init_params(jax.random.PRNGKey(0), config)
    args = (params, L.adamw_init(params), np.zeros(1000, np.int32),
            L.run_keys(jax.random.PRNGKey(1)), config, tc)
    assert lt.bench.attention_kernel(lt.step.run_step.lower(*args).compile().as_text()) == "XLA"
    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fused, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(lt.speed.jax, "default_backend", lambda: "gpu")
    jax.clear_caches()  # trace again: the CPU's trace above chose XLA's attention
    try:
        text = lt.step.run_step.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"this jax cannot lower for CUDA here: {type(err).__name__}: {err}")
    finally:
        jax.clear_caches()  # no later test may reuse a trace made "on a GPU"
    assert "__cudnn$fmhaSoftmax(" in text and "__cudnn$fmhaSoftmaxBackward(" in text
    assert lt.bench.attention_kernel(text) == "cuDNN"
