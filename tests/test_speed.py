"""Tests of llamatool/speed.py."""

import collections
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax as L
import llamatool as lt

from conftest import TINY, loss_grad, random_params, tokens_for


def test_fused_attention_equals_explicit_attention():
    # The package's fused kernel against Part I's attend, alone and in the loss.
    q = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 6, 8))
    k = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 2, 8))
    v = jax.random.normal(jax.random.PRNGKey(2), (2, 9, 2, 8))
    causal = jnp.tril(jnp.ones((1, 9, 9), bool))
    np.testing.assert_allclose(lt.speed.fused_attend(q, k, v, causal), L.attend(q, k, v, causal),
                               atol=1e-5)
    config = lt.settings.run_configs(TINY)[0]
    assert config.attention == "fused"  # The package's default, as before --attention existed
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



@pytest.mark.slow
def test_hand_written_bfloat16_gradient_agrees_with_jaxs_and_float32():
    # The package's hand-written bfloat16 matmul gradient (run_dense, in the package's
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
    temp = lt.speed.loss_buffer_bytes(dataclasses.replace(config, loss_block=512), N)
    assert temp["plain"] > 16e9
    assert temp["blockwise"] < 1 << 30
    # By memory (no --loss-block): the largest blocks whose temporaries fit the budget.
    assert lt.speed.loss_buffer_bytes(config, N)["blockwise"] < lt.speed.loss_memory_budget()


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
    n_fits = lt.speed.loss_memory_budget() // (12 * bf16.padded_vocab)  # plain's temporaries fit
    assert not lt.speed.use_blockwise(bf16, n_fits) and lt.speed.use_blockwise(bf16, n_fits + 1)
    assert not lt.speed.use_blockwise(dataclasses.replace(f32, loss_impl="plain"), 1024)
    assert lt.speed.use_blockwise(dataclasses.replace(bf16, loss_impl="blockwise"), 8)


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


def test_memory_decides_the_loss_and_its_block(monkeypatch):
    """Plain where the plain loss's temporaries fit the budget; else blockwise
    in the largest power-of-two blocks that fit; --loss-block is kept."""
    bf16 = lt.settings.RunModelConfig(compute_dtype="bfloat16")  # V_padded 50,304
    per_token = 12 * bf16.padded_vocab
    monkeypatch.setattr(lt.speed, "loss_memory_budget", lambda: 1000 * per_token)
    assert not lt.speed.use_blockwise(bf16, 1000) and lt.speed.use_blockwise(bf16, 1001)
    assert lt.speed.loss_block_size(bf16, 16384) == 512  # 1,024 would not fit
    assert lt.speed.loss_block_size(bf16, 300) == 300  # all of them, in one block
    assert lt.speed.loss_block_size(dataclasses.replace(bf16, loss_block=96), 16384) == 96
    for module in (lt.speed, lt.plan):
        monkeypatch.setattr(module, "loss_memory_budget", lambda: 17.6e9)  # an H200's eighth
    assert not lt.speed.use_blockwise(bf16, 16 * 1024)  # the 153M run: the plain loss
    words = lt.plan.loss_choice(bf16, 16 * 1024)
    assert words == ("the loss: plain; its temporaries, about 9.89 GB, fit the 17.60 GB it may "
                     "take (an eighth of the device's memory)"), words
    monkeypatch.setattr(lt.speed, "loss_memory_budget", lambda: 1000 * per_token)
    monkeypatch.setattr(lt.plan, "loss_memory_budget", lambda: 1000 * per_token)
    assert lt.plan.loss_choice(bf16, 16384).endswith(
        "512 tokens per block (the largest power of two that fits)")
    with pytest.raises(L.InputError, match="--loss-block -1: give a positive number"):
        lt.settings.RunModelConfig(loss_block=-1)


