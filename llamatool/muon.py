"""Muon: an optimizer for the hidden matrices."""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from llama_jax import adamw_init, adamw_update, global_norm


# Muon (Keller Jordan, 2024, "Muon: An optimizer for hidden layers in neural
# networks", kellerjordan.github.io/posts/muon; used in modded-nanogpt's speed
# runs) updates a weight matrix with its momentum orthogonalised: the momentum
# M = U S V^T becomes about U V^T, so that every direction the gradient points
# in moves by about as much, instead of a few dominant ones taking the step.
# The orthogonalisation is five steps of a quintic Newton-Schulz iteration,
# X <- a X + b (X X^T) X + c (X X^T)^2 X with (a, b, c) = (3.4445, -4.7750,
# 2.0315), on M scaled to unit Frobenius norm (so every singular value starts
# in (0, 1]); it acts on each singular value s alone, as the polynomial
# p(s) = a s + b s^3 + c s^5, and five steps take any s >= 0.003 into about
# [0.68, 1.21] (tests/test_muon.py checks both): close enough to 1 for
# training, and cheaper than an SVD, since it is only matmuls.
#
# It is for the 2-D matrices inside the blocks (wq, wk, wv, wo, w1, w2, w3).
# The embedding (a lookup, not a matmul of its input), the output layer and
# the norm gains stay on AdamW, as in modded-nanogpt and nanochat.
#
# Choices, and where they come from:
# - Momentum: 0.95, Nesterov, as an exponential moving average with bias
#   correction, the form of optax.contrib.muon (the test's oracle); it equals
#   Jordan's g + 0.95 * buf up to a scale, which the normalisation removes,
#   once the bias correction has faded.
# - The update's size: 0.2 * sqrt(max(I, O)) times the orthogonalised [I, O]
#   matrix, Moonshot AI's rule (Liu et al. 2025, "Muon is Scalable for LLM
#   Training", arXiv:2502.16982): it gives the update the RMS of a typical
#   AdamW update, so that Muon can take AdamW's learning rate and weight decay.
# - Weight decay: decoupled, as AdamW's (p -= lr * wd * p), which Moonshot
#   found Muon needs at scale.
# - Same-shaped matrices are stacked (all the blocks' wq, all their w1, ...)
#   so that the iteration runs as a few batched products, not five per matrix
#   one after another: 7 stacks for any depth, not 7 per block
#   (stacked_newton_schulz).
# - The iteration runs in bfloat16 on a GPU, as Jordan runs it, where its
#   matmuls are the cost; in float32 elsewhere: float32 is the fast path on
#   most CPUs, and it keeps the test against a float64 NumPy loop tight. The
#   normalisation and the result are float32 either way.

MUON_MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)  # (a, b, c), from Jordan's post


def newton_schulz(g, steps=5, eps=1e-8, dtype=jnp.float32):
    """About U V^T for g = U S V^T: the quintic iteration above on g scaled to
    unit Frobenius norm, its products in `dtype`. g: [..., m, n], a stack of
    matrices -> float32[..., m, n]. A tall g is turned wide first, so that X
    X^T is the smaller of the two Gram matrices."""
    a, b, c = NEWTON_SCHULZ
    x = g.astype(jnp.float32)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = jnp.swapaxes(x, -1, -2)
    x = (x / (jnp.linalg.norm(x, axis=(-2, -1), keepdims=True) + eps)).astype(dtype)
    for _ in range(steps):
        gram = x @ jnp.swapaxes(x, -1, -2)  # [..., m, m], m the smaller side
        x = a * x + (b * gram + c * gram @ gram) @ x
    x = x.astype(jnp.float32)
    return jnp.swapaxes(x, -1, -2) if tall else x


def stacked_newton_schulz(matrices, dtype=None):
    """newton_schulz of each matrix in a list, same-shaped ones stacked and
    run together. dtype: bfloat16 on a GPU, else float32 (above).
    -> float32 matrices in the list's order."""
    if dtype is None:
        dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    by_shape = {}
    for i, m in enumerate(matrices):
        by_shape.setdefault(m.shape, []).append(i)
    out = [None] * len(matrices)
    for indices in by_shape.values():
        stack = newton_schulz(jnp.stack([matrices[i] for i in indices]), dtype=dtype)
        for j, i in enumerate(indices):
            out[i] = stack[j]
    return out


