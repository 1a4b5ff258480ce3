"""--plan: memory and communication per device, from shapes alone, and whether a run fits."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import InputError, run_keys
from llamatool.settings import param_shapes
from llamatool.speed import (device_memory, loss_block_size, loss_buffer_bytes, loss_memory_budget,
    loss_temp_bytes, run_loss, use_blockwise)
from llamatool.muon import OPTIMIZERS
from llamatool.lora import lora_init
from llamatool.devices import batch_sharding, copies, describe_batch, state_shardings
from llamatool.step import run_step


# "Will it fit?" before a run starts. Per device, in bytes: the weights,
# gradients and optimizer moments (their shard shapes on the mesh), and the
# activations the backward pass keeps. Those are found without running or
# compiling anything: jax.vjp's backward function holds the forward's saved
# values (its "residuals") as arrays, and jax.eval_shape traces it for their
# shapes alone. They grow linearly with the rows of a batch, so two traces (1
# and 2 rows) give the bytes per row. The count errs high (XLA fuses some of
# those values away), so a run it says will not fit is compiled, not run, and
# XLA's own memory analysis decides (check_plan_fits). --plan prints both, and
# the bytes each step sends between devices.


def tree_bytes(tree, shardings=None):
    """Bytes of a pytree of arrays or shapes; with shardings, of one device's
    shards."""
    leaves = jax.tree_util.tree_leaves(tree)
    shards = (jax.tree_util.tree_leaves(shardings) if shardings is not None
              else [None] * len(leaves))
    return sum(math.prod(s.shard_shape(x.shape) if s is not None else x.shape)
               * np.dtype(x.dtype).itemsize for x, s in zip(leaves, shards))


def activation_bytes_per_row(config, tc):
    """Bytes the backward pass keeps per sequence of tc.seq_len tokens."""
    params = param_shapes(config)

    def saved(rows):
        batch = (jax.ShapeDtypeStruct((rows, tc.seq_len), jnp.int32),) * 2
        vjp = jax.eval_shape(lambda p, b: jax.vjp(
            lambda q: run_loss(q, b, config, True, jax.random.PRNGKey(0)), p)[1],
            params, batch)
        return tree_bytes(vjp)

    return saved(2) - saved(1)


def run_shapes(config, tc):
    """-> (the shapes of what the optimizer updates, of the frozen weights or
    None): the model's parameters and None; with LoRA (tc.lora_rank), the
    adapters and the base's parameters."""
    if not tc.lora_rank:
        return param_shapes(config), None
    return (jax.eval_shape(lambda: lora_init(jax.random.PRNGKey(0), config, tc)),
            param_shapes(config))


def memory_plan(config, tc, mesh):
    """Per-device bytes of a training run on this mesh, computed from shapes.
    -> dict of bytes per device, and the rows each device computes at once."""
    trained, frozen_shapes = run_shapes(config, tc)
    weights = tree_bytes(trained, state_shardings(mesh, trained))
    frozen = 0 if frozen_shapes is None else tree_bytes(frozen_shapes,
                                                        state_shardings(mesh, frozen_shapes))
    rows = tc.batch_size // (mesh.size * tc.grad_accum)
    moments = {k: v for k, v in jax.eval_shape(OPTIMIZERS[tc.optimizer].init, trained).items()
               if k != "step"}
    plan = {"params": weights + frozen, "grads": weights * (2 if tc.grad_accum > 1 else 1),
            "optimizer": tree_bytes(moments, state_shardings(mesh, moments)),
            "activations": activation_bytes_per_row(config, tc) * rows,
            "rows_per_device": rows}
    plan["total"] = sum(plan[k] for k in ("params", "grads", "optimizer", "activations"))
    return plan


