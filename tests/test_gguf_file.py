"""Tests of llamatool/gguf_file.py."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax as L
import llamatool as lt

from conftest import (BPE_TEXT, MODEL_FILE_CHECK, finished, forward, interleave,
    is_model_file_test, need_gguf, np_gguf_llama_forward, q8_round_trip, random_params,
    round_matrices, tiny_bpe_vocab, tokens_for, write_tiny_gguf)


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


def test_half_split_to_interleaved_inverts_the_loaders_permutation():
    w = np.arange(6 * 24, dtype=np.float32).reshape(6, 24)
    np.testing.assert_array_equal(lt.gguf_file.half_split_to_interleaved(w, 3), interleave(w, 3))
    np.testing.assert_array_equal(
        lt.gguf_file.interleaved_to_half_split(lt.gguf_file.half_split_to_interleaved(w, 3), 3), w)


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
def test_model_file_tests_pass_in_a_process_of_their_own(programs_beside, request):
    """Runs the model-file tests (is_model_file_test) in a pytest of their own."""
    code, out, _ = finished(programs_beside, MODEL_FILE_CHECK)
    assert code == 0, out[-8000:]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|skipped|failed|error)", out)}
    expected = sum(is_model_file_test(item.originalname) for item in request.session.items)
    assert counts.get("passed", 0) + counts.get("skipped", 0) == expected, out[-3000:]
