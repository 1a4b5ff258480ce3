"""Speed: faster kernels and sampling, the blockwise loss, the auto choices."""

import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from llama_jax import (apply_rope, at_least_f32, attend, decoding_weights, dense, forward_hidden,
    output_logits, output_weight, rms_norm, sample_token, transformer_block)
from llamatool.settings import run_configs
from llamatool.health import health_block


# A target of IGNORE carries no loss: the prompts of chat data (llamatool/chat_data.py) and
# padding. (PyTorch's ignore_index; Hugging Face labels use -100.)
IGNORE = -1


def masked_cross_entropy(logits, targets, config):
    """The mean cross-entropy over the targets that are not IGNORE: logits
    float32[..., V_padded], targets int32[...] -> scalar. With no IGNORE
    target it is Part I's cross_entropy."""
    keep = targets != IGNORE
    if config.padded_vocab != config.vocab_size:
        logits = jnp.where(jnp.arange(config.padded_vocab) < config.vocab_size, logits, -jnp.inf)
    safe = jnp.where(keep, targets, 0)  # any real index; its loss is masked below
    target_logits = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    nats = jax.nn.logsumexp(logits, axis=-1) - target_logits
    return jnp.sum(jnp.where(keep, nats, 0.0)) / jnp.maximum(jnp.sum(keep), 1)


# The package's kernels for the training step, passed to Part I's transformer_block
# (its dense= and attend= seams). First, the bfloat16 matmul with a
# hand-written gradient: JAX's own rule for Part I's dense multiplies the
# float32 gradient with the bfloat16 operands promoted to float32 (the slow
# path), then rounds dx and dw to bfloat16. In PyTorch terms: autocast to
# bfloat16 plus a torch.autograd.Function whose backward is written by hand.
# It halves the cpu preset's step: 472 against 995 ms for the loss and its
# gradients on the AMD EPYC (`python tools/bench_kernels.py`, docs/speed.md).


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense_bf16(x, w, out_dtype):
    return _dense_bf16_fwd(x, w, out_dtype)[0]


# The forward keeps the bfloat16 operands for the backward; the two empty
# arrays carry only the input dtypes (residuals must be arrays), so the
# gradients come back in x's and w's own dtypes. Each product is asked for in
# the dtype it is kept in: bfloat16 for activations and their gradients (the
# next layer rounds its input to bfloat16 anyway), float32 for the logits and
# the weights' gradients. The sums run in float32 either way: a GPU's bfloat16
# matmuls accumulate in float32, and XLA's CPU backend computes bfloat16
# products in float32 and rounds the result.
def _dense_bf16_fwd(x, w, out_dtype):
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    out = jnp.dot(xb, wb, preferred_element_type=out_dtype)
    return out, (xb, wb, jnp.zeros((), x.dtype), jnp.zeros((), w.dtype))


def _dense_bf16_bwd(out_dtype, residuals, g):
    # Rounding g to bfloat16 keeps both products on the fast path; they sum in
    # float32, and the gradients are not rounded.
    xb, wb, x_like, w_like = residuals
    gb = g.astype(jnp.bfloat16)
    dx = jnp.dot(gb, wb.T, preferred_element_type=x_like.dtype)
    dw = jnp.dot(xb.reshape(-1, xb.shape[-1]).T, gb.reshape(-1, gb.shape[-1]),
                 preferred_element_type=jnp.float32)
    return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


_dense_bf16.defvjp(_dense_bf16_fwd, _dense_bf16_bwd)


def bfloat16_activations(config):
    """Whether the training step keeps its activations and residual stream in
    bfloat16: under bfloat16 compute, on a GPU or TPU, where it halves the
    bytes every elementwise kernel moves. Not on a CPU: XLA's CPU backend does
    bfloat16 arithmetic in float32 anyway, converting at every kernel's edges,
    and the cpu preset's step ran slower that way: 1.01x transformers' speed
    against 1.19x with float32 activations (`python tools/bench_vs_hf.py
    --dtype bfloat16 --loss plain --rounds 5 --steps 4`, best rounds, AMD
    EPYC, 2 cores; docs/gpu.md)."""
    return config.compute_dtype == "bfloat16" and jax.default_backend() != "cpu"


