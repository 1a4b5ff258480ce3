"""Builds walkthrough.ipynb from the cells below, then runs it so that the
committed notebook carries the outputs of a real run (the notebook's own
model and steps, not the command line's default run).

    python tools/make_notebook.py            # build and execute (about 8 minutes on 2 cores)
    python tools/make_notebook.py --no-run   # build only, without outputs

Edit the cells here, not in the .ipynb, so the notebook stays reviewable.
"""

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parent.parent

CELLS = [
    ("md", """# Llama, from tokens to a trained model

This notebook runs the functions of [`llama_jax.py`](llama_jax.py) one at a time and shows
what each does: the tokenizer, embeddings, RMSNorm, rotary embeddings, grouped-query attention,
SwiGLU, the whole model and its loss; then JAX's own moves, each run on the module's
functions (tracing and `jit`, PRNG keys, `vmap`, pytrees, donation); gradients and one training
step; training with a loss curve redrawn as it goes, the run's health, sampling with a KV
cache, checkpoints and many devices. The cells call the module (Part I); the few that call the
package beside it (`llamatool`) say so. The training loop is written out (it is `train_loop`'s)
so that it can redraw its plot.

It runs top to bottom on a 2-core CPU in about 8 minutes (8 min 3 s on an AMD EPYC with
avx512_bf16, 5 min 28 s of it the training cell). Set the environment variable
`LLAMA_JAX_FAST=1` before starting Jupyter to shrink the work to under a minute: the same cells
with a smaller model and fewer steps, so the figures are smaller and noisier."""),
    ("code", """import inspect
import os
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import display

import llama_jax as L
import llamatool as lt

FAST = os.environ.get("LLAMA_JAX_FAST") == "1"
print(f"JAX {jax.__version__} on {jax.devices()[0].platform.upper()}; fast mode: {FAST}")"""),
    ("md", """## Tokens

Llama 1 and 2 use a SentencePiece vocabulary, Llama 3 a tiktoken one; here we use GPT-2's
50,257-token byte-pair encoding, read from the `gpt2.tiktoken` file shipped in the repository
(no download). A token is usually a word or a piece of one, often with its leading space."""),
    ("code", """tokenizer = L.get_tokenizer()
line = "To be, or not to be, that is the question:"
ids = tokenizer.encode_ordinary(line)
print(ids)
print([tokenizer.decode([i]) for i in ids])"""),
    ("code", """text = L.load_text(L.DEFAULT_DATA)
tokens = np.array(tokenizer.encode_ordinary(text), dtype=np.int32)
train_tokens, val_tokens = L.split_tokens(tokens, seq_len=128)
print(f"{len(text):,} characters -> {len(tokens):,} tokens ({len(text) / len(tokens):.2f} characters per token)")
print(f"train: the first {len(train_tokens):,} tokens; validation: the last {len(val_tokens):,}")"""),
    ("md", """## Embeddings and RMSNorm

The model's configuration is a frozen dataclass: the architecture, plus the dropout rate and
the matmul dtype. `init_params` returns
a nested dict of arrays (a pytree). The embedding table turns each token id into a vector of
width `dim`; RMSNorm divides each vector by its root-mean-square, then multiplies by a learned
gain (no mean subtraction, no bias). The result is not quite 1 at initialisation: `eps` is
added to the mean square before the square root, and the fresh embeddings are tiny (std 0.02,
mean square 4e-4), so `eps = 1e-5` is not negligible: the RMS comes out as
`sqrt(ms / (ms + eps))`, about 0.988. Trained activations are far larger than `eps`."""),
    ("code", """config = L.ModelConfig(dim=64 if FAST else 256, n_layers=2 if FAST else 4, n_heads=8,
                       n_kv_heads=4, max_seq_len=128, tie_embeddings=True)
params = L.init_params(jax.random.PRNGKey(0), config)
print(config)
x = params["tok_embeddings"][jnp.array([ids])]          # [B, T, D]
normed = L.rms_norm(x, params["layers"][0]["attention_norm"], config.norm_eps)
rms = lambda a: jnp.sqrt(jnp.mean(a ** 2, axis=-1))
print("embeddings:", x.shape, " RMS of the first vectors:", np.round(rms(x)[0, :4], 4))
print("after RMSNorm:", normed.shape, " RMS:", np.round(rms(normed)[0, :4], 4))
ms = jnp.mean(x ** 2, axis=-1)
print("predicted sqrt(ms / (ms + eps)):", np.round(jnp.sqrt(ms / (ms + config.norm_eps))[0, :4], 4))"""),
    ("md", """## Rotary embeddings

RoPE encodes position by rotating pairs of query and key channels: pair *i* turns by
`theta^(-2i/Dh)` radians per position. Fast pairs resolve nearby tokens, slow ones far-away
tokens. Because both the query and the key are rotated, their dot product depends only on the
distance between them: the heatmap of `q(m) . k(n)` is constant along every diagonal."""),
    ("code", """Dh = config.head_width
cos, sin = L.precompute_rope(Dh, config.max_seq_len, config.rope_theta)
freqs = np.arctan2(sin[1], cos[1])  # the angle at position 1 = each pair's frequency
q = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 1, Dh))
k = jax.random.normal(jax.random.PRNGKey(2), (1, 1, 1, Dh))
n = 32
qs = jnp.concatenate([L.apply_rope(q, cos[None, m:m + 1], sin[None, m:m + 1]) for m in range(n)], 1)
ks = jnp.concatenate([L.apply_rope(k, cos[None, m:m + 1], sin[None, m:m + 1]) for m in range(n)], 1)
scores = jnp.einsum("bthd,bshd->ts", qs, ks)

fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
a.semilogy(freqs, "o-")
a.set(title=f"rotation frequency of each channel pair (Dh={Dh})", xlabel="pair i", ylabel="radians per position")
im = b.imshow(scores, cmap="RdBu")
b.set(title="q(m) . k(n): constant along diagonals", xlabel="key position n", ylabel="query position m")
fig.colorbar(im, ax=b)
plt.show()"""),
    ("md", """## Attention

Each query may look only at itself and earlier tokens (the causal mask). With grouped-query
attention, the `n_heads` query heads share `n_kv_heads` key/value heads: here 8 query heads
use 4 K/V heads, each serving a group of 2, which halves the KV cache. `attention_qkv` makes
the queries and keys (with their rotary positions) exactly as `attention` does, and
`attention_weights` reshapes the queries into groups instead of copying K and V."""),
    ("code", """sentence = "Now is the winter of our discontent made glorious summer"
sid = jnp.array([tokenizer.encode_ordinary(sentence)])
T = sid.shape[1]
H, K = config.n_heads, config.n_kv_heads
causal = jnp.tril(jnp.ones((1, T, T), bool))

def layer0_input(params):
    \"\"\"What layer 0's attention reads: the sentence's embeddings after RMSNorm, [B, T, D].\"\"\"
    layer = params["layers"][0]
    return L.rms_norm(params["tok_embeddings"][sid], layer["attention_norm"], config.norm_eps)

def layer0_attention(params):
    \"\"\"Layer 0's attention weights for the sentence: [B, K, G, T, S].\"\"\"
    q, k, v = L.attention_qkv(params["layers"][0]["attention"], layer0_input(params),
                              cos[None, :T], sin[None, :T], config)
    print("q:", q.shape, " k:", k.shape, f" ({H // K} query heads per K/V head)")
    return L.attention_weights(q, k, causal)

weights = layer0_attention(params)
print("weights [B, K, G, T, S]:", weights.shape)"""),
    ("code", """def show_attention(weights, title):
    labels = [tokenizer.decode([t]) for t in sid[0].tolist()]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), layout="constrained")
    axes[0].imshow(causal[0], cmap="Greys_r")
    axes[0].set_title("causal mask (black: hidden)")
    im = axes[1].imshow(weights[0, 0, 0], cmap="viridis", vmin=0, vmax=1)
    axes[1].set_title(title)
    for ax in axes:
        ax.set_xticks(range(T), labels, rotation=90)
        ax.set_yticks(range(T), labels)
    fig.colorbar(im, ax=axes[1])
    plt.show()

show_attention(weights, "layer 0, head 0, untrained")"""),
    ("md", """## SwiGLU and a whole block

The feed-forward network is SwiGLU: `w2(silu(x w1) * (x w3))`, with hidden width
`int(2 * 4 * dim / 3)` rounded up to `multiple_of` (Llama's rule keeps the parameter count of
a plain 4x MLP). A transformer block is pre-norm: `x + attention(norm(x))`, then
`+ ffn(norm(x))`."""),
    ("code", """print(inspect.getsource(L.feed_forward))
layer = params["layers"][0]
h = layer0_input(params)
y = L.feed_forward(layer["feed_forward"], h, config)
out, _ = L.transformer_block(layer, params["tok_embeddings"][sid], cos[None, :T], sin[None, :T], causal, config)
print("feed_forward:", h.shape, "->", y.shape, f"(hidden width F = {config.ffn_width})")
print("transformer_block:", out.shape)"""),
    ("md", """## The whole model on a batch, and its loss

`model_forward` runs the embedding, every block and the output layer: token ids `[B, T]` in,
logits `[B, T, V]` out, one row of scores over the vocabulary for every position. A batch is
`B` random windows of the training tokens (`get_batch`), and the targets are the same windows
shifted one token left: every position learns to predict the next token. `compute_loss` is
the mean cross-entropy over all `B x T` predictions. A freshly initialised model should be
maximally unsure, all 50,257 tokens about equally likely, so its loss is close to
`ln(50257) = 10.82` nats; a much larger value would mean confidently wrong logits (a bad
initialisation scale)."""),
    ("code", """batch = L.get_batch(jax.random.PRNGKey(0), jnp.asarray(train_tokens), 4, 32)
inputs, targets = batch
print("inputs ", inputs.shape, inputs[0, :8].tolist())
print("targets", targets.shape, targets[0, :8].tolist(), " (the inputs, one token later)")
forward = jax.jit(L.model_forward, static_argnames="config")  # compiled: one program per shape
logits, _ = forward(params, inputs, config)
print("logits", logits.shape, logits.dtype)
print(f"loss at init: {float(L.eval_loss(params, batch, config)):.3f}   ln(50257) = {np.log(50257):.3f}"
      "  (eval_loss: compute_loss, jitted)")"""),
    ("md", """## JAX's moves, run on the model

Five of JAX's ideas run through `llama_jax.py`, besides `jax.grad` (the next section). Each is
run here on the module's own functions.

**Pytrees.** The parameters are a nested dict of arrays, a *pytree*. `jax.tree_util` walks
any such tree: `tree_flatten_with_path` lists every leaf with its path, and `tree_map` applies
a function to every leaf and returns a tree of the same structure. Gradients, optimizer
moments and checkpoints are all trees of the parameters' shape, handled this way."""),
    ("code", """leaves = jax.tree_util.tree_flatten_with_path(params)[0]
for path, value in leaves:
    name = jax.tree_util.keystr(path)
    if name.startswith("['layers'][") and not name.startswith("['layers'][0]"):
        continue
    print(f"{name:50s} {str(list(value.shape)):>14s} {value.size:>12,}")
print(f"... and the same for layers 1..{config.n_layers - 1}")
sizes = jax.tree_util.tree_map(lambda a: a.size, params)  # a tree of ints, params' structure
total = sum(jax.tree_util.tree_leaves(sizes))
print(f"total {total:,} = embedding {sizes['tok_embeddings']:,} "
      f"({sizes['tok_embeddings'] / total:.0%}, tied with the output layer) + the rest "
      f"{total - sizes['tok_embeddings']:,};  L.count_params: {L.count_params(params):,}")"""),
    ("md", """**Tracing and `jit`.** `jax.jit` does not run a function's Python on arrays. It calls
it once with *tracers*, placeholders that carry only a shape and a dtype, records every
operation into a small program (a *jaxpr*), and hands that to XLA to compile. `make_jaxpr`
shows the record: here `rms_norm`, a few lines of Python. Python code that runs while
tracing (a `print`, an `if` on a config field) leaves no trace in the program; it runs again
only when jit traces again, which happens for a new input shape or dtype, or a new value of
a static argument (a frozen config, hashable, is one)."""),
    ("code", """w = params["layers"][0]["attention_norm"]
print(jax.make_jaxpr(L.rms_norm, static_argnums=2)(x, w, config.norm_eps))

@jax.jit
def norm(x, w):
    print("  tracing for", x.shape, x.dtype)  # Python: runs only while tracing
    return L.rms_norm(x, w, config.norm_eps)

for shape in ((1, 11, config.dim), (1, 11, config.dim), (2, 5, config.dim)):
    print("call with", shape)
    norm(jnp.ones(shape), w)  # the second call reuses the first's program; the third retraces"""),
    ("code", """# A Python `if` on a static value is fine: dense's `if config.compute_dtype == "bfloat16"`
# picks which operations get recorded, so each config compiles its own program.
xw = (jnp.ones((2, 4)), jnp.ones((4, 3)))
for dtype in ("float32", "bfloat16"):
    jaxpr = jax.make_jaxpr(L.dense, static_argnums=2)(*xw, L.ModelConfig(compute_dtype=dtype))
    print(f"{dtype}: {[str(e.primitive) for e in jaxpr.eqns]}")
# An `if` on a traced value is not: while tracing, the value does not exist yet.
try:
    jax.jit(lambda a: a if a.sum() > 0 else -a)(jnp.ones(3))
except jax.errors.TracerBoolConversionError as err:
    print("if on a tracer:", type(err).__name__, "(use jnp.where or lax.cond)")"""),
    ("md", """**PRNG keys.** JAX has no hidden random state: a key is a value, and the same key always
gives the same numbers. `split` makes new independent keys from one; `fold_in` derives a key
from a key and a number. The training run gives each use of randomness its own stream
(`run_keys`) and each step its key by folding in the step number (`step_keys`), so step *n*'s
batch depends on the seed and *n* alone: ask for step 5's batch twice and it is the same,
whatever happened between."""),
    ("code", """data = jnp.asarray(train_tokens)
key = jax.random.PRNGKey(0)
a, b = jax.random.split(key)
first = L.get_batch(a, data, 2, 8)[0]
print("key a:      ", first.tolist())
print("key a again:", L.get_batch(a, data, 2, 8)[0].tolist(), " (the same batch)")
print("key b:      ", L.get_batch(b, data, 2, 8)[0].tolist())
keys = L.run_keys(key)  # {"init", "batches", "dropout"}: fold_in(key, 0), (key, 1), (key, 2)
print("fold_in(key, 1) is run_keys' batch key:", bool((jax.random.fold_in(key, 1) == keys["batches"]).all()))
step_batch = lambda n: L.get_batch(L.step_keys(keys, n)[0], data, 2, 8)[0][0, :6].tolist()
print("step 5:", step_batch(5), " step 6:", step_batch(6), " step 5 again:", step_batch(5))"""),
    ("md", """**`vmap`.** `jax.vmap` turns a function of one example into a function of a batch. The
KV cache is written this way in `attention`: `dynamic_update_slice` writes one row's new keys
into its cache at one position, and `vmap` maps it over the batch, so each row is written at
its own position (prompts of different lengths are at different positions)."""),
    ("code", """write_one = lambda cache, new, pos: jax.lax.dynamic_update_slice(cache, new, (pos, 0, 0))
cache = jnp.zeros((2, 6, 1, 1))               # [B, S, K, Dh]: 2 rows, 6 slots
new = jnp.array([1.0, 2.0]).reshape(2, 1, 1, 1)  # [B, T=1, K, Dh]: one new key per row
written = jax.vmap(write_one)(cache, new, jnp.array([1, 4]))  # row 0 at slot 1, row 1 at slot 4
print(written[:, :, 0, 0])"""),
    ("md", """**Immutable arrays, and donation.** A JAX array never changes: `x.at[i].set(v)` returns a
new array (inside `jit`, XLA writes it in place), which is how `generate` records each new
token. A whole training step returns new parameters too, and `train_step` is jitted with
`donate_argnames=("params", "opt_state")`: XLA may write the new parameters into the old ones'
memory instead of holding both. The old arrays are then gone, and touching them raises: the
caller keeps the returned ones. (The training settings `tc` are made here; the rest of the
notebook uses them.)"""),
    ("code", """x3 = jnp.zeros(3)
print(x3.at[1].set(7.0), x3, "(a new array; x3 is unchanged)")
tc = L.TrainConfig(steps=16 if FAST else 320, batch_size=8, seq_len=64 if FAST else 128,
                   lr=3e-3, warmup_steps=8 if FAST else 30, eval_every=8 if FAST else 40,
                   eval_batches=4, log_every=8 if FAST else 40)
donated = jax.tree_util.tree_map(jnp.copy, params)  # copies: params itself is used below
donated_opt = L.adamw_init(donated)
small = L.get_batch(a, data, 2, 16)
new_params, new_opt, _ = L.train_step(donated, donated_opt, small, None, config, tc)
print("the old wq is deleted:", donated["layers"][0]["attention"]["wq"].is_deleted(),
      "| the new one:", new_params["layers"][0]["attention"]["wq"].is_deleted())
try:
    donated["norm"] + 1
except RuntimeError as err:
    print("using a donated array:", str(err).splitlines()[0][:80])"""),
    ("md", """## Gradients and one step, the JAX way

In PyTorch, `loss.backward()` fills `.grad` on every parameter. In JAX the gradient is a
function: `jax.value_and_grad(compute_loss)` returns a new function that gives the loss and
the gradients, as a pytree with exactly the parameters' structure. Nothing is stored on the
arrays and nothing is mutated. `adamw_update` takes the parameters, gradients and optimizer
state and returns new ones. `jax.jit` compiles the whole thing, loss, gradients and update,
into one XLA program: that is `train_step`. The first call traces and compiles (slow); later
calls with the same shapes reuse the program. `train_step` donates its inputs (XLA reuses
their memory for the outputs), so always keep the arrays it returns."""),
    ("code", """grad_fn = jax.jit(jax.value_and_grad(L.compute_loss), static_argnames="config")  # one program
loss, grads = grad_fn(params, batch, config)
print("same tree as params:", jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params))
print("gradient of layer 0's wq:", grads["layers"][0]["attention"]["wq"].shape,
      f" global norm {float(L.global_norm(grads)):.3f}")

opt_state = L.adamw_init(params)
# One step by hand, lr 1e-2 (jitted: one program instead of an op-by-op run over every weight).
stepped, _ = jax.jit(L.adamw_update, static_argnums=4)(params, grads, opt_state, 1e-2, tc)
print(f"the same batch's loss: {float(loss):.4f} before the step, "
      f"{float(L.eval_loss(stepped, batch, config)):.4f} after")

p, o = jax.tree_util.tree_map(jnp.copy, (params, opt_state))  # copies: train_step donates its inputs
# A batch of the training run's shape and a dropout key, as the loop below passes
# them: the same program, so the training cell does not compile it again.
train_batch = L.get_batch(jax.random.PRNGKey(1), jnp.asarray(train_tokens), tc.batch_size, tc.seq_len)
for i in range(3):
    t0 = time.perf_counter()
    p, o, step_loss = L.train_step(p, o, train_batch, jax.random.PRNGKey(2), config, tc)
    print(f"train_step call {i + 1}: loss {float(step_loss):.4f}, {time.perf_counter() - t0:.2f}s"
          + (" (tracing and compiling)" if i == 0 else ""))"""),
    ("md", """## Training

The loop below is the core of Part I's `train_loop` (the module's section 6, Training), written out
so that this cell can redraw the loss curve as it trains (`train_loop` also checks `seq_len`
and prints progress lines). Each step draws a batch of random windows and
calls `train_step`. Each use of randomness has its own stream (`run_keys`: initialisation,
batches, dropout), and each step's keys are its stream's key folded with the step number, so a
run can be repeated exactly. Reading a loss (`float(loss)`) waits for the device, so the loop
reads only when it reports; meanwhile Python queues the next steps. Every `eval_every` steps
it evaluates on the same fixed windows of the training and validation text."""),
    ("code", """seed_key = jax.random.PRNGKey(tc.seed)
keys = L.run_keys(seed_key)
start = L.init_params(keys["init"], config)  # the weights train_loop starts from
params = L.init_params(keys["init"], config)  # a copy of them: train_step donates its inputs
opt_state = L.adamw_init(params)
before = L.generate(start, tokenizer.encode_ordinary("KING RICHARD."), 30, config,
                    jax.random.PRNGKey(0), temperature=0.8, top_k=50)
data = jnp.asarray(train_tokens)
eval_sets = {name: L.fixed_windows(d, tc.eval_batches, tc.batch_size, tc.seq_len)
             for name, d in (("train", train_tokens), ("val", val_tokens))}
get_batch = jax.jit(L.get_batch, static_argnums=(2, 3))
history = {"train": [], "eval": []}
fig, ax = plt.subplots(figsize=(8, 4))
plt.close(fig)  # drawn below, and redrawn in place as training goes
view = display(fig, display_id=True)

def redraw():
    ax.clear()
    s, l = np.array(history["train"]).T
    ax.plot(s, l, alpha=0.4, label="train (per step)")
    if history["eval"]:
        e = np.array(history["eval"])
        ax.plot(e[:, 0], e[:, 1], "o-", label="train (fixed windows)")
        ax.plot(e[:, 0], e[:, 2], "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats/token)", xlim=(0, tc.steps))
    ax.legend()
    view.update(fig)

t0 = time.perf_counter()
losses = []
for step in range(tc.steps):
    batch_key, dropout_key = L.step_keys(keys, step)
    batch = get_batch(batch_key, data, tc.batch_size, tc.seq_len)
    params, opt_state, loss = L.train_step(params, opt_state, batch, dropout_key, config, tc)
    losses.append(loss)
    done = step + 1
    if done % tc.log_every == 0 or done == tc.steps:
        history["train"] += [[done - len(losses) + 1 + i, float(x)] for i, x in enumerate(losses)]
        losses = []
    if done % tc.eval_every == 0 or done == tc.steps:
        history["eval"].append([done] + [L.evaluate(params, config, eval_sets[s]) for s in ("train", "val")])
        redraw()
print(f"final validation loss {history['eval'][-1][2]:.3f} after {time.perf_counter() - t0:.0f}s")"""),
    ("md", """### Is the run healthy?

The loss says whether a run learns, not why it stalls or blows up. The cells below run the
package's training step, `run_step` (`llamatool/step.py`, the step `python llama_jax.py` runs),
here with Part I's attention and loss on this model, and with Part I's AdamW for every weight
(the default run uses Muon for the blocks' matrices), because it can also return a few numbers
per block from the same jitted step: the gradient norm before clipping, the update's size
relative to the weights and the RMS of the residual stream after the block. The attention's
entropy needs the T x T attention weights, so the package's `logged_entropy` measures it in a
forward pass of its own, on the batch the step trained on. `python llama_jax.py` writes these
figures to `out/metrics.jsonl` and draws them in `out/health.png`, the panels below.

What to read in them: the update's size against the weights (a few percent per step at
first, then towards the 1e-3 of Karpathy's rule of thumb) shrinks with the learning rate; the
residual RMS grows smoothly with depth; each head's entropy falls from its uniform start as it
learns where to look. The gradient norm is noisy at this batch size (8 windows), with spikes
of many times its usual size; clipping at 1.0 rescales such a gradient before AdamW's moments
take it in (the count of clipped steps is printed below). Clipping alone does not tell the
two runs below apart: at 8 windows a batch, both clip on about half their steps. An update
ratio that climbs towards 1, or a residual RMS that keeps growing from step to step, is the
run to stop. The panels are those of a short run of the same
model and data; the cells after them set four of its figures beside a run with a learning
rate far too large."""),
    ("code", """import dataclasses

# The package's config: Part I's fields plus its options; attention "explicit" is Part I's attend.
run_config = dataclasses.replace(lt.settings.run_configs(config)[0], attention="explicit")

def short_run(lr, steps=4 if FAST else 40):
    run_tc = lt.settings.RunTrainConfig(steps=steps, batch_size=8, seq_len=tc.seq_len, lr=lr, warmup_steps=5)
    p = L.init_params(keys["init"], config)
    o = L.adamw_init(p)
    out = []
    for s in range(steps):
        p, o, loss, h = lt.step.run_step(p, o, data, keys, run_config, run_tc)
        entropy = lt.health.logged_entropy(p, data, keys, s, run_config, run_tc)
        out.append(lt.health.health_record(s + 1, float(loss), float(L.learning_rate(s, run_tc)), None, 0,
                                   [jax.device_get(h)], entropy))
    return out


runs = {"lr 3e-3": short_run(3e-3), "lr 1e-1 (too large)": short_run(1e-1)}
fig = plt.figure(figsize=(10, 6.5))
lt.health.draw_health(fig, runs["lr 3e-3"])
plt.show()"""),
    ("md", """A learning rate far too large, for contrast: the same model and data for the same steps
at 3e-3 (as above) and at 1e-1. Compare the printed figures: the large rate moves the
weights by a far larger fraction of their size per step, and the residual stream's scale
grows far beyond the healthy run's. Its loss may still come down as the schedule lowers the
rate, so read at the end, the loss alone would hide how far off course the run went."""),
    ("code", """fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
for (name, recs), colour in zip(runs.items(), ("tab:blue", "tab:red")):
    steps = [r["step"] for r in recs]
    axes[0].plot(steps, [r["loss"] for r in recs], color=colour, label=name)
    axes[1].plot(steps, [r["grad_norm"] for r in recs], color=colour)
    axes[2].plot(steps, [np.mean(r["layer_update_ratio"]) for r in recs], color=colour)
    axes[3].plot(steps, [r["layer_rms"][-1] for r in recs], color=colour)
for ax, title in zip(axes, ("loss", "gradient norm (clip at 1)", "|update| / |weights|, mean over blocks",
                            "residual RMS after the last block")):
    ax.set(title=title, xlabel="step")
    ax.grid(alpha=0.3)
for ax in axes[1:]:
    ax.set_yscale("log")
axes[0].legend()
fig.tight_layout()
plt.show()
for name, recs in runs.items():
    print(f"{name}: loss at most {max(r['loss'] for r in recs):.2f}, final {recs[-1]['loss']:.2f}; "
          f"steps clipped {sum(r['clipped'] for r in recs)}/{len(recs)}; largest gradient norm "
          f"{max(r['grad_norm'] for r in recs):.1f}; largest mean update ratio "
          f"{max(np.mean(r['layer_update_ratio']) for r in recs):.3f}; largest residual RMS "
          f"{max(r['layer_rms'][-1] for r in recs):.1f}")"""),
    ("code", """# After training, the same head no longer spreads its attention evenly.
show_attention(layer0_attention(params), "layer 0, head 0, trained")"""),
    ("md", """## Sampling

The model gives logits for the next token; `sample_token` turns them into a choice.
Temperature divides the logits (above 1 flattens the distribution, below 1 sharpens it, 0 is
the argmax), top-k keeps the k most likely tokens, top-p keeps the smallest set whose
probability reaches p, and `jax.random.categorical` draws from what is left. After a
speaker's name the next token is nearly certain, so top-p keeps that one token at any p short
of its probability (top-k still keeps k, but all but one with almost no mass); below, the
filters act at a typical position instead: of the 64 positions of a validation window,
the one whose next-token distribution has the median entropy."""),
    ("code", """prompt = tokenizer.encode_ordinary("KING RICHARD.")
after_name = jax.nn.softmax(forward(params, jnp.array([prompt]), config)[0][0, -1])
print(f"after 'KING RICHARD.': {tokenizer.decode([int(jnp.argmax(after_name))])!r} "
      f"with probability {float(jnp.max(after_name)):.2f}")
window = jnp.asarray(val_tokens[:64])[None]  # [1, 64]
logits, _ = forward(params, window, config)
entropy = -jnp.sum(jax.nn.softmax(logits[0]) * jax.nn.log_softmax(logits[0]), axis=-1)  # [64]
t = int(jnp.argsort(entropy)[len(entropy) // 2])  # the median position
last = logits[:, t]  # [1, V]: the logits for the token after position t
probs = jax.nn.softmax(last[0])
print(f"after ...{tokenizer.decode(val_tokens[max(0, t - 12):t + 1].tolist())!r} "
      f"(entropy {float(entropy[t]):.2f} nats)")
print("most likely next tokens:", [(tokenizer.decode([int(i)]), round(float(probs[i]), 3))
                                    for i in jnp.argsort(-probs)[:5]])
for name, kept in (("top-k 5", L.top_k_filter(last, 5)), ("top-p 0.5", L.top_p_filter(last, 0.5)),
                   ("top-p 0.9", L.top_p_filter(last, 0.9))):
    keep = jnp.isfinite(kept[0])
    print(f"{name}: keeps {int(keep.sum()):,} tokens holding {float(probs[keep].sum()):.2f} of the probability")
draws = jax.vmap(lambda k: L.sample_token(k, last, 1.0, top_k=5)[0])(jax.random.split(jax.random.PRNGKey(0), 1000))
print("1,000 draws with top-k 5:", {tokenizer.decode([int(t)]): int(n)
                                     for t, n in zip(*np.unique(np.asarray(draws), return_counts=True))})"""),
    ("md", """`generate` prefills the prompt into a preallocated KV cache in one forward pass, then draws
tokens one at a time with `sample_token` inside a single compiled loop (`lax.while_loop`):
one XLA program for the whole generation, compiled once per shape, never per token."""),
    ("code", """after = L.generate(params, prompt, 30, config, jax.random.PRNGKey(0), temperature=0.8, top_k=50)
print("before training:", repr(tokenizer.decode(before)))
print("after training: ", repr(tokenizer.decode(after)))
for kwargs in (dict(temperature=0.0), dict(temperature=0.7), dict(temperature=1.3),
               dict(temperature=1.0, top_k=5), dict(temperature=1.0, top_p=0.5)):
    out = L.generate(params, prompt, 30, config, jax.random.PRNGKey(1), **kwargs)
    print(f"{str(kwargs):36s}", repr(tokenizer.decode(out[len(prompt):])))"""),
    ("md", """Why the cache pays: without it, every new token runs the whole sequence through the
model again, so each token costs more as the text grows; with it, a token costs one
position's work and its attention over the cache. Below, both decode greedily after an
8-token and a 64-token prompt (validation text; fast mode: the 8-token one), each compiled first (the loop without a
cache compiles one program per length; that is excluded), and take turns, best of three
rounds each: the same tokens, at different speeds. The loop without a cache is also a
Python loop (one dispatch per token, where `generate` is one program) and makes logits for
every position, so the ratio is what the whole design buys, not the cache alone."""),
    ("code", """n_new = 4 if FAST else 32

def without_cache(prompt_tokens):
    tokens = jnp.array([prompt_tokens])  # [1, T], one longer each step
    for _ in range(n_new):
        logits, _ = forward(params, tokens, config)
        tokens = jnp.concatenate([tokens, jnp.argmax(logits[:, -1:], axis=-1)], axis=1)
    return tokens[0].tolist()

def with_cache(prompt_tokens):
    return L.generate(params, prompt_tokens, n_new, config, jax.random.PRNGKey(0), temperature=0.0)

for length in (8,) if FAST else (8, 64):
    p = val_tokens[:length].tolist()
    same = without_cache(p) == with_cache(p)  # the first calls compile
    best = {"KV cache": 0.0, "no cache": 0.0}
    for _ in range(3):
        for name, fn in (("KV cache", with_cache), ("no cache", without_cache)):
            t0 = time.perf_counter()
            fn(p)
            best[name] = max(best[name], n_new / (time.perf_counter() - t0))
    print(f"{length}-token prompt, {n_new} new tokens (the same ones both ways: {same}): KV cache "
          f"{best['KV cache']:,.0f} tokens/s, the whole sequence per token {best['no cache']:,.0f} "
          f"tokens/s: {best['KV cache'] / best['no cache']:.1f}x")"""),
    ("md", """## Checkpoints

The package's `save_checkpoint` (llamatool/checkpoint_npz.py) writes one `.npz` file: parameters, optimizer state,
step, PRNG key, both configs and the loss history, written atomically. Loading it back must
give the same logits."""),
    ("code", """import tempfile
from pathlib import Path

path = Path(tempfile.mkdtemp()) / "ckpt.npz"
lt.checkpoint_npz.save_checkpoint(path, params, opt_state, seed_key, config, tc, history)
loaded = lt.checkpoint_formats.load_checkpoint(path, config)
check = jnp.array([prompt])
a, _ = L.model_forward(params, check, config)
b, _ = L.model_forward(loaded.params, check, config)
print(f"{path.stat().st_size / 1e6:.1f} MB, step {int(loaded.opt_state['step'])}, "
      f"max logit difference {float(jnp.max(jnp.abs(a - b)))}")"""),
    ("md", """## Many devices

The package's `run_step` runs on a mesh of devices: the batch is split over all of them and,
with FSDP, every matrix and its AdamW moments too (`state_shardings` in
`llamatool/devices.py` holds the rule). The layers and the loss do not change; `jax.jit` compiles them for
the mesh. A CPU can pretend to have 8 devices, but only if told before JAX starts, so this
cell runs a fresh Python with `XLA_FLAGS=--xla_force_host_platform_device_count=8`: it shows
where the pieces of one matrix live, and that one step on 8 devices gives the loss of one
device."""),
    ("code", """import os, subprocess, sys

script = '''
import importlib.util, jax, numpy as np, llama_jax as L, llamatool as lt
config = L.ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
tc = lt.settings.RunTrainConfig(batch_size=16, seq_len=16, health=False)
data = np.random.RandomState(0).randint(0, 256, 4000).astype(np.int32)
for mesh in (lt.devices.make_mesh(1, jax.devices()[:1]), lt.devices.make_mesh("all")):
    params = lt.devices.sharded_init(jax.random.PRNGKey(0), config, mesh)
    opt_state = lt.devices.sharded_optimizer_init(params, mesh)
    keys = lt.devices.replicated(mesh, L.run_keys(jax.random.PRNGKey(1)))
    wq = params["layers"][0]["attention"]["wq"]
    print(f"{mesh.size} device(s): wq {wq.shape} is held as", wq.sharding.shard_shape(wq.shape),
          "on each of", len(wq.sharding.device_set))
    if mesh.size > 1 and importlib.util.find_spec("rich"):  # optional: draws the split
        jax.debug.visualize_array_sharding(wq)
    elif mesh.size > 1:  # without rich, the devices holding a piece each
        print([str(s.device) for s in wq.addressable_shards])
    _, _, loss, _ = lt.step.run_step(params, opt_state, lt.devices.replicated(mesh, data), keys, config, tc,
                                 None, mesh)
    print(f"loss of the first step: {float(loss):.6f}")
'''
env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
print(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                     check=True).stdout)"""),
]


def build():
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for kind, source in CELLS:
        nb.cells.append(new_markdown_cell(source) if kind == "md" else new_code_cell(source))
    for cell in nb.cells:  # stable ids keep diffs small
        cell["id"] = f"cell-{nb.cells.index(cell):02d}"
    return nb


if __name__ == "__main__":
    notebook = build()
    if "--no-run" not in sys.argv:
        import time

        from nbclient import NotebookClient

        t0 = time.perf_counter()
        NotebookClient(notebook, timeout=1200, kernel_name="python3",
                       resources={"metadata": {"path": str(ROOT)}}).execute()
        print(f"ran the notebook in {time.perf_counter() - t0:.0f}s")
    nbformat.write(notebook, ROOT / "walkthrough.ipynb")
