"""Tests of llamatool/health.py."""

import dataclasses

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
        assert float(s["entropy"]) == pytest.approx(np.mean(np.log(np.arange(1, 13))), rel=1e-5)
        assert float(s["rms"]) == pytest.approx(np.sqrt(np.mean(embedded ** 2)), rel=1e-5)