def run_dense(x, w, config, out_dtype=None):
    """Part I's dense, with the hand-written gradient under bfloat16 compute,
    and its result in out_dtype (default: bfloat16 where the activations are,
    bfloat16_activations; else float32)."""
    if config.compute_dtype != "bfloat16":
        return dense(x, w, config)
    default = jnp.bfloat16 if bfloat16_activations(config) else jnp.float32
    return _dense_bf16(x, w, out_dtype or default)


def in_compute_dtype(block, dtype):
    """block with its input cast to dtype: with bfloat16 activations the
    residual stream leaves the (float32) embedding as bfloat16 at the first
    block and stays so; each block's norms still take their statistics in
    float32 (Part I's rms_norm), softmax runs in float32, and the loss and the
    optimizer see float32."""
    def run(p, x, *args, **kwargs):
        return block(p, x.astype(dtype), *args, **kwargs)
    return run


def fused_attend(q, k, v, mask, dtype=None):
    """Part I's attend for training (causal, no cache) by
    jax.nn.dot_product_attention, K < H without copying K/V. On a GPU, where
    cuDNN takes the inputs (cudnn_takes), it asks for cuDNN's fused kernel:
    the function's default, implementation=None, is XLA's own on every backend
    (jax/_src/nn/functions.py), which writes out the [B, H, T, T] scores. It
    applies the causal mask itself (is_causal, so cuDNN skips the blocks
    above the diagonal) and ignores `mask`. dtype: the inputs' dtype for the
    kernel (bfloat16 runs pass bfloat16, which cuDNN takes); None keeps q's."""
    dt = dtype or q.dtype
    q, k, v = q.astype(dt), k.astype(dt), v.astype(dt)
    if cudnn_takes(q):
        try:
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError):  # an older cuDNN refuses it
            pass
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)


def cudnn_takes(q):
    """Whether cuDNN's fused attention can take queries like q [B, T, H, Dh]:
    on a GPU, in bfloat16 or float16, head width a multiple of 8 up to 128
    (jax.nn.dot_product_attention's checks for implementation="cudnn" allow
    up to 256 from Hopper on; 128 holds on every GPU cuDNN supports)."""
    return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)


def run_block(config):
    """The block the package trains with: Part I's transformer_block with
    run_dense and, for attention "fused", fused_attend; with
    bfloat16_activations, on a bfloat16 residual stream (in_compute_dtype); wrapped in
    jax.checkpoint for --remat (keep only each block's input for the backward
    pass and recompute the rest there; config, argument 5, is static)."""
    attend_fn = attend
    if config.attention == "fused":
        attend_fn = functools.partial(fused_attend, dtype=config.dtype)
    block = functools.partial(transformer_block, dense=run_dense, attend=attend_fn)
    if bfloat16_activations(config):
        block = in_compute_dtype(block, jnp.bfloat16)
    return jax.checkpoint(block, static_argnums=(5,)) if config.remat else block


# Sampling without a sort, for the command line's generation and chat. Part
# I's sample_token sorts the vocabulary for top-p and draws with
# jax.random.categorical (one Gumbel number per vocabulary entry). Here the
# top-k and top-p thresholds are found by bisection on the values (40 passes
# of V comparisons, no data movement) and the token is drawn by inverting the
# cumulative distribution with one uniform number per row. Measured with
# `python tools/bench_sampling.py` (alternating rounds, V = 50,257; AMD EPYC, 2
# cores): ms per draw, Part I's against these, at batch 1 and 8: top-k 50
# 10.6 vs 0.93 and 72.8 vs 4.8; top-p 0.9 12.3 vs 0.82 and 90.6 vs 4.7; no
# filter 3.1 vs 0.42 and 6.0 vs 1.95 (3 to 19 times faster).


