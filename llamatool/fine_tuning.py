"""Fine-tuning: start from a pretrained model, fully or with LoRA."""

import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import InputError, count_params
from llamatool.lora import check_lora, lora_init
from llamatool.devices import place_state, sharded_init
from llamatool.checkpoints import CheckpointError, flatten_tree


# --init-from SOURCE trains from a model's weights instead of random ones. The
# source is a Hugging Face folder, a GGUF file or one of our runs; it brings
# the architecture and the tokenizer, and everything else is llamatool/training.py's loop:
# evaluation, plots, atomic checkpoints, exact --resume.


def tree_sha256(params):
    """sha256 of a params pytree (names, shapes and float32 values, in a fixed
    order): a LoRA checkpoint records its base's, and refuses any other base."""
    h = hashlib.sha256()
    for name, value in flatten_tree(params).items():
        value = np.asarray(value, np.float32)
        h.update(f"{name}{list(value.shape)}".encode() + value.tobytes())
    return h.hexdigest()


def base_record(init):
    """What a fine-tuning checkpoint says about its base: {"source": path,
    "kind", "sha256"}. The base is read again from there to resume, sample or
    export (a LoRA checkpoint holds only the adapters)."""
    return {"source": str(Path(init.source).resolve()), "kind": init.kind,
            "sha256": init.sha256}


def frozen_base(init, config, tc):
    """LoRA's fixed weights: the matrices that dense multiplies by, in the
    compute dtype (bfloat16 halves their memory, and dense would round them to
    it anyway); the embedding table (looked up, not multiplied) and the norms'
    vectors in float32. None when every weight is trained."""
    if not tc.lora_rank:
        return None
    if init is None:
        raise InputError("--lora-rank adapts a pretrained model: pass --init-from SOURCE")
    check_lora(config, tc)
    dtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32
    rest = {k: v for k, v in init.params.items() if k != "tok_embeddings"}
    base = jax.tree_util.tree_map(lambda w: w.astype(dtype if w.ndim > 1 else jnp.float32), rest)
    return {**base, "tok_embeddings": init.params["tok_embeddings"].astype(jnp.float32)}


def initial_weights(key, config, tc, init, mesh):
    """The trainable weights a run starts from, split over the mesh
    (llamatool/devices.py): random (init_params) without a base, LoRA's adapters (lora_init), or
    the base's weights in float32 (the optimizer's updates are too small for
    bfloat16)."""
    if init is None:
        return sharded_init(key, config, mesh)
    if tc.lora_rank:
        weights = lora_init(key, config, tc)
    else:
        weights = jax.tree_util.tree_map(lambda w: np.asarray(w, np.float32), init.params)
    return place_state(mesh, weights)


def check_same_base(ckpt, init, path):
    """On --resume: the checkpoint and the run must agree on the base model."""
    base = ckpt.base
    if base is None and init is None:
        return
    if base is None:
        raise CheckpointError(f"{path} was trained from random weights, not from "
                              f"{init.source}: use another --out-dir for the fine-tuning run")
    if init is None:
        raise CheckpointError(f"{path} fine-tunes {base['source']}: pass --init-from "
                              f"{base['source']} to resume it")
    if base["sha256"] != init.sha256:
        raise CheckpointError(f"{path} was trained on a base model with other weights "
                              f"({base['source']}, sha256 {base['sha256'][:12]}...) than "
                              f"{init.source} (sha256 {init.sha256[:12]}...): resume with "
                              "the base it was trained on, or use another --out-dir")


def check_source_tokenizer(init, config):
    """A fine-tuning run reads its data with the source's tokenizer, which must
    exist and fit the model's vocabulary."""
    enc = init.tokenizer
    if enc is None:
        raise InputError(f"{init.source} comes without a tokenizer llama_jax can read "
                         "(tokenizer.model in tiktoken format or a byte-level BPE "
                         "tokenizer.json), so its training text cannot be tokenized")
    if enc.n_vocab > config.vocab_size:
        raise InputError(f"{init.source}: its tokenizer has {enc.n_vocab:,} tokens but the "
                         f"model only {config.vocab_size:,} embeddings")


def describe_fine_tuning(init, params, frozen, tc):
    """One log line: the base, and how much of it is trained."""
    if frozen is None:
        return f"fine-tuning every weight of {init.source}"
    n, total = count_params(params), count_params(frozen)
    return (f"fine-tuning {init.source} with LoRA: rank {tc.lora_rank}, alpha "
            f"{tc.lora_alpha:g}, on {','.join(tc.lora_targets)}: {n:,} trained parameters "
            f"({100 * n / total:.2f}% of {total:,}); the base stays frozen")
