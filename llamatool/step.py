"""The command line's training step: health figures, gradient accumulation, LoRA, a mesh."""

import functools

import jax
import jax.numpy as jnp

from llama_jax import get_batch, learning_rate, step_keys
from llamatool.settings import lr_schedule, run_configs
from llamatool.health import step_health
from llamatool.speed import run_loss_aux
from llamatool.muon import OPTIMIZERS
from llamatool.lora import lora_merge
from llamatool.devices import keep_split, split_batch


def accumulate_gradients(grad_fn, params, batch, key, n, mesh=None):
    """grad_fn's loss, health figures and gradients for a whole batch, computed
    over n micro-batches one after the other (a lax.scan): only one
    micro-batch's activations exist at a time. Micro-batches are equal in size,
    so the mean of their mean losses and gradients is the whole batch's. Micro-
    batch i takes rows i, i + n, i + 2n, ...: with the batch split over devices
    in contiguous blocks, each device then holds its share of every one.
    Dropout: micro-batch i draws its masks with key folded with i, one set of
    masks per micro-batch, so with dropout on, --grad-accum N does not give
    the masks (or the losses) of one big batch; without dropout it does, to
    float32 rounding. batch: (inputs, targets) int32[B, T]
    -> ((loss, stats), grads)."""
    micro = jax.tree_util.tree_map(lambda x: x.reshape(-1, n, *x.shape[1:]).swapaxes(0, 1), batch)

    def add_one(total, xs):
        i, micro_batch = xs
        (loss, stats), grads = grad_fn(params, split_batch(micro_batch, mesh),
                                       jax.random.fold_in(key, i))
        return jax.tree_util.tree_map(jnp.add, total, grads), (loss, stats)

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    total, (losses, stats) = jax.lax.scan(add_one, zeros, (jnp.arange(n), micro))
    mean = functools.partial(jax.tree_util.tree_map, lambda x: x.mean(0))
    return (losses.mean(), mean(stats)), jax.tree_util.tree_map(lambda g: g / n, total)


# The package's training step. Part I's train_step is loss, gradients, AdamW; this
# one is the same three (learning_rate and adamw_update are Part I's), with the
# loss and its gradients computed by composition: run_loss_aux for the speed
# options and health figures, lora_merge in front of it for LoRA,
# accumulate_gradients around it for micro-batches, and the mesh's shardings
# on its batch and results.


@functools.partial(jax.jit, static_argnames=("config", "tc", "mesh"),
                   donate_argnames=("params", "opt_state"))
def run_step(params, opt_state, data, keys, config, tc, frozen=None, mesh=None):
    """One optimisation step of a full run, compiled once: draw a batch from
    `data` (int32[N], on the device), compute loss and gradients (with
    dropout), clip, and update with tc.optimizer (AdamW or Muon). keys: the
    run's "batches" and "dropout" streams (run_keys); the step's own keys
    come from them and the step number (step_keys), so a resumed run draws
    what an uninterrupted one would. For
    data too large for the device, `data` is instead the batch (inputs,
    targets), int32[B, T], that host_batch read from a token file with the
    same keys: the same tokens give the same batch either way. params and
    opt_state are donated.
    With tc.health, the step also returns a few figures per layer (step_health,
    llamatool/health.py); else health is {}. With LoRA (tc.lora_rank > 0, llamatool/lora.py),
    params are the adapters, the only weights trained, and frozen the
    pretrained weights they adapt. With tc.grad_accum > 1, the batch is run in
    that many micro-batches (accumulate_gradients). mesh: the devices to split
    the work over (llamatool/devices.py): the batch is split over all of them, and
    params and opt_state come back split as they came in; None runs where the
    inputs are. -> (params, opt_state, loss, health)."""
    config, tc = run_configs(config, tc)
    batch_key, dropout_key = step_keys(keys, opt_state["step"])
    if isinstance(data, tuple):  # a batch read from a token file (host_batch)
        batch = data
    else:
        batch = get_batch(batch_key, data, tc.batch_size, tc.seq_len)

    def loss_fn(p, batch, key):  # the blocks' health figures ride along as auxiliary outputs
        weights = p if frozen is None else lora_merge(frozen, p, tc)
        return run_loss_aux(weights, batch, config, True, key, tc.health)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if tc.grad_accum == 1:
        (loss, stats), grads = grad_fn(params, split_batch(batch, mesh), dropout_key)
    else:
        (loss, stats), grads = accumulate_gradients(grad_fn, params, batch, dropout_key,
                                                    tc.grad_accum, mesh)
    lr = learning_rate(opt_state["step"], lr_schedule(tc))
    new_params, opt_state = OPTIMIZERS[tc.optimizer].update(params, grads, opt_state, lr, tc)
    health = step_health(params, new_params, grads, stats, tc) if tc.health else {}
    new_params, opt_state = keep_split(mesh, (new_params, opt_state))
    return new_params, opt_state, loss, health