def largest_threshold(values, count_at_least, target, iterations=40):
    """Bisection, per row, for the largest t with count_at_least(values, t) >=
    target, where count_at_least(values, t) shrinks as t grows. values:
    float32[B, V] -> t: float32[B, 1]. 40 halvings of the value range reach
    float32 resolution."""
    lo = jnp.min(values, axis=-1, keepdims=True)  # count_at_least(lo) is everything
    hi = jnp.max(values, axis=-1, keepdims=True) + 1.0  # count_at_least(hi) is nothing

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        enough = count_at_least(values, mid) >= target
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    return jax.lax.fori_loop(0, iterations, halve, (lo, hi))[0]


def bisection_top_k(logits, top_k):
    """top_k_filter (llama_jax.py, section 7) by bisection. float32[B, V] -> float32[B, V]."""
    # -inf entries (masked tokens) count as just below the row's smallest
    # finite logit, so the bisection's range stays the finite logits' range.
    low = jnp.min(jnp.where(jnp.isfinite(logits), logits, jnp.inf), axis=-1, keepdims=True)
    finite = jnp.where(jnp.isfinite(logits), logits, low - 1.0)
    kth = largest_threshold(finite, lambda x, t: jnp.sum(x >= t, axis=-1, keepdims=True), top_k)
    return jnp.where(logits >= kth, logits, -jnp.inf)


def bisection_top_p(logits, top_p):
    """top_p_filter (llama_jax.py, section 7) by bisection: the kept set is every token with
    probability >= t for the largest t whose set still holds top_p of the
    mass. float32[B, V] -> float32[B, V]."""
    probs = jax.nn.softmax(logits, axis=-1)
    target = top_p * (1 - 1e-6)  # as in top_p_filter
    t = largest_threshold(probs, lambda p, t: jnp.sum(jnp.where(p >= t, p, 0.0), axis=-1,
                                                      keepdims=True), target)
    return jnp.where(probs >= t, logits, -jnp.inf)


def fast_sample_token(key, logits, temperature, top_k=None, top_p=1.0):
    """sample_token's draw (the same distribution, other random numbers) with
    the bisection filters and one uniform number per row. With top-k alone it
    is Part I's sample_token, which draws among lax.top_k's k values: faster
    than the bisection there (generate at the cpu preset's model, top-k 50,
    batch 1: 161 against 119 tokens/s, `python tools/bench_sampling.py
    --generate --config cpu`, alternating rounds, AMD EPYC, 2 cores shared
    with two training runs). logits: float32[B, V] -> int32[B]."""
    if top_k is not None and top_p >= 1.0:
        return sample_token(key, logits, temperature, top_k, top_p)
    greedy = jnp.argmax(logits, axis=-1)
    logits = logits / jnp.maximum(temperature, 1e-6)
    if top_k is not None:
        logits = bisection_top_k(logits, top_k)
    if top_p < 1.0:
        logits = bisection_top_p(logits, top_p)
    cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)  # [B, V]
    u = jax.random.uniform(key, (logits.shape[0], 1), minval=1e-7) * cdf[:, -1:]
    sampled = jnp.sum(cdf < u, axis=-1)  # the first token whose cdf reaches u
    return jnp.where(temperature == 0, greedy, sampled).astype(jnp.int32)


# Decoding with fewer, larger kernels. At batch 1 a token's work is a chain of
# small matrix-vector products, each its own kernel on a GPU, so launches, not
# memory bandwidth, bound it (docs/gpu.md: 0.69 ms a token, about 270 kernels).
# The package decodes with each block's wq|wk|wv and w1|w3 concatenated once,
# when the weights are prepared (one product for q, k and v, one for the two
# SwiGLU inputs: 9 products a block to 6, counting attention's two), and at
# batch 1 writes the cache with one dynamic_update_slice instead of Part I's
# vmapped one, which XLA lowers to a scatter. `python tools/decode_program.py`
# counts both loops' instructions.


def fused_decoding_weights(params, config):
    """Part I's decoding_weights, then each block's attention as {"wqkv":
    [D, (H + 2K) Dh], "wo"} and feed-forward as {"w13": [D, 2F], "w2"}: the
    weights decode_block reads. Runs once per generate call, before its loop."""
    params = decoding_weights(params, config)
    layers = []
    for layer in params["layers"]:
        a, f = layer["attention"], layer["feed_forward"]
        layers.append({**layer,
                       "attention": {"wqkv": jnp.concatenate([a["wq"], a["wk"], a["wv"]], axis=1),
                                     "wo": a["wo"]},
                       "feed_forward": {"w13": jnp.concatenate([f["w1"], f["w3"]], axis=1),
                                        "w2": f["w2"]}})
    return {**params, "layers": layers}


