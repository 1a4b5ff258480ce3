"""Tests for llama_jax: each checks one property against something independent
(a NumPy oracle written here, finite differences, the full forward pass as the
oracle for the cached one, published token ids). Tiny configs, fixed keys.

    pytest -q test_llama_jax.py
"""

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util as jtu

import llama_jax as L

HERE = Path(__file__).resolve().parent

# GQA on (4 query heads share 2 K/V heads), vocabulary padded 97 -> 128.
TINY = L.ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
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
    config = L.ModelConfig(**{**TINY.__dict__, "tie_embeddings": tied})
    params = random_params(config)
    tokens = tokens_for(config, 2, 12)
    logits, cache = forward(params, tokens, config)
    assert logits.shape == (2, 12, config.vocab_size) and logits.dtype == jnp.float32
    assert cache is None
    np.testing.assert_allclose(logits, np_llama_forward(params, tokens, config), atol=2e-4,
                               rtol=1e-4)


def test_reference_attention_path_matches_oracle():
    config = L.ModelConfig(**{**TINY.__dict__, "fused_attention": False})
    params = random_params(config)
    tokens = tokens_for(config, 2, 12)
    logits, _ = forward(params, tokens, config)
    np.testing.assert_allclose(logits, np_llama_forward(params, tokens, config), atol=2e-4,
                               rtol=1e-4)


def test_fused_attention_equals_explicit_attention():
    q = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 6, 8))
    k = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 2, 8))
    v = jax.random.normal(jax.random.PRNGKey(2), (2, 9, 2, 8))
    causal = jnp.tril(jnp.ones((1, 9, 9), bool))
    np.testing.assert_allclose(jax.nn.dot_product_attention(q, k, v, is_causal=True),
                               L.attention_reference(q, k, v, causal), atol=1e-5)


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
    mha = L.ModelConfig(**{**TINY.__dict__, "n_kv_heads": TINY.n_heads})
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
    mha = L.ModelConfig(**{**TINY.__dict__, "n_kv_heads": TINY.n_heads})
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
    perm = np.concatenate([np.arange(0, Dh, 2), np.arange(1, Dh, 2)])
    cols = (np.arange(H)[:, None] * Dh + perm[None]).reshape(-1)
    cos, sin = L.precompute_rope(Dh, T, theta)
    q2 = L.apply_rope(jnp.asarray((x @ wq[:, cols]).reshape(1, T, H, Dh), jnp.float32),
                      cos[None], sin[None])
    k2 = L.apply_rope(jnp.asarray((x @ wk[:, cols]).reshape(1, T, H, Dh), jnp.float32),
                      cos[None], sin[None])
    ours = np.einsum("thd,shd->hts", np.asarray(q2[0]), np.asarray(k2[0]))
    np.testing.assert_allclose(ours, meta_scores, rtol=1e-4, atol=1e-3)
    # Without the permutation the two layouts disagree.
    q3 = L.apply_rope(jnp.asarray((x @ wq).reshape(1, T, H, Dh), jnp.float32), cos[None], sin[None])
    k3 = L.apply_rope(jnp.asarray((x @ wk).reshape(1, T, H, Dh), jnp.float32), cos[None], sin[None])
    assert not np.allclose(np.einsum("thd,shd->hts", q3[0], k3[0]), meta_scores, atol=1e-1)


# ----------------------------------------------------------------------------- gradients, dropout


def test_gradients_match_finite_differences():
    # The explicit attention path: the fused kernel computes scores in float32.
    config = L.ModelConfig(vocab_size=11, dim=8, n_layers=1, n_heads=2, n_kv_heads=1,
                           max_seq_len=8, vocab_multiple=8, fused_attention=False)
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
    config = L.ModelConfig(**{**TINY.__dict__, "dropout_rate": 0.5})
    params, tokens = random_params(config), tokens_for(config, 2, 8)
    a, _ = forward(params, tokens, config, key=jax.random.PRNGKey(1))
    b, _ = forward(params, tokens, config, key=jax.random.PRNGKey(2))
    np.testing.assert_array_equal(a, b)
    off = L.ModelConfig(**{**TINY.__dict__, "dropout_rate": 0.0})
    c, _ = forward(params, tokens, off, training=True, key=jax.random.PRNGKey(1))
    np.testing.assert_array_equal(a, c)


def test_dropout_on_changes_outputs_with_the_key():
    config = L.ModelConfig(**{**TINY.__dict__, "dropout_rate": 0.5})
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
    padded = L.ModelConfig(**{**TINY.__dict__, "vocab_multiple": 64})  # 97 -> 128
    plain = L.ModelConfig(**{**TINY.__dict__, "vocab_multiple": 1})
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


def test_bfloat16_compute_agrees_with_float32():
    bf16 = L.ModelConfig(**{**TINY.__dict__, "compute_dtype": "bfloat16"})
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
    # The master weights stay float32 through a training step.
    tc = L.TrainConfig(batch_size=2, seq_len=8, steps=2)
    data = jnp.arange(200) % TINY.vocab_size
    new, opt, _, _ = L.train_step(params, L.adamw_init(params), data, jax.random.PRNGKey(0),
                                  bf16, tc)
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


def test_import_prints_nothing_and_creates_no_file(tmp_path):
    result = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(HERE)!r});"
                             " import llama_jax"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    assert list(tmp_path.iterdir()) == []