def communication_bytes(config, tc, mesh):
    """Bytes each device sends per optimizer step with ring collectives
    (float32 weights): data parallel all-reduces the gradients, 2 (n-1)/n of
    them; FSDP over g devices all-gathers the weights twice (forward and
    backward, per micro-batch), reduce-scatters the gradients ((g-1)/g each)
    and all-reduces the gradient shards over the data axis."""
    full = tree_bytes(run_shapes(config, tc)[0])
    d, g = mesh.shape["data"], mesh.shape["fsdp"]
    if g == 1:
        return {"all-reduce": 2 * (d - 1) / d * full}
    return {"all-gather": 2 * tc.grad_accum * (g - 1) / g * full,
            "reduce-scatter": (g - 1) / g * full,
            "all-reduce": 2 * (d - 1) / d * full / g}


def loss_choice(config, n_tokens):
    """--plan's words for the loss use_blockwise and loss_block_size choose."""
    plain, budget = loss_temp_bytes(config, n_tokens), loss_memory_budget()
    if not use_blockwise(config, n_tokens):
        return (f"the loss: plain; its temporaries, about {gb(plain)}, fit the "
                f"{gb(budget)} it may take (an eighth of the device's memory)")
    block = loss_block_size(config, n_tokens)
    why = ("--loss blockwise" if config.loss_impl == "blockwise" else
           f"the plain loss's about {gb(plain)} would not fit the {gb(budget)} it may take"
           if plain > budget else "float32 on a CPU, where it is faster")
    size = ("--loss-block" if config.loss_block else
            "the largest power of two that fits" if block < n_tokens else "all of them")
    return f"the loss: blockwise ({why}), {block:,} tokens per block ({size})"


def gb(n):
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