def write_cache(cache, new, position):
    """new [B, T, K, Dh] written into cache [B, S, K, Dh] at each row's
    position (int32[B]). At batch 1, one dynamic_update_slice (in place);
    else Part I's, one per row."""
    new = new.astype(cache.dtype)
    if cache.shape[0] == 1:
        return jax.lax.dynamic_update_slice(cache, new, (0, position[0], 0, 0))
    write = jax.vmap(lambda c, n, pos: jax.lax.dynamic_update_slice(c, n, (pos, 0, 0)))
    return write(cache, new, position)


def decode_block(p, x, cos, sin, mask, config, cache=None, position=None, key=None):
    """Part I's transformer_block for decoding, from fused_decoding_weights'
    matrices: the same sums, in three matrix products fewer. No dropout.
    x: [B, T, D] -> ([B, T, D], cache)."""
    B, T, _ = x.shape
    H, K, Dh, eps = config.n_heads, config.n_kv_heads, config.head_width, config.norm_eps
    qkv = dense(rms_norm(x, p["attention_norm"], eps), p["attention"]["wqkv"], config)
    q, k, v = jnp.split(qkv, [H * Dh, (H + K) * Dh], axis=-1)  # [B, T, H*Dh], [B, T, K*Dh] x 2
    q = apply_rope(q.reshape(B, T, H, Dh), cos, sin)
    k = apply_rope(k.reshape(B, T, K, Dh), cos, sin)
    cache = {"k": write_cache(cache["k"], k, position),
             "v": write_cache(cache["v"], v.reshape(B, T, K, Dh), position)}
    out = attend(q, cache["k"], cache["v"], mask)  # [B, T, H, Dh]
    x = x + dense(out.reshape(B, T, H * Dh), p["attention"]["wo"], config)
    gate, up = jnp.split(dense(rms_norm(x, p["ffn_norm"], eps), p["feed_forward"]["w13"], config),
                         2, axis=-1)  # [B, T, F] each
    return x + dense(jax.nn.silu(gate) * up, p["feed_forward"]["w2"], config), cache


# Fewer, larger kernels per token, and the sampler without a sort:
# generate(..., **FAST_DECODING).
FAST_DECODING = dict(sample=fast_sample_token, prepare=fused_decoding_weights, block=decode_block)


def command_line_decoding():
    """What the command line's generate takes: FAST_DECODING where decoding is
    bound by kernel launches (a GPU: docs/gpu.md); on a CPU, which is not,
    Part I's own weights and block, and only the sampler (Part I's for top-k
    alone, the bisection where top-p would sort). At the cpu preset's model
    the joined weights gain little on a CPU: 901 against 850 tokens/s, the
    benchmark's own noise being 3% (`python tools/bench_sampling.py
    --generate --config cpu`, best of 5 alternating rounds, AMD EPYC, 2
    cores); for SmolLM2-135M's 30 blocks, 38.7 against 34.2
    (tools/bench_smollm2.py), which chat's streaming keeps."""
    if jax.default_backend() == "cpu":
        return dict(sample=fast_sample_token)
    return FAST_DECODING


