"""Tests of llamatool/lora.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax as L
import llamatool as lt

from conftest import (HAS_ORBAX, LORA_TC, TINY, TRAIN_TINY, forward, quick_tc, random_adapters,
    random_params, tokens_for)


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