@functools.lru_cache(maxsize=None)  # --plan and check_plan_fits may both ask
def compiled_memory(config, tc, mesh):
    """XLA's memory analysis of the compiled run_step on this mesh, per
    device (a token file's batch, so no corpus among the arguments).
    -> {"arguments", "outputs", "aliased", "temporaries", "total"} in bytes,
    total being what the step holds at once."""
    trained, base = run_shapes(config, tc)
    opt = jax.eval_shape(OPTIMIZERS[tc.optimizer].init, trained)
    shaped = lambda tree, sh: jax.tree_util.tree_map(  # noqa: E731
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
    rows = jax.ShapeDtypeStruct((tc.batch_size, tc.seq_len), jnp.int32,
                                sharding=batch_sharding(mesh))
    keys = jax.eval_shape(run_keys, jax.random.PRNGKey(0))
    frozen = None if base is None else shaped(base, state_shardings(mesh, base))
    m = run_step.lower(shaped(trained, state_shardings(mesh, trained)),
                         shaped(opt, state_shardings(mesh, opt)), (rows, rows),
                         shaped(keys, copies(mesh, keys)), config, tc, frozen,
                         mesh).compile().memory_analysis()
    held = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    return {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
            "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes,
            "total": held + m.temp_size_in_bytes}


def plan_report(config, tc, mesh):
    """--plan's lines: the mesh, the memory per device, the communication."""
    plan = memory_plan(config, tc, mesh)
    limit, source = device_memory()
    lines = [describe_batch(tc, mesh),
             "per device, computed from the shapes:",
             f"  weights      {gb(plan['params']):>10}",
             f"  gradients    {gb(plan['grads']):>10}",
             (f"  AdamW        {gb(plan['optimizer']):>10}  (two moments)"
              if tc.optimizer == "adamw" else
              f"  Muon         {gb(plan['optimizer']):>10}  (momentum; AdamW's two moments "
              "for the embedding, output and norms)"),
             f"  activations  {gb(plan['activations']):>10}  ({plan['rows_per_device']} "
             f"sequence(s) of {tc.seq_len} tokens kept for the backward pass"
             f"{', --remat' if config.remat else ''})",
             f"  total        {gb(plan['total']):>10}"
             + (f"  of {gb(limit)} ({source})" if limit else "")]
    other = dataclasses.replace(config, remat=not config.remat)  # what --remat changes
    other_bytes = activation_bytes_per_row(other, tc) * plan["rows_per_device"]
    lines.append(f"  ({'without' if config.remat else 'with'} --remat the activations would "
                 f"be {gb(other_bytes)})")
    n_tokens = plan["rows_per_device"] * tc.seq_len  # what one device's loss sees at once
    chosen, alternative = (("blockwise", "plain") if use_blockwise(config, n_tokens)
                           else ("plain", "blockwise"))
    try:
        loss = loss_buffer_bytes(config, n_tokens)
        lines.append(f"  loss         {gb(loss[chosen]):>10}  (XLA's temporary buffers of the "
                     f"{chosen} cross-entropy and its gradient over {n_tokens} tokens; "
                     f"{alternative}: {gb(loss[alternative])})")
        lines.append("  " + loss_choice(config, n_tokens))
    except Exception as err:  # noqa: BLE001 (a plan without it is still useful)
        lines.append(f"  (the loss's buffers unavailable: {type(err).__name__}: {err})")
    try:
        m = compiled_memory(config, tc, mesh)
        lines.append(f"per device, XLA's memory analysis of the compiled step: arguments "
                     f"{gb(m['arguments'])}, outputs {gb(m['outputs'])} ({gb(m['aliased'])} "
                     f"reuse donated inputs), temporaries {gb(m['temporaries'])}: about "
                     f"{gb(m['total'])} in all")
    except Exception as err:  # noqa: BLE001 (a plan without it is still useful)
        lines.append(f"(XLA's memory analysis unavailable: {type(err).__name__}: {err})")
    comm = communication_bytes(config, tc, mesh)
    if mesh.size == 1:
        lines.append("communication: none (one device)")
    else:
        lines.append("communication per optimizer step, sent by each device (ring "
                     "algorithms, float32): " + ", ".join(f"{k} {gb(v)}" for k, v in comm.items()
                                                          if v))
    try:
        check_plan_fits(plan, config, tc, mesh)
        lines.append("fits: yes")
    except InputError as err:
        lines.append(f"fits: no. {err}")
    return lines


def check_plan_fits(plan, config, tc, mesh):
    """Stops a run that would not fit in a device's memory, before it runs,
    naming the flags that would make it fit. The shapes' estimate counts
    every value the backward pass keeps, some of which XLA fuses away, so it
    errs high: when it exceeds 90% of the memory, the step is compiled (not
    run) and XLA's own analysis decides."""
    limit, source = device_memory()
    if limit is None or plan["total"] <= 0.9 * limit:
        return
    try:
        m = compiled_memory(config, tc, mesh)
    except Exception as err:  # noqa: BLE001 (e.g. more tokens than int32 indexes)
        m = {"temporaries": plan["activations"], "total": plan["total"]}
        source += f"; the step did not compile: {type(err).__name__}"
    need = m["total"]
    if need <= 0.9 * limit:
        return
    rows = plan["rows_per_device"]
    per_row, fixed = m["temporaries"] / rows, need - m["temporaries"]
    fixes = []
    rows_fit = int((0.9 * limit - fixed) // per_row)
    if rows_fit >= 1:
        fixes.append(f"--batch-size {rows_fit * mesh.size * tc.grad_accum} (at most "
                     f"{rows_fit} sequence(s) per device)")
        fixes.append(f"--grad-accum {-(-rows // rows_fit) * tc.grad_accum} (the same batch, "
                     "in micro-batches)")
    if not config.remat:
        fixes.append("--remat (recompute activations in the backward pass)")
    if mesh.shape["fsdp"] < mesh.size:
        fixes.append("--fsdp all (split weights and optimizer state over every device)")
    fixes.append("more devices, or a smaller model")
    raise InputError(f"this run needs about {gb(need)} per device (weights, gradients and "
                     f"optimizer {gb(fixed)}, temporaries "
                     f"for {rows} sequence(s) of {tc.seq_len} tokens {gb(m['temporaries'])}) "
                     f"but a device has {gb(limit)} ({source}). To fit, try: "
                     + "; ".join(fixes))


def describe_plan(plan):
    """The memory plan (memory_plan) in one clause."""
    limit, source = device_memory()
    of = f" of {gb(limit)} ({source})" if limit else ""
    return (f"per device about {gb(plan['total'])}{of}: weights {gb(plan['params'])}, "
            f"gradients {gb(plan['grads'])}, optimizer {gb(plan['optimizer'])}, activations "
            f"{gb(plan['activations'])} (--plan for more)")