def auto_compute_dtype(cpuinfo=None):
    """What --dtype auto (the cpu preset) means on this machine: bfloat16 on a
    GPU or TPU. On a CPU it depends on the chip, as measured with XLA's CPU
    backend (docs/speed.md, `python llama_jax.py --bench --dtype bfloat16`
    against `--dtype float32`): on an AMD EPYC with avx512_bf16 a 2048^3
    bfloat16 matmul ran at 370 GFLOP/s against 189 in float32, so bfloat16;
    on an Intel Xeon with avx512_bf16 but no AMX it ran at 155 against 274
    (Intel's bfloat16 dot-product instruction does no more multiply-adds per
    cycle than its float32 FMA, and converting costs time), so float32; with
    Intel's AMX (amx_bf16), tile instructions made for bfloat16 matmuls,
    bfloat16 (not measured here). Decided from /proc/cpuinfo (or the
    text `cpuinfo`), not by a timing: timings on a shared 2-core machine
    vary from run to run, and a run's dtype (and so its losses) must not
    depend on the machine's load.
    -> (dtype, the reason in words)."""
    backend = jax.default_backend()
    if backend != "cpu":
        return "bfloat16", f"a {backend.upper()} runs bfloat16 matmuls natively"
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    words = set(cpuinfo.split())
    if "amx_bf16" in words:
        return "bfloat16", "this CPU has AMX bfloat16 tiles (amx_bf16)"
    if "avx512_bf16" in words and "AuthenticAMD" in words:
        return "bfloat16", "this AMD CPU has native bfloat16 dot products (avx512_bf16)"
    if "avx512_bf16" in words:
        return "float32", ("on an Intel CPU with avx512_bf16 but no AMX, XLA's bfloat16 matmul "
                           "ran at 0.57x its float32 speed")
    return "float32", "this CPU has no native bfloat16 instructions (avx512_bf16, amx_bf16)"


# The output layer without its logits. compute_loss holds float32 logits
# [B*T, V_padded] and, in the backward pass, their gradient of the same size:
# 2 x 8.4 GB for Llama 3's 128,256-token vocabulary at 8 x 2048 tokens, more
# than the rest of a 1B model's training state. blockwise_cross_entropy runs
# over blocks of loss_block_size tokens (a lax.scan), and for each block computes
# the logits, the loss and, when differentiated, the gradient right away:
# softmax minus one-hot is the gradient of cross-entropy with respect to the
# logits, so dh = G W^T and dW = h^T G follow, and the block's logits are
# dropped. Memory is O(loss_block x V) instead of O(B*T x V), and the FLOPs are
# those of the plain path (one output matmul forward, two backward): the
# gradient is computed in the forward pass and only scaled in the backward
# one (the approach of Liger Kernel's fused linear cross-entropy; Levanter's
# blockwise cross-entropy recomputes the logits in the backward pass instead,
# one more matmul). Evaluation, which needs no gradient, runs the primal
# function, from which jit drops the gradient's work.

# Memory decides the loss: the plain path where its temporaries fit
# comfortably, else blockwise in the largest blocks that do. "Comfortably" is
# an eighth of one device's memory (device_memory): the rest is for the
# weights, the optimizer, the activations and XLA's own buffers. On the H200
# (141 GB) the 153M model's 16 x 1,024 tokens take the plain path (about 10 GB
# by loss_temp_bytes; 6.2 GiB by XLA's analysis, docs/gpu.md); at 8 x 2,048
# tokens of Llama 3's vocabulary on a 24 GB CPU host, blocks of 1,024.
LOSS_MEMORY_SHARE = 8


def device_memory():
    """-> (bytes one device may use, where the figure comes from)."""
    device = jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return stats["bytes_limit"], f"{getattr(device, 'device_kind', device.platform)} memory"
    try:  # CPU devices share the host's memory
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None, "unknown"
    n = jax.local_device_count()
    return total // n, f"host memory / {n} CPU device{'s' if n > 1 else ''}"


def loss_memory_budget():
    """The bytes the loss's temporaries may take: an eighth of a device's
    memory (4 GiB where it is unknown)."""
    limit, _ = device_memory()
    return (limit or 32 << 30) // LOSS_MEMORY_SHARE


def loss_temp_bytes(config, n_tokens):
    """What the plain loss's temporaries hold for n_tokens tokens, about:
    the float32 logits, their exponentials and their gradient, each
    [n_tokens, V_padded] (XLA's analysis, loss_buffer_bytes, finds a little
    less: it reuses some)."""
    return 3 * 4 * n_tokens * config.padded_vocab


