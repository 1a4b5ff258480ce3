"""Tests of llamatool/muon.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax as L
import llamatool as lt

from conftest import NS_BAND, TINY, np_newton_schulz, random_params


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
    # Each step's gradient an independent draw, so that the momentum points
    # elsewhere than the gradient: with multiples of one matrix it would be a
    # multiple too, and Newton-Schulz, which normalises its input, would hide
    # any mistake that only rescales it (a wrong bias correction, say).
    def draw(step):
        g = random_params(config, seed=5 + step, scale=1.0)
        norm = float(L.global_norm(g))
        return jax.tree_util.tree_map(lambda x: x * 0.5 / norm, g)  # below grad_clip: no clip

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
        g = draw(step)
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


def test_stacked_newton_schulz_equals_one_matrix_at_a_time():
    """Muon's update orthogonalises all its matrices stacked by shape: the
    same as one newton_schulz per matrix (float32, the CPU's), and within
    bfloat16's rounding of it in bfloat16 (a GPU's)."""
    rng = np.random.RandomState(1)
    shapes = [(24, 40), (40, 24), (24, 40), (24, 24), (40, 24), (24, 40)]
    matrices = [jnp.asarray(rng.randn(*s), jnp.float32) for s in shapes]
    one_by_one = [lt.muon.newton_schulz(m) for m in matrices]
    stacked = lt.muon.stacked_newton_schulz(matrices, dtype=jnp.float32)
    assert [m.shape for m in stacked] == shapes
    for a, b in zip(stacked, one_by_one):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # In bfloat16 (8 bits of mantissa) the iteration's rounding grows over
    # its five steps: about 5% of the update here. What Muon needs holds: the
    # same direction, and singular values in (about) the float32 band.
    for a, b in zip(lt.muon.stacked_newton_schulz(matrices, dtype=jnp.bfloat16), one_by_one):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == np.float32
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.1
        assert np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99
        s = np.linalg.svd(a, compute_uv=False)
        assert 0.6 < s.min() and s.max() < 1.3, (s.min(), s.max())


def test_muon_step_runs_its_matrices_in_a_few_stacked_products():
    """The compiled Muon update holds about 5 x 3 products per shape of
    matrix (7 stacks here), not per matrix (7 per block)."""
    config = dataclasses.replace(TINY, n_layers=4)
    params = random_params(config)
    tc = lt.settings.RunTrainConfig(optimizer="muon")
    state = lt.muon.muon_init(params)
    hlo = jax.jit(lt.muon.muon_update, static_argnames="tc").lower(
        params, params, state, 1e-3, tc).compile().as_text()
    dots = hlo.count(" dot(")
    shapes = {tuple(np.shape(m)) for layer in params["layers"] for part in layer.values()
              if isinstance(part, dict) for m in part.values()}
    assert dots <= 15 * len(shapes) < 15 * 7 * config.n_layers, (dots, shapes)
