"""LoRA: low-rank adapters over a frozen model."""

import math

import jax
import jax.numpy as jnp

from llama_jax import InputError
from llamatool.settings import LORA_MATRICES, param_shapes


# LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
# arXiv:2106.09685) freezes the pretrained weights and learns a low-rank change
# to a few matrices: W [I, O] becomes W + (alpha / R) A B, with A [I, R] drawn
# at random and B [R, O] starting at zero, so that at step 0 the model is the
# base model exactly. Only A and B are trained and have optimizer moments. It
# is written here as functions over the same parameter pytree: lora_merge
# builds ordinary weights from the base and the adapters inside the jitted
# step, the model runs on them unchanged, and differentiating through the merge
# gives the gradients of A and B. (Libraries add x A B beside x W instead,
# which skips forming dL/dW' for the adapted matrices: an [I, O] product each.)


def lora_init(key, config, tc):
    """Adapters for every block: {"layers": [{name: {"a": [I, R], "b": [R, O]}}]}
    for each name in tc.lora_targets. A ~ N(0, 1/I) (the paper: "a random
    Gaussian initialization for A and zero for B"), B = 0."""
    shapes = param_shapes(config)
    layers = []
    for i, layer in enumerate(shapes["layers"]):
        adapters = {}
        for j, name in enumerate(tc.lora_targets):
            I, O = layer[LORA_MATRICES[name]][name].shape
            k = jax.random.fold_in(key, i * len(LORA_MATRICES) + j)
            adapters[name] = {"a": jax.random.normal(k, (I, tc.lora_rank)) / math.sqrt(I),
                              "b": jnp.zeros((tc.lora_rank, O))}
        layers.append(adapters)
    return {"layers": layers}


def lora_merge(base, adapters, tc):
    """The model's weights: base with each adapted matrix W [I, O] replaced by
    W + (lora_alpha / lora_rank) A B. -> a params pytree of the usual shapes."""
    scale = tc.lora_alpha / tc.lora_rank
    layers = []
    for layer, adapted in zip(base["layers"], adapters["layers"]):
        layer = {**layer, "attention": dict(layer["attention"]),
                 "feed_forward": dict(layer["feed_forward"])}
        for name, ab in adapted.items():
            part = layer[LORA_MATRICES[name]]
            part[name] = part[name] + scale * (ab["a"] @ ab["b"])
        layers.append(layer)
    return {**base, "layers": layers}


merged_weights = jax.jit(lora_merge, static_argnames=("tc",))


def check_lora(config, tc):
    """Refuses a LoRA rank above an adapted matrix's smaller side: A B could
    then be any matrix, and training the full matrix is simpler and smaller."""
    shapes = param_shapes(config)["layers"][0]
    for name in tc.lora_targets:
        I, O = shapes[LORA_MATRICES[name]][name].shape
        if tc.lora_rank > min(I, O):
            raise InputError(f"--lora-rank {tc.lora_rank} is larger than {name}'s smaller side "
                             f"({name} is [{I}, {O}]): use a rank of at most {min(I, O)}, or "
                             "--lora-rank 0 to train every weight")