def muon_mask(params):
    """params' tree with True at the matrices Muon trains (MUON_MATRICES in
    every block) and False elsewhere."""
    def block(layer):
        return {group: ({name: name in MUON_MATRICES for name in sub} if isinstance(sub, dict)
                        else False) for group, sub in layer.items()}
    return {name: ([block(layer) for layer in value] if name == "layers"
                   else jax.tree_util.tree_map(lambda _: False, value))
            for name, value in params.items()}


def muon_init(params):
    """Muon's state: {"mu": zeros like params (Muon's momentum for the hidden
    matrices, AdamW's first moment for the rest), "nu": AdamW's second moment
    for the rest and a float32 scalar 0 for each hidden matrix (Muon keeps one
    moment, not two; the tree keeps AdamW's shape so that both optimizers'
    states are handled alike), "step"}.
    The placeholder is a scalar, not an empty array: Orbax refuses to save
    arrays of size 0. .npz checkpoints written with the earlier empty
    float32[0] still load (checkpoints.upgrade_muon_placeholders)."""
    nu = jax.tree_util.tree_map(lambda p, hidden: jnp.zeros(() if hidden else p.shape, p.dtype),
                                params, muon_mask(params))
    return {"mu": jax.tree_util.tree_map(jnp.zeros_like, params), "nu": nu,
            "step": jnp.zeros((), jnp.int32)}


def muon_update(params, grads, state, lr, tc):
    """One step after global-norm clipping (as adamw_update's): Muon at lr for
    the hidden matrices, AdamW at lr * adam_lr / tc.lr for the rest (tc.adam_lr:
    their own peak rate, default tc.lr). -> (new params, new state)."""
    norm = global_norm(grads)
    grads = jax.tree_util.tree_map(lambda g: g * jnp.minimum(1.0, tc.grad_clip / (norm + 1e-6)),
                                   grads)
    t = state["step"] + 1
    beta, b1, b2 = tc.muon_momentum, tc.beta1, tc.beta2
    adam_lr = lr * (tc.adam_lr / tc.lr) if tc.adam_lr else lr  # the schedule's shape, its peak

    leaves, tree = jax.tree_util.tree_flatten(params)
    rows = list(zip(leaves, tree.flatten_up_to(grads), tree.flatten_up_to(state["mu"]),
                    tree.flatten_up_to(state["nu"]), tree.flatten_up_to(muon_mask(params))))
    # Muon's momentum and its Nesterov look-ahead for each hidden matrix, then
    # all of them orthogonalised together, stacked by shape.
    mu = [beta * m + (1 - beta) * g if hidden else None for _, g, m, _, hidden in rows]
    looks = [beta * m / (1 - beta ** (t + 1)) + (1 - beta) * g / (1 - beta ** t)
             for m, (_, g, _, _, hidden) in zip(mu, rows) if hidden]
    ortho = iter(stacked_newton_schulz(looks))

    def update(p, g, m, v, hidden, m_new):
        if hidden:  # Muon
            scale = 0.2 * math.sqrt(max(p.shape))  # Moonshot's: AdamW's update RMS
            return p - lr * (scale * next(ortho) + tc.weight_decay * p), m_new, v
        m = b1 * m + (1 - b1) * g  # AdamW, as adamw_update
        v = b2 * v + (1 - b2) * g * g
        decay = tc.weight_decay * p if p.ndim > 1 else 0.0
        step = m / (1 - b1 ** t) / (jnp.sqrt(v / (1 - b2 ** t)) + tc.eps)
        return p - adam_lr * (step + decay), m, v

    out = [update(*row, m_new) for row, m_new in zip(rows, mu)]
    new = [tree.unflatten(column) for column in zip(*out)]
    return new[0], {"mu": new[1], "nu": new[2], "step": t}


class Optimizer(NamedTuple):
    """init(params) -> a fresh state; update(params, grads, state, lr, tc) ->
    (new params, new state)."""
    init: object
    update: object


# The optimizers a run can use (--optimizer).
OPTIMIZERS = {"adamw": Optimizer(adamw_init, adamw_update),
              "muon": Optimizer(muon_init, muon_update)}
