"""Run health: per-block figures from each training step, metrics.jsonl and health.png."""

import functools
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import (attention_qkv, attention_weights, forward_hidden, get_batch, global_norm,
    rms_norm, step_keys, transformer_block)


# A loss curve says that a run diverged or stalled, not why. Each training
# step also returns a few numbers per block, from what the step already has:
# the gradient's norm (before clipping), the size of the update relative to
# the weights (|new - old| / |old|; Karpathy's rule of thumb is about 1e-3 for a
# healthy run) and the RMS of the residual stream after the block (it should
# grow slowly, not explode). The mean entropy of the attention (in nats: 0 when
# each query looks at one key, log(t + 1) when it spreads evenly over the t + 1
# it may see) needs the [B, H, T, T] attention weights, which the fused kernel
# never forms and which cost O(T^2) to rebuild, so it is not taken inside the
# timed step: at each logged step, one forward pass of its own measures it on
# the batch that step trained on, with the weights the step left
# (logged_entropy), outside the step's timing. They go to out/metrics.jsonl
# and out/health.png.


def health_block(p, x, cos, sin, mask, config, cache=None, position=None, key=None,
                 block=transformer_block):
    """A block for forward_hidden (llama_jax.py, section 4) that runs `block` and returns
    its health figure where the plain block returns its cache (training runs
    without one). -> ([B, T, D], {"rms"})."""
    y, _ = block(p, x, cos, sin, mask, config, cache, position, key)
    return y, block_health(y)


def block_health(x_out):
    """One block's figure inside the training step: the RMS of the residual
    stream after it, x_out [B, T, D] -> {"rms": scalar}, out of the backward
    pass (stop_gradient). Nothing of size T x T."""
    x_out = jax.lax.stop_gradient(x_out)
    return {"rms": jnp.sqrt(jnp.mean(jnp.square(x_out.astype(jnp.float32))))}


def entropy_block(p, x, cos, sin, mask, config, cache=None, position=None, key=None,
                  block=transformer_block):
    """A block for forward_hidden that runs `block` and returns the mean
    entropy of its attention weights (queries and keys computed again from
    the block's input: a block does not return its weights).
    -> ([B, T, D], scalar)."""
    y, _ = block(p, x, cos, sin, mask, config, cache, position, key)
    q, k, _ = attention_qkv(p["attention"], rms_norm(x, p["attention_norm"], config.norm_eps),
                            cos, sin, config)
    probs = attention_weights(q, k, mask)  # [B, K, G, T, S]
    entropy = -jnp.sum(probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), axis=-1)  # 0 log 0 = 0
    return y, jnp.mean(entropy)


@functools.partial(jax.jit, static_argnames=("config",))
def attention_entropy(params, inputs, config):
    """Each block's mean attention entropy on inputs int32[B, T], forward
    only. -> float32[L]."""
    _, entropies = forward_hidden(params, inputs, config, block=entropy_block)
    return jnp.stack(entropies)