def test_decoding_with_fused_matrices_equals_part_ones():
    """FAST_DECODING's blocks (wq|wk|wv and w1|w3 as one matrix each, the
    cache written in place at batch 1) give Part I's logits, prefill and
    cached step, at batch 1 and 3 (tests/test_chat.py decodes with them)."""
    config = TINY
    params = random_params(config)
    fused = lt.speed.fused_decoding_weights(params, config)
    for B in (1, 3):
        prompt = tokens_for(config, B, 7)
        cache = L.init_cache(config, B, 12)
        ours, cache_ours = L.model_forward(fused, prompt, config, cache, 0,
                                           block=lt.speed.decode_block)
        theirs, cache_theirs = L.model_forward(params, prompt, config, cache, 0)
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
        step = tokens_for(config, B, 1, seed=5)
        position = jnp.array([7, 5, 6][:B])
        ours, _ = L.model_forward(fused, step, config, cache_ours, position,
                                  block=lt.speed.decode_block)
        theirs, _ = L.model_forward(params, step, config, cache_theirs, position)
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_the_decoding_loop_runs_fewer_products_and_writes_the_cache_without_a_scatter():
    """Read from the compiled decoding loop (tools/decode_program.py prints
    the same): Part I's runs 9 matrix products a block (q, k, v, o, w1, w2,
    w3 and attention's two) and the output layer's; the package's 6 a block.
    At batch 1 the package's program asks for no scatter into the cache."""
    config = TINY
    params = random_params(config)
    part_one = lt.bench.decode_loop_counts(params, config)
    package = lt.bench.decode_loop_counts(params, config, decoding=lt.speed.FAST_DECODING)
    assert part_one["dots"] == 9 * config.n_layers + 1
    assert package["dots"] == 6 * config.n_layers + 1
    assert package["instructions"] < part_one["instructions"]
    # Part I's vmapped dynamic_update_slice: a scatter per cache write (k and v,
    # each block, in the prefill and in the loop); the package's: none (what
    # remains is generate's output buffer, out.at[:, i].set).
    assert part_one["scatters_lowered"] >= 4 * config.n_layers
    assert package["scatters_lowered"] <= 2


def lowered_results(text, shape, dtype):
    """{op: how many} of the lowered program's operations whose result is a
    tensor of `shape` and `dtype` (StableHLO text)."""
    pattern = re.compile(rf"(-> |: )tensor<{'x'.join(map(str, shape))}x{dtype}>$")
    ops = collections.Counter()
    for line in text.splitlines():
        if pattern.search(line.strip()):
            m = re.search(r"= \"?([\w.@]+)", line)
            ops[m.group(1) if m else "?"] += 1
    return ops


def test_bfloat16_compute_keeps_the_activations_and_the_residual_stream_in_bfloat16(monkeypatch):
    """Under bfloat16 compute, the training step as a GPU traces it (on a CPU
    the activations stay float32: bfloat16_activations says why) makes every
    matmul output, residual add and feed-forward activation of [B, T, D] and
    [B, T, F] in bfloat16 in its lowered program; float32 ones of that shape
    come only from the norms' statistics and the embedding's lookup. The loss
    and the gradients agree with float32 as Part I's bfloat16 test asks."""
    monkeypatch.setattr(lt.speed.jax, "default_backend", lambda: "gpu")
    jax.clear_caches()
    config = dataclasses.replace(lt.settings.run_configs(TINY)[0], compute_dtype="bfloat16",
                                 attention="fused", dim=48, n_heads=4, n_kv_heads=2, ffn_dim=96)
    params = random_params(config)
    data = np.arange(500, dtype=np.int32) % config.vocab_size
    tc = lt.settings.RunTrainConfig(batch_size=2, seq_len=23, health=False)
    text = lt.step.run_step.lower(params, L.adamw_init(params), data,
                                  L.run_keys(jax.random.PRNGKey(0)), config, tc).as_text()
    assert not lowered_results(text, (2, 23, 96), "f32")  # the feed-forward's activations
    assert lowered_results(text, (2, 23, 96), "bf16")["stablehlo.dot_general"] > 0
    f32 = lowered_results(text, (2, 23, 48), "f32")
    assert set(f32) <= {"stablehlo.multiply", "stablehlo.broadcast_in_dim", "stablehlo.add",
                        "stablehlo.convert", "stablehlo.gather"}, f32
    bf16 = lowered_results(text, (2, 23, 48), "bf16")
    assert bf16["stablehlo.dot_general"] > 0 and bf16["stablehlo.add"] >= 2 * config.n_layers
    tokens = tokens_for(config, 2, 16)
    batch = (tokens, jnp.roll(tokens, -1, 1))
    f32_config = dataclasses.replace(config, compute_dtype="float32")
    loss = jax.jit(lt.speed.run_loss, static_argnames="config")
    assert float(loss(params, batch, config=config)) == pytest.approx(
        float(loss(params, batch, config=f32_config)), rel=1e-2)
    grad = jax.jit(jax.grad(lt.speed.run_loss), static_argnames="config")
    for a, b in zip(jax.tree_util.tree_leaves(grad(params, batch, config=f32_config)),
                    jax.tree_util.tree_leaves(grad(params, batch, config=config))):
        cosine = jnp.sum(a * b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + 1e-30)
        assert b.dtype == jnp.float32 and float(cosine) > 0.99
    monkeypatch.undo()
    jax.clear_caches()
