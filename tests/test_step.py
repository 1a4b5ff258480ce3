"""Tests of llamatool/step.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax as L
import llamatool as lt

from conftest import TINY, random_params, tokens_for


def test_part_one_step_equals_part_two_step_without_its_options():
    # Part I's plain step and the package's run_step (health off, the plain loss,
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