def logged_entropy(weights, data, keys, step, config, tc):
    """attention_entropy on the batch step `step` trained on: drawn from
    `data` with the step's keys as run_step draws it, or `data` itself when
    it is the batch (a token file's), its first micro-batch's rows only (the
    memory --grad-accum keeps within). weights: what the model runs on (the
    merged weights with LoRA). -> float32[L] on the host."""
    if isinstance(data, tuple):
        inputs = data[0]
    else:
        inputs = get_batch(step_keys(keys, step)[0], data, tc.batch_size, tc.seq_len)[0]
    rows = max(1, inputs.shape[0] // max(1, tc.grad_accum))
    return np.asarray(jax.device_get(attention_entropy(weights, inputs[:rows], config)))


def step_health(old_params, new_params, grads, stats, tc):
    """A training step's health: {"grad_norm": the global gradient norm before
    clipping, "clipped": whether clipping scaled it down (as adamw_update does),
    "layer_grad_norm", "layer_update_ratio", "layer_rms": float32[L] each, per
    block}."""
    norm = global_norm(grads)

    def ratio(new, old):
        diff = jax.tree_util.tree_map(lambda a, b: a - b, new, old)
        return global_norm(diff) / (global_norm(old) + 1e-12)

    return {"grad_norm": norm,
            "clipped": tc.grad_clip / (norm + 1e-6) < 1.0,
            "layer_grad_norm": jnp.stack([global_norm(g) for g in grads["layers"]]),
            "layer_update_ratio": jnp.stack([ratio(n, o) for n, o in
                                             zip(new_params["layers"], old_params["layers"])]),
            "layer_rms": jnp.stack([s["rms"] for s in stats])}


def start_metrics(path, resume, step, log):
    """out/metrics.jsonl at the start of a run -> the records kept, a list of
    dicts. A fresh run starts the file anew. A resumed one keeps the lines up
    to the checkpoint's step (later ones were written after the checkpoint and
    those steps will run again: no duplicates, no gaps) and drops lines that are
    not JSON objects with a step (a crash in mid-write), saying so."""
    records, bad = [], 0
    if resume and path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                    raise ValueError(line)
            except ValueError:
                bad += 1
                continue
            if record["step"] <= step:
                records.append(record)
    if bad:
        log(f"{path}: dropped {bad} unreadable line(s), left by a crash in mid-write? "
            f"Kept {len(records)} records up to step {step}; continuing")
    if jax.process_index() == 0:  # with several processes, process 0 writes the files
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        os.replace(tmp, path)
    return records


def health_record(step, loss, lr, seconds_per_step, tokens_per_step, healths, entropy=None):
    """The metrics.jsonl line of a logged step: its loss, learning rate and
    speed, its own health figures, and how many steps since the previous
    line were clipped. healths: the health dicts of those steps, host arrays;
    entropy: the step's attention entropy per block (logged_entropy), or None."""
    record = {"kind": "train", "step": step, "loss": loss, "lr": lr, "ms_per_step": None,
              "tokens_per_s": None}
    if seconds_per_step is not None:  # unknown for the step that compiled
        record.update(ms_per_step=round(seconds_per_step * 1e3, 2),
                      tokens_per_s=round(tokens_per_step / seconds_per_step, 1))
    if healths and healths[-1]:
        last = healths[-1]
        record.update({"grad_norm": float(last["grad_norm"]), "clipped": bool(last["clipped"]),
                       "clipped_steps": int(sum(bool(h["clipped"]) for h in healths)),
                       "steps": len(healths)})
        for name in ("layer_grad_norm", "layer_update_ratio", "layer_rms"):
            record[name] = [float(x) for x in last[name]]
        if entropy is not None:
            record["layer_attn_entropy"] = [float(x) for x in entropy]
    return record


def draw_health(fig, records):
    """Four panels from the metrics records (health_record): the global
    gradient norm with the steps where clipping happened; the update/weight
    ratio, the residual stream's RMS and the attention entropy, one line per
    block (the same colour for a block in every panel). fig: a matplotlib
    Figure (the notebook passes its own). -> False if there was nothing to draw."""
    import matplotlib

    rows = [r for r in records if r.get("kind") == "train" and "layer_grad_norm" in r]
    if not rows:
        return False
    steps = np.array([r["step"] for r in rows])
    axes = fig.subplots(2, 2).ravel()
    axes[0].plot(steps, [r["grad_norm"] for r in rows], color="black", lw=1)
    clipped = [r for r in rows if r["clipped_steps"]]
    if clipped:
        axes[0].scatter([r["step"] for r in clipped], [r["grad_norm"] for r in clipped],
                        color="tab:red", s=12, zorder=3, label="clipped since the previous point")
        axes[0].legend(fontsize=8)
    axes[0].set_yscale("log")
    axes[0].set_title("gradient norm before clipping", fontsize=10)
    n_layers = len(rows[0]["layer_grad_norm"])
    colours = [matplotlib.colormaps["viridis"](i / max(n_layers - 1, 1)) for i in range(n_layers)]
    panels = [("layer_update_ratio", "|update| / |weights| per block", True),
              ("layer_rms", "residual stream RMS after each block", False),
              ("layer_attn_entropy", "attention entropy per block (nats)", False)]
    for ax, (name, title, log_scale) in zip(axes[1:], panels):
        have = [r for r in rows if name in r]  # entropy: where it was measured
        values = np.array([r[name] for r in have]).reshape(len(have), n_layers)  # [steps, L]
        for i in range(n_layers):
            ax.plot([r["step"] for r in have], values[:, i], color=colours[i], lw=1,
                    label=f"block {i}")
        ax.set_title(title, fontsize=10)
        if log_scale:
            ax.set_yscale("log")
    axes[1].legend(fontsize=7, ncol=2)
    for ax in axes:
        ax.set_xlabel("step", fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return True


def save_health_plot(records, path):
    """draw_health as a PNG, written atomically; nothing before the first record."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 6.5), dpi=100)
    if draw_health(fig, records):
        tmp = Path(path).with_name(Path(path).name + ".tmp.png")
        fig.savefig(tmp)
        os.replace(tmp, path)