def use_blockwise(config, n_tokens):
    """Whether run_loss takes the blockwise path for n_tokens tokens.
    "auto": where the plain path's temporaries would take more than
    loss_memory_budget; and, for speed, float32 compute on a CPU, where its
    hand-written gradient (one fused pass for softmax minus one-hot) beat the
    plain path's autodiff (a scatter for the target logits, a select for the
    padding, a transposed copy of the logits' gradient): 1.57x the whole
    training step at the benchmark configuration on an Intel Xeon (`python
    tools/bench_vs_hf.py`; docs/speed.md). With bfloat16 on the CPU both ran
    within noise, so plain."""
    if config.loss_impl != "auto":
        return config.loss_impl == "blockwise"
    if loss_temp_bytes(config, n_tokens) > loss_memory_budget():
        return True
    return config.compute_dtype == "float32" and jax.default_backend() == "cpu"


def loss_block_size(config, n_tokens):
    """Tokens per block of the blockwise loss: config.loss_block where
    given (--loss-block), else the largest power of two whose temporaries
    fit loss_memory_budget (at least 64), at most n_tokens."""
    if config.loss_block:
        return min(config.loss_block, n_tokens)
    budget, block = loss_memory_budget(), 1 << max(0, (n_tokens - 1).bit_length())
    while block > 64 and loss_temp_bytes(config, block) > budget:
        block //= 2
    return min(block, n_tokens)


def blockwise_cross_entropy(h, w, targets, config):
    """The mean cross-entropy of compute_loss from the final hidden states, by
    blocks of loss_block_size tokens. h: [N, D], w: [D, V_padded] (the output
    weight), targets: int32[N] (IGNORE: no loss) -> scalar, the mean over the
    targets that count. A custom VJP (below) returns the gradients computed
    alongside the loss."""
    return _blockwise_ce(h, w, targets, config)[0]


