"""Tests of llamatool/health.py."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax as L
import llamatool as lt

from conftest import TINY, random_params, tokens_for


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
        assert set(s) == {"rms"}  # the entropy is not taken inside the step
        assert float(s["rms"]) == pytest.approx(np.sqrt(np.mean(embedded ** 2)), rel=1e-5)
    entropy = lt.health.attention_entropy(params, tokens, config)
    np.testing.assert_allclose(entropy, [np.mean(np.log(np.arange(1, 13)))] * config.n_layers,
                               rtol=1e-5)


def count_square_tensors(hlo, T):
    """How many tensors of the compiled program end in [..., T, T]."""
    return len(re.findall(rf"\[[0-9,]*{T},{T}\]", hlo))


def test_health_adds_no_t_by_t_tensor_to_the_training_step():
    """With health on, the compiled step holds no more [..., T, T] tensors
    (the attention's scores and weights) than with it off: the entropy is
    measured outside the step (logged_entropy)."""
    config = dataclasses.replace(lt.settings.run_configs(TINY)[0], attention="fused",
                                 max_seq_len=24)
    params = random_params(config)
    data = np.arange(500, dtype=np.int32) % config.vocab_size
    keys = L.run_keys(jax.random.PRNGKey(0))
    counts = {}
    for health in (False, True):
        tc = lt.settings.RunTrainConfig(batch_size=2, seq_len=23, health=health)
        hlo = lt.step.run_step.lower(params, L.adamw_init(params), data, keys, config,
                                     tc).compile().as_text()
        counts[health] = count_square_tensors(hlo, 23)
    assert counts[False] > 0  # the count sees the attention's scores at all
    assert counts[True] <= counts[False], counts


def test_logged_entropy_measures_the_batch_the_step_trained_on():
    config = TINY
    params = random_params(config)
    data = jnp.asarray(np.arange(700, dtype=np.int32) % config.vocab_size)
    keys = L.run_keys(jax.random.PRNGKey(0))
    tc = lt.settings.RunTrainConfig(batch_size=4, seq_len=10, grad_accum=2)
    inputs = L.get_batch(L.step_keys(keys, 5)[0], data, 4, 10)[0]
    got = lt.health.logged_entropy(params, data, keys, 5, config, tc)
    np.testing.assert_allclose(got, lt.health.attention_entropy(params, inputs[:2], config),
                               rtol=1e-6)
    # A token file's batch is given as it is.
    got = lt.health.logged_entropy(params, (inputs, inputs), keys, 5, config, tc)
    np.testing.assert_allclose(got, lt.health.attention_entropy(params, inputs[:2], config),
                               rtol=1e-6)