def _blockwise_ce(h, w, targets, config, with_grads=False):
    """-> (mean loss, (dL/dh [N, D], dL/dw [D, V_padded]) or None)."""
    N, D = h.shape
    n = loss_block_size(config, N)
    blocks = -(-N // n)
    pad = blocks * n - N  # the last block is padded with rows that count for nothing
    hs = jnp.pad(h, ((0, pad), (0, 0))).reshape(blocks, n, D)
    ts = jnp.pad(targets, (0, pad), constant_values=IGNORE).reshape(blocks, n)
    valid = ts != IGNORE  # padding rows, and the prompts of chat data (llamatool/chat_data.py)
    ts = jnp.where(valid, ts, 0)
    count = jnp.maximum(jnp.sum(valid), 1)  # the tokens the mean is over: N for text
    bf16 = config.compute_dtype == "bfloat16"
    w_mm = w.astype(jnp.bfloat16) if bf16 else w  # rounded once, not once per block
    vocab = jnp.arange(w.shape[1])

    def matmul(a, b):  # as in dense: bfloat16 operands, float32 sums
        if bf16:
            return jnp.dot(a.astype(jnp.bfloat16), b, preferred_element_type=jnp.float32)
        return jnp.dot(a, b)

    def block(dw, xs):
        hb, tb, vb = xs  # [n, D], [n], [n]
        logits = at_least_f32(matmul(hb, w_mm))  # [n, V_padded]
        logits = jnp.where(vocab < config.vocab_size, logits, -jnp.inf)
        m = jnp.max(logits, axis=-1, keepdims=True)
        e = jnp.exp(logits - m)
        s = jnp.sum(e, axis=-1, keepdims=True)
        target_logits = jnp.take_along_axis(logits, tb[:, None], axis=-1)[:, 0]
        loss = jnp.sum(jnp.where(vb, m[:, 0] + jnp.log(s[:, 0]) - target_logits, 0.0))
        if not with_grads:
            return dw, (loss, None)
        # dL/dlogits for the mean over the counted tokens: (softmax - one_hot)
        # / count, and 0 on rows that do not count; rounded to bfloat16 for the
        # two matmuls, as in dense.
        p = e / s
        g = jnp.where(vocab == tb[:, None], p - 1, p) * (vb[:, None] / count)
        g = g.astype(jnp.bfloat16) if bf16 else g.astype(logits.dtype)
        # g @ w.T as a contraction over w's vocabulary axis: no transposed copy of w
        dh = jax.lax.dot_general(g, w_mm, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32 if bf16 else None)  # [n, D]
        dw = dw + (jnp.dot(hb.astype(jnp.bfloat16).T, g, preferred_element_type=jnp.float32)
                   if bf16 else hb.T @ g)  # [D, V_padded]
        return dw, (loss, dh)

    dw0 = jnp.zeros(w.shape, jnp.promote_types(w.dtype, jnp.float32)) if with_grads else None
    dw, (losses, dh) = jax.lax.scan(block, dw0, (hs, ts, valid))
    loss = jnp.sum(losses) / count
    if not with_grads:
        return loss, None
    return loss, (dh.reshape(blocks * n, D)[:N].astype(h.dtype), dw.astype(w.dtype))


def _blockwise_ce_fwd(h, w, targets, config):
    return _blockwise_ce(h, w, targets, config, with_grads=True)  # (loss, residuals: the grads)


def _blockwise_ce_bwd(config, grads, g):
    dh, dw = grads  # computed in the forward pass; the loss is linear in them
    return dh * g, dw * g, None  # targets are integers: no gradient


blockwise_cross_entropy = jax.custom_vjp(blockwise_cross_entropy, nondiff_argnums=(3,))
blockwise_cross_entropy.defvjp(_blockwise_ce_fwd, _blockwise_ce_bwd)


def run_loss_aux(params, batch, config, training=False, key=None, health=False):
    """Part I's compute_loss with the options of RunModelConfig: the package's
    kernels and --remat (run_block), the blockwise cross-entropy where
    use_blockwise picks it, and with health=True each block's health figures
    (health_block, llamatool/health.py). Targets of IGNORE (the prompts of chat data,
    llamatool/chat_data.py) carry no loss. -> (loss, [per-block figures] or [None] * L)."""
    config, _ = run_configs(config)
    inputs, targets = batch
    block = run_block(config)
    if health:
        block = functools.partial(health_block, block=block)
    h, stats = forward_hidden(params, inputs, config, training=training, key=key, block=block)
    if use_blockwise(config, targets.size):
        loss = blockwise_cross_entropy(h.reshape(-1, h.shape[-1]), output_weight(params),
                                       targets.reshape(-1), config)
    else:  # Part I's cross_entropy, but targets of IGNORE count for nothing (chat data)
        logits = at_least_f32(run_dense(h, output_weight(params), config,  # [B, T, V_padded]
                                        jnp.float32))
        loss = masked_cross_entropy(logits, targets, config)
    return loss, stats


def run_loss(params, batch, config, training=False, key=None):
    """run_loss_aux's loss alone: compute_loss's signature, the package's choices."""
    return run_loss_aux(params, batch, config, training, key)[0]


run_eval_loss = jax.jit(run_loss, static_argnames=("config",))


def evaluate_run(params, config, batches):
    """Part I's evaluate with run_loss: the mean loss per counted target over
    fixed batches, each batch weighted by its targets that are not IGNORE (for
    text, all of them: the mean of the batches' means)."""
    total = count = 0.0
    for batch in batches:
        # Counted on the devices: with several processes, batch[1] spans
        # devices this process cannot read, but the count is on all of them.
        n = float(jnp.sum(batch[1] != IGNORE))
        total += n * float(run_eval_loss(params, batch, config))
        count += n
    return total / max(count, 1.0)


def loss_buffer_bytes(config, n_tokens):
    """Temporary bytes of the output layer's loss and gradient, from hidden
    states [n_tokens, D] (XLA's memory analysis of the compiled function; no
    run): {"plain": ..., "blockwise": ...}."""
    shapes = (jax.ShapeDtypeStruct((n_tokens, config.dim), jnp.float32),
              jax.ShapeDtypeStruct((config.dim, config.padded_vocab), jnp.float32),
              jax.ShapeDtypeStruct((n_tokens,), jnp.int32))

    def plain_loss(h, w, t):
        return masked_cross_entropy(output_logits({"output": w}, h, config), t, config)

    def blockwise_loss(h, w, t):
        return blockwise_cross_entropy(h, w, t, config)

    return {name: jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*shapes).compile()
            .memory_analysis().temp_size_in_bytes
            for name, f in (("plain", plain_loss), ("blockwise", blockwise_loss))}
