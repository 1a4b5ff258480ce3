"""llama_jax: the Llama architecture as one readable, pure-functional JAX module.

It is written in two parts. Part I is the reading path: everything a learner
needs to understand Llama and train it on one device, top to bottom.

    1. configuration          ModelConfig (architecture), TrainConfig (optimisation)
    2. tokenizer and data     an offline GPT-2 tokenizer, text loading, batches
    3. layers                 rms_norm, rotary embeddings, attention, SwiGLU
    4. model                  init_params, init_cache, model_forward
    5. loss and optimizer     cross-entropy, AdamW, a jitted train_step
    6. training               train_loop: a plain loop with evaluation
    7. sampling               generate: a KV cache and one compiled decode loop

Part I alone trains and samples a model:

    import jax, llama_jax as L
    config, tc = L.ModelConfig(), L.TrainConfig()  # the cpu preset's sizes, float32
    train, val = L.load_dataset(L.DEFAULT_DATA, tc.seq_len)  # Shakespeare, GPT-2 tokens
    params, opt_state, history = L.train_loop(config, tc, train, val)
    enc = L.get_tokenizer()
    tokens = L.generate(params, enc.encode_ordinary("ROMEO:"), 100, config,
                        jax.random.PRNGKey(0), temperature=0.8, top_k=50)
    print(enc.decode(tokens))

Part II grows it. Each feature composes with Part I from outside: it wraps a
Part I function, passes its own function where Part I takes one with a plain
default, or places arrays on devices around a jitted call. No Part I function
asks which feature is on, and Part I never calls anything Part II defines
(its error messages do name the command line's flags).
Part II reads top to bottom too: each section uses only Part I and the
sections above it (test_llama_jax.py checks both).

    8. settings               RunModelConfig, RunTrainConfig: Part II's options
    9. run health             per-layer figures from each step, metrics.jsonl
   10. speed                  faster kernels and sampling, the blockwise loss, remat
   11. token files            --prepare: your own text, tokenized once to disk
   12. Muon                   --optimizer muon: orthogonalised updates for the matrices
   13. LoRA                   low-rank adapters over a frozen model
   14. many devices           a mesh, FSDP, Part II's training step, --plan, many hosts
   15. checkpoints, formats   our .npz, Hugging Face safetensors, GGUF, tokenizers
   16. chat                   chat formats and streaming
   17. fine-tuning            --init-from a pretrained model, chat data, --export-hf
   18. the full run           train(): resume, signals, time budgets; --eval
   19. command line           presets, python llama_jax.py --help, what each mode runs
   20. benchmarks             --bench: training speed, MFU, decoding
   21. modes and main         the table of modes, and main

Shapes are written with these letters: B batch, T time (tokens), S the KV
cache's slots (generate sizes the cache to the request, at most max_seq_len),
D model width, H query heads, K key/value heads, G = H // K query heads per
key/value head, N either H or K (a function used for both), Dh head width, F
feed-forward width, V vocabulary, V_padded the vocabulary rounded up to a
multiple of vocab_multiple (the embedding's and output layer's width).

Parameters are a nested dict of arrays (a pytree); every Part I function is
pure (it mutates none of its arguments) and takes what it needs as arguments.
One thing to know: train_step donates its params and opt_state to XLA, which
writes the new ones into the same memory, so the caller keeps the returned
ones (as every loop here does). Importing this module does no work.
"""

import base64
import dataclasses
import functools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

HERE = Path(__file__).resolve().parent
GPT2_TIKTOKEN = HERE / "gpt2.tiktoken"
DEFAULT_DATA = HERE / "shakespeare.txt"


class InputError(ValueError):
    """Bad input from the user (a flag, a file, a prompt). The command line
    prints its message, which names the value and the fix, without a traceback."""


# =============================================================================
# 1. Configuration
# =============================================================================


@dataclass(frozen=True)
class ModelConfig:
    """The architecture. Frozen, so it is hashable and can be a static argument
    of jax.jit. Field names follow Meta's reference model.py where it has the
    field. The defaults are the cpu preset's model (PRESETS, section 19: what
    `python llama_jax.py` trains on a CPU), in float32 (the preset's dtype is
    "auto": Part II picks float32 or bfloat16 for the machine, section 10)."""

    vocab_size: int = 50257  # GPT-2's BPE: 50,000 merges + 256 bytes + <|endoftext|>
    dim: int = 128  # D, the width of the residual stream
    n_layers: int = 6
    n_heads: int = 4  # H query heads
    n_kv_heads: int = 2  # K key/value heads; K < H is grouped-query attention
    # Dh; None means dim // n_heads. Hugging Face configs may state it apart
    # from dim (config.json's head_dim), and then it is read from there.
    head_dim: int | None = None
    ffn_dim: int | None = None  # F; None means Llama's rule, see ffn_width
    ffn_dim_multiplier: float | None = None  # Llama's rule, e.g. 1.3 in Llama 2 70B
    # Llama's rule rounds F up to a multiple of this: 256 in Meta's 7B; 32 keeps
    # a small model's F near 8/3 D (D = 128: 341 -> 352, not 512).
    multiple_of: int = 32
    norm_eps: float = 1e-5  # the RMSNorm epsilon of Llama 2 and Llama 3
    rope_theta: float = 10000.0  # Llama 2: 1e4, Llama 3: 5e5
    # Llama 3.1's RoPE frequency scaling: (factor, low_freq_factor,
    # high_freq_factor, original_max_position_embeddings), or None for plain RoPE.
    rope_scaling: tuple | None = None
    # The longest sequence (the RoPE tables' length); a KV cache holds at most
    # this many positions (generate sizes its cache to the request).
    max_seq_len: int = 256
    # Llama itself has no dropout; a small model that sees its data many
    # times may need it (the gpu preset uses 0.2).
    dropout_rate: float = 0.0
    # Share the input embedding with the output layer (GPT-2, Llama 3.2 1B and
    # 3B do; Llama 2 and Llama 3 8B keep two matrices).
    tie_embeddings: bool = True
    # Padding, part of the architecture: it sets the embedding's shape.
    vocab_multiple: int = 64  # pad the vocabulary to a multiple of this for speed
    # Numerics, not architecture: a checkpoint loads under any value of this.
    compute_dtype: str = "float32"  # "bfloat16": matmul inputs in bf16 (see dense)

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads",
                     "multiple_of", "max_seq_len", "vocab_multiple"):
            if getattr(self, name) <= 0:
                raise InputError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("head_dim", "ffn_dim", "ffn_dim_multiplier"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise InputError(f"ModelConfig.{name} must be positive or None, got {value}")
        if self.head_dim is None and self.dim % self.n_heads:
            raise InputError(f"ModelConfig: dim ({self.dim}) must be divisible by n_heads "
                             f"({self.n_heads}) so that each head gets dim // n_heads channels")
        if self.n_heads % self.n_kv_heads:
            raise InputError(f"ModelConfig: n_heads ({self.n_heads}) must be divisible by "
                             f"n_kv_heads ({self.n_kv_heads}): each K/V head serves a whole "
                             "group of query heads")
        if self.head_width % 2:
            raise InputError(f"ModelConfig: the head width ({self.head_width}) must be even: "
                             "rotary embeddings rotate pairs of channels")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise InputError(f"ModelConfig.dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise InputError("ModelConfig: norm_eps and rope_theta must be positive")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise InputError(f"ModelConfig.compute_dtype must be 'float32' or 'bfloat16', "
                             f"got {self.compute_dtype!r}")
        if self.rope_scaling is not None and len(self.rope_scaling) != 4:
            raise InputError("ModelConfig.rope_scaling must be (factor, low_freq_factor, "
                             "high_freq_factor, original_max_position_embeddings)")

    @property
    def head_width(self):
        """Dh."""
        return self.head_dim or self.dim // self.n_heads

    @property
    def ffn_width(self):
        """F. Llama's rule: SwiGLU has three matrices instead of two, so 2/3 of
        the usual 4 * dim keeps the parameter count of a plain 4x MLP."""
        if self.ffn_dim is not None:
            return self.ffn_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @property
    def padded_vocab(self):
        """V rounded up to vocab_multiple (50257 -> 50304): matmul kernels are
        faster on round sizes (nanoGPT's trick). model_forward slices the padded
        logits off (Part II's losses mask them)."""
        return self.vocab_multiple * math.ceil(self.vocab_size / self.vocab_multiple)

    @property
    def dtype(self):
        return jnp.bfloat16 if self.compute_dtype == "bfloat16" else jnp.float32


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings: everything a training run needs beyond the model.
    The defaults are the cpu preset's (PRESETS, section 19)."""

    steps: int = 1000
    batch_size: int = 8  # B sequences per step
    seq_len: int = 128  # T tokens per sequence (at most max_seq_len)
    lr: float = 3e-3  # peak learning rate
    min_lr: float = 1.5e-4  # the cosine decays to this floor
    warmup_steps: int = 50  # linear warmup from ~0 to lr
    weight_decay: float = 0.1  # decoupled (AdamW), on matrices only
    beta1: float = 0.9
    beta2: float = 0.95  # 0.95 rather than 0.999, as in Llama and GPT-3 training
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clipping, as in the Llama papers
    eval_every: int = 100  # evaluate (and, in Part II, plot and checkpoint) this often
    eval_batches: int = 8  # fixed windows per split for each evaluation
    log_every: int = 25  # a progress line every this many steps
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "log_every"):
            if getattr(self, name) <= 0:
                raise InputError(f"TrainConfig.{name} (--{name.replace('_', '-')}) must be "
                                 f"positive, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise InputError(f"TrainConfig: need 0 <= min_lr <= lr and lr > 0, got "
                             f"lr={self.lr}, min_lr={self.min_lr}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip <= 0:
            raise InputError("TrainConfig: warmup_steps and weight_decay must be >= 0, "
                             "grad_clip > 0")


# =============================================================================
# 2. Tokenizer and data
# =============================================================================

# GPT-2's pre-tokenizer: split text into words, numbers, punctuation runs and
# whitespace before BPE merges are applied inside each piece (from OpenAI's
# encoder.py, the same pattern tiktoken calls r50k).
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"


def read_bpe_ranks(path):
    """Reads a tiktoken BPE file (one 'base64(token) rank' per line) into
    {token bytes: rank}. The same format holds GPT-2's ranks and Llama 3's
    tokenizer.model."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"tokenizer file {path} not found: it ships with llama_jax "
                         "(restore it with `git checkout gpt2.tiktoken`)")
    ranks = {}
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as err:
            raise InputError(f"{path}, line {number}: not a tiktoken BPE line "
                             "('base64-token rank')") from err
    return ranks


@functools.lru_cache(maxsize=None)
def get_tokenizer():
    """GPT-2's tokenizer as a tiktoken.Encoding, built from the gpt2.tiktoken
    file shipped beside this module. tiktoken.get_encoding("gpt2") would
    download the same ranks at run time; this needs no network."""
    import tiktoken

    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_SPLIT_PATTERN,
                             mergeable_ranks=read_bpe_ranks(GPT2_TIKTOKEN),
                             special_tokens={ENDOFTEXT: 50256}, explicit_n_vocab=50257)


def load_text(path):
    """Reads a UTF-8 text file, or raises InputError saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file {path} not found: pass --data PATH to a UTF-8 text file "
                         f"(the repository ships {DEFAULT_DATA.name}) or to a data set made by "
                         "--prepare (NAME.json)")
    raw = path.read_bytes()
    if not raw.strip():
        raise InputError(f"data file {path} is empty: it needs some text to train on")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"data file {path} is not UTF-8 text (byte {err.start} is "
                         f"0x{raw[err.start]:02x}): convert it, e.g. with iconv -t utf-8") from err


def split_tokens(tokens, seq_len, name="the data"):
    """int32[N] -> (train int32[N_train], val int32[N - N_train]). The last 10%
    is validation, so validation text follows training text and never overlaps
    it. Both parts must hold a window of seq_len + 1 tokens (inputs + targets)."""
    n_train = int(0.9 * len(tokens))
    need = seq_len + 1
    if n_train < need or len(tokens) - n_train < need:
        minimum = need
        while int(0.9 * minimum) < need or minimum - int(0.9 * minimum) < need:
            minimum += 1
        raise InputError(f"{name} has {len(tokens)} tokens; at --seq-len {seq_len} it needs at "
                         f"least {minimum} (one window of {need} tokens in the 90% training "
                         "part and one in the 10% validation part): use more text or a "
                         "smaller --seq-len")
    return tokens[:n_train], tokens[n_train:]


def load_dataset(path, seq_len, enc=None):
    """Text file -> (train, val) token arrays, int32, tokenized by enc (default
    GPT-2's)."""
    text = load_text(path)
    tokens = np.asarray((enc or get_tokenizer()).encode_ordinary(text), dtype=np.int32)
    return split_tokens(tokens, seq_len, name=f"data file {path}")


def window_starts(key, n_tokens, batch_size, seq_len):
    """Where a batch's windows start: int32[B] positions, uniform in
    [0, n_tokens - seq_len). The one rule every batch is drawn by, on the
    device (get_batch) and on the host (token files, evaluation windows), so
    the same key gives the same windows everywhere."""
    return jax.random.randint(key, (batch_size,), 0, n_tokens - seq_len)


def read_windows(data, starts, length):
    """Token windows on the host: data int[N] (an array, a memmap, or anything
    indexed as one, such as Part II's token files), starts int[B]
    -> int32[B, length]."""
    return np.asarray(data[np.asarray(starts)[:, None] + np.arange(length)], np.int32)


def get_batch(key, data, batch_size, seq_len):
    """Random windows of a token array, drawn on the device (fastest inside jit).
    data: int32[N] -> (inputs int32[B, T], targets int32[B, T]), where the
    targets are the inputs shifted one token to the left."""
    starts = window_starts(key, data.shape[0], batch_size, seq_len)
    windows = data[starts[:, None] + jnp.arange(seq_len + 1)]  # [B, T + 1]
    return windows[:, :-1], windows[:, 1:]


# =============================================================================
# 3. Layers
# =============================================================================


def at_least_f32(x):
    """x in float32, or float64 if it already is (the gradient tests run in
    float64): statistics and softmax never run in bfloat16."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def dense(x, w, config):
    """x @ w: [..., I] @ [I, O] -> [..., O]. Under bfloat16 compute both
    operands are rounded to bfloat16 and their products summed in float32
    (mixed precision: half the bytes moved, and a GPU's tensor cores), so the
    activations between matmuls stay float32; otherwise a plain matmul."""
    if config.compute_dtype == "bfloat16":
        return jnp.dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                       preferred_element_type=jnp.float32)
    return x @ w


def rms_norm(x, weight, eps):
    """Root-mean-square layer norm (Zhang & Sennrich 2019): no mean subtraction,
    no bias. x: [..., D], weight: [D] -> [..., D]. Statistics in at least
    float32, whatever x's dtype (decoding in bfloat16, decoding_weights in
    section 7, gives bfloat16 embeddings), so that small variance terms are
    not lost."""
    x32 = at_least_f32(x)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * weight).astype(x.dtype)


@functools.lru_cache(maxsize=None)
def precompute_rope(head_width, max_seq_len, theta, scaling=None):
    """Rotary embedding tables (Su et al. 2021) as NumPy constants.
    -> (cos, sin), each float32[max_seq_len, Dh / 2]. Channel pair i rotates at frequency
    theta^(-2i / Dh) radians per position. With Llama 3.1 scaling, slow
    (long-wavelength) frequencies are divided by `factor`, fast ones are kept,
    and those in between are interpolated smoothly."""
    inv_freq = theta ** (-np.arange(0, head_width, 2, dtype=np.float64) / head_width)
    if scaling is not None:
        factor, low_freq_factor, high_freq_factor, original_len = scaling
        wavelen = 2 * np.pi / inv_freq
        smooth = np.clip((original_len / wavelen - low_freq_factor)
                         / (high_freq_factor - low_freq_factor), 0.0, 1.0)
        # smooth is 0 for wavelengths longer than original_len / low_freq_factor
        # (fully scaled) and 1 below original_len / high_freq_factor (unscaled).
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    angles = np.outer(np.arange(max_seq_len), inv_freq)  # [S, Dh / 2]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x, cos, sin):
    """Rotates channel pairs of queries or keys by their position's angle.
    x: [B, T, N, Dh], cos/sin: [B or 1, T, Dh/2] -> [B, T, N, Dh].
    The "half-split" layout pairs channel i with channel i + Dh/2 (Hugging
    Face's rotate_half). Meta's reference pairs 2i with 2i + 1 instead; the two
    agree once each head's output channels of wq and wk (our columns, Meta's
    rows) are permuted (test_llama_jax.py checks it)."""
    x1, x2 = jnp.split(at_least_f32(x), 2, axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def attention_weights(q, k, mask):
    """softmax(q k^T / sqrt(Dh) + mask): how much each query attends to each
    key. Grouped-query: each of the K key/value heads serves G = H // K query
    heads; we reshape the queries into groups rather than copy K G times.
    q: [B, T, H, Dh], k: [B, S, K, Dh], mask: bool[B or 1, T, S] (True = may
    attend) -> float32[B, K, G, T, S], rows summing to 1."""
    B, T, H, Dh = q.shape
    K = k.shape[2]
    q = q.reshape(B, T, K, H // K, Dh)  # [B, T, K, G, Dh]
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k,  # [B, K, G, T, S]
                        preferred_element_type=jnp.promote_types(q.dtype, jnp.float32))
    scores = scores / np.sqrt(Dh)
    scores = jnp.where(mask[:, None, None, :, :], scores, -1e30)  # finite: no NaN rows
    return jax.nn.softmax(scores, axis=-1)  # in float32 even for bfloat16 inputs


def attend(q, k, v, mask):
    """softmax(q k^T / sqrt(Dh) + mask) v: each query's weighted mean of the
    values. q: [B, T, H, Dh], k, v: [B, S, K, Dh], mask: bool[B or 1, T, S]
    -> [B, T, H, Dh]."""
    B, T, H, Dh = q.shape
    probs = attention_weights(q, k, mask).astype(v.dtype)  # [B, K, G, T, S]
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)  # [B, T, K, G, Dh]
    return out.reshape(B, T, H, Dh)


# Part I's seams are parameters whose default is Part I's own function:
# `dense` (above) and `attend` here, `block` in forward_hidden and `sample`
# in generate. Part II's training step gives forward_hidden a block with its
# bfloat16 matmul (a hand-written gradient) and, where a preset chooses it,
# the fused attention kernel bound as dense= and attend= (section 10);
# everything else runs these.


def attention_qkv(p, x, cos, sin, config, dense=dense):
    """The queries, keys and values of x, with rotary positions on q and k.
    p: the attention's weights (see attention), x: [B, T, D], cos/sin:
    [B or 1, T, Dh/2] -> q [B, T, H, Dh], k [B, T, K, Dh], v [B, T, K, Dh]."""
    B, T, _ = x.shape
    H, K, Dh = config.n_heads, config.n_kv_heads, config.head_width
    q = apply_rope(dense(x, p["wq"], config).reshape(B, T, H, Dh), cos, sin)  # [B, T, H, Dh]
    k = apply_rope(dense(x, p["wk"], config).reshape(B, T, K, Dh), cos, sin)  # [B, T, K, Dh]
    v = dense(x, p["wv"], config).reshape(B, T, K, Dh)  # [B, T, K, Dh]
    return q, k, v


def attention(p, x, cos, sin, mask, config, cache=None, position=None, dense=dense,
              attend=attend):
    """Multi-head self-attention with grouped K/V heads and rotary positions.
    p: {"wq": [D, H*Dh], "wk": [D, K*Dh], "wv": [D, K*Dh], "wo": [H*Dh, D]},
    x: [B, T, D], cos/sin: [B or 1, T, Dh/2], mask: bool[B or 1, T, S], True
    where a query may attend to a key. Without a cache, S = T and the mask is
    causal. With a cache ({"k", "v"}: [B, S, K, Dh]), the new keys and values
    are written at `position` (int32[B]) and the queries attend to the cache.
    -> ([B, T, D], updated cache or None)."""
    B, T, _ = x.shape
    H, Dh = config.n_heads, config.head_width
    q, k, v = attention_qkv(p, x, cos, sin, config, dense)
    if cache is not None:
        # One dynamic_update_slice per row: each row may be at its own position.
        write = jax.vmap(lambda c, new, pos: jax.lax.dynamic_update_slice(c, new, (pos, 0, 0)))
        cache = {"k": write(cache["k"], k.astype(cache["k"].dtype), position),
                 "v": write(cache["v"], v.astype(cache["v"].dtype), position)}
        k, v = cache["k"], cache["v"]
    out = attend(q, k, v, mask)  # [B, T, H, Dh]
    return dense(out.reshape(B, T, H * Dh), p["wo"], config), cache  # [B, T, D]


def feed_forward(p, x, config, dense=dense):
    """SwiGLU (Shazeer 2020): w2(silu(x w1) * (x w3)).
    p: {"w1": [D, F], "w3": [D, F], "w2": [F, D]}, x: [B, T, D] -> [B, T, D]."""
    gate = jax.nn.silu(dense(x, p["w1"], config))
    return dense(gate * dense(x, p["w3"], config), p["w2"], config)


def dropout(x, rate, key):
    """Inverted dropout: zero a fraction `rate` of x and scale the rest by
    1 / (1 - rate), so the expected value is unchanged. x: any shape."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def transformer_block(p, x, cos, sin, mask, config, cache=None, position=None, key=None,
                      dense=dense, attend=attend):
    """Pre-norm residual block: x = x + attention(norm(x)), then x + ffn(norm(x)).
    x: [B, T, D] -> ([B, T, D], cache). With a key, dropout is applied to both
    branch outputs before they join the residual stream."""
    eps = config.norm_eps
    h, cache = attention(p["attention"], rms_norm(x, p["attention_norm"], eps), cos, sin,
                         mask, config, cache, position, dense, attend)
    if key is not None:
        key, sub = jax.random.split(key)
        h = dropout(h, config.dropout_rate, sub)
    x = x + h
    h = feed_forward(p["feed_forward"], rms_norm(x, p["ffn_norm"], eps), config, dense)
    if key is not None:
        h = dropout(h, config.dropout_rate, key)
    return x + h, cache


# =============================================================================
# 4. Model
# =============================================================================

def init_params(key, config):
    """-> the parameter pytree, float32. Weights are normal with std 0.02 (GPT-2
    and nanoGPT); the two projections that write into the residual stream (wo,
    w2) get 0.02 / sqrt(2 * n_layers), so the stream's variance does not grow
    with depth (GPT-2 paper, section 2.3). Norm weights start at 1. Rows of the
    embedding and columns of the output beyond vocab_size (padding) are zero."""
    D, H, K, Dh, F = (config.dim, config.n_heads, config.n_kv_heads, config.head_width,
                      config.ffn_width)
    std, out_std = 0.02, 0.02 / math.sqrt(2 * config.n_layers)
    keys = iter(jax.random.split(key, 2 + 7 * config.n_layers))

    def normal(shape, scale=std):
        return scale * jax.random.normal(next(keys), shape, jnp.float32)

    def pad_vocab(w, axis):
        mask = (jnp.arange(config.padded_vocab) < config.vocab_size)
        return w * jnp.expand_dims(mask, 1 - axis).astype(w.dtype)

    params = {"tok_embeddings": pad_vocab(normal((config.padded_vocab, D)), 0), "layers": []}
    for _ in range(config.n_layers):
        params["layers"].append({
            "attention_norm": jnp.ones((D,)),
            "attention": {"wq": normal((D, H * Dh)), "wk": normal((D, K * Dh)),
                          "wv": normal((D, K * Dh)), "wo": normal((H * Dh, D), out_std)},
            "ffn_norm": jnp.ones((D,)),
            "feed_forward": {"w1": normal((D, F)), "w2": normal((F, D), out_std),
                             "w3": normal((D, F))},
        })
    params["norm"] = jnp.ones((D,))
    # Drawn even when tied and unused, so that a tied and an untied model get
    # the same keys, and so the same values, for every other weight.
    output = normal((D, config.padded_vocab))
    if not config.tie_embeddings:
        params["output"] = pad_vocab(output, 1)
    return params


def count_params(params):
    return sum(x.size for x in jax.tree_util.tree_leaves(params))


def init_cache(config, batch_size, length=None):
    """A KV cache with room for `length` positions (default max_seq_len): a
    list over layers of {"k", "v"}: zeros[B, S, K, Dh] in the compute dtype.
    Preallocated, so its shape never changes while decoding and nothing
    recompiles per token. generate sizes it to the request (decoding_shapes)."""
    shape = (batch_size, length or config.max_seq_len, config.n_kv_heads, config.head_width)
    return [{"k": jnp.zeros(shape, config.dtype), "v": jnp.zeros(shape, config.dtype)}
            for _ in range(config.n_layers)]


def output_weight(params):
    """The output projection, [D, V_padded]: its own matrix, or the transposed
    input embedding when they are tied."""
    return params["output"] if "output" in params else params["tok_embeddings"].T


# The forward pass in two steps: forward_hidden runs the embedding and the
# blocks up to the final norm (building the one attention mask every block
# uses), and model_forward applies the output layer. Part II's loss starts
# from forward_hidden's hidden states (its blockwise loss never makes the
# logits, section 10).


def forward_hidden(params, tokens, config, cache=None, position=0, training=False, key=None,
                   block=transformer_block):
    """The transformer up to the final norm. tokens: int32[B, T] -> (h [B, T, D],
    a list over layers of each block's second output: its updated cache, or
    None without one). See model_forward for the other arguments. block: the
    function each layer runs; Part II passes its own with the same arguments
    (faster kernels or recomputed activations, section 10; health figures in
    place of the cache, section 9)."""
    B, T = tokens.shape
    dropout_on = training and config.dropout_rate > 0
    if dropout_on and key is None:
        raise InputError("model_forward(training=True) with dropout needs a PRNG key")
    h = params["tok_embeddings"][tokens]  # [B, T, D]
    S = T if cache is None else cache[0]["k"].shape[1]  # the positions there can be
    cos, sin = precompute_rope(config.head_width, S, config.rope_theta, config.rope_scaling)
    if cache is None:
        cos, sin = cos[None], sin[None]  # [1, T, Dh/2]
        mask = jnp.tril(jnp.ones((1, T, T), dtype=bool))  # causal: query t sees keys <= t
        position = None
    else:
        position = jnp.broadcast_to(jnp.asarray(position, jnp.int32), (B,))
        positions = position[:, None] + jnp.arange(T)  # [B, T]
        cos, sin = jnp.asarray(cos)[positions], jnp.asarray(sin)[positions]  # [B, T, Dh/2]
        # Query at position p sees cache slots 0..p: earlier tokens and itself.
        # Slots past p may hold the keys of a shorter prompt's padding (see
        # generate); they are masked now and overwritten before they are seen.
        mask = jnp.arange(S)[None, None, :] <= positions[:, :, None]  # [B, T, S]
    layer_keys = [None] * config.n_layers
    if dropout_on:
        layer_keys = list(jax.random.split(key, config.n_layers))
        h = dropout(h, config.dropout_rate, jax.random.fold_in(key, config.n_layers))
    outputs = []
    for i, layer in enumerate(params["layers"]):
        h, out = block(layer, h, cos, sin, mask, config, None if cache is None else cache[i],
                       position, layer_keys[i])
        outputs.append(out)
    return rms_norm(h, params["norm"], config.norm_eps), outputs


def output_logits(params, h, config):
    """h: [B, T, D] -> float32[B, T, V_padded] (float64 for float64 params)."""
    return at_least_f32(dense(h, output_weight(params), config))


def model_forward(params, tokens, config, cache=None, position=0, training=False, key=None):
    """The Llama forward pass.
    tokens: int32[B, T]. Without a cache: causal attention over the T tokens.
    With a cache (from init_cache): the tokens sit at positions position ..
    position + T - 1 (position: a scalar or int32[B], traced is fine), their
    keys and values are written there, and they attend to every earlier slot.
    training=True applies dropout with `key`.
    -> (logits float32[B, T, vocab_size], the updated cache or None)."""
    h, new_cache = forward_hidden(params, tokens, config, cache, position, training, key)
    logits = output_logits(params, h, config)[..., :config.vocab_size]
    return logits, (None if cache is None else new_cache)


# =============================================================================
# 5. Loss and optimizer
# =============================================================================


def cross_entropy(logits, targets):
    """Mean cross-entropy in nats: logits float32[..., V], targets int32[...]
    -> scalar. logsumexp(logits) - logit[target] is -log softmax(logits)[target],
    computed without exponentiating a large number."""
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - target_logits)


def compute_loss(params, batch, config, training=False, key=None):
    """Mean next-token cross-entropy of a batch: (inputs, targets), each
    int32[B, T] -> float32 scalar. training=True applies dropout with key."""
    inputs, targets = batch
    logits, _ = model_forward(params, inputs, config, training=training, key=key)
    return cross_entropy(logits, targets)


def learning_rate(step, tc):
    """Linear warmup to tc.lr over warmup_steps, then a cosine down to tc.min_lr
    at the last step (step tc.steps - 1, counting from 0), and min_lr after it;
    works on ints and traced arrays."""
    total = tc.steps
    step = jnp.asarray(step, jnp.float32)
    warm = tc.lr * (step + 1) / max(tc.warmup_steps, 1)
    progress = jnp.clip((step - tc.warmup_steps) / max(total - 1 - tc.warmup_steps, 1), 0, 1)
    cosine = tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < tc.warmup_steps, warm, cosine)


def adamw_init(params):
    """Optimizer state: first and second moments (float32, like params) and the
    number of updates taken."""
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    return {"mu": zeros, "nu": jax.tree_util.tree_map(jnp.zeros_like, params),
            "step": jnp.zeros((), jnp.int32)}


def global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                        for x in jax.tree_util.tree_leaves(tree)))


def adamw_update(params, grads, state, lr, tc):
    """One AdamW step (Loshchilov & Hutter 2019) after global-norm clipping.
    Weight decay is decoupled (p -= lr * wd * p) and applied to matrices only:
    decaying norm gains towards 0 would fight their role as scales.
    -> (new params, new state)."""
    norm = global_norm(grads)
    grads = jax.tree_util.tree_map(lambda g: g * jnp.minimum(1.0, tc.grad_clip / (norm + 1e-6)),
                                   grads)
    t = state["step"] + 1
    mu = jax.tree_util.tree_map(lambda m, g: tc.beta1 * m + (1 - tc.beta1) * g, state["mu"], grads)
    nu = jax.tree_util.tree_map(lambda v, g: tc.beta2 * v + (1 - tc.beta2) * g * g,
                                state["nu"], grads)
    mu_scale, nu_scale = 1 / (1 - tc.beta1 ** t), 1 / (1 - tc.beta2 ** t)  # bias correction

    def step(p, m, v):
        decay = tc.weight_decay * p if p.ndim > 1 else 0.0
        return p - lr * (m * mu_scale / (jnp.sqrt(v * nu_scale) + tc.eps) + decay)

    params = jax.tree_util.tree_map(step, params, mu, nu)
    return params, {"mu": mu, "nu": nu, "step": t}


STREAMS = ("init", "batches", "dropout")


def run_keys(seed_key):
    """A run's random streams, one per use, so that no two uses share a key:
    {"init": the parameters, "batches": the training windows' positions,
    "dropout": the dropout masks}, each fold_in(seed_key, its number in
    STREAMS), where seed_key = jax.random.PRNGKey(seed). Evaluation windows
    have their own fixed key (fixed_windows), the same for every seed, so
    that runs are evaluated on the same text."""
    return {name: jax.random.fold_in(seed_key, i) for i, name in enumerate(STREAMS)}


def step_keys(keys, step):
    """One training step's (batch key, dropout key): its stream's key folded
    with the step number (which may be traced), and nothing else, so a resumed
    run draws exactly the batches and masks an uninterrupted one would."""
    return jax.random.fold_in(keys["batches"], step), jax.random.fold_in(keys["dropout"], step)


@functools.partial(jax.jit, static_argnames=("config", "tc"),
                   donate_argnames=("params", "opt_state"))
def train_step(params, opt_state, batch, key, config, tc):
    """One optimisation step, compiled once: the loss of a batch and its
    gradients (dropout drawn with `key`), then AdamW at the schedule's
    learning rate. batch: (inputs, targets) int32[B, T]. params and opt_state
    are donated: XLA updates them in place instead of keeping two copies, so
    the caller must use the returned ones.
    -> (params, opt_state, loss)."""
    loss, grads = jax.value_and_grad(compute_loss)(params, batch, config, True, key)
    lr = learning_rate(opt_state["step"], tc)
    params, opt_state = adamw_update(params, grads, opt_state, lr, tc)
    return params, opt_state, loss


eval_loss = jax.jit(compute_loss, static_argnames=("config",))


# =============================================================================
# 6. Training
# =============================================================================


def fixed_windows(data, n_batches, batch_size, seq_len, seed=1234):
    """The same evaluation batches every time, so successive evaluations (and
    runs) are comparable: the windows get_batch would draw with these keys,
    read on the host (data may be a token file). -> list of (inputs, targets)
    pairs, int32[B, T]."""
    batches = []
    for k in jax.random.split(jax.random.PRNGKey(seed), n_batches):
        windows = read_windows(data, window_starts(k, len(data), batch_size, seq_len),
                               seq_len + 1)
        batches.append((jnp.asarray(windows[:, :-1]), jnp.asarray(windows[:, 1:])))
    return batches


def evaluate(params, config, batches):
    """Mean loss over fixed batches, dropout off."""
    return float(np.mean([float(eval_loss(params, b, config)) for b in batches]))


def format_duration(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_line(done, tc, loss, lr, seconds_per_step):
    """The one-line report of step `done`: loss, learning rate, speed and the
    time left at that speed."""
    return (f"step {done:5d}/{tc.steps} | loss {loss:.4f} | lr {lr:.2e} | "
            f"{seconds_per_step * 1e3:6.0f} ms/step | "
            f"{tc.batch_size * tc.seq_len / seconds_per_step:8,.0f} tok/s | "
            f"ETA {format_duration(seconds_per_step * (tc.steps - done))}")


# The training loop, flat as nanoGPT's train.py: keys, a batch, a step, now and
# then a progress line and an evaluation. It reads a loss (which waits for the
# device) only when it prints one, so Python queues the next steps meanwhile.
# `python llama_jax.py` runs Part II's train() (section 18) instead: the same
# pieces (step_keys, learning_rate, adamw_update, fixed_windows, evaluate,
# progress_line), plus checkpoints and exact resume, Ctrl-C, token files, many
# devices, time budgets and health figures. Written as hooks into this loop,
# they would bury it; so this loop stays the lesson, and Part II's is the tool.

_get_batch = jax.jit(get_batch, static_argnums=(2, 3))


def train_loop(config, tc, train_data, val_data, log=print):
    """Trains a fresh model on token arrays (load_dataset) and returns (params,
    opt_state, history): history["train"] holds [step, loss] for every step,
    history["eval"] [step, train loss, validation loss] for each evaluation."""
    if tc.seq_len > config.max_seq_len:
        raise InputError(f"--seq-len {tc.seq_len} is longer than the model's context "
                         f"(max_seq_len {config.max_seq_len}): lower --seq-len")
    keys = run_keys(jax.random.PRNGKey(tc.seed))
    params = init_params(keys["init"], config)
    opt_state = adamw_init(params)
    data = jnp.asarray(train_data)  # on the device, where each step draws its windows
    eval_sets = {name: fixed_windows(d, tc.eval_batches, tc.batch_size, tc.seq_len)
                 for name, d in (("train", train_data), ("val", val_data))}
    history, losses = {"train": [], "eval": []}, []  # losses: device scalars not read yet
    t_last, timed_from = time.perf_counter(), 0  # speed: the steps since timed_from
    for step in range(tc.steps):
        batch_key, dropout_key = step_keys(keys, step)
        batch = _get_batch(batch_key, data, tc.batch_size, tc.seq_len)
        params, opt_state, loss = train_step(params, opt_state, batch, dropout_key, config, tc)
        losses.append(loss)
        done = step + 1
        if done % tc.log_every == 0 or done == tc.steps:
            history["train"] += [[done - len(losses) + 1 + i, float(x)]
                                 for i, x in enumerate(losses)]
            now = time.perf_counter()
            log(progress_line(done, tc, history["train"][-1][1], float(learning_rate(step, tc)),
                              (now - t_last) / (done - timed_from)))
            losses, t_last, timed_from = [], now, done
        if done % tc.eval_every == 0 or done == tc.steps:
            train_loss, val_loss = (evaluate(params, config, eval_sets[s]) for s in ("train", "val"))
            history["eval"].append([done, train_loss, val_loss])
            log(f"eval  step {done:5d} | train {train_loss:.4f} | val {val_loss:.4f}")
            t_last, timed_from = time.perf_counter(), done  # evaluation time is not training speed
    return params, opt_state, history


# =============================================================================
# 7. Sampling
# =============================================================================


def top_k_filter(logits, top_k):
    """Keeps the top_k largest logits of each row (and any tied with the k-th);
    the rest get -inf. logits: float32[B, V] -> float32[B, V]."""
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1] the k-th largest
    return jnp.where(logits >= kth, logits, -jnp.inf)


def top_p_filter(logits, top_p):
    """Nucleus filtering (Holtzman et al. 2019): keeps the smallest set of most
    likely tokens whose probabilities sum to at least top_p (and any tied with
    the last one kept); the rest get -inf. logits: float32[B, V] -> float32[B, V]."""
    probs = jax.nn.softmax(logits, axis=-1)
    ranked = -jnp.sort(-probs, axis=-1)  # [B, V] each row's probabilities, largest first
    before = jnp.cumsum(ranked, axis=-1) - ranked  # the mass of the tokens ranked above
    # A token is kept while the mass above it is short of top_p (the factor
    # forgives float rounding in sums that should equal top_p exactly).
    n_kept = jnp.sum(before < top_p * (1 - 1e-6), axis=-1, keepdims=True)  # [B, 1], >= 1
    smallest = jnp.take_along_axis(ranked, n_kept - 1, axis=-1)  # [B, 1]
    return jnp.where(probs >= smallest, logits, -jnp.inf)


def sample_token(key, logits, temperature, top_k=None, top_p=1.0):
    """Draws one token per row. logits: float32[B, V] -> int32[B].
    temperature 0 is greedy (argmax); otherwise logits / temperature, then the
    top_k most likely (if given), then the top_p nucleus (if < 1), then a draw
    from the softmax of what is left."""
    greedy = jnp.argmax(logits, axis=-1)
    logits = logits / jnp.maximum(temperature, 1e-6)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    sampled = jax.random.categorical(key, logits, axis=-1)
    return jnp.where(temperature == 0, greedy, sampled).astype(jnp.int32)


def _bucket(n, smallest=16):
    """Rounds up to a power of two, so that a handful of shapes get compiled."""
    return max(smallest, 1 << max(0, n - 1).bit_length())


def decoding_shapes(longest, max_new_tokens, config):
    """The compiled shapes of a request: (width, the prompts' bucket; n_slots,
    the new tokens' bucket; cache_len, the KV cache's slots). The cache holds
    the request, not the model's context: Llama 3.1 and 3.2 declare 131,072
    positions, and every new token attends over all cache slots."""
    width = min(_bucket(longest), config.max_seq_len)
    n_slots = _bucket(max_new_tokens, smallest=32)
    return width, n_slots, min(width + n_slots, config.max_seq_len)


def decoding_weights(params, config):
    """With bfloat16 compute, the matrices rounded to bfloat16 once, not once
    per token; otherwise params unchanged."""
    if config.compute_dtype != "bfloat16":
        return params
    return jax.tree_util.tree_map(lambda w: w.astype(config.dtype) if w.ndim > 1 else w, params)


def sampling_filters(top_k, top_p, config):
    """generate's top_k and top_p as the static arguments of the compiled
    programs: top_k at most the vocabulary, top_p 1.0 (off) for None."""
    return (None if top_k is None else min(int(top_k), config.vocab_size),
            1.0 if top_p is None else float(top_p))


def check_generate_args(prompts, max_new_tokens, config, temperature, top_k, top_p):
    """Raises InputError naming the first bad argument of generate."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("generate: every prompt needs at least one token (e.g. <|endoftext|>)")
    if any(t < 0 or t >= config.vocab_size for p in prompts for t in p):
        raise InputError(f"generate: token ids must be in [0, {config.vocab_size})")
    if max_new_tokens < 0:
        raise InputError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise InputError(f"generate: temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise InputError(f"generate: top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise InputError(f"generate: top_p must be in (0, 1] or None, got {top_p}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > config.max_seq_len:
        raise InputError(f"generate: the prompt ({longest} tokens) plus max_new_tokens "
                         f"({max_new_tokens}) is {longest + max_new_tokens}, more than the "
                         f"model's context of {config.max_seq_len} tokens: shorten the prompt "
                         "or ask for fewer tokens")


@functools.partial(jax.jit, static_argnames=("config", "top_k", "top_p", "n_slots", "cache_len",
                                             "sample"))
def _generate(params, prompts, lengths, key, temperature, n_new, stop_token, *, config, top_k,
              top_p, n_slots, cache_len, sample):
    """The compiled part of generate. prompts: int32[B, P] (right-padded),
    lengths: int32[B], n_new: how many tokens to draw (traced, <= n_slots).
    The cache is created here, so it never leaves the device; the decode loop is
    one lax.while_loop, so the whole generation is one XLA program.
    temperature, n_new and stop_token are traced: any value reuses the program.
    top_k and top_p are static (each new value compiles once) because they
    change the program's shape: whether a filter runs at all, and top_k is
    lax.top_k's output size.
    Right padding is harmless: the prefill writes the padding's keys and
    values into a short row's cache slots past its length, but the mask lets
    each query see only slots up to its own position, and each new token is
    written at its row's next position (lengths + i), over the padding, before
    any query can see that slot.
    The cache has cache_len slots (decoding_shapes), so a model with a long
    context decodes a short request as fast as a short-context model would.
    -> int32[B, n_slots]: the new tokens (after a row's stop token: the stop token)."""
    B = prompts.shape[0]
    params = decoding_weights(params, config)
    logits, cache = model_forward(params, prompts, config, init_cache(config, B, cache_len),
                                  position=0)
    last = logits[jnp.arange(B), lengths - 1]  # [B, V] each row's next-token logits
    out = jnp.full((B, n_slots), stop_token, jnp.int32)

    def cond(state):
        i, _, _, _, done, _ = state
        return (i < n_new) & ~jnp.all(done)

    def body(state):
        i, cache, last, out, done, key = state
        key, sub = jax.random.split(key)
        token = jnp.where(done, stop_token, sample(sub, last, temperature, top_k, top_p))
        out = out.at[:, i].set(token)
        done = done | (token == stop_token)
        logits, cache = model_forward(params, token[:, None], config, cache, lengths + i)
        return i + 1, cache, logits[:, 0], out, done, key

    state = (jnp.int32(0), cache, last, out, jnp.zeros((B,), bool), key)
    return jax.lax.while_loop(cond, body, state)[3]


def generate(params, prompt_tokens, max_new_tokens, config, key, temperature=1.0, top_k=None,
             top_p=None, stop_token=None, sample=sample_token):
    """Continues one prompt (a list of token ids) or a batch of them (a list of
    lists, lengths may differ). The prompts are prefilled into a KV cache in
    one forward pass, then tokens are drawn one at a time inside one compiled
    loop; compilation happens once per (batch size, prompt-length bucket,
    max_new_tokens bucket, top_k, top_p), never per token. Rows that draw
    stop_token stop there (the stop token ends their list). sample: a function
    with sample_token's arguments (Part II's command line passes a faster one,
    section 10).
    -> the prompt plus its new tokens, as a list of ints (or a list of such
    lists for a batch)."""
    single = len(prompt_tokens) > 0 and not isinstance(prompt_tokens[0], (list, tuple, np.ndarray))
    prompts = [list(map(int, p)) for p in ([prompt_tokens] if single else prompt_tokens)]
    check_generate_args(prompts, max_new_tokens, config, temperature, top_k, top_p)
    if max_new_tokens == 0:
        return prompts[0] if single else prompts
    width, n_slots, cache_len = decoding_shapes(max(len(p) for p in prompts), max_new_tokens,
                                                config)
    padded = np.zeros((len(prompts), width), np.int32)
    for row, p in enumerate(prompts):
        padded[row, :len(p)] = p
    top_k, top_p = sampling_filters(top_k, top_p, config)
    stop = -1 if stop_token is None else int(stop_token)
    new = _generate(params, padded, np.array([len(p) for p in prompts], np.int32), key,
                    jnp.float32(temperature), jnp.int32(max_new_tokens), jnp.int32(stop),
                    config=config, top_k=top_k, top_p=top_p, n_slots=n_slots,
                    cache_len=cache_len, sample=sample)
    results = []
    for p, row in zip(prompts, np.asarray(new)):
        row = row[:max_new_tokens].tolist()
        if stop in row:
            row = row[:row.index(stop) + 1]
        results.append(p + row)
    return results[0] if single else results


# #############################################################################
#
#                          Part II: growing it
#
# Everything below composes with Part I from outside. A reader of Part I can
# stop here: the model, its training and its sampling are complete above.
# #############################################################################

# What Part II needs beyond Part I's imports (here, so that Part I's list is
# only what the reading path uses).
import argparse  # noqa: E402
import codecs  # noqa: E402
import contextlib  # noqa: E402
import glob  # noqa: E402
import hashlib  # noqa: E402
import importlib.util  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from typing import NamedTuple  # noqa: E402

import ml_dtypes  # noqa: E402,F401  (installed with jax: gives NumPy a bfloat16 dtype)
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402


# =============================================================================
# 8. Settings: Part I's configs plus the options of Part II's features
# =============================================================================
# Subclasses, so that every Part I function takes them where it takes a
# ModelConfig or TrainConfig, and the frozen dataclasses stay static
# arguments of jax.jit. Checkpoints store their fields, as they always have.


@dataclass(frozen=True)
class RunModelConfig(ModelConfig):
    """ModelConfig plus the speed and memory options of section 10."""

    # The training loss: "plain" (Part I's compute_loss), "blockwise"
    # (blockwise_cross_entropy: never holds the [B*T, V] logits), or "auto":
    # blockwise where it is needed or faster (use_blockwise).
    loss_impl: str = "auto"
    loss_block: int = 512  # tokens per block of the blockwise loss
    # jax.checkpoint around each block: the backward pass recomputes a block's
    # activations from its input instead of keeping them (--remat).
    remat: bool = False
    # --attention: "fused" trains with jax.nn.dot_product_attention
    # (fused_attend: cuDNN's kernel on a GPU); "explicit" with Part I's attend.
    attention: str = "fused"

    def __post_init__(self):
        super().__post_init__()
        if self.loss_impl not in ("auto", "plain", "blockwise"):
            raise InputError(f"ModelConfig.loss_impl must be 'auto', 'plain' or 'blockwise', "
                             f"got {self.loss_impl!r}")
        if self.loss_block <= 0:
            raise InputError(f"ModelConfig.loss_block must be positive, got {self.loss_block}")
        if self.attention not in ("fused", "explicit"):
            raise InputError(f"--attention {self.attention}: choose fused or explicit")


# The matrices LoRA can adapt, and the part of a block each belongs to.
LORA_MATRICES = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
                 "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}


@dataclass(frozen=True)
class RunTrainConfig(TrainConfig):
    """TrainConfig plus the options of Part II's training: health figures
    (section 9), LoRA (section 13) and gradient accumulation (section 14)."""

    health: bool = True  # per-layer health figures from each step (section 9)
    # LoRA: rank 0 trains every weight; rank R > 0 trains only low-rank
    # adapters A [I, R], B [R, O] on the named matrices.
    lora_rank: int = 0
    lora_alpha: float = 16.0  # the adapters' update is scaled by lora_alpha / lora_rank
    lora_targets: tuple = ("wq", "wk", "wv", "wo")
    # Micro-batches per optimizer step (--grad-accum): the batch is split in
    # this many parts, run one after the other, and their gradients averaged.
    grad_accum: int = 1
    # The cosine's length; None means steps. A resumed run keeps the schedule
    # it started with (keep_schedule, section 18): a longer --steps then runs
    # on at min_lr. learning_rate reads it through lr_schedule.
    schedule_steps: int | None = None
    # --optimizer: "adamw" (Part I's), or "muon" for the blocks' matrices with
    # AdamW for the rest (section 12), whose peak rate is then adam_lr (None:
    # lr, as Muon's update is scaled to AdamW's size).
    optimizer: str = "adamw"
    adam_lr: float | None = None
    muon_momentum: float = 0.95  # Jordan's and optax's
    # --checkpoint: "npz" (one file, gathered), "orbax" (each process writes
    # its own shards, in the background; section 15) or "auto"
    # (checkpoint_format); with Orbax, the last keep_checkpoints steps are kept.
    checkpoint: str = "auto"
    keep_checkpoints: int = 3

    def __post_init__(self):
        super().__post_init__()
        if self.optimizer not in ("adamw", "muon"):
            raise InputError(f"--optimizer {self.optimizer}: choose adamw or muon")
        if self.optimizer == "muon" and self.lora_rank:
            raise InputError("--optimizer muon with --lora-rank: Muon orthogonalises the "
                             "update of a whole matrix, and a LoRA update is the product of "
                             "two thin factors, for which it is neither published nor tested "
                             "here; use --optimizer adamw (the default) for LoRA")
        if not 0 <= self.muon_momentum < 1:
            raise InputError(f"TrainConfig.muon_momentum must be in [0, 1), got "
                             f"{self.muon_momentum}")
        if self.adam_lr is not None and self.adam_lr <= 0:
            raise InputError(f"--adam-lr must be positive, got {self.adam_lr}")
        if self.grad_accum <= 0:
            raise InputError(f"TrainConfig.grad_accum (--grad-accum) must be positive, "
                             f"got {self.grad_accum}")
        if self.checkpoint not in ("auto", "npz", "orbax"):
            raise InputError(f"--checkpoint {self.checkpoint}: choose auto, npz or orbax")
        if self.keep_checkpoints < 1:
            raise InputError(f"--keep-checkpoints must be at least 1, got "
                             f"{self.keep_checkpoints}")
        if self.lora_rank < 0 or self.lora_alpha <= 0:
            raise InputError(f"TrainConfig: need lora_rank >= 0 (--lora-rank) and lora_alpha "
                             f"> 0 (--lora-alpha), got {self.lora_rank} and {self.lora_alpha}")
        unknown = [t for t in self.lora_targets if t not in LORA_MATRICES]
        if unknown or not self.lora_targets:
            raise InputError(f"--lora-targets {','.join(self.lora_targets)}: choose among "
                             f"{','.join(LORA_MATRICES)} (the attention's wq, wk, wv, wo and "
                             "the feed-forward's w1, w2, w3)")


def lr_schedule(tc):
    """The TrainConfig whose steps are the learning-rate schedule's length:
    Part I's learning_rate ends its cosine at tc.steps, and a resumed run's
    schedule may be longer or shorter than the steps it runs now."""
    if getattr(tc, "schedule_steps", None) is None:
        return tc
    return dataclasses.replace(tc, steps=tc.schedule_steps)


def run_configs(config, tc=None):
    """Part I configs as Part II's (a RunModelConfig or RunTrainConfig is returned as it is), with
    Part II's defaults for the options. -> (RunModelConfig, RunTrainConfig
    or None)."""
    if not isinstance(config, RunModelConfig):
        config = RunModelConfig(**{f.name: getattr(config, f.name)
                                   for f in dataclasses.fields(config)})
    if tc is not None and not isinstance(tc, RunTrainConfig):
        tc = RunTrainConfig(**{f.name: getattr(tc, f.name) for f in dataclasses.fields(tc)})
    return config, tc


def replace_durably(tmp, path):
    """Renames the finished file tmp over path (atomic: a reader sees the old
    file or the new one), then flushes the folder to disk as well: the rename
    is an entry in the folder, and without that it can be lost to a power
    failure even though the file's bytes were flushed (POSIX fsync on a
    directory; where a folder cannot be opened, as on Windows, the rename is
    all there is)."""
    os.replace(tmp, path)
    try:
        folder = os.open(Path(path).parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def param_shapes(config):
    """init_params's tree as jax.ShapeDtypeStructs, computed without
    allocating: the template that loaders fill and check against."""
    return jax.eval_shape(lambda: init_params(jax.random.PRNGKey(0), config))


# =============================================================================
# 9. Run health
# =============================================================================
# A loss curve says that a run diverged or stalled, not why. Each training
# step also returns a few numbers per block, from what the step already has:
# the gradient's norm (before clipping), the size of the update relative to
# the weights (|new - old| / |old|; Karpathy's rule of thumb is about 1e-3 for a
# healthy run), the RMS of the residual stream after the block (it should grow
# slowly, not explode), and the mean entropy of the attention (in nats: 0 when
# each query looks at one key, log(t + 1) when it spreads evenly over the t + 1
# it may see). They go to out/metrics.jsonl and out/health.png.


def health_block(p, x, cos, sin, mask, config, cache=None, position=None, key=None,
                 block=transformer_block):
    """A block for forward_hidden (section 4) that runs `block` and returns
    its health figures where the plain block returns its cache (training runs
    without one). -> ([B, T, D], {"rms", "entropy"})."""
    y, _ = block(p, x, cos, sin, mask, config, cache, position, key)
    return y, block_health(p, x, y, cos, sin, mask, config)


def block_health(p, x_in, x_out, cos, sin, mask, config):
    """One block's figures, called by forward_hidden when it is asked for them.
    p: the block's weights, x_in/x_out: [B, T, D] the residual stream before and
    after it -> {"rms": scalar, "entropy": scalar}. A block does not return its
    attention weights (the fused kernel never even forms them), so the
    queries, keys and scores are computed again here (three matmuls per
    block, forward only; tools/bench_health.py measures the cost);
    stop_gradient keeps all of it out of the backward pass."""
    p, x_in, x_out = jax.lax.stop_gradient((p, x_in, x_out))
    q, k, _ = attention_qkv(p["attention"], rms_norm(x_in, p["attention_norm"], config.norm_eps),
                            cos, sin, config)
    probs = attention_weights(q, k, mask)  # [B, K, G, T, S]
    entropy = -jnp.sum(probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), axis=-1)  # 0 log 0 = 0
    rms = jnp.sqrt(jnp.mean(jnp.square(x_out.astype(jnp.float32))))
    return {"rms": rms, "entropy": jnp.mean(entropy)}


def step_health(old_params, new_params, grads, stats, tc):
    """A training step's health: {"grad_norm": the global gradient norm before
    clipping, "clipped": whether clipping scaled it down (as adamw_update does),
    "layer_grad_norm", "layer_update_ratio", "layer_rms", "layer_attn_entropy":
    float32[L] each, per block}."""
    norm = global_norm(grads)

    def ratio(new, old):
        diff = jax.tree_util.tree_map(lambda a, b: a - b, new, old)
        return global_norm(diff) / (global_norm(old) + 1e-12)

    return {"grad_norm": norm,
            "clipped": tc.grad_clip / (norm + 1e-6) < 1.0,
            "layer_grad_norm": jnp.stack([global_norm(g) for g in grads["layers"]]),
            "layer_update_ratio": jnp.stack([ratio(n, o) for n, o in
                                             zip(new_params["layers"], old_params["layers"])]),
            "layer_rms": jnp.stack([s["rms"] for s in stats]),
            "layer_attn_entropy": jnp.stack([s["entropy"] for s in stats])}


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


def health_record(step, loss, lr, seconds_per_step, tokens_per_step, healths):
    """The metrics.jsonl line of a logged step: its loss, learning rate and
    speed, its own health figures, and how many steps since the previous
    line were clipped. healths: the health dicts of those steps, host arrays."""
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
        for name in ("layer_grad_norm", "layer_update_ratio", "layer_rms", "layer_attn_entropy"):
            record[name] = [float(x) for x in last[name]]
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
        values = np.array([r[name] for r in rows])  # [steps, L]
        for i in range(n_layers):
            ax.plot(steps, values[:, i], color=colours[i], lw=1, label=f"block {i}")
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


# =============================================================================
# 10. Speed: faster kernels and sampling, the blockwise loss, the auto choices
# =============================================================================
# A target of IGNORE carries no loss: the prompts of chat data (section 17) and
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


# Part II's kernels for the training step, passed to Part I's transformer_block
# (its dense= and attend= seams). First, the bfloat16 matmul with a
# hand-written gradient: JAX's own rule for Part I's dense multiplies the
# float32 gradient with the bfloat16 operands promoted to float32 (the slow
# path), then rounds dx and dw to bfloat16. In PyTorch terms: autocast to
# bfloat16 plus a torch.autograd.Function whose backward is written by hand.
# It halves the cpu preset's step: 472 against 995 ms for the loss and its
# gradients on the AMD EPYC (`python tools/bench_kernels.py`, docs/speed.md).


@jax.custom_vjp
def _dense_bf16(x, w):
    return _dense_bf16_fwd(x, w)[0]


# The forward keeps the bfloat16 operands for the backward; the two empty
# arrays carry only the input dtypes (residuals must be arrays), so the
# gradients come back in x's and w's own dtypes.
def _dense_bf16_fwd(x, w):
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    out = jnp.dot(xb, wb, preferred_element_type=jnp.float32)
    return out, (xb, wb, jnp.zeros((), x.dtype), jnp.zeros((), w.dtype))


def _dense_bf16_bwd(residuals, g):
    # Rounding g to bfloat16 keeps both products on the fast path; they sum in
    # float32, and the gradients are not rounded.
    xb, wb, x_like, w_like = residuals
    gb = g.astype(jnp.bfloat16)
    dx = jnp.dot(gb, wb.T, preferred_element_type=jnp.float32)
    dw = jnp.dot(xb.reshape(-1, xb.shape[-1]).T, gb.reshape(-1, gb.shape[-1]),
                 preferred_element_type=jnp.float32)
    return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


_dense_bf16.defvjp(_dense_bf16_fwd, _dense_bf16_bwd)


def run_dense(x, w, config):
    """Part I's dense, with the hand-written gradient under bfloat16 compute
    (the same forward values)."""
    return _dense_bf16(x, w) if config.compute_dtype == "bfloat16" else dense(x, w, config)


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
    """The block Part II trains with: Part I's transformer_block with
    run_dense and, for attention "fused", fused_attend; wrapped in
    jax.checkpoint for --remat (keep only each block's input for the backward
    pass and recompute the rest there; config, argument 5, is static)."""
    attend_fn = attend
    if config.attention == "fused":
        attend_fn = functools.partial(fused_attend, dtype=config.dtype)
    block = functools.partial(transformer_block, dense=run_dense, attend=attend_fn)
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
    """top_k_filter (section 7) by bisection. float32[B, V] -> float32[B, V]."""
    # -inf entries (masked tokens) count as just below the row's smallest
    # finite logit, so the bisection's range stays the finite logits' range.
    low = jnp.min(jnp.where(jnp.isfinite(logits), logits, jnp.inf), axis=-1, keepdims=True)
    finite = jnp.where(jnp.isfinite(logits), logits, low - 1.0)
    kth = largest_threshold(finite, lambda x, t: jnp.sum(x >= t, axis=-1, keepdims=True), top_k)
    return jnp.where(logits >= kth, logits, -jnp.inf)


def bisection_top_p(logits, top_p):
    """top_p_filter (section 7) by bisection: the kept set is every token with
    probability >= t for the largest t whose set still holds top_p of the
    mass. float32[B, V] -> float32[B, V]."""
    probs = jax.nn.softmax(logits, axis=-1)
    target = top_p * (1 - 1e-6)  # as in top_p_filter
    t = largest_threshold(probs, lambda p, t: jnp.sum(jnp.where(p >= t, p, 0.0), axis=-1,
                                                      keepdims=True), target)
    return jnp.where(probs >= t, logits, -jnp.inf)


def fast_sample_token(key, logits, temperature, top_k=None, top_p=1.0):
    """sample_token's draw (the same distribution, other random numbers) with
    the bisection filters and one uniform number per row.
    logits: float32[B, V] -> int32[B]."""
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
# over blocks of `loss_block` tokens (a lax.scan), and for each block computes
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

# "auto" takes the blockwise path above this many bytes of float32 logits,
# where the plain path's logits and their gradient would hold twice this.
BLOCKWISE_ABOVE_BYTES = 1 << 30


def use_blockwise(config, n_tokens):
    """Whether run_loss takes the blockwise path for n_tokens tokens.
    "auto": above BLOCKWISE_ABOVE_BYTES of logits, for memory; and, for speed,
    float32 compute on a CPU, where its hand-written gradient (one fused pass
    for softmax minus one-hot) beat the plain path's autodiff (a scatter for
    the target logits, a select for the padding, a transposed copy of the
    logits' gradient): 1.57x the whole training step at the benchmark
    configuration on an Intel Xeon (`python tools/bench_vs_hf.py`; docs/speed.md).
    With bfloat16 on the CPU both ran within noise, so plain."""
    if config.loss_impl != "auto":
        return config.loss_impl == "blockwise"
    if n_tokens * config.padded_vocab * 4 > BLOCKWISE_ABOVE_BYTES:
        return True
    return config.compute_dtype == "float32" and jax.default_backend() == "cpu"


def blockwise_cross_entropy(h, w, targets, config):
    """The mean cross-entropy of compute_loss from the final hidden states, by
    blocks of config.loss_block tokens. h: [N, D], w: [D, V_padded] (the output
    weight), targets: int32[N] (IGNORE: no loss) -> scalar, the mean over the
    targets that count. A custom VJP (below) returns the gradients computed
    alongside the loss."""
    return _blockwise_ce(h, w, targets, config)[0]


def _blockwise_ce(h, w, targets, config, with_grads=False):
    """-> (mean loss, (dL/dh [N, D], dL/dw [D, V_padded]) or None)."""
    N, D = h.shape
    n = min(config.loss_block, N)
    blocks = -(-N // n)
    pad = blocks * n - N  # the last block is padded with rows that count for nothing
    hs = jnp.pad(h, ((0, pad), (0, 0))).reshape(blocks, n, D)
    ts = jnp.pad(targets, (0, pad), constant_values=IGNORE).reshape(blocks, n)
    valid = ts != IGNORE  # padding rows, and the prompts of chat data (section 17)
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
    """Part I's compute_loss with the options of RunModelConfig: Part II's
    kernels and --remat (run_block), the blockwise cross-entropy where
    use_blockwise picks it, and with health=True each block's health figures
    (health_block, section 9). Targets of IGNORE (the prompts of chat data,
    section 17) carry no loss. -> (loss, [per-block figures] or [None] * L)."""
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
        logits = at_least_f32(run_dense(h, output_weight(params), config))  # [B, T, V_padded]
        loss = masked_cross_entropy(logits, targets, config)
    return loss, stats


def run_loss(params, batch, config, training=False, key=None):
    """run_loss_aux's loss alone: compute_loss's signature, Part II's choices."""
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


# =============================================================================
# 11. Token files: your own data at any size
# =============================================================================
# `--prepare INPUT... --data NAME` tokenizes text once into NAME.train.bin and
# NAME.val.bin (raw token ids, uint16 when the vocabulary fits) plus a JSON
# header NAME.json; `--data NAME.json` then trains from the files without
# tokenizing or loading them: each step reads only its batch's windows.

TEXT_SUFFIXES = (".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".org")
TOKEN_FORMAT = "llama_jax tokens"
VAL_FRACTION = 0.1  # of the documents, chosen by a hash of their path


def tokenizer_fingerprint(enc):
    """sha256 of every token's bytes in id order (special tokens included):
    two tokenizers with the same fingerprint map text to the same ids."""
    h = hashlib.sha256()
    for i in range(enc.n_vocab):
        try:
            piece = enc.decode_single_token_bytes(i)
        except KeyError:  # an unused id
            piece = b""
        h.update(len(piece).to_bytes(4, "little") + piece)
    return h.hexdigest()


def find_documents(inputs):
    """Text files, folders (read recursively for TEXT_SUFFIXES) and globs ->
    [(path, name)], where name is the path relative to the folder or glob it
    came from (what the validation split hashes, so it does not depend on
    where the folder lives). Sorted within each input; duplicates dropped."""
    found = {}
    for item in inputs:
        root = Path(item)
        if root.is_dir():
            files = [(f, f.relative_to(root).as_posix()) for f in sorted(root.rglob("*"))
                     if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES]
        elif root.is_file():
            files = [(root, root.name)]
        elif any(c in item for c in "*?["):
            files = [(Path(f), Path(f).as_posix()) for f in sorted(glob.glob(item, recursive=True))
                     if Path(f).is_file()]
            if not files:
                raise InputError(f"--prepare: the pattern {item} matches no file")
        else:
            raise InputError(f"--prepare: {item} is not a file, a folder, or a glob that matches "
                             "anything")
        if not files:
            raise InputError(f"--prepare: no text files in {item} (looked for "
                             f"{', '.join(TEXT_SUFFIXES)}; name files directly to take others)")
        for path, name in files:
            found.setdefault(path.resolve(), (path, name))
    return list(found.values())


def in_validation(name):
    """The document-level split: a document is validation if the hash of its
    name falls in the first VAL_FRACTION of the hash range. Deterministic, and
    a document never straddles the two files."""
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return h / 2 ** 64 < VAL_FRACTION


def check_document(path, block=1 << 22):
    """Reads a file once in blocks: -> None if it is UTF-8 with some
    non-whitespace text, else the reason to skip it."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    has_text, offset = False, 0
    with open(path, "rb") as f:
        while True:
            data = f.read(block)
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the last block
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as err:  # err.start counts from the pending bytes
                return f"not UTF-8 (byte {offset - pending + err.start})"
            if not data:
                return None if has_text else "empty"
            has_text = has_text or bool(data.strip())
            offset += len(data)


def safe_cut(buf):
    """Where a chunk of text can end without changing its tokens: just after a
    newline that sits between two visible ASCII characters. GPT-2's and Llama
    3's pre-tokenizers never join such a newline to its neighbours, so
    tokenizing the two sides apart gives the same ids. -> index or None."""
    i = len(buf) - 2
    while True:
        i = buf.rfind(b"\n", 1, i + 1)
        if i < 1:
            return None
        if 0x21 <= buf[i - 1] <= 0x7E and 0x21 <= buf[i + 1] <= 0x7E:
            return i + 1
        i -= 1


def document_chunks(path, chunk_bytes):
    """A file's text in pieces of about chunk_bytes, cut only where safe_cut
    allows, so memory stays bounded however large the file is.
    -> (text, its size in bytes) pairs."""
    carry = b""
    with open(path, "rb") as f:
        while True:
            data = f.read(chunk_bytes)
            if not data:
                if carry:
                    yield carry.decode("utf-8"), len(carry)
                return
            buf = carry + data
            cut = safe_cut(buf)
            if cut is None:
                carry = buf
                continue
            yield buf[:cut].decode("utf-8"), cut
            carry = buf[cut:]


def usable_documents(inputs, log):
    """The documents of --prepare's inputs that hold UTF-8 text, each marked
    for validation by a hash of its name (in_validation; with too few for the
    hash to split, the last one is). -> ([(path, name, is_validation)],
    [{"path", "reason"} of each file skipped])."""
    docs, skipped = [], []
    for path, doc_name in find_documents(inputs):
        reason = check_document(path)
        if reason:
            skipped.append({"path": str(path), "reason": reason})
            log(f"prepare: skipping {path}: {reason}")
        else:
            docs.append((path, doc_name, in_validation(doc_name)))
    if len(docs) < 2:
        raise InputError(f"--prepare: {len(docs)} usable document(s); the validation split is "
                         "by document, so it needs at least two files (or train on one text "
                         "file directly with --data FILE)")
    if all(val for _, _, val in docs) or not any(val for _, _, val in docs):
        # Too few documents for the hash to split them: the last one is validation.
        docs = [(p, n, i == len(docs) - 1) for i, (p, n, _) in enumerate(docs)]
    return docs, skipped


def write_token_files(docs, total, files, enc, dtype, chunk_bytes, chunks_per_batch, log):
    """Tokenizes each document (chunk by chunk, chunks_per_batch at a time on
    every core) into files["train"] or files["val"], each document followed by
    <|endoftext|>; each file is written beside its name and renamed over it once
    complete. total: the documents' bytes, for the progress line.
    -> {"train": tokens, "val": tokens}."""
    eot = np.array([enc.eot_token], dtype)
    tmp = {k: f.with_name(f".{f.name}.tmp{os.getpid()}") for k, f in files.items()}
    outs = {k: open(p, "wb") for k, p in tmp.items()}
    counts = {"train": 0, "val": 0}
    done_bytes, t0 = 0, time.perf_counter()
    t_print = t0
    threads = os.cpu_count() or 1

    def flush(batch):
        ids = enc.encode_ordinary_batch([text for _, text in batch if text is not None],
                                        num_threads=threads)
        ids = iter(ids)
        for split, text in batch:
            tokens = eot if text is None else np.asarray(next(ids), dtype)
            outs[split].write(tokens.tobytes())
            counts[split] += len(tokens)

    try:
        batch = []
        for path, _, val in docs:
            split = "val" if val else "train"
            for text, size in document_chunks(path, chunk_bytes):
                batch.append((split, text))
                done_bytes += size
                if len(batch) >= chunks_per_batch:
                    flush(batch)
                    batch = []
                now = time.perf_counter()
                if now - t_print > 5:
                    t_print = now
                    rate = done_bytes / max(now - t0, 1e-9)
                    log(f"prepare: {done_bytes / 1e6:,.1f}/{total / 1e6:,.1f} MB | "
                        f"{rate / 1e6:.1f} MB/s | {sum(counts.values()):,} tokens | "
                        f"ETA {format_duration((total - done_bytes) / max(rate, 1))}")
            batch.append((split, None))  # None: the end-of-text token
        flush(batch)
        for k in outs:
            outs[k].flush()
            os.fsync(outs[k].fileno())
            outs[k].close()
            replace_durably(tmp[k], files[k])
    finally:
        for k in outs:
            outs[k].close()
            if tmp[k].exists():
                tmp[k].unlink()
    return counts


def prepare_tokens(inputs, name, log=print, chunk_bytes=1 << 20, chunks_per_batch=8,
                   enc=None):
    """Tokenizes text files into NAME.train.bin, NAME.val.bin and NAME.json.
    Each document (file) ends with <|endoftext|>. Memory stays bounded: text
    is read in chunks of about chunk_bytes and tokenized chunks_per_batch at a
    time on every core (tiktoken's batch encoder runs threads). Files that are
    not UTF-8 or hold no text are skipped and listed. -> the header dict."""
    enc = enc or get_tokenizer()
    name = Path(str(name)[:-5] if str(name).endswith(".json") else name)
    docs, skipped = usable_documents(inputs, log)
    dtype = np.dtype(np.uint16 if enc.n_vocab <= 2 ** 16 else np.uint32)
    files = {"train": name.with_name(name.name + ".train.bin"),
             "val": name.with_name(name.name + ".val.bin")}
    name.parent.mkdir(parents=True, exist_ok=True)
    total = sum(p.stat().st_size for p, _, _ in docs)
    t0 = time.perf_counter()
    counts = write_token_files(docs, total, files, enc, dtype, chunk_bytes, chunks_per_batch,
                               log)
    seconds = time.perf_counter() - t0
    header = {"format": TOKEN_FORMAT, "version": 1, "tokenizer": enc.name,
              "tokenizer_sha256": tokenizer_fingerprint(enc), "vocab_size": enc.n_vocab,
              "end_of_text": int(enc.eot_token), "dtype": dtype.name,
              "train_file": files["train"].name, "val_file": files["val"].name,
              "train_tokens": counts["train"], "val_tokens": counts["val"],
              "documents": {"train": sum(not v for _, _, v in docs),
                            "val": sum(v for _, _, v in docs)},
              "text_bytes": total, "sources": [str(i) for i in inputs], "skipped": skipped,
              "split": f"by document: sha256(path relative to its input) in the first "
                       f"{VAL_FRACTION:.0%} of the hash range is validation",
              "seconds": round(seconds, 2)}
    header_path = name.with_name(name.name + ".json")
    header_tmp = header_path.with_name(f".{header_path.name}.tmp{os.getpid()}")
    header_tmp.write_text(json.dumps(header, indent=1) + "\n")
    replace_durably(header_tmp, header_path)
    log(f"prepare: {len(docs)} documents, {total / 1e6:,.1f} MB -> {counts['train']:,} training "
        f"and {counts['val']:,} validation tokens ({dtype.name}) in {seconds:.1f}s "
        f"({total / 1e6 / max(seconds, 1e-9):.1f} MB/s); wrote {header_path}")
    return header


@dataclass(frozen=True)
class TokenFile:
    """A file of raw token ids, read a batch at a time. Each read maps the file
    afresh and drops the mapping after copying the windows out, so the pages
    a long run touches are not kept counted in its memory (nanoGPT #287)."""

    path: Path
    dtype: str
    n_tokens: int

    def __len__(self):
        return self.n_tokens

    def __getitem__(self, index):
        """The tokens at int positions (an array of any shape), so that Part
        I's read_windows reads a TokenFile as it reads an array."""
        data = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))
        out = np.asarray(data[index])
        del data
        return out

    def windows(self, starts, length):
        """int[B] start positions -> int32[B, length] token windows."""
        return read_windows(self, starts, length)


def token_files_header(path):
    """Where --data names a prepared data set (NAME.json or NAME), its header
    path; else None (a text file)."""
    path = Path(path)
    if path.suffix == ".json":
        return path
    named = path.with_name(path.name + ".json")
    return named if named.is_file() and not path.is_file() else None


def open_token_files(header_path, enc=None):
    """NAME.json -> (train TokenFile, val TokenFile, header), refusing with a
    message that says what to do: a missing or unreadable header, a tokenizer
    other than the model's, a file that is missing or not a whole number of
    the header's tokens."""
    header_path = Path(header_path)
    redo = f"run `python llama_jax.py --prepare INPUT... --data {header_path.with_suffix('')}` again"
    if not header_path.is_file():
        raise InputError(f"data set {header_path} not found: make it with --prepare INPUT... "
                         f"--data {header_path.with_suffix('')}")
    try:
        header = json.loads(header_path.read_text())
        assert header.get("format") == TOKEN_FORMAT
        fields = [header[k] for k in ("tokenizer_sha256", "dtype", "train_file", "val_file",
                                      "train_tokens", "val_tokens")]
    except (ValueError, AssertionError, KeyError, TypeError) as err:
        raise InputError(f"{header_path} is not a llama_jax token-file header "
                         f"({type(err).__name__}): {redo}") from err
    enc = enc or get_tokenizer()
    if fields[0] != tokenizer_fingerprint(enc):
        raise InputError(f"{header_path} was tokenized with {header.get('tokenizer')!r} "
                         f"(sha256 {fields[0][:12]}...), not this model's tokenizer {enc.name!r}: "
                         f"{redo} with the model's tokenizer")
    files = []
    for split, name, count in (("train", fields[2], fields[4]), ("val", fields[3], fields[5])):
        path = header_path.with_name(name)
        itemsize = np.dtype(fields[1]).itemsize
        if not path.is_file():
            raise InputError(f"{path} ({split} tokens of {header_path}) is missing: {redo}")
        size = path.stat().st_size
        if size % itemsize or size // itemsize != count:
            raise InputError(f"{path} has {size:,} bytes, but {header_path} says {count:,} "
                             f"{fields[1]} tokens ({count * itemsize:,} bytes): the file is "
                             f"truncated or was overwritten; {redo}")
        files.append(TokenFile(path, fields[1], count))
    return files[0], files[1], header


_step_window_starts = jax.jit(
    lambda keys, step, n_tokens, batch_size, seq_len: window_starts(
        step_keys(keys, step)[0], n_tokens, batch_size, seq_len),
    static_argnames=("batch_size", "seq_len"))


@dataclass(frozen=True)
class ChatWindows:
    """Rendered conversations, one a row: inputs int32[N, T] and targets
    int32[N, T] (IGNORE where no loss). Batches are drawn on the host by the
    run's keys (host_batch), as token files' are."""

    inputs: np.ndarray
    targets: np.ndarray

    def __len__(self):
        return len(self.inputs)

    def rows(self, rows):
        """int[B] row numbers -> (inputs, targets) int32[B, T]."""
        return self.inputs[rows], self.targets[rows]

    def batches(self, batch_size):
        """Every row once, in batches of batch_size (the last one padded with
        rows that are all IGNORE). -> [(inputs, targets)]."""
        out = []
        for i in range(0, len(self), batch_size):
            x, y = self.inputs[i:i + batch_size], self.targets[i:i + batch_size]
            pad = batch_size - len(x)
            out.append((np.pad(x, ((0, pad), (0, 0))),
                        np.pad(y, ((0, pad), (0, 0)), constant_values=IGNORE)))
        return out


def host_batch(token_file, keys, step, batch_size, seq_len):
    """The batch run_step would draw from the same tokens on the device, read
    from a token file: the same start positions (computed by jax.random on the
    CPU, so that a GPU's queue is never waited on), then this process reads
    its own rows only and jax.make_array_from_process_local_data assembles the
    global batch. Chat data (ChatWindows, above) is read the same way:
    the draw picks conversations, uniform over its N rows.
    -> (inputs, targets) int32[B, T]."""
    chats = isinstance(token_file, ChatWindows)
    # window_starts draws in [0, n - seq_len): n = N + seq_len draws a row in [0, N)
    n = len(token_file) + seq_len if chats else len(token_file)
    cpu_keys = jax.device_put(keys, jax.devices("cpu")[0])
    starts = np.asarray(_step_window_starts(cpu_keys, step, n, batch_size, seq_len))
    rows = batch_size // jax.process_count()
    mine = starts[jax.process_index() * rows:(jax.process_index() + 1) * rows]
    if chats:
        inputs, targets = token_file.rows(mine)
    else:
        windows = token_file.windows(mine, seq_len + 1)
        inputs, targets = windows[:, :-1], windows[:, 1:]
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return (jax.make_array_from_process_local_data(sharding, inputs),
            jax.make_array_from_process_local_data(sharding, targets))


def load_training_data(path, seq_len, enc=None):
    """--data: a text file (tokenized in memory by enc, default GPT-2's: int32
    arrays) or a prepared data set (TokenFiles, nothing read yet; refused if
    another tokenizer made it). -> (train, val, how)."""
    header = token_files_header(path)
    if header is None:
        train, val = load_dataset(path, seq_len, enc)
        return train, val, "tokenized in memory"
    train, val, _ = open_token_files(header, enc)
    for split, f in (("training", train), ("validation", val)):
        if len(f) >= 2 ** 31:  # window starts are drawn as int32, as on the device
            raise InputError(f"{f.path} holds {len(f):,} {split} tokens; llama_jax reads at "
                             f"most 2^31 - 1 per file: --prepare the text in parts")
        if len(f) < seq_len + 1:
            raise InputError(f"{f.path} holds {len(f):,} {split} tokens; --seq-len {seq_len} "
                             f"needs at least {seq_len + 1}: prepare more text or lower --seq-len")
    return train, val, "token files, memory-mapped"


# =============================================================================
# 12. Muon: an optimizer for the hidden matrices
# =============================================================================
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
# [0.68, 1.21] (test_llama_jax.py checks both): close enough to 1 for
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
# - The iteration runs in float32: Jordan runs it in bfloat16 on GPUs, where
#   its matmuls are the cost, but float32 is the fast path on most CPUs, and
#   it keeps the test against a float64 NumPy loop tight. Its cost is 5
#   iterations of three small products per matrix, beside a step's forward
#   and backward pass over every token.

MUON_MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)  # (a, b, c), from Jordan's post


def newton_schulz(g, steps=5, eps=1e-8):
    """About U V^T for g = U S V^T: the quintic iteration above on g scaled to
    unit Frobenius norm. g: [m, n] -> float32[m, n]. A tall g is turned wide
    first, so that X X^T is the smaller of the two Gram matrices."""
    a, b, c = NEWTON_SCHULZ
    x = g.astype(jnp.float32)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (jnp.linalg.norm(x) + eps)
    for _ in range(steps):
        gram = x @ x.T  # [m, m], m the smaller side
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


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
    for the rest and an empty float32[0] for each hidden matrix (Muon keeps
    one moment, not two), "step"}."""
    nu = jax.tree_util.tree_map(lambda p, hidden: jnp.zeros((0,) if hidden else p.shape, p.dtype),
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

    def update(p, g, m, v, hidden):
        if hidden:  # Muon
            m = beta * m + (1 - beta) * g
            nesterov = beta * m / (1 - beta ** (t + 1)) + (1 - beta) * g / (1 - beta ** t)
            scale = 0.2 * math.sqrt(max(p.shape))  # Moonshot's: AdamW's update RMS
            return p - lr * (scale * newton_schulz(nesterov) + tc.weight_decay * p), m, v
        m = b1 * m + (1 - b1) * g  # AdamW, as adamw_update
        v = b2 * v + (1 - b2) * g * g
        decay = tc.weight_decay * p if p.ndim > 1 else 0.0
        step = m / (1 - b1 ** t) / (jnp.sqrt(v / (1 - b2 ** t)) + tc.eps)
        return p - adam_lr * (step + decay), m, v

    leaves, tree = jax.tree_util.tree_flatten(params)
    out = [update(*x) for x in zip(leaves, tree.flatten_up_to(grads),
                                   tree.flatten_up_to(state["mu"]),
                                   tree.flatten_up_to(state["nu"]),
                                   tree.flatten_up_to(muon_mask(params)))]
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


# =============================================================================
# 13. LoRA: low-rank adapters over a frozen model
# =============================================================================
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


# =============================================================================
# 14. Many devices and many hosts
# =============================================================================
# One code path for 1 to N devices, with JAX's own machinery (see the guide
# "Distributed arrays and automatic parallelization" on docs.jax.dev). The
# devices form a 2-D mesh with axes ("data", "fsdp"):
#   - the batch is split over every device (both axes): each one computes the
#     loss and gradients of its rows, and XLA inserts the communication that
#     makes the update the one of the whole batch;
#   - the weights and optimizer moments are split over "fsdp" (ZeRO-3 / fully
#     sharded data parallel: Rajbhandari et al. 2020, arXiv:1910.02054) and
#     copied over "data". --fsdp 1 (the default) is pure data parallelism:
#     every device holds everything and the gradients are all-reduced.
#     --fsdp all shards over every device: each holds 1/N of every matrix,
#     gathered just in time for its matmul, and the gradients are
#     reduce-scattered so that each device updates only its own part.
# The layers, model and loss (sections 3 to 5) know nothing of it: they are
# written for one device, jax.jit compiles them for the mesh from the
# shardings of their inputs (GSPMD), and the results are those of one device
# to float32 rounding (test_llama_jax.py checks 1, 8, FSDP and 2 x 4). The
# mesh's axes are "auto": jax 0.10's default, "explicit", would make every
# einsum in the model say how its output is split.
# Several hosts (processes) join one mesh through jax.distributed; every
# process runs the same program on its own devices, reads the same batches,
# and only process 0 prints and writes files.


def make_mesh(fsdp=1, devices=None):
    """The ("data", "fsdp") mesh over `devices` (default: every device of
    every process). fsdp: devices per FSDP group, a divisor of their number,
    or "all"."""
    devices = jax.devices() if devices is None else list(devices)
    n = len(devices)
    if fsdp == "all":
        fsdp = n
    elif not str(fsdp).isdigit():
        raise InputError(f"--fsdp {fsdp}: give a number of devices per FSDP group, or all")
    fsdp = int(fsdp)
    if fsdp < 1 or n % fsdp:
        choices = ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
        raise InputError(f"--fsdp {fsdp} does not divide the {n} device{'s' * (n > 1)}: "
                         f"choose one of {choices} or all")
    return jax.make_mesh((n // fsdp, fsdp), ("data", "fsdp"), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)


def fsdp_spec(shape, n):
    """How one array is split over a mesh whose "fsdp" axis has n devices: a
    matrix along its largest dimension that n divides (the embedding and
    output layer along the vocabulary, the others along their wider side);
    vectors (norm gains, the step count), and matrices n divides nowhere, are
    copied to every device. -> a PartitionSpec."""
    if n > 1 and len(shape) >= 2:
        for d in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[d] % n == 0:
                return P(*[("fsdp" if i == d else None) for i in range(len(shape))])
    return P()


def state_shardings(mesh, tree):
    """The NamedSharding of every leaf of a pytree of arrays (or shapes):
    parameters, optimizer state, LoRA adapters, keys. Replicated over
    "data", split over "fsdp" by fsdp_spec."""
    n = mesh.shape["fsdp"]
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, n)), tree)


def batch_sharding(mesh):
    """Rows of a batch [B, ...] split over every device of the mesh."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def split_batch(batch, mesh):
    """Inside a jitted step: a batch's rows split over every device of the
    mesh (None: left as it is)."""
    if mesh is None:
        return batch
    return jax.lax.with_sharding_constraint(batch, batch_sharding(mesh))


def keep_split(mesh, tree):
    """Inside a jitted step: new weights and optimizer state split as the
    old ones were (state_shardings), so that a step's outputs are the next
    step's inputs as they are, and donation can reuse their buffers."""
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, state_shardings(mesh, tree))


def place(tree, shardings):
    """Host or device arrays -> global arrays with these shardings. Each
    device receives only its own slice (make_array_from_callback), which also
    works when the mesh spans several processes that each hold the same
    values."""
    def put(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return jax.tree_util.tree_map(put, tree, shardings)


def place_state(mesh, tree):
    """Weights or optimizer state (host or device arrays) split over the mesh
    by state_shardings."""
    return place(tree, state_shardings(mesh, tree))


def copies(mesh, tree):
    """A copy-on-every-device NamedSharding for each leaf of a pytree."""
    return jax.tree_util.tree_map(lambda _: NamedSharding(mesh, P()), tree)


def replicated(mesh, tree):
    """A pytree copied to every device of the mesh."""
    return place(tree, copies(mesh, tree))


def gather(x):
    """One global array -> a NumPy array on every process (a collective when
    the array spans processes: every process must call it)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def sharded_init(key, config, mesh):
    """init_params compiled to write each device's shard where it lives: the
    full weights are never on one device."""
    shardings = state_shardings(mesh, param_shapes(config))
    return jax.jit(init_params, static_argnums=1, out_shardings=shardings)(key, config)


def sharded_optimizer_init(params, mesh, tc=None):
    """The optimizer's state (tc.optimizer's, default AdamW's), its moments
    split like the weights."""
    init = adamw_init if tc is None else OPTIMIZERS[tc.optimizer].init
    shapes = jax.eval_shape(init, params)
    return jax.jit(init, out_shardings=state_shardings(mesh, shapes))(params)


def describe_mesh(mesh):
    kind = mesh.devices.flat[0].platform.upper()
    hosts = f" on {jax.process_count()} processes" if jax.process_count() > 1 else ""
    return (f"{mesh.size} {kind} device{'s' if mesh.size > 1 else ''}{hosts} as data "
            f"{mesh.shape['data']} x fsdp {mesh.shape['fsdp']}")


def check_batch_split(tc, mesh):
    """The global batch must split evenly over the devices and micro-batches."""
    parts = mesh.size * tc.grad_accum
    if tc.batch_size % parts:
        fit = parts * max(1, round(tc.batch_size / parts))
        accum = f" x --grad-accum {tc.grad_accum}" if tc.grad_accum > 1 else ""
        raise InputError(f"--batch-size {tc.batch_size} does not split over {mesh.size} "
                         f"device(s){accum}: use a multiple of {parts}, e.g. --batch-size {fit}")


def describe_batch(tc, mesh):
    """Tokens per optimizer step, in total and per device, and where."""
    tokens = tc.batch_size * tc.seq_len
    micro = (f", in {tc.grad_accum} micro-batches of {tokens // tc.grad_accum:,}"
             if tc.grad_accum > 1 else "")
    return (f"batch: {tc.batch_size} x {tc.seq_len} = {tokens:,} tokens per optimizer step on "
            f"{describe_mesh(mesh)}: {tokens // mesh.size:,} per device{micro}")


def describe_plan(plan):
    """The memory plan (memory_plan) in one clause."""
    limit, source = device_memory()
    of = f" of {gb(limit)} ({source})" if limit else ""
    return (f"per device about {gb(plan['total'])}{of}: weights {gb(plan['params'])}, "
            f"gradients {gb(plan['grads'])}, optimizer {gb(plan['optimizer'])}, activations "
            f"{gb(plan['activations'])} (--plan for more)")


# ----------------------------------------------------------------------------- Part II's training step


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


# Part II's training step. Part I's train_step is loss, gradients, AdamW; this
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
    section 9); else health is {}. With LoRA (tc.lora_rank > 0, section 13),
    params are the adapters, the only weights trained, and frozen the
    pretrained weights they adapt. With tc.grad_accum > 1, the batch is run in
    that many micro-batches (accumulate_gradients). mesh: the devices to split
    the work over (section 14): the batch is split over all of them, and
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


# ----------------------------------------------------------------------------- the plan
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


# ----------------------------------------------------------------------------- many hosts
# Every process runs the same command. jax.distributed connects them through
# process 0 (the coordinator), after which jax.devices() lists the devices of
# all of them and one mesh spans them. Flags name the coordinator; without
# them, a SLURM job step of several tasks is detected from its environment.
# Decisions a process takes alone (a signal arrived, the time budget ran out)
# are agreed on at every step (any_process), so that all processes stop at the
# same step: a collective that only some processes enter never returns.

# How long to wait for every process to join, and for a silent process before
# the others stop: JAX's coordination service then ends them, its message
# naming the lost process ("tasks are unhealthy (stopped sending heartbeats)").
COORDINATOR_TIMEOUT_S = 60


def wait_for_port(address, timeout):
    """True once a TCP connection to HOST:PORT succeeds, False after timeout."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)


def start_distributed(coordinator=None, num_processes=None, process_id=None,
                      timeout=COORDINATOR_TIMEOUT_S):
    """Joins this process to a run of several (before JAX starts its backend):
    process process_id of num_processes, process 0 listening at coordinator
    (HOST:PORT); all three None: under SLURM's srun, read from its
    environment, else a run of one. timeout: seconds to wait for every
    process to join, and for a silent one before the others stop.
    -> True when it joined a run of several."""
    given = {"--coordinator": coordinator, "--num-processes": num_processes,
             "--process-id": process_id}
    if all(v is None for v in given.values()):
        if int(os.environ.get("SLURM_NTASKS", "1")) > 1:  # srun: JAX reads SLURM_* itself
            jax.distributed.initialize(initialization_timeout=int(timeout),
                                       heartbeat_timeout_seconds=int(timeout))
            return True
        return False
    missing = [flag for flag, v in given.items() if v is None]
    if missing:
        raise InputError(f"{' and '.join(missing)} missing: a run on several processes needs "
                         "--coordinator HOST:PORT (process 0's address), --num-processes N and "
                         "--process-id I (0 to N-1), the same on every process except I")
    n, i = num_processes, process_id
    if n < 1 or not 0 <= i < n:
        raise InputError(f"--process-id {i} must be between 0 and --num-processes - 1 ({n - 1})")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"--coordinator {coordinator}: expected HOST:PORT, e.g. "
                         "10.0.0.1:1234")
    # A process that cannot reach the coordinator would wait, then abort inside
    # XLA without a word; check the address first, and name it.
    if i != 0 and not wait_for_port(coordinator, timeout):
        raise InputError(f"could not reach the coordinator at {coordinator} within "
                         f"{timeout:g}s: start process 0 there (it listens on "
                         "that port), check the address and the firewall")
    jax.distributed.initialize(coordinator, n, i,
                               initialization_timeout=int(timeout),
                               heartbeat_timeout_seconds=int(timeout))
    return True


def lost_processes():
    """The processes the coordinator no longer hears from, in words. Of two,
    the other one; of more, the coordinator is asked, which takes up to
    --coordinator-timeout (its client's get_live_nodes is not public API: used
    only to name the lost process in an error message)."""
    if jax.process_count() == 2:
        return str(1 - jax.process_index())
    try:
        from jax._src import distributed
        live = distributed.global_state.client.get_live_nodes(list(range(jax.process_count())))
        return ", ".join(str(i) for i in range(jax.process_count()) if i not in live) or "?"
    except Exception:  # noqa: BLE001
        return "? (JAX's own message above names it)"


def any_process(*flags):
    """Each flag, made true on every process if it is true on any (a
    collective when there are several processes: all must call it at the
    same point). -> a tuple of bools."""
    flags = np.asarray(flags, np.int32)
    if jax.process_count() > 1:
        flags = np.any(multihost_utils.process_allgather(flags), axis=0)
    return tuple(bool(f) for f in flags)


def from_process_0(value):
    """Process 0's value of an integer, on every process."""
    if jax.process_count() == 1:
        return value
    return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int64)))


# =============================================================================
# 15. Checkpoints and file formats
# =============================================================================


class RunFiles(NamedTuple):
    """The files a training run keeps in its --out-dir (run_files)."""
    checkpoint: Path   # ckpt.npz: weights, optimizer state, keys, configs, history
    metrics: Path      # metrics.jsonl: one JSON line per logged step (section 9)
    loss_plot: Path    # loss.png
    health_plot: Path  # health.png (section 9)
    orbax: Path        # ckpt.orbax/: the same, as Orbax's step folders (--checkpoint orbax)


def run_files(out_dir):
    """Where a run in out_dir keeps its files: every path into an out-dir is
    built here. -> RunFiles."""
    out = Path(out_dir)
    return RunFiles(out / "ckpt.npz", out / "metrics.jsonl", out / "loss.png", out / "health.png",
                    out / "ckpt.orbax")


def special_token(tokenizer, *names):
    """The id of the first of these special tokens the tokenizer has, or None.
    (An id can be 0, as SmolLM's <|endoftext|> is: test it against None.)"""
    return next((tokenizer.encode_single_token(n) for n in names
                 if n in tokenizer.special_tokens_set), None)


# 2: the key is the run's seed key, from which run_keys derives its streams.
# 1 (same arrays; the key was used directly) still loads, but resuming it
# cannot repeat the batches its run would have drawn.
CHECKPOINT_VERSION = 2


class CheckpointError(InputError):
    """A checkpoint that cannot be used: unreadable, or made for another model."""


def flatten_tree(tree, prefix=""):
    """Nested dicts and lists -> {"a/0/b": array}, in a fixed order."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    flat = {}
    for name, value in items:
        path = f"{prefix}{name}"
        if isinstance(value, (dict, list)):
            flat.update(flatten_tree(value, path + "/"))
        else:
            flat[path] = value
    return flat


def unflatten_like(template, flat, prefix=""):
    """Inverse of flatten_tree, taking the structure from template."""
    if isinstance(template, dict):
        return {k: unflatten_like(v, flat, f"{prefix}{k}/") for k, v in template.items()}
    if isinstance(template, list):
        return [unflatten_like(v, flat, f"{prefix}{i}/") for i, v in enumerate(template)]
    return flat[prefix[:-1]]


def config_from_json(cls, d):
    d = dict(d)
    for name in ("rope_scaling", "lora_targets"):  # JSON has lists; configs hold tuples
        if d.get(name) is not None:
            d[name] = tuple(d[name])
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in known})


def checkpoint_record(opt_state, config, tc, history, base):
    """A checkpoint's JSON part, the same in both formats."""
    return {"format_version": CHECKPOINT_VERSION, "model_config": dataclasses.asdict(config),
            "train_config": dataclasses.asdict(tc), "history": history,
            "step": int(opt_state["step"]), "base": base}


def save_checkpoint(path, params, opt_state, key, config, tc, history, base=None):
    """Writes everything a resume needs into one .npz file: parameters,
    optimizer state, the step, the PRNG key, both configs, the loss history
    and a format version. No pickle: arrays plus one JSON string. The file is
    written beside its final name, flushed to disk, then renamed over it
    (replace_durably: atomic, and the folder flushed too), so a crash
    mid-save leaves the old one intact.
    base: for a fine-tuning run, where its pretrained model came from and the
    hash of its weights (base_record, section 17).
    On a mesh, each array is gathered to the host one at a time (gather,
    section 14): the whole state is never copied onto one device. With several
    processes, all take part in gathering and process 0 writes."""
    path = Path(path)
    meta = checkpoint_record(opt_state, config, tc, history, base)
    arrays = {"params/" + k: v for k, v in flatten_tree(params).items()}
    arrays.update({"opt/" + k: v for k, v in flatten_tree(opt_state).items()})
    arrays = {k: gather(v) for k, v in arrays.items()}
    arrays["key"] = gather(key)  # a raw uint32[2] key from jax.random.PRNGKey
    if jax.process_index() != 0:
        return
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        replace_durably(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _tree_mismatches(template, arrays, prefix):
    """Lists how flat `arrays` differ from a template's names, shapes, dtypes."""
    want = {f"{prefix}{k}": v for k, v in flatten_tree(template).items()}
    problems = [f"missing array {k}" for k in want if k not in arrays]
    problems += [f"unexpected array {k}" for k in arrays if k.startswith(prefix) and k not in want]
    for k, v in want.items():
        if k in arrays and (arrays[k].shape != v.shape or arrays[k].dtype != v.dtype):
            problems.append(f"{k}: {arrays[k].dtype}{list(arrays[k].shape)} in the file, "
                            f"{np.dtype(v.dtype)}{list(v.shape)} expected")
    return problems


def checkpoint_meta(path):
    """A checkpoint's JSON metadata alone (configs, history, step), or None if
    there is no readable checkpoint there (load_checkpoint says why). path:
    a .npz, or an Orbax folder (its latest complete step), or None."""
    try:
        if Path(path).is_dir():
            manager = orbax_manager(path)
            with manager:
                return manager.restore(manager.latest_step(), args=orbax_args(meta=True))["meta"]
        with np.load(path, allow_pickle=False) as npz:
            return json.loads(npz["meta"].tobytes())
    except Exception:  # missing, unreadable, no Orbax: the full load reports it
        return None


def load_checkpoint(path, config=None, mesh=None, weights_only=False):
    """Reads a checkpoint written by save_checkpoint (a .npz) or by
    OrbaxWriter (an Orbax folder: its latest complete step). With `config`,
    refuses (CheckpointError listing every mismatch) a checkpoint whose
    architecture, tree, shapes or dtypes differ from it; without, uses its own.
    -> {"params", "opt_state", "key", "config", "train_config", "history",
    "format_version", "base" (a fine-tuning run's base_record, else None),
    "placed", "note"}. From a .npz the arrays are NumPy arrays on the host: a
    run on a mesh places each one straight into its shards (place, section
    14). From Orbax, with `mesh`, each device reads its own shard of the
    state_shardings split ("placed": True); without, NumPy arrays. "note":
    what a reader should be told (an unfinished save passed over), or None.
    With LoRA, params are the adapters alone (load_source merges them).
    weights_only: an Orbax step's optimizer state is left unread ("opt_state"
    None), as the readers of a run (load_source) want: a state that needs
    Orbax may not fit one host with its moments."""
    path = Path(path)
    if path.is_dir():
        return load_orbax_checkpoint(path, config, mesh, weights_only)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: train first (python llama_jax.py "
                              "--out-dir DIR) or pass the --out-dir that holds ckpt.npz")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        meta = json.loads(arrays.pop("meta").tobytes())
    except Exception as err:  # zipfile, zlib, JSON, missing keys: all mean "unreadable"
        raise unreadable_checkpoint(path, err) from err
    use, saved_tc, template, opt_template = check_checkpoint(path, meta, arrays, config)
    params = unflatten_like(template, {k[7:]: v for k, v in arrays.items()
                                       if k.startswith("params/")})
    opt_state = unflatten_like(opt_template, {k[4:]: v for k, v in arrays.items()
                                              if k.startswith("opt/")})
    return {"params": params, "opt_state": opt_state, "key": arrays["key"],
            "config": use, "train_config": saved_tc, "history": meta["history"],
            "format_version": meta["format_version"], "base": meta.get("base"),
            "placed": False, "note": None}


def unreadable_checkpoint(path, err):
    """The CheckpointError for a file or metadata that cannot be read."""
    return CheckpointError(f"{path} is not a readable llama_jax checkpoint ({type(err).__name__}:"
                           f" {err}); it may be truncated or corrupted: delete it and train again")


def check_checkpoint(path, meta, arrays, config):
    """The checks of load_checkpoint, for either format: the format version,
    the architecture against `config` and every array's name, shape and dtype
    (arrays: flat names -> anything with .shape and .dtype).
    -> (the config to use, the saved TrainConfig, the params' and the
    optimizer state's shape trees)."""
    try:
        version = meta["format_version"]
        saved_config = config_from_json(RunModelConfig, meta["model_config"])
        saved_tc = config_from_json(RunTrainConfig, meta["train_config"])
    except Exception as err:  # missing keys, wrong types: the metadata is not ours
        raise unreadable_checkpoint(path, err) from err
    if version not in (1, CHECKPOINT_VERSION):
        raise CheckpointError(f"{path} has checkpoint format {version}; this llama_jax reads "
                              f"format {CHECKPOINT_VERSION}")
    problems = []
    if config is not None:
        for field in ARCHITECTURE_FIELDS:
            a, b = getattr(saved_config, field), getattr(config, field)
            if a != b:
                problems.append(f"{field}: {a} in the checkpoint, {b} requested")
    use = config or saved_config
    template = (jax.eval_shape(lambda: lora_init(jax.random.PRNGKey(0), use, saved_tc))
                if saved_tc.lora_rank else param_shapes(use))
    opt_template = jax.eval_shape(OPTIMIZERS[saved_tc.optimizer].init, template)
    problems += _tree_mismatches(template, arrays, "params/")
    problems += _tree_mismatches(opt_template, arrays, "opt/")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match this model:\n  - "
                              + "\n  - ".join(problems)
                              + "\nuse the flags it was trained with, or another --out-dir")
    return use, saved_tc, template, opt_template


# ----------------------------------------------------------------------------- Orbax
# The second format, for runs past one host: a folder (ckpt.orbax) of step
# folders written by Orbax, the JAX ecosystem's checkpointing library
# (orbax-checkpoint, https://orbax.readthedocs.io), as MaxText writes its own.
#   - Each process writes only the shards its devices hold: nothing is
#     gathered, so no host ever holds the whole state (.npz gathers all of it
#     onto every process, and process 0 writes it).
#   - Asynchronous: save returns once the shards are copied off the devices,
#     and a thread writes them while training goes on; the next save, the end
#     of the run or a stop waits for the one before.
#   - Atomic: a step is written under a temporary name and renamed into place
#     once every process has finished (Orbax's commit), so a crash mid-save
#     leaves the steps before it, and the reader passes over the rest.
#   - Restored onto any mesh: each device reads its own slice of each array.
#   - Uncompressed: Orbax compresses with zstd by default, which saved only 8%
#     of the bytes of float32 weights and AdamW moments (0.84 against 0.91 GB
#     a process, 153M parameters) but raised a process's peak memory during a
#     save by 1.0 to 1.5 GB (two runs, saves 10 s apart), where uncompressed
#     it rose by about 0.05 GB
#     (tools/bench_checkpoint.py --orbax-compression, docs/scaling.md).
# The arrays are one tree {"params", "opt", "key"} (PyTreeSave); the JSON
# part, checkpoint_record, is a second item ("meta").
ORBAX_REQUIREMENT = "orbax-checkpoint>=0.12,<0.13"  # tested: 0.12.8


def orbax_installed():
    """Whether orbax-checkpoint can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("orbax.checkpoint") is not None
    except ImportError:  # no orbax package at all
        return False


def orbax_module(why):
    """orbax.checkpoint, or InputError naming the package to install."""
    try:
        import orbax.checkpoint as ocp
    except ImportError as err:
        raise InputError(f"{why} needs the optional package orbax-checkpoint: pip install "
                         f"'{ORBAX_REQUIREMENT}' (or use --checkpoint npz)") from err
    return ocp


def orbax_manager(path, keep=None, compress=False):
    """Orbax's CheckpointManager over the folder `path`: a writer's (keep:
    the steps it keeps; it creates the folder) or a reader's (keep None).
    compress: zstd, Orbax's default, off here (see above); a reader reads
    either."""
    ocp = orbax_module(f"the Orbax checkpoint {path}")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=keep is not None,
                                           cleanup_tmp_directories=keep is not None,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager(
        Path(path).absolute(), options=options,
        item_handlers={"state": ocp.PyTreeCheckpointHandler(use_compression=compress),
                       "meta": ocp.JsonCheckpointHandler()})


def orbax_args(state=None, meta=None, restore=True, partial=False):
    """The items of one save or restore: state (a tree of arrays, or for a
    restore their ShapeDtypeStructs; partial: a part of the saved tree) and
    meta (the JSON; True to restore it)."""
    ocp = orbax_module("an Orbax checkpoint")
    items = {}
    if state is not None:  # a restore's ShapeDtypeStructs carry the shardings to read into
        items["state"] = (ocp.args.PyTreeRestore(
            state, restore_args=ocp.checkpoint_utils.construct_restore_args(state),
            partial_restore=partial)
            if restore else ocp.args.PyTreeSave(state))
    if meta is not None:
        items["meta"] = ocp.args.JsonRestore() if restore else ocp.args.JsonSave(meta)
    return ocp.args.Composite(**items)


def unfinished_saves(path, step):
    """The folders an interrupted save left in an Orbax folder past `step`
    (Orbax names them STEP.orbax-checkpoint-tmp-*)."""
    return sorted(p.name for p in Path(path).iterdir()
                  if ".orbax-checkpoint-tmp" in p.name and p.name.split(".")[0].isdigit()
                  and int(p.name.split(".")[0]) > step)


def load_orbax_checkpoint(path, config=None, mesh=None, weights_only=False):
    """load_checkpoint for an Orbax folder: its latest complete step."""
    manager = orbax_manager(path)
    with manager:
        step = manager.latest_step()
        if step is None:
            raise CheckpointError(f"{path} holds no complete Orbax step (a save that never "
                                  "finished, or not a checkpoint folder): train again, or "
                                  "point --out-dir at another run")
        unreadable = (f"{path}: step {step} is not readable ({{}}); delete that step's folder "
                      "to fall back to the one before")
        try:
            meta = manager.restore(step, args=orbax_args(meta=True))["meta"]
            saved = manager.item_metadata(step)["state"].tree
            arrays = flatten_tree({"params": saved["params"], "opt": saved["opt"]})
        except Exception as err:  # Orbax's and tensorstore's errors, or another tree
            raise CheckpointError(unreadable.format(f"{type(err).__name__}: {err}")) from err
        use, saved_tc, template, opt_template = check_checkpoint(path, meta, arrays, config)
        target = {"params": template, "opt": opt_template,
                  "key": jax.ShapeDtypeStruct((2,), jnp.uint32)}
        if weights_only:
            del target["opt"]
        if mesh is None:  # onto one device, then to the host
            one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            shardings = jax.tree_util.tree_map(lambda _: one, target)
        else:
            shardings = {"params": state_shardings(mesh, template),
                         "opt": state_shardings(mesh, opt_template),
                         "key": NamedSharding(mesh, P())}
            shardings = {k: shardings[k] for k in target}
        abstract = jax.tree_util.tree_map(
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), target, shardings)
        try:
            state = manager.restore(step, args=orbax_args(state=abstract,
                                                          partial=weights_only))["state"]
        except Exception as err:  # a missing or damaged shard file
            raise CheckpointError(unreadable.format(f"{type(err).__name__}: {err}")) from err
    if mesh is None:
        state = jax.tree_util.tree_map(np.asarray, state)
    left = unfinished_saves(path, step)
    note = (f"{path}: passed over an unfinished save ({', '.join(left)}, from a run stopped "
            f"mid-save); step {step} is the last complete one") if left else None
    return {"params": state["params"], "opt_state": state.get("opt"),
            "key": np.asarray(state["key"]),
            "config": use, "train_config": saved_tc, "history": meta["history"],
            "format_version": meta["format_version"], "base": meta.get("base"),
            "placed": mesh is not None, "note": note}


def saved_checkpoint(out_dir):
    """The checkpoint a run in out_dir left: its ckpt.npz or its ckpt.orbax
    folder; where both are there (a run that changed --checkpoint), the one
    at the later step. -> Path, or None when there is neither."""
    files = run_files(out_dir)
    present = [p for p in (files.checkpoint, files.orbax) if p.exists()]
    if len(present) == 2:
        steps = [(checkpoint_meta(p) or {}).get("step", -1) for p in present]
        return present[int(steps[1] > steps[0])]
    return present[0] if present else None


def checkpoint_bytes(config, tc):
    """Bytes of what a checkpoint holds: the trained weights (with LoRA, the
    adapters) and the optimizer's state."""
    trainable = run_shapes(config, tc)[0]
    return tree_bytes(trainable) + tree_bytes(jax.eval_shape(OPTIMIZERS[tc.optimizer].init,
                                                             trainable))


def checkpoint_format(tc, config):
    """--checkpoint auto: Orbax where .npz would not scale, when
    orbax-checkpoint is installed: with several processes (.npz gathers the
    whole state onto each), or where the state (checkpoint_bytes: 12 bytes a
    parameter with AdamW) would take over half of this host's memory. Else
    .npz: one file, readable with NumPy alone.
    -> ("npz" or "orbax", why, in words)."""
    if tc.checkpoint != "auto":
        return tc.checkpoint, f"--checkpoint {tc.checkpoint}"
    state = checkpoint_bytes(config, tc)
    try:
        host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        host = None
    reasons = ([f"{jax.process_count()} processes"] if jax.process_count() > 1 else []) + (
        [f"the state, {gb(state)}, is over half this host's memory"]
        if host is not None and state > host / 2 else [])
    if not reasons:
        return "npz", "--checkpoint auto: npz, one process"
    if not orbax_installed():
        return "npz", (f"--checkpoint auto: npz, gathered onto every process; with "
                       f"{' and '.join(reasons)}, orbax would scale better (pip install "
                       f"'{ORBAX_REQUIREMENT}')")
    return "orbax", f"--checkpoint auto: orbax, as {' and '.join(reasons)}"


def checkpoint_plan(config, tc, mesh):
    """--plan's lines on saving a checkpoint, in each format, per process."""
    state = checkpoint_bytes(config, tc)
    # The distinct FSDP shards one process's devices hold (each group of fsdp
    # devices holds one copy of the state; a process's devices are contiguous).
    fsdp = mesh.shape["fsdp"]
    shards = state * min(jax.local_device_count(), fsdp) / fsdp
    chosen, why = checkpoint_format(tc, config)
    return [f"checkpoint ({chosen}: {why}), per process, for {gb(state)} of weights and "
            "optimizer state:",
            f"  npz    host memory {gb(state):>10}  (every array gathered onto each process); "
            f"process 0 writes {gb(state)}, the others nothing",
            f"  orbax  host memory {gb(shards):>10}  (only its own shards, copied off its "
            f"devices); writes at most {gb(shards)}, in the background"]


class NpzWriter:
    """Writes a run's checkpoints as out_dir/ckpt.npz (save_checkpoint)."""

    def __init__(self, out_dir):
        self.path = run_files(out_dir).checkpoint

    def save(self, params, opt_state, key, config, tc, history, base):
        save_checkpoint(self.path, params, opt_state, key, config, tc, history, base)

    def close(self):
        pass


class OrbaxWriter:
    """Writes a run's checkpoints into out_dir/ckpt.orbax, one step folder
    each, asynchronously (see above), keeping the last tc.keep_checkpoints.
    close() waits for the save in flight."""

    def __init__(self, out_dir, keep, compress=False):
        self.path = run_files(out_dir).orbax
        self.manager = orbax_manager(self.path, keep, compress)

    def save(self, params, opt_state, key, config, tc, history, base):
        meta = checkpoint_record(opt_state, config, tc, history, base)
        if meta["step"] in self.manager.all_steps():  # a stop just after an evaluation's save
            return
        state = {"params": params, "opt": opt_state, "key": np.asarray(key)}
        try:
            saved = self.manager.save(meta["step"], args=orbax_args(state, meta, restore=False))
        except Exception as err:  # the save before it failed in the background: disk, rights
            raise OSError(f"Orbax: {type(err).__name__}: {err}") from err
        if not saved:  # Orbax refuses a step at or before its latest one
            raise OSError(f"Orbax did not save step {meta['step']}: {self.path} holds later "
                          "steps of another run")

    def close(self):
        try:
            self.manager.wait_until_finished()
        except Exception as err:
            raise OSError(f"Orbax: {type(err).__name__}: {err}") from err
        finally:
            self.manager.close()


def checkpoint_writer(out_dir, tc, config, log=lambda line: None, resume=False):
    """The writer of a run's checkpoints, in the format checkpoint_format
    chooses, which it logs. A fresh run (resume False) first removes an
    earlier run's checkpoints from out_dir, in either format, as it would
    write over its ckpt.npz: a reader takes the later of the two
    (saved_checkpoint), and Orbax would not save steps before an old run's."""
    chosen, why = checkpoint_format(tc, config)
    files = run_files(out_dir)
    if not resume and jax.process_index() == 0:
        for old in (files.checkpoint, files.orbax):
            if old.exists():
                log(f"a fresh run: removing the earlier run's {old}")
                if old.is_dir():
                    shutil.rmtree(old)
                else:
                    old.unlink()
    if not resume and jax.process_count() > 1:
        multihost_utils.sync_global_devices("fresh run: old checkpoints removed")
    if chosen == "orbax":
        orbax_module("--checkpoint orbax")
        writer = OrbaxWriter(out_dir, tc.keep_checkpoints)
        log(f"checkpoints: {writer.path}, each process writing its own shards in the "
            f"background, the last {tc.keep_checkpoints} steps kept ({why})")
    else:
        writer = NpzWriter(out_dir)
        log(f"checkpoints: {writer.path} ({why})")
    return writer


# ----------------------------------------------------------------------------- Hugging Face
# A safetensors file is: 8 bytes (little-endian u64) header length N, N bytes
# of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, optional
# "__metadata__"}, then the raw little-endian tensor bytes, offsets relative
# to the end of the header.

SAFETENSORS_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
                      "BF16": np.dtype(ml_dtypes.bfloat16)}


def read_safetensors(path):
    """-> {name: np.ndarray}, memory-mapped (read lazily, never copied whole)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated: shorter than a safetensors header")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise CheckpointError(f"{path}: the header claims {n} bytes but the file has "
                                  f"{size - 8} after the length field (truncated?)")
        try:
            header = json.loads(f.read(n))
        except ValueError as err:
            raise CheckpointError(f"{path}: the safetensors header is not valid JSON") from err
    data_start, data_size = 8 + n, size - 8 - n
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_size,)) \
        if data_size else np.zeros(0, np.uint8)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is a JSON "
                              f"{type(header).__name__}, not an object of tensors")
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(info, dict) and isinstance(info.get("shape"), list)
                and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2):
            raise CheckpointError(f"{path}: the header entry of tensor {name} is "
                                  f"{json.dumps(info)[:80]}, not an object with dtype, shape "
                                  "and two data_offsets: the file is damaged or not safetensors")
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has dtype {info.get('dtype')}; "
                                  "llama_jax reads F32, F16 and BF16")
        shape, (begin, end) = tuple(info["shape"]), info["data_offsets"]
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != expected or not 0 <= begin <= end <= data_size:
            raise CheckpointError(f"{path}: tensor {name} claims bytes {begin}..{end} for shape "
                                  f"{list(shape)} {info['dtype']} ({expected} bytes) but the "
                                  f"data section has {data_size} bytes: the file is truncated "
                                  "or its header is wrong")
        tensors[name] = raw[begin:end].view(dtype).reshape(shape)
    return tensors


def write_safetensors(path, tensors):
    """{name: np.ndarray} -> a .safetensors file (atomically, like checkpoints)."""
    names = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors.items():
        code = next(c for c, d in names.items() if np.dtype(d) == t.dtype)
        header[name] = {"dtype": code, "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format asks for 8-byte aligned data
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for t in tensors.values():
            f.write(np.ascontiguousarray(t).tobytes())
        f.flush()
        os.fsync(f.fileno())
    replace_durably(tmp, path)


# (our path, Hugging Face name, transposed?) for one layer; see the table in 4.
# Our names and Hugging Face's (LlamaForCausalLM), one to one. Our matrices are
# stored [in, out] so that layers compute x @ w; Hugging Face stores torch's
# nn.Linear weight, [out, in], so the loader transposes ("T" below).
#   tok_embeddings                    model.embed_tokens.weight
#   layers.{i}.attention_norm         model.layers.{i}.input_layernorm.weight
#   layers.{i}.attention.wq  (T)      model.layers.{i}.self_attn.q_proj.weight
#   layers.{i}.attention.wk  (T)      model.layers.{i}.self_attn.k_proj.weight
#   layers.{i}.attention.wv  (T)      model.layers.{i}.self_attn.v_proj.weight
#   layers.{i}.attention.wo  (T)      model.layers.{i}.self_attn.o_proj.weight
#   layers.{i}.ffn_norm               model.layers.{i}.post_attention_layernorm.weight
#   layers.{i}.feed_forward.w1 (T)    model.layers.{i}.mlp.gate_proj.weight
#   layers.{i}.feed_forward.w2 (T)    model.layers.{i}.mlp.down_proj.weight
#   layers.{i}.feed_forward.w3 (T)    model.layers.{i}.mlp.up_proj.weight
#   norm                              model.norm.weight
#   output   (T)                      lm_head.weight (absent when embeddings are tied)


HF_LAYER_NAMES = [
    ("attention_norm", "input_layernorm.weight", False),
    ("attention/wq", "self_attn.q_proj.weight", True),
    ("attention/wk", "self_attn.k_proj.weight", True),
    ("attention/wv", "self_attn.v_proj.weight", True),
    ("attention/wo", "self_attn.o_proj.weight", True),
    ("ffn_norm", "post_attention_layernorm.weight", False),
    ("feed_forward/w1", "mlp.gate_proj.weight", True),
    ("feed_forward/w2", "mlp.down_proj.weight", True),
    ("feed_forward/w3", "mlp.up_proj.weight", True),
]


def name_map(config, embedding, norm, output, layer, layer_names):
    """-> [(our flat path, the file's name, transposed)] for every parameter.
    layer: the file's name of a block's tensor, formatted with the block's
    index i and the name from layer_names; output is absent when tied."""
    names = [("tok_embeddings", embedding, False), ("norm", norm, False)]
    for i in range(config.n_layers):
        names += [(f"layers/{i}/{ours}", layer.format(i=i, name=theirs), t)
                  for ours, theirs, t in layer_names]
    if not config.tie_embeddings:
        names.append(("output", output, True))
    return names


def hf_name_map(config):
    """-> [(our flat path, Hugging Face name, transposed)] for every parameter."""
    return name_map(config, "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                    "model.layers.{i}.{name}", HF_LAYER_NAMES)


def read_json(path):
    """A JSON object from a model folder, or CheckpointError naming the file."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}): the file is damaged or "
                              "was not written by transformers") from err
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def config_from_hf(hf):
    """A Hugging Face config.json dict -> ModelConfig, or CheckpointError naming
    the field that llama_jax does not support."""
    if hf.get("model_type") != "llama":
        raise CheckpointError(f"config.json: model_type is {hf.get('model_type')!r}; llama_jax "
                              "loads only 'llama' models")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise CheckpointError(f"config.json: {flag} is true; Llama has no biases and "
                                  "llama_jax does not support them")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"config.json: hidden_act is {hf['hidden_act']!r}; llama_jax "
                              "supports 'silu' (SwiGLU)")
    # transformers 4.x writes rope_theta and rope_scaling; 5.x one rope_parameters dict.
    rope = hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or (rope if "rope_type" in rope else None)
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "default":
            scaling = None
        elif kind != "llama3":
            raise CheckpointError(f"config.json: rope_scaling type {kind!r} is not supported "
                                  "(llama_jax supports 'llama3')")
        else:
            scaling = (float(scaling["factor"]), float(scaling["low_freq_factor"]),
                       float(scaling["high_freq_factor"]),
                       float(scaling["original_max_position_embeddings"]))
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size")
    missing = [k for k in required if not isinstance(hf.get(k), int)]
    if missing:
        raise CheckpointError(f"config.json: {', '.join(missing)} "
                              f"{'is' if len(missing) == 1 else 'are'} missing or not an integer; "
                              f"a Llama config needs all of {', '.join(required)}")
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    return RunModelConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=None if head_dim in (None, hf["hidden_size"] // n_heads) else head_dim,
        ffn_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta), rope_scaling=scaling,
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), vocab_multiple=1,
        compute_dtype="bfloat16" if hf.get("torch_dtype", hf.get("dtype")) == "bfloat16" else "float32")


def config_to_hf(config):
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
          "vocab_size": config.vocab_size, "hidden_size": config.dim,
          "intermediate_size": config.ffn_width, "num_hidden_layers": config.n_layers,
          "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
          "head_dim": config.head_width, "hidden_act": "silu", "rms_norm_eps": config.norm_eps,
          "rope_theta": config.rope_theta, "max_position_embeddings": config.max_seq_len,
          "tie_word_embeddings": config.tie_embeddings, "attention_bias": False,
          "mlp_bias": False, "torch_dtype": "float32", "rope_scaling": None}
    if config.rope_scaling is not None:
        factor, low, high, original = config.rope_scaling
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                              "high_freq_factor": high,
                              "original_max_position_embeddings": int(original)}
    return hf


def load_hf_checkpoint(path):
    """Reads a Hugging Face Llama folder (config.json plus model.safetensors, or
    shards listed in model.safetensors.index.json). float32 and float16 weights
    load as float32, bfloat16 stays bfloat16 (and sets bfloat16 compute). One
    tensor is converted at a time from the memory-mapped files, so host memory
    holds about one copy of the weights. -> (params, ModelConfig)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: pass a Hugging Face Llama model folder")
    config = config_from_hf(read_json(path / "config.json"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map object (tensor name -> file)")
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not (path / f).is_file()]
        if absent:
            raise CheckpointError(f"{index} names {', '.join(absent)}, which "
                                  f"{'is' if len(absent) == 1 else 'are'} not in {path}: the "
                                  "download is incomplete; fetch every shard the index lists")
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{path} has neither model.safetensors nor "
                              "model.safetensors.index.json (PyTorch .bin files are not read)")
    tensors = {}
    for name in files:
        tensors.update(read_safetensors(path / name))
    shapes = param_shapes(config)
    template, flat = flatten_tree(shapes), {}
    for ours, theirs, transposed in hf_name_map(config):
        if theirs not in tensors:
            raise CheckpointError(f"{path}: tensor {theirs} is missing")
        t = tensors[theirs]
        t = t.T if transposed else t
        if t.shape != template[ours].shape:
            implied = template[ours].shape[::-1] if transposed else template[ours].shape
            raise CheckpointError(f"{path}: tensor {theirs} has shape {list(tensors[theirs].shape)}"
                                  f", but config.json implies {list(implied)}")
        dtype = jnp.bfloat16 if t.dtype == ml_dtypes.bfloat16 else jnp.float32
        flat[ours] = jnp.asarray(t, dtype=dtype)
    return unflatten_like(shapes, flat), config


def save_hf_checkpoint(path, params, config):
    """Writes config.json and model.safetensors (float32) that transformers'
    LlamaForCausalLM.from_pretrained(path) loads. Padded vocabulary rows are
    dropped."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat = flatten_tree(params)
    tensors = {}
    for ours, theirs, transposed in hf_name_map(config):
        t = np.asarray(flat[ours], dtype=np.float32)
        if ours == "tok_embeddings":
            t = t[:config.vocab_size]
        elif ours == "output":
            t = t[:, :config.vocab_size]
        tensors[theirs] = np.ascontiguousarray(t.T if transposed else t)
    write_safetensors(path / "model.safetensors", tensors)
    (path / "config.json").write_text(json.dumps(config_to_hf(config), indent=2) + "\n")


# ----------------------------------------------------------------------------- GGUF
# llama.cpp's single-file format: metadata (key -> value) then tensors, most
# of them quantized in blocks (Q8_0: 32 int8 values and one float16 scale per
# block; Q4_1: 32 4-bit values, a scale and a minimum; K-quants: super-blocks of
# 256). The `gguf` package (llama.cpp's own reader, an optional dependency)
# maps the file and dequantizes; we only name, transpose and check.
# Our names and GGUF's (llama.cpp's llama architecture):
#   tok_embeddings              token_embd.weight
#   layers.{i}.attention_norm   blk.{i}.attn_norm.weight
#   layers.{i}.attention.wq     blk.{i}.attn_q.weight       (T, rows interleaved, see below)
#   layers.{i}.attention.wk     blk.{i}.attn_k.weight       (T, rows interleaved)
#   layers.{i}.attention.wv     blk.{i}.attn_v.weight       (T)
#   layers.{i}.attention.wo     blk.{i}.attn_output.weight  (T)
#   layers.{i}.ffn_norm         blk.{i}.ffn_norm.weight
#   layers.{i}.feed_forward.w1  blk.{i}.ffn_gate.weight     (T)
#   layers.{i}.feed_forward.w2  blk.{i}.ffn_down.weight     (T)
#   layers.{i}.feed_forward.w3  blk.{i}.ffn_up.weight       (T)
#   norm                        output_norm.weight
#   output                      output.weight (T; absent when tied)

GGUF_LAYER_NAMES = [("attention_norm", "attn_norm", False), ("attention/wq", "attn_q", True),
                    ("attention/wk", "attn_k", True), ("attention/wv", "attn_v", True),
                    ("attention/wo", "attn_output", True), ("ffn_norm", "ffn_norm", False),
                    ("feed_forward/w1", "ffn_gate", True), ("feed_forward/w2", "ffn_down", True),
                    ("feed_forward/w3", "ffn_up", True)]


def gguf_name_map(config):
    """-> [(our flat path, GGUF tensor name, transposed)] for every parameter."""
    return name_map(config, "token_embd.weight", "output_norm.weight", "output.weight",
                    "blk.{i}.{name}.weight", GGUF_LAYER_NAMES)


def interleaved_to_half_split(w, n_heads):
    """w: [D, n_heads * Dh] whose output channels rotate as Meta's interleaved
    pairs (2j, 2j + 1), as llama.cpp stores wq and wk -> the same matrix with
    each head's channels reordered to the half-split pairs (j, j + Dh/2) that
    apply_rope uses. The attention scores are unchanged (a test proves it)."""
    D, width = w.shape
    Dh = width // n_heads
    order = np.concatenate([np.arange(0, Dh, 2), np.arange(1, Dh, 2)])  # [Dh]
    return w[:, (np.arange(n_heads)[:, None] * Dh + order).reshape(-1)]


def gguf_value(reader, key, required=True):
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise CheckpointError(f"GGUF metadata has no {key}: the file is incomplete or was "
                                  "not written for llama.cpp's llama architecture")
        return None
    return field.contents()


def open_gguf(path):
    """A gguf.GGUFReader over the file (it parses the metadata, about 2 s for
    SmolLM2's 49,152 tokens and merges, and maps the tensors), or a clear error."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"GGUF file {path} not found")
    try:
        import gguf
    except ImportError as err:
        raise InputError("reading GGUF files needs the gguf package (llama.cpp's reader): "
                         "pip install gguf") from err
    try:
        return gguf.GGUFReader(path)
    except Exception as err:  # the reader raises ValueError, IndexError, struct errors...
        raise CheckpointError(f"{path} is not a readable GGUF file ({type(err).__name__}: "
                              f"{err}); it may be truncated or not GGUF at all") from err


def gguf_config(reader, path, dtype="float32"):
    """The ModelConfig of a GGUF file of the llama architecture, from its
    metadata and tensor names. -> RunModelConfig."""
    import gguf

    arch = gguf_value(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path} holds a {arch!r} model; llama_jax reads the 'llama' "
                              "architecture only")
    p = "llama."
    n_heads = int(gguf_value(reader, p + "attention.head_count"))
    dim = int(gguf_value(reader, p + "embedding_length"))
    head_dim = gguf_value(reader, p + "attention.key_length", required=False)
    rope_scaling = gguf_value(reader, p + "rope.scaling.type", required=False)
    if rope_scaling not in (None, "none"):
        raise CheckpointError(f"{path}: rope.scaling.type {rope_scaling!r} is not supported")
    tensors = {t.name: t for t in reader.tensors}
    scaling = None
    if "rope_freqs.weight" in tensors:  # Llama 3.1+: scaling factors per RoPE frequency
        scaling = gguf_value(reader, "llama_jax.rope_scaling", required=False)
        if scaling is None:
            raise CheckpointError(f"{path} carries RoPE frequency factors (rope_freqs.weight, "
                                  "Llama 3.1-style scaling) without the four numbers that made "
                                  "them, which llama_jax reads only from its own exports: load "
                                  "the model's Hugging Face folder with --hf-checkpoint")
        scaling = tuple(float(x) for x in scaling)
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path} has no token_embd.weight tensor")
    vocab_size = gguf_value(reader, p + "vocab_size", required=False)
    if vocab_size is None:
        vocab_size = len(gguf_value(reader, "tokenizer.ggml.tokens"))
    config = RunModelConfig(
        vocab_size=int(vocab_size), dim=dim, n_layers=int(gguf_value(reader, p + "block_count")),
        n_heads=n_heads,
        n_kv_heads=int(gguf_value(reader, p + "attention.head_count_kv", required=False)
                       or n_heads),
        head_dim=None if head_dim in (None, dim // n_heads) else int(head_dim),
        ffn_dim=int(gguf_value(reader, p + "feed_forward_length")),
        # float32 in the file: 1e-5 reads 9.9999997e-06; 7 digits give it back
        norm_eps=float(f"{gguf_value(reader, p + 'attention.layer_norm_rms_epsilon'):.7g}"),
        rope_theta=float(gguf_value(reader, p + "rope.freq_base", required=False) or 10000.0),
        max_seq_len=int(gguf_value(reader, p + "context_length")), rope_scaling=scaling,
        tie_embeddings="output.weight" not in tensors, vocab_multiple=1,
        compute_dtype="bfloat16" if dtype == "bfloat16" else "float32")
    if scaling is not None:
        factors = gguf.quants.dequantize(tensors["rope_freqs.weight"].data,
                                         tensors["rope_freqs.weight"].tensor_type)
        if not np.allclose(np.ravel(factors), rope_frequency_factors(config), rtol=1e-5):
            raise CheckpointError(f"{path}: rope_freqs.weight disagrees with "
                                  "llama_jax.rope_scaling; the file was edited after export")
    return config


def read_gguf_tensor(tensors, path, name, shape, transpose):
    """A GGUF tensor of tensors (name -> the reader's tensor), dequantized to
    float32 and, with transpose, turned to our [in, out]; shape: what the
    metadata implies. -> np.ndarray."""
    import gguf

    if name not in tensors:
        raise CheckpointError(f"{path}: tensor {name} is missing")
    t = tensors[name]
    try:
        value = gguf.quants.dequantize(t.data, t.tensor_type)
    except (NotImplementedError, KeyError, ValueError) as err:
        raise CheckpointError(f"{path}: tensor {name} has type {t.tensor_type.name}, which "
                              f"the gguf package cannot dequantize ({err})") from err
    value = np.asarray(value, np.float32)
    value = value.T if transpose else value  # GGUF rows are outputs, like torch's [out, in]
    if value.shape != tuple(shape):
        raise CheckpointError(f"{path}: tensor {name} has shape {list(value.shape)} after "
                              f"dequantizing, but the metadata implies {list(shape)}")
    return value


def load_gguf(path, dtype="float32", reader=None):
    """Reads a llama.cpp GGUF file of the llama architecture: every tensor type
    that the gguf package dequantizes (F32, F16, BF16, Q8_0, Q4_0, Q4_1, the
    K-quants, ...) becomes float32 (or bfloat16 with dtype="bfloat16"), the
    hyperparameters come from the metadata, and the tokenizer (byte-level BPE)
    from its token list and merges. Embeddings are tied when the file has no
    output.weight. reader: the file's open_gguf, if the caller has it already.
    -> (params, ModelConfig, tiktoken Encoding)."""
    path = Path(path)
    reader = reader or open_gguf(path)  # checks that gguf is installed
    config = gguf_config(reader, path, dtype)
    tensors = {t.name: t for t in reader.tensors}
    target = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    shapes = param_shapes(config)
    template, flat = flatten_tree(shapes), {}
    for ours, theirs, transposed in gguf_name_map(config):
        value = read_gguf_tensor(tensors, path, theirs, template[ours].shape,
                                 transposed)
        if ours.endswith(("/wq", "/wk")):  # llama.cpp's converter interleaved these rows
            value = interleaved_to_half_split(
                value, config.n_heads if ours.endswith("/wq") else config.n_kv_heads)
        flat[ours] = jnp.asarray(value, target)
    params = unflatten_like(shapes, flat)
    return params, config, gguf_tokenizer(reader, path)


def gguf_tokenizer(reader, path):
    """The tokenizer stored in a GGUF file, as a tiktoken Encoding: byte-level
    BPE (tokenizer.ggml.model "gpt2", as in Llama 3, SmolLM, Qwen...) from its
    token list and merges; unknown, control, user-defined and unused tokens
    (GGUF token types 2 to 5) are special."""
    model = gguf_value(reader, "tokenizer.ggml.model")
    if model == "llama":
        raise CheckpointError(f"{path} has a SentencePiece tokenizer (Llama 1 and 2), which "
                              "llama_jax does not read: pass token ids with --prompt-ids "
                              "instead of text")
    if model != "gpt2":
        raise CheckpointError(f"{path}: tokenizer.ggml.model is {model!r}; llama_jax reads "
                              "byte-level BPE ('gpt2')")
    tokens = gguf_value(reader, "tokenizer.ggml.tokens")
    types = gguf_value(reader, "tokenizer.ggml.token_type", required=False) or [1] * len(tokens)
    pre = gguf_value(reader, "tokenizer.ggml.pre", required=False) or "default"
    try:
        return bpe_tokenizer(tokens, gguf_value(reader, "tokenizer.ggml.merges"),
                             [i for i, t in enumerate(types) if t in (2, 3, 4, 5)], pre,
                             name=Path(path).stem)
    except InputError as err:
        raise CheckpointError(f"{path}: {err}") from err


# ----------------------------------------------------------------------------- writing GGUF
# --export-gguf FILE writes a model as llama.cpp's own converter
# (convert_hf_to_gguf.py) would: the llama architecture's metadata, the
# tokenizer as byte-level BPE tokens and merges, the chat template, and the
# tensors under GGUF_LAYER_NAMES, [out, in] rows, with wq and wk back in the
# interleaved layout that load_gguf undoes. Norm gains stay float32 (llama.cpp
# keeps 1-D tensors in F32); matrices are F32, F16, or Q8_0: blocks of 32
# weights along a row, each stored as int8 with one float16 scale (a matrix
# whose rows do not split into blocks of 32 is written F16, as llama.cpp does).
# Llama 3.1's RoPE scaling is written as llama.cpp's rope_freqs.weight (the
# factors per frequency) and as the four numbers load_gguf reads back.

GGUF_TYPES = ("f32", "f16", "q8_0")


def half_split_to_interleaved(w, n_heads):
    """The inverse of interleaved_to_half_split: w [D, n_heads * Dh] with
    half-split channel pairs (j, j + Dh/2) -> llama.cpp's interleaved pairs
    (2j, 2j + 1), head by head."""
    D, width = w.shape
    Dh = width // n_heads
    order = np.concatenate([np.arange(0, Dh, 2), np.arange(1, Dh, 2)])  # [Dh]
    return w[:, (np.arange(n_heads)[:, None] * Dh + np.argsort(order)).reshape(-1)]


def bpe_merges(ranks):
    """The merges of a tiktoken BPE ({token bytes: rank}), in rank order: each
    token of two or more bytes is what BPE makes of its bytes with only the
    lower-ranked tokens, which leaves two parts, and those two are its merge
    (tiktoken merges the pair whose result has the lowest rank, so a merge's
    priority is its result's rank). -> [(left bytes, right bytes)]."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, i = min(pairs)
            if best >= rank:
                raise InputError(f"token {rank} ({token!r}) is not a merge of lower-ranked "
                                 "tokens: not a BPE vocabulary GGUF can hold")
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def gguf_vocabulary(tokenizer, vocab_size):
    """A tiktoken Encoding in GGUF's byte-level BPE terms: token strings in
    byte-level characters (id = position; special tokens by name, control
    type), token types (1 normal, 3 control, 5 unused for ids the tokenizer
    does not use) and merges "a b" in priority order. -> (tokens, types, merges)."""
    to_char = {b: c for c, b in byte_level_alphabet().items()}
    special = {tokenizer.encode_single_token(s): s for s in tokenizer.special_tokens_set}
    tokens, types, ranks = [], [], {}
    for i in range(vocab_size):
        if i in special:
            tokens.append(special[i])
            types.append(3)
            continue
        try:
            raw = tokenizer.decode_single_token_bytes(i)
        except KeyError:  # an id the tokenizer never produces
            tokens.append(f"[PAD{i}]")
            types.append(5)
            continue
        ranks[raw] = i
        tokens.append("".join(to_char[b] for b in raw))
        types.append(1)
    merges = [" ".join("".join(to_char[b] for b in part) for part in pair)
              for pair in bpe_merges(ranks)]
    return tokens, types, merges


def pre_tokenizer_name(tokenizer):
    """The name llama.cpp gives the tokenizer's split pattern (PRE_TOKENIZERS;
    llama.cpp's llama-vocab.cpp spells GPT-2's "gpt-2"), or None when
    llama.cpp names no such pattern. tiktoken keeps the pattern in the
    Encoding's _pat_str."""
    pattern = getattr(tokenizer, "_pat_str", None)
    for name in ("gpt-2", "llama-bpe", "smollm"):
        if PRE_TOKENIZERS[name] == pattern:
            return name
    return None


def gguf_matrix(gguf, value, kind):
    """One matrix as GGUF stores it: (data, GGML type). value: float32 [rows,
    columns], already in llama.cpp's [out, in] layout."""
    types = gguf.GGMLQuantizationType
    if kind == "f32":
        return value, types.F32
    if kind == "q8_0" and value.shape[-1] % 32 == 0:
        return gguf.quants.quantize(value, types.Q8_0), types.Q8_0
    return value.astype(np.float16), types.F16


def rope_frequency_factors(config):
    """Llama 3.1's RoPE scaling as llama.cpp reads it: float32[Dh / 2], how
    many times slower each channel pair rotates than plain RoPE would turn it
    (llama.cpp divides each angle by its factor). Read off precompute_rope's
    tables: the angle at position 1 is each pair's frequency."""
    def frequencies(scaling):
        cos, sin = precompute_rope(config.head_width, 2, config.rope_theta, scaling)
        return np.arctan2(sin[1].astype(np.float64), cos[1].astype(np.float64))

    return (frequencies(None) / frequencies(config.rope_scaling)).astype(np.float32)


def check_gguf_export(path, config, tokenizer, kind):
    """Refuses what would lose something: an existing file, an unknown type, a
    model without a tokenizer llama.cpp can read, or an architecture that the
    llama architecture's metadata cannot state. -> the pre-tokenizer's name."""
    path = Path(path)
    if path.exists():
        raise InputError(f"--export-gguf {path}: the file exists; choose a new name (nothing "
                         "was written)")
    if not path.parent.is_dir():
        raise InputError(f"--export-gguf {path}: the folder {path.parent} does not exist")
    if kind not in GGUF_TYPES:
        raise InputError(f"--gguf-type {kind}: choose one of {', '.join(GGUF_TYPES)}")
    if tokenizer is None:
        raise InputError("--export-gguf: the model has no tokenizer llama_jax can read, and "
                         "llama.cpp needs one in the file")
    pre = pre_tokenizer_name(tokenizer)
    if pre is None:
        raise InputError(f"--export-gguf: the tokenizer {tokenizer.name!r} splits text by a "
                         "pattern that llama.cpp has no name for (it knows gpt2, llama-bpe, "
                         "smollm and others), so llama.cpp would tokenize differently")
    return pre


def add_gguf_tokenizer(w, tokenizer, vocabulary, pre, special, chat_template):
    """The tokenizer's keys of a GGUF file, to GGUFWriter w: vocabulary's
    byte-level BPE (tokens, types, merges: gguf_vocabulary), pre-tokenizer
    pre, the special tokens (save_gguf's special) and the chat template."""
    tokens, types, merges = vocabulary
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    end = special_token(tokenizer, ENDOFTEXT, "<|end_of_text|>")
    special = special or {"bos": end, "eos": end, "add_bos": False}
    for role in ("bos", "eos", "pad"):
        if special.get(role) is not None:
            getattr(w, f"add_{role}_token_id")(int(special[role]))
    w.add_add_bos_token(bool(special.get("add_bos")))
    if chat_template:
        w.add_chat_template(chat_template)


def add_gguf_tensors(w, gguf, params, config, kind):
    """The model's tensors, to GGUFWriter w under llama.cpp's names: the
    padded vocabulary cut, wq and wk interleaved back, matrices as kind."""
    flat = flatten_tree(jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params))
    for ours, theirs, transposed in gguf_name_map(config):
        value = flat[ours]
        if ours == "tok_embeddings":
            value = value[:config.vocab_size]  # [V, D]: the padding rows go
        elif ours == "output":
            value = value[:, :config.vocab_size]  # [D, V]
        if ours.endswith(("/wq", "/wk")):
            value = half_split_to_interleaved(
                value, config.n_heads if ours.endswith("/wq") else config.n_kv_heads)
        value = np.ascontiguousarray(value.T if transposed else value)
        if value.ndim == 1:
            w.add_tensor(theirs, value)
        else:
            data, ggml_type = gguf_matrix(gguf, value, kind)
            w.add_tensor(theirs, data, raw_dtype=ggml_type)


def save_gguf(path, params, config, tokenizer, kind="f16", chat_template=None, special=None,
              name="llama_jax", log=print):
    """Writes a model (params over the padded vocabulary are cut to
    vocab_size, which llama.cpp's token list must match) as a GGUF file of
    type kind (GGUF_TYPES). special: the source's {"bos", "eos", "pad": token
    id or None, "add_bos": whether llama.cpp puts bos in front of a prompt}
    (load_source); default: the end-of-text token as bos and eos, added to
    no prompt, as GPT-2 does. Written beside its name and
    renamed over it, so a failure leaves no partial file."""
    import gguf  # checked by the caller

    pre = check_gguf_export(path, config, tokenizer, kind)
    path = Path(path)
    tokens, types, merges = gguf_vocabulary(tokenizer, config.vocab_size)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
    architecture = {  # llama.<key> in the file, written by GGUFWriter.add_<key>
        "context_length": config.max_seq_len, "embedding_length": config.dim,
        "block_count": config.n_layers, "feed_forward_length": config.ffn_width,
        "head_count": config.n_heads, "head_count_kv": config.n_kv_heads,
        "key_length": config.head_width, "value_length": config.head_width,
        "rope_dimension_count": config.head_width, "rope_freq_base": config.rope_theta,
        "layer_norm_rms_eps": config.norm_eps, "vocab_size": config.vocab_size}
    for key, value in architecture.items():
        getattr(w, f"add_{key}")(value)
    if config.rope_scaling is not None:  # Llama 3.1: llama.cpp reads the factors' tensor,
        w.add_tensor("rope_freqs.weight", rope_frequency_factors(config))  # we the 4 numbers
        w.add_array("llama_jax.rope_scaling", [float(x) for x in config.rope_scaling])
    add_gguf_tokenizer(w, tokenizer, (tokens, types, merges), pre, special,
                       chat_template)
    add_gguf_tensors(w, gguf, params, config, kind)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    log(f"wrote {path} ({kind}, {path.stat().st_size / 1e6:,.1f} MB): {config.n_layers} "
        f"layers, {config.vocab_size:,} tokens ({pre} pre-tokenizer), "
        f"{'a chat template' if chat_template else 'no chat template'}")


# ----------------------------------------------------------------------------- other models' tokenizers

ARCHITECTURE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                       "ffn_dim", "ffn_dim_multiplier", "multiple_of", "norm_eps", "rope_theta",
                       "rope_scaling", "max_seq_len", "tie_embeddings", "vocab_multiple")


def llama3_tokenizer(path):
    """A tiktoken Encoding for Llama 3's tokenizer.model (tiktoken format, 128,000
    ranks) with Llama 3's split pattern and its 256 special tokens, numbered
    after the ranks, named as in Llama 3.1 and later (Meta's tokenizer.py).
    Llama 3.0 named a few unused slots differently; the ids of
    <|begin_of_text|>, <|end_of_text|>, the header tokens and <|eot_id|> agree."""
    import tiktoken

    ranks = read_bpe_ranks(path)
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
             "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
             "<|python_tag|>"]
    names += [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(names))]
    return tiktoken.Encoding(name="llama3", pat_str=PRE_TOKENIZERS["llama-bpe"],
                             mergeable_ranks=ranks,
                             special_tokens={n: len(ranks) + i for i, n in enumerate(names)})


# Pre-tokenizers by the names llama.cpp writes to GGUF (tokenizer.ggml.pre): how
# text is split into pieces before BPE merges run inside each piece.
PRE_TOKENIZERS = {
    "gpt2": GPT2_SPLIT_PATTERN,
    "llama-bpe": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),  # Llama 3
    # SmolLM, StarCoder and others: every digit alone, then GPT-2's rules.
    # llama.cpp splits in two passes (digits, then GPT-2's pattern inside the
    # rest); in one pattern, whitespace before a digit must count as the end
    # of a piece, hence (?![^\s\p{N}]) where GPT-2 has (?!\S).
    "smollm": (r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|"
               r"\s+(?![^\s\p{N}])|\s+"),
}
for _name in ("starcoder", "refact", "codeshell"):
    PRE_TOKENIZERS[_name] = PRE_TOKENIZERS["smollm"]
PRE_TOKENIZERS["default"] = PRE_TOKENIZERS["gpt-2"] = PRE_TOKENIZERS["gpt2"]  # llama.cpp: gpt-2


def byte_level_alphabet():
    """GPT-2's byte-level BPE writes each byte as a printable character (its
    encoder.py, bytes_to_unicode): printable Latin-1 bytes as themselves, the
    other 68 as chr(256 + n) in byte order. -> {character: byte}."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(others)})
    return table


def bpe_tokenizer(tokens, merges, special, pre, name="bpe", pattern=None):
    """A byte-level BPE given as a token list (id = position, in byte-level
    characters), its merges ("a b", in priority order) and the ids of its
    special tokens, as a tiktoken Encoding. tiktoken merges the pair whose
    result has the lowest rank and uses ranks as ids; that is the same BPE when
    each merge's result has a larger id than every earlier merge's, which
    trained BPE vocabularies satisfy (checked here). pre: the pre-tokenizer's
    name (PRE_TOKENIZERS), or pattern: its regular expression."""
    import tiktoken

    if pattern is None and pre not in PRE_TOKENIZERS:
        raise InputError(f"pre-tokenizer {pre!r} is not supported (llama_jax knows "
                         f"{', '.join(sorted(PRE_TOKENIZERS))})")
    alphabet = byte_level_alphabet()
    special = set(special)
    ranks = {}
    for i, token in enumerate(tokens):
        if i in special:
            continue
        try:
            ranks[bytes(alphabet[c] for c in token)] = i
        except KeyError as err:
            raise InputError(f"token {i} ({token!r}) is not written in byte-level characters: "
                             "this is not a byte-level BPE vocabulary") from err
    previous = -1
    for merge in merges:
        left, _, right = merge.partition(" ")
        merged = ranks.get(bytes(alphabet[c] for c in left + right))
        if merged is None or merged <= previous:
            raise InputError(f"merge {merge!r} does not produce a token whose id follows the "
                             "previous merge's: tiktoken cannot reproduce this BPE")
        previous = merged
    return tiktoken.Encoding(name=name, pat_str=pattern or PRE_TOKENIZERS[pre],
                             mergeable_ranks=ranks,
                             special_tokens={tokens[i]: i for i in sorted(special)})


def hf_bpe_tokenizer(path):
    """A Hugging Face tokenizer.json holding a byte-level BPE (model "BPE" with
    vocab and merges; pre-tokenizer ByteLevel, Digits then ByteLevel, or a
    Split regex then ByteLevel, as in Llama 3) -> a tiktoken Encoding."""
    spec = read_json(path)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise CheckpointError(f"{path}: model type {model.get('type')!r}; llama_jax reads "
                              "byte-level BPE tokenizers (model type 'BPE')")
    tokens = [None] * (max(model["vocab"].values()) + 1)
    for token, i in model["vocab"].items():
        tokens[i] = token
    special = []
    for added in spec.get("added_tokens") or []:
        if added["id"] >= len(tokens):
            tokens += [None] * (added["id"] + 1 - len(tokens))
        tokens[added["id"]] = added["content"]
        special.append(added["id"])
    if None in tokens:
        raise CheckpointError(f"{path}: token id {tokens.index(None)} has no token")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    pattern = None
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        name = "gpt2"
    elif kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        name = "smollm"
    elif kinds == ["Split", "ByteLevel"] and "Regex" in (steps[0].get("pattern") or {}):
        name, pattern = "split", steps[0]["pattern"]["Regex"]
    else:
        raise CheckpointError(f"{path}: pre-tokenizer {' then '.join(map(str, kinds))} is not "
                              "supported (ByteLevel; Digits then ByteLevel; Split then ByteLevel)")
    try:
        return bpe_tokenizer(tokens, merges, special, name, name=Path(path).parent.name,
                             pattern=pattern)
    except InputError as err:
        raise CheckpointError(f"{path}: {err}") from err


# =============================================================================
# 16. Chat and streaming
# =============================================================================
# An instruction-tuned model was trained on conversations in one format: each
# turn wrapped in special tokens, the reply ending with an end-of-turn token.
# ChatML (SmolLM, Qwen): <|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n
# Llama 3: <|start_header_id|>user<|end_header_id|>\n\n...<|eot_id|> and the
# assistant's header. A model file may carry its own template (Jinja); it is
# untrusted input, so it is rendered only in jinja2's sandbox, as transformers
# does, and the built-in formats are used when jinja2 is not installed.

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", ENDOFTEXT)


def chat_end_token(tokenizer):
    """The token that ends the assistant's turn, or None."""
    return special_token(tokenizer, *END_OF_TURN)


def render_chat_template(template, messages):
    """A model file's chat template, rendered in jinja2's immutable sandbox
    (no attribute access to Python internals, no mutation of our objects).
    -> the prompt text, or None when jinja2 is not installed."""
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        return None

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                                bos_token="", eos_token="")
    except TemplateError as err:  # SecurityError is a TemplateError too
        raise InputError(f"the model's chat template failed: {err}") from err


def chat_prompt(messages, tokenizer, template=None):
    """messages: [{"role": "system" | "user" | "assistant", "content": str}]
    -> the token ids of the conversation, ending where the assistant speaks.
    Message text is encoded as ordinary text, so that a user cannot type a
    special token into the conversation. messages is left as it is."""
    specials = tokenizer.special_tokens_set

    def ordinary(text):  # special-token text in a message is not a special token
        for s in specials:
            text = text.replace(s, "")
        return text

    messages = [{**m, "content": ordinary(m["content"])} for m in messages]
    text = render_chat_template(template, messages) if template else None
    if text is not None:
        return tokenizer.encode(text, allowed_special=specials)
    sp = lambda name: [tokenizer.encode_single_token(name)]  # noqa: E731
    if {"<|im_start|>", "<|im_end|>"} <= specials:  # ChatML
        ids = []
        for m in messages:
            ids += (sp("<|im_start|>") + tokenizer.encode_ordinary(f"{m['role']}\n{m['content']}")
                    + sp("<|im_end|>") + tokenizer.encode_ordinary("\n"))
        return ids + sp("<|im_start|>") + tokenizer.encode_ordinary("assistant\n")
    if {"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"} <= specials:  # Llama 3
        ids = sp("<|begin_of_text|>") if "<|begin_of_text|>" in specials else []
        for m in messages:
            ids += (sp("<|start_header_id|>") + tokenizer.encode_ordinary(m["role"])
                    + sp("<|end_header_id|>") + tokenizer.encode_ordinary(f"\n\n{m['content']}")
                    + sp("<|eot_id|>"))
        return (ids + sp("<|start_header_id|>") + tokenizer.encode_ordinary("assistant")
                + sp("<|end_header_id|>") + tokenizer.encode_ordinary("\n\n"))
    raise InputError("--chat: this model has no chat format (no ChatML or Llama 3 header "
                     "tokens, no chat template): it continues text instead; use --sample")


@dataclass(frozen=True)
class Sampling:
    """How tokens are drawn (the command line's sampling flags): at most
    max_new_tokens of them, at temperature (0: greedy), among the top_k most
    likely (None: all) and the smallest set reaching top_p (None: off)."""
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = None


def chat_turn(params, config, tokenizer, messages, sampling, key, template=None, out=None):
    """Generates the assistant's reply to `messages` (drawn as `sampling`
    says), printing it as it is
    drawn, and appends it to messages. Older turns are dropped (the system
    message kept) when the conversation no longer fits the context.
    -> (reply text, tokens drawn, seconds in all, seconds after the first
    token: the first waits for the prompt and, in a new shape, for compiling)."""
    out = out or sys.stdout
    end = chat_end_token(tokenizer)
    while True:
        prompt = chat_prompt(messages, tokenizer, template)
        if len(prompt) + sampling.max_new_tokens <= config.max_seq_len:
            break
        first = 1 if messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:
            raise InputError(f"the message is {len(prompt)} tokens; with --max-new-tokens "
                             f"{sampling.max_new_tokens} it does not fit the model's "
                             f"{config.max_seq_len}-token context")
        del messages[first:first + 2]  # the oldest exchange
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces, n, t0 = [], 0, time.perf_counter()
    t_first = t0
    for token in stream_tokens(params, prompt, sampling.max_new_tokens, config, key,
                               temperature=sampling.temperature, top_k=sampling.top_k or None,
                               top_p=sampling.top_p, stop_token=end):
        n += 1
        if n == 1:
            t_first = time.perf_counter()
        if token == end:
            break
        piece = decoder.decode(tokenizer.decode_single_token_bytes(token))
        pieces.append(piece)
        out.write(piece)
        out.flush()
    pieces.append(decoder.decode(b"", final=True))
    out.write(pieces[-1] + "\n")
    reply = "".join(pieces)
    messages.append({"role": "assistant", "content": reply})
    now = time.perf_counter()
    return reply, n, now - t0, now - t_first


# Streaming: the same sampling, one token per call, so that a chat can print
# each token as it is drawn. Two programs, each compiled once per shape: the
# prefill (per prompt-length bucket) and one decoding step (the position is
# traced). With the same key, the tokens equal generate's with
# sample=fast_sample_token (a test checks it).


@functools.partial(jax.jit, static_argnames=("config", "cache_len"))
def _prefill(params, prompt, length, *, config, cache_len):
    """prompt: int32[1, P] right-padded, length: its real length (traced)
    -> (the next token's logits [1, V], a cache of cache_len slots)."""
    logits, cache = model_forward(params, prompt, config, init_cache(config, 1, cache_len),
                                  position=0)
    return logits[:, length - 1], cache


@functools.partial(jax.jit, static_argnames=("config", "top_k", "top_p"),
                   donate_argnames=("cache",))
def _decode_step(params, last, cache, position, key, temperature, *, config, top_k, top_p):
    """Draws a token from `last` [1, V] and runs it through the model at
    `position` -> (token int32[1], the next logits [1, V], cache)."""
    token = fast_sample_token(key, last, temperature, top_k, top_p)
    logits, cache = model_forward(params, token[:, None], config, cache, position)
    return token, logits[:, 0], cache


def stream_tokens(params, prompt, max_new_tokens, config, key, temperature=1.0, top_k=None,
                  top_p=None, stop_token=None):
    """Like generate for one prompt, but yields each new token id as soon as it
    is drawn (the stop token, if drawn, is the last)."""
    check_generate_args([prompt], max_new_tokens, config, temperature, top_k, top_p)
    if max_new_tokens == 0:
        return
    width, _, cache_len = decoding_shapes(len(prompt), max_new_tokens, config)
    padded = np.zeros((1, width), np.int32)
    padded[0, :len(prompt)] = prompt
    params = decoding_weights(params, config)
    last, cache = _prefill(params, padded, jnp.int32(len(prompt)), config=config,
                           cache_len=cache_len)
    top_k, top_p = sampling_filters(top_k, top_p, config)
    for i in range(max_new_tokens):
        key, sub = jax.random.split(key)
        token, last, cache = _decode_step(params, last, cache, jnp.int32(len(prompt) + i), sub,
                                          jnp.float32(temperature), config=config, top_k=top_k,
                                          top_p=top_p)
        token = int(token[0])
        yield token
        if token == stop_token:
            return


# =============================================================================
# 17. Fine-tuning: start from a pretrained model, fully or with LoRA
# =============================================================================
# --init-from SOURCE trains from a model's weights instead of random ones. The
# source is a Hugging Face folder, a GGUF file or one of our runs; it brings
# the architecture and the tokenizer, and everything else is section 18's loop:
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
    return {"source": str(Path(init["source"]).resolve()), "kind": init["kind"],
            "sha256": init["sha256"]}


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
    rest = {k: v for k, v in init["params"].items() if k != "tok_embeddings"}
    base = jax.tree_util.tree_map(lambda w: w.astype(dtype if w.ndim > 1 else jnp.float32), rest)
    return {**base, "tok_embeddings": init["params"]["tok_embeddings"].astype(jnp.float32)}


def initial_weights(key, config, tc, init, mesh):
    """The trainable weights a run starts from, split over the mesh (section
    14): random (init_params) without a base, LoRA's adapters (lora_init), or
    the base's weights in float32 (the optimizer's updates are too small for
    bfloat16)."""
    if init is None:
        return sharded_init(key, config, mesh)
    if tc.lora_rank:
        weights = lora_init(key, config, tc)
    else:
        weights = jax.tree_util.tree_map(lambda w: np.asarray(w, np.float32), init["params"])
    return place_state(mesh, weights)


def check_same_base(ckpt, init, path):
    """On --resume: the checkpoint and the run must agree on the base model."""
    base = ckpt["base"]
    if base is None and init is None:
        return
    if base is None:
        raise CheckpointError(f"{path} was trained from random weights, not from "
                              f"{init['source']}: use another --out-dir for the fine-tuning run")
    if init is None:
        raise CheckpointError(f"{path} fine-tunes {base['source']}: pass --init-from "
                              f"{base['source']} to resume it")
    if base["sha256"] != init["sha256"]:
        raise CheckpointError(f"{path} was trained on a base model with other weights "
                              f"({base['source']}, sha256 {base['sha256'][:12]}...) than "
                              f"{init['source']} (sha256 {init['sha256'][:12]}...): resume with "
                              "the base it was trained on, or use another --out-dir")


def check_source_tokenizer(init, config):
    """A fine-tuning run reads its data with the source's tokenizer, which must
    exist and fit the model's vocabulary."""
    enc = init["tokenizer"]
    if enc is None:
        raise InputError(f"{init['source']} comes without a tokenizer llama_jax can read "
                         "(tokenizer.model in tiktoken format or a byte-level BPE "
                         "tokenizer.json), so its training text cannot be tokenized")
    if enc.n_vocab > config.vocab_size:
        raise InputError(f"{init['source']}: its tokenizer has {enc.n_vocab:,} tokens but the "
                         f"model only {config.vocab_size:,} embeddings")


def describe_fine_tuning(init, params, frozen, tc):
    """One log line: the base, and how much of it is trained."""
    if frozen is None:
        return f"fine-tuning every weight of {init['source']}"
    n, total = count_params(params), count_params(frozen)
    return (f"fine-tuning {init['source']} with LoRA: rank {tc.lora_rank}, alpha "
            f"{tc.lora_alpha:g}, on {','.join(tc.lora_targets)}: {n:,} trained parameters "
            f"({100 * n / total:.2f}% of {total:,}); the base stays frozen")


# ----------------------------------------------------------------------------- sources
# One loader for every model a command can start from.

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json")


def source_kind(path):
    """"hf" (a folder with config.json), "ckpt" (one of our runs: a folder with
    ckpt.npz or ckpt.orbax, the .npz, or the Orbax folder) or "gguf" (a file
    that starts with GGUF's magic)."""
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf"
        if saved_checkpoint(path) or path.suffix == ".orbax":
            return "ckpt"
        raise InputError(f"{path} holds neither a Hugging Face model (config.json) nor a "
                         "llama_jax run (ckpt.npz or ckpt.orbax)")
    if not path.is_file():
        raise InputError(f"{path}: no such file or folder (a model source is a Hugging Face "
                         "folder, a GGUF file or a llama_jax run)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return "gguf"
    if magic == b"PK\x03\x04":  # .npz files are zip archives
        return "ckpt"
    raise InputError(f"{path} is neither a GGUF file, a llama_jax checkpoint (.npz) nor a "
                     "Hugging Face folder")


def hf_folder_tokenizer(folder, gpt2=False):
    """A Hugging Face folder's tokenizer: tiktoken's tokenizer.model (Llama 3),
    else a byte-level BPE tokenizer.json, else None (also for SentencePiece
    models, Llama 1 and 2). gpt2=True: GPT-2's, whatever the folder holds."""
    if gpt2:
        return get_tokenizer()
    for f in (folder / "tokenizer.model", folder / "original" / "tokenizer.model"):
        if f.is_file():
            try:
                return llama3_tokenizer(f)
            except InputError:
                return None  # a SentencePiece model, not tiktoken format
    if (folder / "tokenizer.json").is_file():
        return hf_bpe_tokenizer(folder / "tokenizer.json")
    return None


def hf_special_tokens(settings, tokenizer):
    """A Hugging Face folder's bos, eos and pad token ids, from its
    tokenizer_config.json (names, or {"content": name}), and whether a prompt
    starts with bos (add_bos_token; when absent, whether bos is a token of
    its own, not eos as in GPT-2). -> load_source's "special", or None."""
    config = read_json(settings) if settings.is_file() else {}
    if tokenizer is None or not config:
        return None
    special = {}
    for role in ("bos", "eos", "pad"):
        name = config.get(f"{role}_token")
        name = name.get("content") if isinstance(name, dict) else name
        special[role] = (tokenizer.encode_single_token(name)
                         if isinstance(name, str) and name in tokenizer.special_tokens_set
                         else None)
    special["add_bos"] = bool(config.get("add_bos_token",
                                         special["bos"] not in (None, special["eos"])))
    return special


def load_source(path, kind=None, dtype="float32", gpt2_tokenizer=False):
    """A model to sample, evaluate, chat with, fine-tune or export: a Hugging
    Face folder, a GGUF file or a llama_jax run (kind: as source_kind says, by
    default). A fine-tuned run brings its base's tokenizer and chat format, and
    a LoRA run is merged into its base, which is read again and checked
    against the hash the run recorded.
    -> {"params", "config", "tokenizer" (or None), "chat_template" (or None),
    "seq_len" (the length a run trained at, or None), "source", "kind",
    "tokenizer_files" (a Hugging Face base's, for --export-hf), "special" (the
    source's bos, eos and pad ids and whether it adds bos, for --export-gguf;
    None: GPT-2's)}."""
    kind = kind or source_kind(path)
    model = {"seq_len": None, "chat_template": None, "source": str(path), "kind": kind,
             "tokenizer_files": [], "special": None}
    if kind == "gguf":
        reader = open_gguf(path)  # once: parsing the metadata takes seconds
        params, config, tokenizer = load_gguf(path, dtype, reader=reader)
        template = gguf_value(reader, "tokenizer.chat_template", required=False)
        special = {role: gguf_value(reader, f"tokenizer.ggml.{key}_token_id", required=False)
                   for role, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))}
        special["add_bos"] = bool(gguf_value(reader, "tokenizer.ggml.add_bos_token",
                                             required=False))
        model.update(params=params, config=config, tokenizer=tokenizer, chat_template=template,
                     special=special)
    elif kind == "hf":
        folder = Path(path)
        params, config = load_hf_checkpoint(folder)
        settings = folder / "tokenizer_config.json"
        template = read_json(settings).get("chat_template") if settings.is_file() else None
        tokenizer = hf_folder_tokenizer(folder, gpt2_tokenizer)
        model.update(params=params, config=config, tokenizer=tokenizer,
                     chat_template=template if isinstance(template, str) else None,
                     tokenizer_files=[folder / f for f in TOKENIZER_FILES
                                      if (folder / f).is_file()],
                     special=None if gpt2_tokenizer else hf_special_tokens(settings, tokenizer))
    else:
        path = Path(path)
        if path.is_dir() and path.suffix != ".orbax":  # a run's folder
            path = saved_checkpoint(path) or run_files(path).checkpoint
        ckpt = load_checkpoint(path, weights_only=True)
        model.update(params=ckpt["params"], config=ckpt["config"],
                     seq_len=ckpt["train_config"].seq_len, source=str(path))
        model.update(base_model(ckpt, path, dtype) if ckpt["base"] is not None
                     else {"tokenizer": get_tokenizer()})
    return model


def base_model(ckpt, path, dtype):
    """A fine-tuned run's weights (a LoRA run's merged into its base), with its
    base's tokenizer, chat format and tokenizer files."""
    record = ckpt["base"]
    if not Path(record["source"]).exists():
        raise CheckpointError(f"{path} was fine-tuned from {record['source']}, which is gone: "
                              "its tokenizer (and, for LoRA, its weights) are read from there; "
                              "put the base model back at that path")
    base = load_source(record["source"], record["kind"], dtype)
    params = ckpt["params"]
    tc = ckpt["train_config"]
    if tc.lora_rank:
        if tree_sha256(base["params"]) != record["sha256"]:
            raise CheckpointError(f"{record['source']} has changed since {path} was trained on "
                                  "it (its weights' sha256 differs): the adapters belong to the "
                                  "old weights")
        params = merged_weights(base["params"], params, tc)
    return {"params": params, "tokenizer": base["tokenizer"],
            "chat_template": base["chat_template"], "tokenizer_files": base["tokenizer_files"],
            "special": base["special"]}


def export_hf(model, folder, log=print):
    """--export-hf: writes a model (load_source's dict; LoRA already merged) as
    a Hugging Face folder, with its base's tokenizer files when it has them.
    Refuses a folder that is not empty, so nothing is overwritten."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise InputError(f"--export-hf {folder}: the folder exists and is not empty; choose a "
                         "new one (nothing was written)")
    save_hf_checkpoint(folder, model["params"], model["config"])
    for f in model["tokenizer_files"]:
        (folder / f.name).write_bytes(f.read_bytes())
    names = [f.name for f in model["tokenizer_files"]]
    if names:
        note = f", and the base's {', '.join(names)}"
    elif model["tokenizer"] is not None and model["tokenizer"].name == "gpt2":
        note = "; its tokenizer is GPT-2's (in transformers: AutoTokenizer.from_pretrained('gpt2'))"
    else:
        note = "; no tokenizer files (the model did not come from a Hugging Face folder)"
    log(f"wrote {folder / 'config.json'} and {folder / 'model.safetensors'} (float32){note}")


# ----------------------------------------------------------------------------- chat fine-tuning
# --data CHATS.jsonl with --init-from a chat model teaches it conversations.
# Each line is one conversation, {"messages": [{"role": "system" | "user" |
# "assistant", "content": "..."}, ...]}, the format of Hugging Face and
# OpenAI. It is rendered by chat_prompt, the renderer --chat uses, and only
# the assistant's replies are learned: a model trained on the user's turns
# too would learn to write questions (instruction tuning's "completion only"
# loss: Hugging Face TRL; litgpt's mask_prompt). The mask is carried by the
# targets: a target of IGNORE carries no loss (PyTorch's ignore_index;
# Hugging Face labels use -100), and masked_cross_entropy averages over the
# others, each reply's tokens and its end-of-turn token.
#
# Windows: one conversation per window of --seq-len + 1 tokens, padded with
# IGNORE targets, so that no token attends across two conversations. A longer
# conversation is cut after its last reply that fits (its end-of-turn token),
# or, when not even its first reply fits, at --seq-len; either way the run
# counts it in a warning. Validation: the conversations whose line's sha256
# falls in the lowest tenth (at least one; the rest train), so the split does
# not depend on the lines' order.

CHAT_ROLES = ("system", "user", "assistant")


def read_chats(path):
    """CHATS.jsonl -> [(line number, line text, messages)], every line checked:
    JSON, a "messages" list of {"role", "content"} with known roles and text,
    at least one assistant turn; at least two conversations."""
    path = Path(path)
    chats = []
    for number, line in enumerate(load_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except ValueError as err:
            raise InputError(f"{where}: not JSON ({err}); each line must be one conversation, "
                             '{"messages": [{"role": ..., "content": ...}, ...]}') from err
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages:
            raise InputError(f'{where}: no "messages" list; write the conversation as '
                             '{"messages": [{"role": "user", "content": ...}, ...]}')
        for m in messages:
            role = m.get("role") if isinstance(m, dict) else None
            if role not in CHAT_ROLES:
                raise InputError(f"{where}: unknown role {role!r}; use one of "
                                 f"{', '.join(CHAT_ROLES)}")
            if not isinstance(m.get("content"), str):
                raise InputError(f'{where}: a {role} message without text "content"')
        if not any(m["role"] == "assistant" for m in messages):
            raise InputError(f"{where}: no assistant turn, so nothing to learn; add the "
                             "reply the model should give")
        chats.append((number, line, [{"role": m["role"], "content": m["content"]}
                                     for m in messages]))
    if len(chats) < 2:
        raise InputError(f"{path} holds {len(chats)} conversation(s); chat fine-tuning needs "
                         "at least two (one or more to train on, one held out to evaluate)")
    return chats


def render_chat(messages, tokenizer, template):
    """A conversation as chat_prompt renders it, and which of its tokens are
    replies: each assistant turn's tokens, from where chat_prompt of the turns
    before it ends (the assistant's header) through the first end-of-turn
    token. The ids stop there, after the last reply; what the renderer adds
    after it (the next turn's header) carries no loss.
    -> (ids [n], is_reply bool[n])."""
    end = chat_end_token(tokenizer)
    ids = chat_prompt(messages, tokenizer, template)
    reply = [False] * len(ids)
    last = None
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = chat_prompt(messages[:i], tokenizer, template)  # ends with its header
        start = len(before)
        if ids[:start] != before:
            raise InputError("the chat template renders earlier turns differently once later "
                             "turns follow, so the replies' tokens cannot be told apart")
        j = start
        while j < len(ids) and ids[j] != end:
            reply[j] = True
            j += 1
        if j == len(ids):
            raise InputError("the chat template puts no end-of-turn token after a reply")
        reply[j] = True  # the end-of-turn token: the model must learn to stop
        last = j
    return ids[:last + 1], reply[:last + 1]


def chat_windows(chats, tokenizer, template, seq_len, where):
    """Renders conversations into ChatWindows of seq_len. -> (windows, how
    many were cut)."""
    inputs = np.zeros((len(chats), seq_len), np.int32)
    targets = np.full((len(chats), seq_len), IGNORE, np.int32)
    end, cut = chat_end_token(tokenizer), 0
    for row, (number, _, messages) in enumerate(chats):
        try:
            ids, reply = render_chat(messages, tokenizer, template)
        except InputError as err:
            raise InputError(f"{where}, line {number}: {err}") from err
        if len(ids) > seq_len + 1:
            ends = [k for k in range(seq_len + 1) if reply[k] and ids[k] == end]
            n = ends[-1] + 1 if ends else seq_len + 1
            ids, reply, cut = ids[:n], reply[:n], cut + 1
        inputs[row, :len(ids) - 1] = ids[:-1]
        targets[row, :len(ids) - 1] = np.where(reply[1:], ids[1:], IGNORE)
    return ChatWindows(inputs, targets), cut


def in_chat_validation(line):
    """The held-out tenth: a line's sha256 in the lowest tenth of its range."""
    return int(hashlib.sha256(line.encode("utf-8")).hexdigest()[:8], 16) < 2 ** 32 // 10


def load_chats(path, seq_len, init, log):
    """--data CHATS.jsonl -> (train ChatWindows, val ChatWindows, how, the
    first held-out conversation's messages before its first reply: the
    question the run's final sample answers)."""
    if init is None or init.get("tokenizer") is None:
        raise InputError(f"--data {path}: conversations are learned by a pretrained chat "
                         "model; pass --init-from with one (e.g. SmolLM2-135M-Instruct)")
    tokenizer, template = init["tokenizer"], init.get("chat_template")
    try:
        chat_prompt([{"role": "user", "content": "hi"}], tokenizer, template)
    except InputError as err:
        raise InputError(f"--data {path}: the model of --init-from has no chat format (no chat "
                         "template, no ChatML or Llama 3 tokens); fine-tune a chat model, or "
                         "train on plain text instead") from err
    chats = read_chats(path)
    val = [c for c in chats if in_chat_validation(c[1])] or chats[-1:]
    train = [c for c in chats if c not in val] or chats[:1]
    (train_w, cut_train), (val_w, cut_val) = (chat_windows(c, tokenizer, template, seq_len, path)
                                              for c in (train, val))
    if cut_train + cut_val:
        log(f"warning: {cut_train + cut_val} of {len(chats)} conversations in {path} are "
            f"longer than --seq-len {seq_len} tokens and were cut after their last reply "
            "that fits (or at --seq-len); raise --seq-len to keep them whole")
    question = val[0][2][:next(i for i, m in enumerate(val[0][2]) if m["role"] == "assistant")]
    n_reply = int(np.sum(train_w.targets != IGNORE))
    return (train_w, val_w, f"{len(train)} conversations to train on ({n_reply:,} reply "
            f"tokens), {len(val)} held out", question)


# =============================================================================
# 18. The full training run: resume, signals, time budgets, --eval
# =============================================================================


def save_loss_plot(history, path):
    """Train (per step, smoothed) and validation loss against step, as a PNG.
    Uses matplotlib's Figure directly: no pyplot, no GUI backend needed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    if history["train"]:
        steps, losses = np.array(history["train"], dtype=np.float64).T
        window = max(1, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, lw=0.8)
        ax.plot(steps[window - 1:], smooth, color="tab:blue", label="train (per step)")
    if history["eval"]:
        steps, train_eval, val_eval = np.array(history["eval"], dtype=np.float64).T
        ax.plot(steps, train_eval, "o-", color="tab:green", label="train (fixed windows)")
        ax.plot(steps, val_eval, "o-", color="tab:red", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = Path(path).with_name(Path(path).name + ".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def stop_requests(log):
    """While training: Ctrl-C (SIGINT) or a polite kill (SIGTERM, as SLURM sends
    before preemption) only appends to the yielded list, which the loop reads
    between steps. Raising inside run_step instead could leave params
    pointing at buffers already donated to the step. A second Ctrl-C aborts
    at once. The previous handlers come back on exit."""
    requests = []

    def request_stop(signum, frame):
        if requests:
            raise KeyboardInterrupt
        requests.append(signum)
        log("stopping after this step (press Ctrl-C again to abort without saving)")

    handlers = {}
    if threading.current_thread() is threading.main_thread():  # signals reach only it
        handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requests
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def read_losses(pending, history):
    """Moves the losses of dispatched steps, [(step, loss, health) on the
    device], into history["train"] as [step + 1, float] and returns their
    health dicts (on the host). Reading a loss waits for its step, so this
    runs only when a line is printed, and the device is never idle waiting for
    Python. Raises FloatingPointError(step) at a non-finite loss."""
    fetched = jax.device_get(pending)
    pending.clear()
    for step, value, _ in fetched:
        if not np.isfinite(value):
            raise FloatingPointError(step)
        history["train"].append([step + 1, float(value)])
    return [health for _, _, health in fetched]


def steps_within_budget(tc, step, seconds_left, per_step, eval_seconds):
    """How many steps in total fit a wall-clock budget: the steps already done,
    plus as many more as the time left allows at the measured seconds per step,
    an evaluation's cost counted every tc.eval_every steps and 5% kept in hand.
    Never more than tc.steps: a budget only shortens a run."""
    per_step_with_evals = per_step + eval_seconds / tc.eval_every
    more = int(0.95 * seconds_left / per_step_with_evals)
    return max(step + 1, min(tc.steps, step + more))


def fit_schedule_to_budget(tc, done, seconds_left, per_step, eval_seconds, budget, log):
    """-> tc with fewer steps if the rest of the run would overrun the budget,
    so that the cosine ends inside it (the warmup is kept, or cut to a fifth
    of the run if it is longer)."""
    fit = steps_within_budget(tc, done, seconds_left, per_step, eval_seconds)
    if fit >= tc.steps:
        return tc
    log(f"time budget {budget:g} min: at {per_step * 1e3:.0f} ms/step and {eval_seconds:.1f}s "
        f"per evaluation, {fit} of {tc.steps} steps fit; the schedule now ends at step {fit}")
    return dataclasses.replace(tc, steps=fit, warmup_steps=min(tc.warmup_steps,
                                                               max(done, fit // 5)))


def keep_schedule(tc, saved, log):
    """On --resume: the learning-rate schedule stays the one the run started
    with (saved, the checkpoint's TrainConfig), whatever --steps says now.
    Stretching the cosine to a new --steps would send the learning rate back
    up mid-run (600 -> 1000 steps: from 1.5e-4 to 1.2e-3 at step 600); steps
    past the schedule's end run at min_lr instead, and a smaller --steps just
    stops early. -> tc with schedule_steps set."""
    schedule = saved.schedule_steps or saved.steps
    if tc.steps > schedule:
        log(f"--steps {tc.steps} goes past the {schedule}-step schedule of the run being "
            f"resumed: steps {schedule + 1} to {tc.steps} continue at the floor, lr "
            f"{tc.min_lr:.2e} (the cosine is kept, not stretched)")
    elif tc.steps < schedule:
        log(f"--steps {tc.steps} stops before the end of the run's {schedule}-step schedule")
    return dataclasses.replace(tc, schedule_steps=schedule)


def start_or_resume(config, tc, out_dir, resume, log, init=None, mesh=None):
    """A fresh run's state, or the state saved in out_dir for --resume
    (saved_checkpoint: its ckpt.npz or ckpt.orbax).
    init: the pretrained model a fine-tuning run starts from (section 17).
    mesh: where the weights and optimizer state live, each split by
    state_shardings (section 14; default: every device, pure data parallel).
    A checkpoint loads onto any mesh, whatever the devices that wrote it.
    -> (params, opt_state, history, seed_key, tc): the seed key (saved in the
    checkpoint) gives the run's key streams; a resumed tc keeps its schedule."""
    mesh = mesh or make_mesh()
    ckpt_path = saved_checkpoint(out_dir)
    if not resume:
        seed_key = jax.random.PRNGKey(tc.seed)
        params = initial_weights(run_keys(seed_key)["init"], config, tc, init, mesh)
        return (params, sharded_optimizer_init(params, mesh, tc), {"train": [], "eval": []},
                seed_key, tc)
    if ckpt_path is None or not ckpt_path.exists():
        raise InputError(f"--resume: no checkpoint in {out_dir} (ckpt.npz or ckpt.orbax); train "
                         "without --resume first, or point --out-dir at the run to continue")
    ckpt = load_checkpoint(ckpt_path, config, mesh)
    if ckpt["note"]:
        log(ckpt["note"])
    check_same_base(ckpt, init, ckpt_path)
    if ckpt["train_config"].optimizer != tc.optimizer:
        raise InputError(f"--optimizer {tc.optimizer}: the run in {ckpt_path} trains with "
                         f"{ckpt['train_config'].optimizer}, whose state it holds; resume it "
                         f"with --optimizer {ckpt['train_config'].optimizer}")
    log(f"resumed from {ckpt_path} at step {int(ckpt['opt_state']['step'])}")
    if ckpt["format_version"] == 1:
        log("(a format-1 checkpoint: its key predates run_keys, so the resumed steps draw "
            "other batches than the original run would have)")
    params, opt_state = ckpt["params"], ckpt["opt_state"]
    if not ckpt["placed"]:  # Orbax reads each shard in place; .npz arrays are on the host
        params, opt_state = place_state(mesh, (params, opt_state))
    return (params, opt_state, ckpt["history"], ckpt["key"],
            keep_schedule(tc, ckpt["train_config"], log))


# train() is the loop behind `python llama_jax.py`. It is Part I's train_loop
# grown for real runs, in pieces: start_run gathers the state (checkpoint or
# fresh weights, data, metrics), run_steps is the loop, log_progress and
# evaluate_and_save are what it does every few steps, and train joins them
# inside stop_requests. The state every piece shares is one Run, `run`.


@dataclass
class RunState:
    """What changes as a run trains: the trained weights (params: the whole
    model's, or with LoRA the adapters), the optimizer's state (opt_state,
    with the step count) and the training config (tc: a time budget shortens
    its schedule once)."""
    params: dict
    opt_state: dict
    tc: RunTrainConfig


@dataclass(frozen=True)
class Run:
    """A training run between its steps (start_run builds it; run_steps,
    evaluate_and_save and save_run use it). The lists and dicts grow in
    place; what is replaced as it trains is in state.
      config      the model's RunModelConfig
      mesh        the devices it trains on (section 14)
      log         prints a line (a no-op on processes other than 0)
      init        the pretrained model it fine-tunes (load_source), or None
      frozen      with LoRA, the frozen base weights; else None
      train_data  training tokens (an array, a TokenFile or ChatWindows)
      on_device   the training tokens on every device, or None when batches
                  are read on the host (token files, chat data)
      rows        the shardings of a batch's inputs and targets
      eval_sets   {"train": [...], "val": [...]}: fixed evaluation batches
      history     {"train": [[step, loss]], "eval": [[step, train, val]]}
      seed_key    the run's key; keys: the streams drawn from it (run_keys)
      records     the metrics.jsonl records so far
      pending     (step, loss, health) of steps dispatched but not yet read
      out_dir     where its files go (run_files)
      writer      saves its checkpoints (NpzWriter or OrbaxWriter, section 15)
      question    chat data: the held-out question the final sample answers
      state       RunState: params, opt_state, tc"""
    config: RunModelConfig
    mesh: object
    log: object
    init: dict | None
    frozen: dict | None
    train_data: object
    on_device: object
    rows: tuple
    eval_sets: dict
    history: dict
    seed_key: object
    keys: object
    records: list
    pending: list
    out_dir: Path
    writer: object
    question: object
    state: RunState


def start_run(config, tc, data_path, out_dir, resume, log, init, mesh):
    """Checks and loads everything a run needs before its first step. -> Run."""
    if tc.seq_len > config.max_seq_len:
        raise InputError(f"--seq-len {tc.seq_len} is longer than the model's context "
                         f"(max_seq_len {config.max_seq_len}): lower --seq-len")
    config, tc = run_configs(config, tc)
    out_dir = Path(out_dir)
    # Checked before any work: mkdir would fail only after the data is loaded.
    for folder in (out_dir, *out_dir.parents):
        if folder.exists() and not folder.is_dir():
            raise InputError(f"--out-dir {out_dir}: {folder} is a file, not a folder; choose "
                             "another --out-dir")
    mesh = mesh or make_mesh()
    if jax.process_index() != 0:
        log = lambda *args, **kwargs: None  # noqa: E731 (process 0 speaks for all)
    check_batch_split(tc, mesh)
    if init is not None:
        check_source_tokenizer(init, config)
        init = {**init, "sha256": tree_sha256(init["params"])}
    # Will it fit? From shapes alone, before any data is read or code compiled.
    plan = memory_plan(config, tc, mesh)
    check_plan_fits(plan, config, tc, mesh)
    frozen = frozen_base(init, config, tc)  # LoRA's fixed weights, else None
    if frozen is not None:
        frozen = place_state(mesh, frozen)
    question = None  # chat data: the held-out question the final sample answers
    if str(data_path).endswith(".jsonl"):
        train_data, val_data, data_note, question = load_chats(data_path, tc.seq_len, init, log)
    else:
        train_data, val_data, data_note = load_training_data(data_path, tc.seq_len,
                                                             init and init["tokenizer"])
    params, opt_state, history, seed_key, tc = start_or_resume(config, tc, out_dir, resume, log,
                                                               init, mesh)
    if jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    records = start_metrics(run_files(out_dir).metrics, resume, int(opt_state["step"]), log)
    rows = (batch_sharding(mesh),) * 2
    eval_sets = {name: [place(b, rows) for b in evaluation_batches(d, tc, name)]
                 for name, d in (("train", train_data), ("val", val_data))}
    log(f"model: {count_params(frozen or params) / 1e6:.2f}M parameters ({config.dim} wide, "
        f"{config.n_layers} layers, {config.n_heads} heads, {config.n_kv_heads} kv heads), "
        f"{config.compute_dtype} compute{', --remat' if config.remat else ''}")
    log(f"{describe_batch(tc, mesh)}; {describe_plan(plan)}")
    if init is not None:
        log(describe_fine_tuning(init, params, frozen, tc))
    if question is None:
        log(f"data: {len(train_data):,} training and {len(val_data):,} validation tokens from "
            f"{data_path} ({data_note})")
    else:
        log(f"data: {data_path}: {data_note}; the loss counts the replies' tokens only")
    # A text file's tokens live on every device and each step draws its batch
    # there; a token file's batches are read on the host, one step at a time,
    # and each device receives its rows.
    on_device = replicated(mesh, train_data) if isinstance(train_data, np.ndarray) else None
    writer = checkpoint_writer(out_dir, tc, config, log, resume)  # last: train() closes it
    return Run(config=config, mesh=mesh, log=log, init=init, frozen=frozen,
               train_data=train_data, on_device=on_device, rows=rows, eval_sets=eval_sets,
               history=history, seed_key=seed_key, keys=replicated(mesh, run_keys(seed_key)),
               records=records, pending=[], out_dir=out_dir, writer=writer, question=question,
               state=RunState(params, opt_state, tc))


def evaluation_batches(data, tc, split):
    """The fixed evaluation batches of one split: Part I's fixed_windows of a
    text's tokens, or for chat data (ChatWindows) every held-out conversation,
    and the first tc.eval_batches batches of the training ones."""
    if isinstance(data, ChatWindows):
        batches = data.batches(tc.batch_size)
        return batches if split == "val" else batches[:tc.eval_batches]
    return fixed_windows(data, tc.eval_batches, tc.batch_size, tc.seq_len)


def batch_for(run, step):
    """What run_step draws step `step`'s batch from: the tokens on the device,
    or the batch read from a token file and placed on the mesh."""
    if run.on_device is not None:
        return run.on_device
    tc = run.state.tc
    return place(host_batch(run.train_data, run.keys, step, tc.batch_size, tc.seq_len),
                 run.rows)


def run_weights(run):
    """What the model runs on: params, or with LoRA the base plus the adapters."""
    if run.frozen is None:
        return run.state.params
    return merged_weights(run.frozen, run.state.params, run.state.tc)


def write_record(run, record):
    """Keeps a metrics record and appends it to out_dir/metrics.jsonl."""
    run.records.append(record)
    if jax.process_index() == 0:
        with open(run_files(run.out_dir).metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


@contextlib.contextmanager
def closing_writer(run):
    """Closes the run's checkpoint writer at the end, however the run ends:
    Orbax waits there for the save in flight, and a failed background write
    gets save_run's message."""
    try:
        yield
    finally:
        try:
            run.writer.close()
        except OSError as err:
            raise InputError(f"could not write the run's checkpoint in {run.out_dir} ({err}); "
                             "the last complete one there is kept: free some space (or "
                             "choose another --out-dir) and continue with --resume") from err


def save_run(run):
    """The checkpoint, atomically, and the loss and health plots. A failed
    write (a full disk, a folder made read-only) ends the run with a message;
    the last complete checkpoint stays as it was."""
    files = run_files(run.out_dir)
    try:
        run.writer.save(run.state.params, run.state.opt_state, run.seed_key, run.config,
                        run.state.tc, run.history, run.init and base_record(run.init))
        if jax.process_index() == 0:
            save_loss_plot(run.history, files.loss_plot)
            save_health_plot(run.records, files.health_plot)
    except OSError as err:
        raise InputError(f"could not write the run's files in {run.out_dir} "
                         f"({err.strerror or err}); the last complete checkpoint there is "
                         "kept: free some space (or choose another --out-dir) and continue "
                         "with --resume") from err


def evaluate_splits(run):
    """Part I's evaluation on the fixed windows of both splits: (train, val)."""
    weights = run_weights(run)
    return tuple(evaluate_run(weights, run.config, run.eval_sets[s]) for s in ("train", "val"))


def evaluate_and_save(run, step):
    """evaluate_splits, logged, recorded and checkpointed. -> the seconds
    the saving took."""
    train_loss, val_loss = evaluate_splits(run)
    run.history["eval"].append([step, train_loss, val_loss])
    write_record(run, {"kind": "eval", "step": step, "train_loss": train_loss,
                       "val_loss": val_loss})
    run.log(f"eval  step {step:5d} | train {train_loss:.4f} | val {val_loss:.4f}")
    t0 = time.perf_counter()
    save_run(run)
    return time.perf_counter() - t0


def log_progress(run, done, since):
    """Reads the losses of the steps dispatched since the last line (waiting
    for them), records step `done`'s metrics and prints Part I's progress
    line with the gradient norm and the steps clipped since the last line.
    since: (clock, step) of the last line. The clock is read after the wait,
    so the speed is that of finished steps, not of their dispatch (which
    returns at once). -> that clock reading, for the next line."""
    tc = run.state.tc
    healths = read_losses(run.pending, run.history)
    now = time.perf_counter()
    seconds_per_step = (now - since[0]) / (done - since[1]) if done > since[1] else None
    record = health_record(done, run.history["train"][-1][1],
                           float(learning_rate(done - 1, lr_schedule(tc))), seconds_per_step,
                           tc.batch_size * tc.seq_len, healths)
    write_record(run, record)
    if seconds_per_step is None:  # the step that compiled: no speed to report
        return now
    line = progress_line(done, tc, record["loss"], record["lr"], seconds_per_step)
    if "grad_norm" in record:
        line += f" | grad {record['grad_norm']:.2f}"
        if record["clipped_steps"]:
            line += f" ({record['clipped_steps']}/{record['steps']} clipped)"
    run.log(line)
    return now


def run_steps(run, stop, time_budget):
    """The loop: steps until tc.steps, the time budget or a stop request
    (raised as KeyboardInterrupt); a progress line every tc.log_every steps,
    evaluate_and_save every tc.eval_every and at the end. With a budget, after
    10 timed steps and one timed evaluation, the schedule is fitted to it."""
    log = run.log
    start_step = step = int(run.state.opt_state["step"])
    t_start = time.perf_counter()
    deadline = None if time_budget is None else t_start + 60.0 * time_budget
    while step < run.state.tc.steps:
        tc = run.state.tc
        run.state.params, run.state.opt_state, loss, health = run_step(
            run.state.params, run.state.opt_state, batch_for(run, step), run.keys, run.config,
            tc, run.frozen, run.mesh)
        run.pending.append((step, loss, health))
        done = step + 1
        if step == start_step:  # the first call compiled the step: time it apart
            loss.block_until_ready()
            t_first = t_last = time.perf_counter()
            step_last = done
            log(f"compiled and ran the first step in {t_first - t_start:.1f}s")
        calibrate = deadline is not None and done == start_step + 11 and done < tc.steps
        # With several processes, all must take the same branches at the same step,
        # agreed by a collective of their own; the step's collectives must finish
        # first, or the two could interleave differently on different processes.
        if jax.process_count() > 1:
            loss.block_until_ready()
        out_of_time = deadline is not None and any_process(time.perf_counter() > deadline)[0]
        last = done == tc.steps or out_of_time
        evaluate_now = done % tc.eval_every == 0 or last or calibrate
        if done % tc.log_every == 0 or evaluate_now:
            now = log_progress(run, done, (t_last, step_last))
            t_last, step_last = now, done
        if evaluate_now:
            if out_of_time and done < tc.steps:
                log(f"time budget of {time_budget:g} min reached at step {done}: "
                    "evaluating and saving")
            save_seconds = evaluate_and_save(run, done)
            if calibrate:
                # That evaluation compiled its programs (on a GPU, most of its
                # time): a second, compiled pass is what each later one costs.
                t0 = time.perf_counter()
                evaluate_splits(run)
                eval_seconds = time.perf_counter() - t0 + save_seconds
                # A new schedule recompiles the step: count one more compile.
                tc = fit_schedule_to_budget(
                    tc, done, deadline - time.perf_counter() - (t_first - t_start),
                    (now - t_first) / (done - start_step - 1), eval_seconds, time_budget, log)
                run.state.tc = dataclasses.replace(tc, steps=from_process_0(tc.steps),
                                                   warmup_steps=from_process_0(tc.warmup_steps))
            t_last, step_last = time.perf_counter(), done  # evaluation time is not training speed
        if any_process(bool(stop))[0]:
            raise KeyboardInterrupt
        step = done
        if out_of_time:
            break
    if start_step >= run.state.tc.steps:
        log(f"nothing to do: the checkpoint is at step {start_step} and --steps is "
            f"{run.state.tc.steps}")


def train(config, tc, data_path=DEFAULT_DATA, out_dir="out", resume=False, log=print,
          time_budget=None, init=None, mesh=None):
    """Trains a model and returns {"params", "opt_state", "history", "stopped",
    "weights", "question", "checkpoint"} (weights: the model's, which are
    params except with LoRA; checkpoint: the path of its checkpoint).
    Writes a checkpoint (out_dir/ckpt.npz, or the ckpt.orbax folder with
    --checkpoint orbax; section 15) and out_dir/loss.png at every evaluation
    and at the end. With resume=True, continues from that checkpoint; it
    must have been written with the same architecture.
    time_budget (minutes of wall clock, compile included) shortens the run to
    fit: after 10 timed steps and one timed evaluation, tc.steps is lowered so
    that the cosine schedule ends inside the budget (the step recompiles once
    for the new schedule), and a run that still reaches the budget stops there
    cleanly, evaluates and checkpoints.
    init: fine-tune this pretrained model (load_source, section 17) instead of
    starting from random weights; its tokenizer reads the data, and it is
    evaluated before the first step (step 0 of the history). A .jsonl
    data_path holds conversations (load_chats, section 17), and "question"
    in the result is the first held-out one's question (else None).
    mesh: the devices to train on (make_mesh, section 14; default: all of
    them, data parallel). With several processes, every one calls train;
    only process 0 logs and writes files, except Orbax's checkpoint, where
    each process writes its own shards."""
    run = start_run(config, tc, data_path, out_dir, resume, log, init, mesh)
    stopped, ckpt_path = None, run.writer.path
    with stop_requests(run.log) as stop, closing_writer(run):
        try:
            if init is not None and not resume:  # the pretrained model's own losses: step 0
                evaluate_and_save(run, 0)
            run_steps(run, stop, time_budget)
        except FloatingPointError as err:
            run.log(f"stopped: the loss became non-finite at step {int(err.args[0]) + 1}; the "
                    f"last good checkpoint ({ckpt_path}) was kept. Lower --lr or check the data.")
            stopped = "non-finite"
        except KeyboardInterrupt:
            stopped = "interrupted"
            state = (run.state.params, run.state.opt_state)
            if any(x.is_deleted() for x in jax.tree_util.tree_leaves(state)):
                run.log(f"aborted inside a step: {ckpt_path} keeps the last saved state")
            else:
                run.history["train"] += [[s + 1, float(v)]
                                         for s, v, _ in jax.device_get(run.pending)]
                run.log(f"interrupted: saving a checkpoint at step "
                        f"{int(run.state.opt_state['step'])} to {ckpt_path}; continue with "
                        "--resume")
                save_run(run)
    return {"params": run.state.params, "opt_state": run.state.opt_state, "history": run.history,
            "stopped": stopped, "weights": None if stopped == "interrupted" else run_weights(run),
            "question": run.question, "checkpoint": ckpt_path}


def token_nats(params, inputs, targets, config):
    """Each target's cross-entropy: int32[B, T] twice -> float32[B, T] nats."""
    logits, _ = model_forward(params, inputs, config)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


token_nats_jit = jax.jit(token_nats, static_argnames=("config",))


def text_windows(ids, T):
    """ids cut as evaluate_text reads them: windows of T predictions that do
    not overlap, each token predicted once, the last window padded.
    -> (inputs int32[W, T], targets int32[W, T], mask bool[W, T]: False on
    the padding), W = ceil((len(ids) - 1) / T)."""
    n_pred = len(ids) - 1
    n_windows = -(-n_pred // T)
    padded = np.zeros(n_windows * T + 1, np.int32)
    padded[:len(ids)] = ids
    inputs = padded[:-1].reshape(n_windows, T)  # [W, T]
    targets = padded[1:].reshape(n_windows, T)  # [W, T]: each input's next token
    mask = (np.arange(n_windows * T) < n_pred).reshape(n_windows, T)
    return inputs, targets, mask


def evaluate_text(params, config, tokenizer, text, seq_len=None, batch_size=None, log=None):
    """The model's loss on every token of `text`, so that models with different
    tokenizers can be compared (bits per byte). The text is encoded, the
    tokenizer's start token (<|endoftext|> for GPT-2, <|begin_of_text|> for
    Llama 3) put in front as the first token's context, and the tokens cut
    into windows of seq_len predictions (default: the model's context, at most
    1,024) that do not overlap: every token is predicted once, from the tokens
    before it in its window. Batches hold about 4,096 tokens (their float32
    logits: 0.8 GB at V = 50,257). One compiled shape: the last batch is padded
    and masked.
    log: called with a progress line every 5 seconds on long texts.
    -> {"tokens", "bytes", "nats_per_token", "perplexity", "bits_per_byte"}."""
    start = special_token(tokenizer, ENDOFTEXT, "<|begin_of_text|>")
    # Without a start token the first token is only context, not predicted.
    ids = ([] if start is None else [start]) + list(tokenizer.encode_ordinary(text))
    if len(ids) < 2:
        raise InputError("the text is too short to evaluate: it needs at least two tokens")
    # The tokens spell the text's bytes exactly, so the predicted ones (all but
    # ids[0]) hold all of them, less the first token's when it is the text's.
    n_bytes = len(text.encode("utf-8"))
    if start is None:
        n_bytes -= len(tokenizer.decode_single_token_bytes(ids[0]))
    T = min(seq_len or min(config.max_seq_len, 1024), config.max_seq_len)
    batch_size = batch_size or max(1, 4096 // T)
    n_pred = len(ids) - 1
    inputs, targets, mask = text_windows(ids, T)
    n_windows = len(inputs)
    total, t0, shown = 0.0, time.perf_counter(), time.perf_counter()
    for i in range(0, n_windows, batch_size):
        rows = slice(i, i + batch_size)
        x, y, m = inputs[rows], targets[rows], mask[rows]
        if len(x) < batch_size:  # pad the last batch to the compiled shape
            pad = batch_size - len(x)
            x, y = np.pad(x, ((0, pad), (0, 0))), np.pad(y, ((0, pad), (0, 0)))
            m = np.pad(m, ((0, pad), (0, 0)))
        nats = np.asarray(token_nats_jit(params, jnp.asarray(x), jnp.asarray(y), config),
                          np.float64)
        total += float(np.sum(nats * m))
        done = min(i + batch_size, n_windows)
        if log is not None and time.perf_counter() - shown > 5 and done < n_windows:
            shown = time.perf_counter()
            rate = done / (shown - t0)
            log(f"eval {done}/{n_windows} windows of {T} tokens | "
                f"ETA {format_duration((n_windows - done) / rate)}")
    nats_per_token = total / n_pred
    return {"tokens": n_pred, "bytes": n_bytes, "nats_per_token": nats_per_token,
            "perplexity": math.exp(nats_per_token),
            "bits_per_byte": total / math.log(2) / max(n_bytes, 1)}


# =============================================================================
# 19. Command line: presets, flags and what each mode runs
# =============================================================================
# The defaults a new user gets, chosen by measurement (docs/results.md).
# compute_dtype "auto" is decided per machine by auto_compute_dtype (section 10).
PRESETS = {
    # 2-core CPU: 10 min 51 s on an Intel Xeon (docs/results.md). Narrow
    # (128), so that the output layer, most of the FLOPs, costs half what it
    # does at 256 and the same minutes hold 1,000 steps instead of 600: on the
    # held-out plays, that beat the width-256, 600-step preset by 0.18 nats
    # per token (docs/results.md). About three passes over the corpus, so no
    # dropout; small batches give more optimizer steps in the time.
    # The fused attention call: no slower than Part I's attend here, 1% and 5%
    # faster in two runs of tools/bench_kernels.py on the AMD EPYC (bfloat16),
    # 3% in float32 (docs/speed.md).
    "cpu": (dict(dim=128, n_layers=6, n_heads=4, n_kv_heads=2, max_seq_len=256,
                 dropout_rate=0.0, tie_embeddings=True, compute_dtype="auto",
                 attention="fused"),
            dict(steps=1000, batch_size=8, seq_len=128, lr=3e-3, min_lr=1.5e-4, warmup_steps=50,
                 eval_every=100)),
    # One H100/H200, bfloat16 compute. Not yet tuned (docs/gpu.md): a wider,
    # deeper model with dropout, for about 20 passes over the corpus (15 ms
    # per step on an H200), and cuDNN's fused attention (not yet timed
    # against attend there).
    # Muon, not yet measured on a GPU: on the cpu preset it led AdamW on the
    # held-out plays with both seeds tried (by 0.04 and 0.08), at 4x the
    # preset's AdamW rate for the matrices and that rate for the rest
    # (docs/training.md), so here 4 x 1e-3 and 1e-3, the floor a tenth of the
    # peak as before. --lr is Muon's rate; --optimizer adamw takes the AdamW
    # rates (adamw_rates). The cpu preset stays on AdamW, Part I's optimizer,
    # since its lead there is small; published gains (modded-nanogpt, 124M
    # parameters on GPUs) come at sizes nearer this preset's.
    "gpu": (dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, max_seq_len=512,
                 dropout_rate=0.2, tie_embeddings=True, compute_dtype="bfloat16",
                 vocab_multiple=128, attention="fused"),
            dict(steps=800, batch_size=32, seq_len=256, optimizer="muon", lr=4e-3,
                 adam_lr=1e-3, min_lr=4e-4, warmup_steps=100, eval_every=100)),
}


def adamw_rates(training):
    """A preset's training values for AdamW: a Muon preset's lr and min_lr
    are Muon's, and its adam_lr is the rate AdamW would take (section 12), so
    --optimizer adamw (or fine-tuning, which uses AdamW) starts from those."""
    if training.get("optimizer", "adamw") == "adamw":
        return training
    adam_lr = training.get("adam_lr") or training["lr"]
    ratio = adam_lr / training["lr"]
    return {**training, "optimizer": "adamw", "lr": adam_lr,
            "min_lr": training.get("min_lr", TrainConfig.min_lr) * ratio, "adam_lr": None}


def preset_help(field):
    """'cpu preset: 256, gpu preset: 512' for a --help text, read from PRESETS
    (a field a preset leaves out takes the config's default)."""
    defaults = {f.name: f.default for f in dataclasses.fields(RunModelConfig)}
    defaults.update({f.name: f.default for f in dataclasses.fields(RunTrainConfig)})
    return ", ".join(f"{name} preset: {({**defaults, **model, **training})[field]}"
                     for name, (model, training) in PRESETS.items())


PROMPT_DEFAULT = "\n"


def default_preset():
    return "gpu" if jax.default_backend() == "gpu" else "cpu"


def matmul_seconds(a, b, repeats=5):
    """Seconds for `repeats` products a @ b with float32 accumulation (as in
    dense), compiled and warmed up first."""
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = f(a, b)
    out.block_until_ready()
    return time.perf_counter() - t0


def decoding_config(config):
    """The config to sample with. Decoding one token at a time reads every
    weight per token, so it is bound by memory, not matmul speed; on CPU,
    XLA's bfloat16 matrix-vector products convert each weight before they
    multiply, and ran slower than float32 ones (docs/speed.md)."""
    if jax.default_backend() == "cpu":
        return dataclasses.replace(config, compute_dtype="float32")
    return config


# The model and training flags (argparse's names) and the config fields they
# set: what resolve_configs reads, and what MODES (section 21) calls model and
# training flags.
MODEL_FIELDS = {"dim": "dim", "n_layers": "n_layers", "n_heads": "n_heads",
                "n_kv_heads": "n_kv_heads", "ffn_dim": "ffn_dim", "max_seq_len": "max_seq_len",
                "dropout": "dropout_rate", "tie_embeddings": "tie_embeddings",
                "dtype": "compute_dtype", "loss_impl": "loss_impl", "loss_block": "loss_block",
                "remat": "remat", "attention": "attention"}
TRAINING_FIELDS = ("steps", "batch_size", "seq_len", "lr", "min_lr", "warmup_steps",
                   "weight_decay", "eval_every", "log_every", "seed", "health", "grad_accum",
                   "optimizer", "adam_lr", "checkpoint", "keep_checkpoints")


def preset_configs(name=None, **overrides):
    """A preset (default: the one for this machine, default_preset) as
    configs, with overrides by field name (dim=64, steps=100, ...) and
    compute_dtype "auto" decided for this machine (auto_compute_dtype).
    -> (RunModelConfig, RunTrainConfig)."""
    model, training = (dict(d) for d in PRESETS[name or default_preset()])
    if overrides.get("optimizer") == "adamw":
        training = adamw_rates(training)
    model_fields = {f.name for f in dataclasses.fields(RunModelConfig)}
    unknown = set(overrides) - model_fields - {f.name for f in dataclasses.fields(RunTrainConfig)}
    if unknown:
        raise InputError(f"preset_configs: no config field named {', '.join(sorted(unknown))}")
    for field, value in overrides.items():
        (model if field in model_fields else training)[field] = value
    if "seq_len" in overrides and "max_seq_len" not in overrides:  # as --seq-len does
        model["max_seq_len"] = max(model["max_seq_len"], training["seq_len"])
    if model.get("compute_dtype") == "auto":
        model["compute_dtype"] = auto_compute_dtype()[0]
    training["min_lr"] = min(training.get("min_lr", TrainConfig.min_lr), training["lr"])
    return RunModelConfig(**model), RunTrainConfig(**training)


def resumed_meta(args):
    """With --resume, the metadata of the checkpoint the run continues from
    (checkpoint_meta), else None."""
    return checkpoint_meta(saved_checkpoint(args.out_dir)) if args.resume else None


def resolve_configs(args, saved=None):
    """The preset's values, overridden by the flags that were given
    (preset_configs), with --dtype auto decided and said. saved: the resumed
    checkpoint's metadata where the caller has read it (resumed_meta).
    -> (RunModelConfig, RunTrainConfig)."""
    preset = args.preset or default_preset()
    overrides = {field: getattr(args, flag) for flag, field in MODEL_FIELDS.items()
                 if getattr(args, flag) is not None}
    overrides.update({field: getattr(args, field) for field in TRAINING_FIELDS
                      if getattr(args, field) is not None})
    saved = saved or resumed_meta(args)
    if saved and args.optimizer is None:  # a resumed run keeps the optimizer whose state it has
        overrides["optimizer"] = saved["train_config"].get("optimizer", "adamw")
    if overrides.get("compute_dtype", PRESETS[preset][0].get("compute_dtype")) == "auto":
        if saved:  # a resumed run keeps the dtype it started with
            dtype = saved["model_config"]["compute_dtype"]
            why = "the dtype of the run being resumed"
        else:
            dtype, why = auto_compute_dtype()
        print(f"--dtype auto: {dtype} matmuls ({why})", flush=True)
        overrides["compute_dtype"] = dtype
    return preset_configs(preset, **overrides)


def sampling_from(args):
    """The sampling flags as a Sampling (section 16)."""
    return Sampling(args.max_new_tokens, args.temperature, args.top_k or None, args.top_p)


def print_sample(params, config, tokenizer, args, key, log=print):
    """Encodes the prompt, generates, prints the decoded text."""
    if args.prompt_ids:
        try:
            prompt = [int(t) for t in args.prompt_ids.split(",")]
        except ValueError as err:
            raise InputError("--prompt-ids must be comma-separated integers") from err
    elif tokenizer is None:
        raise InputError("this checkpoint comes without a tokenizer llama_jax can read: pass "
                         "--prompt-ids 1,2,3 (and read ids back), or --tokenizer gpt2")
    else:
        prompt = tokenizer.encode_ordinary(args.prompt)
        bos = special_token(tokenizer, "<|begin_of_text|>")  # Llama 3 prompts start with it
        if bos is not None:
            prompt = [bos] + prompt
    max_new = args.max_new_tokens
    if len(prompt) + max_new > config.max_seq_len:
        if len(prompt) >= config.max_seq_len:
            raise InputError(f"the prompt is {len(prompt)} tokens; the model's context is "
                             f"{config.max_seq_len}: use a shorter --prompt")
        max_new = config.max_seq_len - len(prompt)
        log(f"(--max-new-tokens lowered to {max_new} to fit the {config.max_seq_len}-token "
            "context)")
    stop = None
    if tokenizer is not None:
        stop = special_token(tokenizer, ENDOFTEXT, "<|end_of_text|>")
    t0 = time.perf_counter()
    out = generate(params, prompt, max_new, config, key, temperature=args.temperature,
                   top_k=args.top_k or None, top_p=args.top_p, stop_token=stop,
                   sample=fast_sample_token)
    elapsed = time.perf_counter() - t0
    new = out[len(prompt):]
    if new and new[-1] == stop:
        new = new[:-1]
    log(f"--- sample ({len(out) - len(prompt)} tokens in {elapsed:.1f}s, compile included; "
        f"temperature {args.temperature}, top-k {args.top_k or 'off'}, "
        f"top-p {args.top_p or 'off'}) ---")
    if tokenizer is None:
        log(",".join(map(str, out)))
    else:
        log(tokenizer.decode(out[:len(prompt)] + new)
            .replace("<|begin_of_text|>", ""))


# Fine-tuning's defaults where the preset's (made for random weights) do not
# fit: a pretrained model needs far smaller steps than one trained from
# scratch, and LoRA's few, freshly initialised weights take larger ones (the
# LoRA paper used 2e-4 to 5e-4 on GPT-2 Medium and RoBERTa; a short CPU run of a
# small model takes the top of that range and more: docs/finetuning.md).
# Fine-tuning uses AdamW, whatever the preset trains with: the published
# models were trained with it, and Muon is refused for LoRA (section 12).
FINE_TUNING = {"full": dict(lr=5e-5, min_lr=5e-6, warmup_steps=10, optimizer="adamw",
                            adam_lr=None),
               "lora": dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, optimizer="adamw",
                            adam_lr=None)}
ARCHITECTURE_FLAGS = {"dim": "dim", "n_layers": "n_layers", "n_heads": "n_heads",
                      "n_kv_heads": "n_kv_heads", "ffn_dim": "ffn_width",
                      "max_seq_len": "max_seq_len", "tie_embeddings": "tie_embeddings"}


def fine_tuning_configs(args, source, saved=None):
    """--init-from: the source's architecture with the run's compute settings,
    and the training flags over fine-tuning's defaults. An architecture flag
    that disagrees with the source is refused, naming it. saved: as
    resolve_configs takes it. -> (ModelConfig, TrainConfig)."""
    for flag, field in ARCHITECTURE_FLAGS.items():
        given, theirs = getattr(args, flag), getattr(source["config"], field)
        if given is not None and given != theirs:
            raise InputError(f"--{flag.replace('_', '-')} {given} disagrees with "
                             f"{source['source']}, whose {field} is {theirs}: the architecture "
                             f"comes from --init-from, so leave --{flag.replace('_', '-')} out")
    run_args = argparse.Namespace(**{**vars(args), **{flag: None for flag in ARCHITECTURE_FLAGS}})
    saved = saved or resumed_meta(args)
    preset, tc = resolve_configs(run_args, saved)  # compute dtype, dropout, loss; training flags
    config = dataclasses.replace(source["config"], compute_dtype=preset.compute_dtype,
                                 dropout_rate=preset.dropout_rate, loss_impl=preset.loss_impl,
                                 loss_block=preset.loss_block, remat=preset.remat,
                                 attention=preset.attention)
    lora = dict(lora_rank=args.lora_rank or 0, lora_alpha=args.lora_alpha or 16.0,
                lora_targets=tuple(args.lora_targets.split(",")) if args.lora_targets
                else RunTrainConfig.lora_targets)
    if saved:  # a resumed run keeps its adapters' shape; a flag may only repeat it
        saved_tc = config_from_json(RunTrainConfig, saved["train_config"])
        for name in lora:
            ours, theirs = lora[name], getattr(saved_tc, name)
            if getattr(args, name) is not None and ours != theirs:
                raise InputError(f"--{name.replace('_', '-')} {getattr(args, name)}: the run "
                                 f"being resumed has {name} {theirs}; leave the flag out")
            lora[name] = theirs
    defaults = FINE_TUNING["lora" if lora["lora_rank"] else "full"]
    if saved:  # and the optimizer whose state it holds
        defaults = {**defaults, "optimizer": saved_tc.optimizer, "adam_lr": saved_tc.adam_lr}
    given = {name: getattr(args, name) for name in defaults if getattr(args, name) is not None}
    tc = dataclasses.replace(tc, **{**defaults, **given}, **lora)
    return config, dataclasses.replace(tc, min_lr=min(tc.min_lr, tc.lr))


def training_configs(args):
    """The run's configs, from the flags, or from --init-from's source (a
    resumed fine-tuning run finds its base in its checkpoint).
    -> (ModelConfig, TrainConfig, the source or None)."""
    saved = resumed_meta(args)  # read once, for the three functions that need it
    source = args.init_from
    if source is None and saved:  # a fine-tuning run resumes from its own base
        source = saved.get("base") and saved["base"]["source"]
    if source:
        init = load_source(source)
        config, tc = fine_tuning_configs(args, init, saved)
    elif args.lora_rank:
        raise InputError("--lora-rank adapts a pretrained model: pass --init-from SOURCE")
    else:
        (config, tc), init = resolve_configs(args, saved), None
    if args.adam_lr is not None and tc.optimizer != "muon":  # refused, not ignored
        raise InputError("--adam-lr sets the rate of the weights Muon leaves to AdamW, so "
                         "it needs --optimizer muon; with AdamW, --lr is the rate of all")
    return config, tc, init


def run_train(args):
    log = functools.partial(print, flush=True) if jax.process_index() == 0 else lambda *a: None
    if args.time_budget is not None and args.time_budget <= 0:
        raise InputError(f"--time-budget must be a positive number of minutes, got "
                         f"{args.time_budget}")
    config, tc, init = training_configs(args)
    mesh = make_mesh(args.fsdp)
    result = train(config, tc, args.data or DEFAULT_DATA, args.out_dir, resume=args.resume,
                   log=log, time_budget=args.time_budget, init=init, mesh=mesh)
    if result["stopped"] == "non-finite":
        return 1
    if result["stopped"] == "interrupted":
        return 130
    files = run_files(args.out_dir)
    log(f"wrote {result['checkpoint']}, {files.loss_plot}, {files.health_plot} and "
        f"{files.metrics}; peak host memory {peak_rss_gb():.2f} GB")
    weights = result["weights"]
    if jax.process_count() > 1:  # process 0 samples alone, on its own device, from a copy
        weights = jax.tree_util.tree_map(gather, weights)
        if jax.process_index() != 0:
            return 0
    key = jax.random.PRNGKey(tc.seed)
    if init is None:
        print_sample(weights, decoding_config(config), get_tokenizer(), args, key, log)
    else:
        sample_model(dict(init, params=weights, config=config), args, key, log,
                     result["question"])
    return 0


def run_prepare(args):
    """--prepare INPUT... --data NAME: tokenize once into a data set on disk."""
    if not args.data:
        raise InputError("--prepare needs --data NAME: the data set to write "
                         "(NAME.json, NAME.train.bin, NAME.val.bin)")
    enc = load_source(args.init_from)["tokenizer"] if args.init_from else None
    if args.init_from and enc is None:
        raise InputError(f"--init-from {args.init_from} has no tokenizer llama_jax can "
                         "read, so --prepare cannot tokenize for it")
    prepare_tokens(args.prepare, args.data, log=functools.partial(print, flush=True), enc=enc)
    return 0


def run_training(args):
    """Training, the default mode: run_train on one process, or as one of
    several (run_on_many_processes)."""
    return run_on_many_processes(args) if jax.process_count() > 1 else run_train(args)


def run_on_many_processes(args):
    """run_train as one of several processes. When a process dies, the
    others' next collective fails: they say so, name the lost process, and
    stop, instead of waiting for it."""
    try:
        return run_train(args)
    except jax.errors.JaxRuntimeError as err:
        me = jax.process_index()
        print(f"error: process {me}: a collective failed ({str(err).splitlines()[0][:200]}); "
              "asking the coordinator which process was lost", file=sys.stderr, flush=True)
        print(f"error: process {me}: lost contact with process {lost_processes()}; stopping. "
              "Restart every process with --resume to continue from the last checkpoint",
              file=sys.stderr, flush=True)
        os._exit(3)  # not sys.exit: JAX's shutdown would wait for the lost process


def run_plan(args):
    """--plan: the memory and communication of a training run, then exit."""
    config, tc, _ = training_configs(args)
    mesh = make_mesh(args.fsdp)
    check_batch_split(tc, mesh)
    for line in plan_report(config, tc, mesh) + checkpoint_plan(config, tc, mesh):
        if jax.process_index() == 0:
            print(line, flush=True)
    return 0


def peak_rss_gb():
    """This process's peak resident memory so far, in GB (ru_maxrss is in KiB
    on Linux, in bytes on macOS)."""
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2 ** 30 if sys.platform == "darwin" else 2 ** 20)


FINE_TUNED_CHAT_PROMPT = "Write a few lines of a play."


def sample_model(model, args, key, log=print, question=None):
    """A sample from a model (load_source's dict): a chat reply to --prompt
    when the model has a chat format, else a continuation of it. question: a
    conversation to reply to instead (chat data's first held-out question)."""
    config, tokenizer = decoding_config(model["config"]), model["tokenizer"]
    try:
        chat_prompt([{"role": "user", "content": "hi"}], tokenizer, model["chat_template"])
    except (InputError, AttributeError):  # no chat format (or no tokenizer)
        return print_sample(model["params"], config, tokenizer, args, key, log)
    text = FINE_TUNED_CHAT_PROMPT if args.prompt == PROMPT_DEFAULT else args.prompt
    held_out = bool(question) and args.prompt == PROMPT_DEFAULT
    messages = ([dict(m) for m in question] if held_out
                else [{"role": "user", "content": text}])
    log(f"--- chat sample (temperature {args.temperature}, top-k {args.top_k or 'off'})"
        f"{', a held-out question' if held_out else ''} ---")
    for m in messages:
        log(f"{m['role']}> {m['content']}")
    print("model> ", end="", flush=True)
    chat_turn(model["params"], config, tokenizer, messages, sampling_from(args), key,
              model["chat_template"])


def load_model(args):
    """The model that --sample, --eval, --chat and --export-hf use: --gguf FILE,
    --hf-checkpoint DIR, or else the run in --out-dir (load_source)."""
    if args.gguf:
        return load_source(args.gguf, "gguf", "bfloat16" if args.dtype == "bfloat16"
                           else "float32")
    if args.hf_checkpoint:
        return load_source(args.hf_checkpoint, "hf", gpt2_tokenizer=args.tokenizer == "gpt2")
    path = saved_checkpoint(args.out_dir)
    if path is None:
        raise InputError(f"no checkpoint in {args.out_dir} (ckpt.npz or ckpt.orbax): train "
                         "first (python llama_jax.py), point --out-dir at a run, or pass "
                         "--hf-checkpoint DIR or --gguf FILE")
    return load_source(path, "ckpt")


def run_sample(args):
    key = jax.random.PRNGKey(args.seed or 0)
    model = load_model(args)
    print_sample(model["params"], decoding_config(model["config"]), model["tokenizer"], args, key,
                 functools.partial(print, flush=True))
    return 0


def run_export(args):
    """--export-hf DIR: the run in --out-dir (LoRA merged), or --gguf /
    --hf-checkpoint, as a Hugging Face folder."""
    export_hf(load_model(args), args.export_hf, functools.partial(print, flush=True))
    return 0


def run_export_gguf(args):
    """--export-gguf FILE: the run in --out-dir (LoRA merged), or --gguf /
    --hf-checkpoint, as a GGUF file of --gguf-type."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise InputError("--export-gguf needs the gguf package (llama.cpp's writer): "
                         "pip install gguf")
    kind = args.gguf_type or "f16"
    model = load_model(args)
    check_gguf_export(args.export_gguf, model["config"], model["tokenizer"], kind)  # before work
    save_gguf(args.export_gguf, model["params"], model["config"], model["tokenizer"], kind,
              model["chat_template"], model["special"], name=Path(model["source"]).stem,
              log=functools.partial(print, flush=True))
    return 0


def run_eval(args):
    """--eval FILE: loss, perplexity and bits per byte of the model on a text."""
    model = load_model(args)
    if model["tokenizer"] is None:
        raise InputError("--eval needs the model's tokenizer to read the text, and none was "
                         "found in the model folder (pass --tokenizer gpt2 if it uses GPT-2's)")
    text = load_text(args.eval)
    # Our checkpoints are evaluated at the length they were trained at: RoPE
    # positions past it were never seen in training.
    seq_len = args.seq_len or model["seq_len"]
    # With --json, standard output is the one JSON line; progress goes to stderr.
    r = evaluate_text(model["params"], model["config"], model["tokenizer"], text,
                      seq_len=seq_len, log=functools.partial(
                          print, flush=True, file=sys.stderr if args.json else sys.stdout))
    if args.json:
        print(json.dumps({"file": str(args.eval), "model": model["source"], **r}))
    else:
        print(f"{args.eval}: {r['tokens']:,} tokens, {r['bytes']:,} bytes | loss "
              f"{r['nats_per_token']:.4f} nats/token | perplexity {r['perplexity']:.2f} | "
              f"{r['bits_per_byte']:.4f} bits/byte ({model['source']})")
    return 0


def run_chat(args):
    """--chat: a terminal chat with an instruction-tuned model, or one reply to
    --prompt for scripts."""
    model = load_model(args)
    tokenizer, template = model["tokenizer"], model["chat_template"]
    if tokenizer is None:
        raise InputError("--chat needs the model's tokenizer, and none was found")
    chat_prompt([{"role": "user", "content": "hi"}], tokenizer, template)  # has a chat format?
    config = decoding_config(model["config"])
    key = jax.random.PRNGKey(args.seed or 0)
    messages = []
    if args.prompt != PROMPT_DEFAULT:  # one reply, for scripts
        messages.append({"role": "user", "content": args.prompt})
        _, n, seconds, after_first = chat_turn(model["params"], config, tokenizer, messages,
                                               sampling_from(args), key, template)
        rate = f", then {(n - 1) / after_first:.1f} tokens/s" if n > 1 and after_first > 0 else ""
        print(f"({n} tokens in {seconds:.1f}s, the first with compilation{rate})",
              file=sys.stderr)
        return 0
    print(f"chatting with {model['source']} (context {config.max_seq_len} tokens). An empty "
          "line or Ctrl-D ends; /reset forgets the conversation.", flush=True)
    for turn in itertools.count():
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        if not line.strip():
            return 0
        if line.strip() == "/reset":
            messages.clear()
            continue
        messages.append({"role": "user", "content": line})
        print("model> ", end="", flush=True)
        try:
            chat_turn(model["params"], config, tokenizer, messages, sampling_from(args),
                      jax.random.fold_in(key, turn), template)
        except InputError as err:
            print(f"error: {err}", flush=True)
            messages.pop()


# =============================================================================
# 20. Benchmarks: --bench
# =============================================================================
# Dense bfloat16 peak of the cards we quote MFU against, and their memory
# bandwidth, which decoding at batch 1 is bound by (NVIDIA datasheets, SXM).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.039e12}


def flops_per_token(config, seq_len):
    """Training FLOPs per token: 6 per weight for forward + backward (PaLM,
    appendix B) over every matmul weight (all but the input embedding, whose
    lookup is not a matmul; the output layer counts even when tied), plus
    attention's 6 * L * D * T (the QK^T and AV products, halved for causality)."""
    D, L = config.dim, config.n_layers
    per_layer = (D * config.n_heads * config.head_width * 2
                 + D * config.n_kv_heads * config.head_width * 2 + 3 * D * config.ffn_width)
    return 6 * (L * per_layer + D * config.vocab_size) + 6 * L * D * seq_len


def measured_matmul_peak(dtype, n=2048, repeats=5):
    """FLOP/s of one large square matmul: what this device can do at best."""
    a = jnp.ones((n, n), dtype)
    return 2 * n ** 3 * repeats / matmul_seconds(a, a, repeats)


def bench_state(config, tc, mesh):
    """What --bench's run_step takes: random tokens on every device, fresh
    weights and optimizer state split over the mesh, the key streams.
    -> (data, params, opt_state, keys)."""
    data = replicated(mesh, np.random.RandomState(0).randint(0, config.vocab_size, 1_000_000,
                                                             dtype=np.int32))
    params = sharded_init(jax.random.PRNGKey(1), config, mesh)
    return (data, params, sharded_optimizer_init(params, mesh, tc),
            replicated(mesh, run_keys(jax.random.PRNGKey(2))))


def bench_train(config, tc, n_steps, mesh=None):
    """-> dict with compile time, ms/step and tokens/s of run_step (in
    total, and per device of the mesh; default: every device)."""
    mesh = mesh or make_mesh()
    data, params, opt_state, key = bench_state(config, tc, mesh)
    t0 = time.perf_counter()
    params, opt_state, loss, _ = run_step(params, opt_state, data, key, config, tc, None, mesh)
    loss.block_until_ready()
    compile_s = time.perf_counter() - t0
    for _ in range(2):
        params, opt_state, loss, _ = run_step(params, opt_state, data, key, config, tc, None,
                                                mesh)
    loss.block_until_ready()
    t0 = time.perf_counter()
    for _ in range(n_steps):
        params, opt_state, loss, _ = run_step(params, opt_state, data, key, config, tc, None,
                                                mesh)
    loss.block_until_ready()
    per_step = (time.perf_counter() - t0) / n_steps
    tokens_per_s = tc.batch_size * tc.seq_len / per_step
    stats = jax.local_devices()[0].memory_stats() or {}  # None on some backends
    return {"compile_s": compile_s, "ms_per_step": per_step * 1e3,
            "train_tokens_per_s": tokens_per_s, "devices": mesh.size,
            "train_tokens_per_s_per_device": tokens_per_s / mesh.size,
            "peak_memory_bytes": stats.get("peak_bytes_in_use"),
            "recompiled": run_step._cache_size() > 1}, params


def naive_generate(params, tokens, n_new, config):
    """Greedy decoding without a cache, the way a first implementation does it:
    run the whole model over the whole sequence for every new token. The input
    grows by one token each step, so jax.jit compiles a new program every time.
    The baseline of --bench and of the notebook's KV-cache comparison.
    tokens: int32[B, T] -> int32[B, T + n_new]."""
    forward = jax.jit(model_forward, static_argnames=("config",))
    tokens = jnp.asarray(tokens)
    for _ in range(n_new):
        logits, _ = forward(params, tokens, config)
        tokens = jnp.concatenate([tokens, jnp.argmax(logits[:, -1:], axis=-1)], axis=1)
    return tokens


def bench_prompts(config, batch):
    """`batch` fixed 16-token prompts for the decoding benchmarks."""
    return [[(7 * i + 3 * b) % config.vocab_size for i in range(16)] for b in range(batch)]


def decode_speed(params, config, batch, n_new, seed=1):
    """Tokens/s of generate for `batch` 16-token prompts (compiled beforehand)."""
    prompt = bench_prompts(config, batch)
    generate(params, prompt, n_new, config, jax.random.PRNGKey(0),
             sample=fast_sample_token)  # compile
    t0 = time.perf_counter()
    generate(params, prompt, n_new, config, jax.random.PRNGKey(seed), sample=fast_sample_token)
    return batch * n_new / (time.perf_counter() - t0)


def bench_long_context(params, config, n_new, rounds=5):
    """Decoding at batch 1 with the model's context set to Llama 3.x's 131,072
    positions and to 256, alternating rounds, best of each: with the cache
    sized to the request the two should run at the same speed."""
    configs = {131072: dataclasses.replace(config, max_seq_len=131072),
               256: dataclasses.replace(config, max_seq_len=256)}
    best = {n: 0.0 for n in configs}
    for r in range(rounds):
        for n, c in configs.items():
            best[n] = max(best[n], decode_speed(params, c, 1, n_new, seed=r + 1))
    return {"long_tokens_per_s": best[131072], "short_tokens_per_s": best[256],
            "ratio": best[131072] / best[256]}


def decode_bytes_per_token(params, config, batch, cache_len):
    """Bytes one decoding step reads from memory, per token, at `batch` rows:
    every matrix once (in the compute dtype: decoding_weights), shared by the
    rows; each row's whole KV cache (the mask, not the loop, skips the empty
    slots); one embedding row (the whole table when it is also the output)."""
    itemsize = jnp.dtype(config.dtype).itemsize
    weights = sum(w.size * (itemsize if w.ndim > 1 else w.dtype.itemsize)
                  for k, w in flatten_tree(params).items() if k != "tok_embeddings")
    embedding = params["tok_embeddings"]
    weights += embedding.size * itemsize if config.tie_embeddings else 0
    cache = 2 * config.n_layers * cache_len * config.n_kv_heads * config.head_width * itemsize
    return weights / batch + cache + embedding.shape[1] * itemsize


def bench_decode(params, config, batch, n_new, n_naive):
    """Cached decoding against naive_generate at `batch` rows: tokens/s of
    each, and the bytes the cached loop reads per token."""
    cached = decode_speed(params, config, batch, n_new)
    naive = None
    if n_naive:  # 0: not timed (each of its lengths compiles: minutes on a GPU)
        t0 = time.perf_counter()
        naive_generate(params, np.array(bench_prompts(config, batch)), n_naive,
                       config).block_until_ready()
        naive = batch * n_naive / (time.perf_counter() - t0)
    cache_len = decoding_shapes(16, n_new, config)[2]  # bench_prompts: 16 tokens
    return {"batch": batch, "new_tokens": n_new, "decode_tokens_per_s": cached,
            "naive_tokens_per_s": naive, "speedup": naive and cached / naive,
            "bytes_per_token": decode_bytes_per_token(params, config, batch, cache_len)}


def bench_loaded_model(args):
    """--bench with --gguf or --hf-checkpoint: that model's decoding at batch
    1 and 8. Its training step is not timed (--bench trains the preset's
    random model; tools/bench_finetune.py times fine-tuning), and it says so."""
    model = load_model(args)
    config, params = decoding_config(model["config"]), model["params"]
    name = getattr(jax.devices()[0], "device_kind", jax.default_backend())
    n_new = min(64, config.max_seq_len - 16)

    def emit(record, text):
        print(json.dumps({"device": name, "model": model["source"], **record}) if args.json
              else text, flush=True)

    emit({"kind": "train", "skipped": "a loaded model's training step is not timed"},
         f"model  {model['source']}: {count_params(params) / 1e6:.1f}M params, "
         f"{config.compute_dtype}; training not timed (--bench trains the preset's random "
         "model; for fine-tuning speed: python tools/bench_finetune.py)")
    for batch in (1, 8):
        d = bench_decode(params, config, batch, n_new, n_naive=2)
        emit({"kind": "decode", **d},
             f"decode batch {batch}: cached {d['decode_tokens_per_s']:,.1f} tok/s, naive full "
             f"recompute {d['naive_tokens_per_s']:,.2f} tok/s ({d['speedup']:,.0f}x)")
    return 0


def bench_decoding(params, config, on_gpu, emit):
    """--bench's decoding: batch 1 and 8 against the naive loop, then batch 1
    with the context at 131,072 positions against 256, each emitted.
    -> the two bench_decode records."""
    n_new = min(128, config.max_seq_len - 16)
    # On a GPU the naive loop's compiles (one per length) would take minutes.
    decode = [bench_decode(params, decoding_config(config), b, n_new, n_naive=0 if on_gpu else 6)
              for b in (1, 8)]
    device = jax.devices()[0]
    name = getattr(device, "device_kind", device.platform)
    bandwidth = next((v for k, v in HBM_BYTES_PER_S.items() if k in name), None)
    for d in decode:
        read = d["bytes_per_token"] * d["decode_tokens_per_s"]  # bytes/s the loop reads
        d["hbm_fraction"] = None if bandwidth is None else read / bandwidth
        emit({"kind": "decode", **d},
             f"decode batch {d['batch']}: cached {d['decode_tokens_per_s']:,.1f} tok/s"
             + (f", naive full recompute {d['naive_tokens_per_s']:,.2f} tok/s "
                f"({d['speedup']:,.0f}x)" if d["naive_tokens_per_s"] else "")
             + f"; reads {d['bytes_per_token'] / 1e6:,.1f} MB per token, "
             f"{read / 1e9:,.0f} GB/s"
             + (f" ({d['hbm_fraction']:.1%} of {name}'s {bandwidth / 1e12:.2f} TB/s)"
                if bandwidth else ""))
    long = bench_long_context(params, decoding_config(config), min(n_new, 64), rounds=3)
    emit({"kind": "decode_long_context", **long},
         f"decode batch 1, the model's context at 131,072 positions: "
         f"{long['long_tokens_per_s']:,.1f} tok/s; at 256: {long['short_tokens_per_s']:,.1f} "
         f"({long['ratio']:.2f}x; the cache is sized to the request)")
    return decode


def device_peak(config):
    """The FLOP/s that MFU is measured against: the datasheet's for a card in
    PEAK_BF16_FLOPS, else one large matmul's in config's dtype.
    -> (device name, FLOP/s, where the figure comes from)."""
    device = jax.devices()[0]
    name = getattr(device, "device_kind", device.platform)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    if peak is not None:
        return name, peak, f"{name} datasheet dense bf16"
    return (name, measured_matmul_peak(config.dtype),
            f"measured 2048^3 {config.compute_dtype} matmul on {name}")


def run_bench(args):
    """Times the training step and decoding for the preset (or flags), or the
    decoding of --gguf / --hf-checkpoint's model (bench_loaded_model)."""
    if args.gguf or args.hf_checkpoint:
        return bench_loaded_model(args)
    on_gpu = jax.default_backend() == "gpu"
    if args.batch_size is None:
        args.batch_size = 16 if on_gpu else 8
    if args.seq_len is None:
        args.seq_len = 1024 if on_gpu else 256
    config, tc = resolve_configs(args)
    mesh = make_mesh(args.fsdp)
    check_batch_split(tc, mesh)
    name, peak, peak_source = device_peak(config)

    def emit(record, text):
        print(json.dumps({"device": name, **record}) if args.json else text, flush=True)

    train_result, params = bench_train(config, tc, n_steps=30 if on_gpu else 8, mesh=mesh)
    fpt = flops_per_token(config, tc.seq_len)
    mfu = fpt * train_result["train_tokens_per_s_per_device"] / peak  # per device
    emit({"kind": "train", "dim": config.dim, "n_layers": config.n_layers,
          "params": count_params(params), "batch_size": tc.batch_size, "seq_len": tc.seq_len,
          "dtype": config.compute_dtype, **train_result, "mfu": mfu, "peak_flops": peak,
          "peak_source": peak_source},
         f"train  {name}, {count_params(params) / 1e6:.1f}M params, {tc.batch_size} x "
         f"{tc.seq_len} tokens, {config.compute_dtype}: "
         f"{train_result['train_tokens_per_s']:,.0f} tok/s"
         + (f" ({train_result['train_tokens_per_s_per_device']:,.0f} per device on "
            f"{describe_mesh(mesh)})" if mesh.size > 1 else "")
         + f", {train_result['ms_per_step']:.0f} ms/step, MFU {mfu:.1%} (per device, of "
         f"{peak / 1e12:.3g} TFLOP/s, {peak_source}; "
         f"{fpt / 1e6:.0f} MFLOP/token), compile {train_result['compile_s']:.1f}s"
         + (f", peak memory {gb(train_result['peak_memory_bytes'])}"
            if train_result["peak_memory_bytes"] else ""))
    n_tokens = tc.batch_size * tc.seq_len
    loss_bytes = loss_buffer_bytes(config, n_tokens)
    chosen = "blockwise" if use_blockwise(config, n_tokens) else "plain"
    emit({"kind": "loss_memory", "loss_impl": chosen, "loss_block": config.loss_block,
          "temp_bytes": loss_bytes},
         f"loss   {chosen} ({config.loss_impl}) cross-entropy; temporary buffers of the loss "
         f"and its gradient: plain {loss_bytes['plain'] / 2**20:,.0f} MiB, blockwise "
         f"({config.loss_block} tokens per block) {loss_bytes['blockwise'] / 2**20:,.0f} MiB")
    # --max-new-tokens 0: training only
    decode = [] if args.max_new_tokens == 0 else bench_decoding(params, config, on_gpu, emit)
    if args.json:
        emit({"kind": "summary", "train_tokens_per_s": train_result["train_tokens_per_s"],
              "mfu": mfu, "decode_tokens_per_s": decode[0]["decode_tokens_per_s"] if decode else None,
              "decode_tokens_per_s_batch8": decode[1]["decode_tokens_per_s"] if decode else None},
             "")
    return 0


# =============================================================================
# 21. The table of modes, and main
# =============================================================================


# Which flags each mode reads (argparse's names). A flag given to a mode that
# does not read it is refused (check_flags), not silently dropped:
# `--sample --lr 1e-3` would otherwise look as if it did something.
MODEL_FLAGS = frozenset(MODEL_FIELDS)
TRAINING_FLAGS = frozenset(TRAINING_FIELDS) | {
    "time_budget", "resume", "init_from", "lora_rank", "lora_alpha", "lora_targets", "data",
    "preset", "fsdp", "coordinator", "num_processes", "process_id", "coordinator_timeout"}
SAMPLING_FLAGS = frozenset({"prompt", "prompt_ids", "max_new_tokens", "temperature", "top_k",
                            "top_p", "seed"})
SOURCE_FLAGS = frozenset({"gguf", "hf_checkpoint", "tokenizer", "out_dir", "dtype"})


@dataclass(frozen=True)
class Mode:
    """One thing the command line does: one row of MODES.
    name: its name in messages; flag: the option that chooses it (None for
    training, what runs when no mode is chosen), with flag_args, its argparse
    settings in --help's "what to do" group; reads: the flags it reads (any
    other is refused); run: args -> exit code; many_processes: whether it
    runs as one of several processes (--coordinator, srun); reads_with_model:
    what it reads instead when given a model file (--gguf, --hf-checkpoint)."""
    name: str
    flag: str | None
    flag_args: dict
    reads: frozenset
    run: object
    many_processes: bool = False
    reads_with_model: frozenset | None = None


# Adding a mode is one row here and the function it runs.
MODES = (
    Mode("train", None, {}, MODEL_FLAGS | TRAINING_FLAGS | SAMPLING_FLAGS | {"out_dir"},
         run_training, many_processes=True),
    Mode("sample", "--sample", dict(
        action="store_true",
        help="sample from the checkpoint in --out-dir (or --hf-checkpoint) without training"),
         SOURCE_FLAGS | SAMPLING_FLAGS, run_sample),
    Mode("bench", "--bench", dict(
        action="store_true", help="time the training step and decoding, then exit"),
         MODEL_FLAGS | {"batch_size", "seq_len", "fsdp", "grad_accum", "json", "preset",
                        "max_new_tokens"} | SOURCE_FLAGS, run_bench,
         reads_with_model=SOURCE_FLAGS | {"json", "max_new_tokens"}),
    Mode("eval", "--eval", dict(
        metavar="FILE",
        help="loss (nats/token), perplexity and bits per byte of the model in --out-dir (or "
             "--hf-checkpoint) on every token of a UTF-8 text file, in windows of --seq-len "
             "(default: the length a checkpoint was trained at, else the model's context up "
             "to 1,024); bits per byte compare models with different tokenizers"),
         SOURCE_FLAGS | {"seq_len", "json"}, run_eval),
    Mode("chat", "--chat", dict(
        action="store_true",
        help="chat with an instruction-tuned model (--gguf, --hf-checkpoint) in its own chat "
             "format, the reply printed as it is generated; with --prompt: one reply, for "
             "scripts"),
         SOURCE_FLAGS | SAMPLING_FLAGS, run_chat),
    Mode("export_hf", "--export-hf", dict(
        metavar="DIR",
        help="write the run in --out-dir (a LoRA run merged into its base), or --gguf / "
             "--hf-checkpoint, as a Hugging Face folder (config.json, model.safetensors and "
             "the base's tokenizer files) that transformers loads; DIR must be new or empty"),
         SOURCE_FLAGS, run_export),
    Mode("export_gguf", "--export-gguf", dict(
        metavar="FILE",
        help="write the run in --out-dir (a LoRA run merged into its base), or --gguf / "
             "--hf-checkpoint, as a GGUF file that llama.cpp (and ollama, LM Studio, "
             "llama-cpp-python) runs: the weights, the tokenizer and the chat template; FILE "
             "must not exist (needs the gguf package)"),
         SOURCE_FLAGS | {"gguf_type"}, run_export_gguf),
    Mode("prepare", "--prepare", dict(
        nargs="+", metavar="INPUT",
        help="tokenize text files, folders (recursively: " + ", ".join(TEXT_SUFFIXES) + ") or "
             "globs once into the data set named by --data (NAME.json, NAME.train.bin, "
             "NAME.val.bin), then exit; each file is a document, and about 10%% of the "
             "documents (chosen by a hash of their path) are validation"),
         frozenset({"data", "init_from"}), run_prepare),
    Mode("plan", "--plan", dict(
        action="store_true",
        help="print the mesh, the memory per device (weights, gradients, AdamW, activations, "
             "the loss's buffers; XLA's analysis of the compiled step) and the bytes each step "
             "sends between devices, then exit without training"),
         MODEL_FLAGS | TRAINING_FLAGS | {"out_dir"}, run_plan, many_processes=True),
)


def build_parser():
    p = argparse.ArgumentParser(
        prog="python llama_jax.py",
        description="Train a Llama on Shakespeare (the default), sample from a checkpoint "
                    "(--sample), evaluate it on a text (--eval), chat with an instruction-tuned "
                    "model (--chat with --gguf or --hf-checkpoint), or measure speed "
                    "(--bench). With no flags: train the preset for this machine (cpu: 10 to "
                    "13 minutes on 2 cores; gpu: a larger model in bfloat16), evaluate and "
                    "checkpoint to out/, draw out/loss.png and out/health.png, then print a "
                    "sample.",
        epilog="Model and training flags left out take the preset's value; the presets are "
               "listed in PRESETS (llama_jax.py, section 19) and in docs/results.md.")
    mode = p.add_argument_group("what to do")
    for m in MODES:  # one flag each, training (the default) aside
        if m.flag:
            mode.add_argument(m.flag, **m.flag_args)
    mode.add_argument("--gguf-type", choices=GGUF_TYPES,
                      help="with --export-gguf: how matrices are stored: f32, f16 (default) "
                           "or q8_0 (llama.cpp's 8-bit blocks: 32 weights, one f16 scale)")
    mode.add_argument("--json", action="store_true",
                      help="with --bench or --eval: print JSON instead of text")
    mode.add_argument("--preset", choices=sorted(PRESETS),
                      help="default model and training sizes (default: gpu when JAX sees a "
                           "GPU, else cpu)")
    files = p.add_argument_group("files")
    files.add_argument("--data",
                       help="what to train on: a UTF-8 text file (tokenized at start; its last "
                            "10%% is validation) or a data set made by --prepare (NAME.json or "
                            "NAME; read from disk a batch at a time), or conversations, "
                            "CHATS.jsonl, to fine-tune a chat model (--init-from) on its "
                            "replies only. With --prepare: the name to write. Default: "
                            "shakespeare.txt beside this file")
    files.add_argument("--out-dir", default="out",
                       help="where ckpt.npz (or ckpt.orbax), loss.png, health.png and "
                            "metrics.jsonl go (default: out)")
    files.add_argument("--checkpoint", choices=["auto", "npz", "orbax"],
                       help="the checkpoint's format: npz, one file that process 0 writes after "
                            "gathering the whole state; orbax, a folder of steps where each "
                            "process writes its own shards in the background (needs "
                            "orbax-checkpoint; docs/scaling.md). auto (the default): orbax with "
                            "several processes or a state over half the host's memory, when "
                            "installed; else npz")
    files.add_argument("--keep-checkpoints", type=int,
                       help="with --checkpoint orbax: the last N steps kept (default: 3)")
    files.add_argument("--resume", action="store_true",
                       help="continue training from --out-dir's checkpoint up to --steps, with the "
                            "same batches and dropout masks as an uninterrupted run. The "
                            "learning-rate schedule stays the original run's: a larger --steps "
                            "runs on at --min-lr after its end")
    tune = p.add_argument_group("fine-tuning")
    tune.add_argument("--init-from", metavar="SOURCE",
                      help="start training from a pretrained model instead of random weights: "
                           "a Hugging Face folder, a GGUF file or a llama_jax run (its folder, "
                           "its ckpt.npz or its ckpt.orbax). Its architecture and tokenizer are used (--data is "
                           "tokenized with it; with --prepare, the data set is written with "
                           "it); defaults become --lr 5e-5 (LoRA: 1e-3), --min-lr lr/10, "
                           "--warmup-steps 10")
    tune.add_argument("--lora-rank", type=int, metavar="R",
                      help="with --init-from: train only rank-R LoRA adapters on "
                           "--lora-targets and keep the base frozen (default 0: train every "
                           "weight)")
    tune.add_argument("--lora-alpha", type=float,
                      help="LoRA's update is scaled by alpha / R (default 16)")
    tune.add_argument("--lora-targets", metavar="NAMES",
                      help="comma-separated matrices to adapt, among wq,wk,wv,wo (attention) "
                           "and w1,w2,w3 (feed-forward) (default: wq,wk,wv,wo)")
    model = p.add_argument_group("model (defaults from the preset)")
    model.add_argument("--dim", type=int, help=f"model width D ({preset_help('dim')})")
    model.add_argument("--n-layers", type=int, help=f"transformer blocks ({preset_help('n_layers')})")
    model.add_argument("--n-heads", type=int, help=f"query heads H ({preset_help('n_heads')})")
    model.add_argument("--n-kv-heads", type=int,
                       help=f"key/value heads K; H must be a multiple ({preset_help('n_kv_heads')})")
    model.add_argument("--ffn-dim", type=int,
                       help="feed-forward width F (default: Llama's rule, 8/3 * D rounded up)")
    model.add_argument("--max-seq-len", type=int,
                       help=f"context length and KV-cache size ({preset_help('max_seq_len')})")
    model.add_argument("--dropout", type=float, help=f"dropout rate ({preset_help('dropout_rate')})")
    model.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=None,
                       help=f"share the input embedding with the output layer ({preset_help('tie_embeddings')})")
    model.add_argument("--attention", choices=["fused", "explicit"],
                       help="the training step's attention: fused, jax.nn.dot_product_attention "
                            "(cuDNN's kernel on a GPU), or explicit, Part I's attend; decoding "
                            f"always runs attend ({preset_help('attention')})")
    model.add_argument("--loss", choices=["auto", "plain", "blockwise"], dest="loss_impl",
                       help="how the cross-entropy is computed: plain holds the [B*T, V] "
                            "logits; blockwise takes loss_block tokens at a time and never "
                            "does (for large vocabularies and batches); auto: blockwise once "
                            "the float32 logits would exceed 1 GiB, or for float32 compute on "
                            "a CPU, where it is faster (default auto)")
    model.add_argument("--loss-block", type=int,
                       help=f"tokens per block of the blockwise loss (default {RunModelConfig.loss_block})")
    model.add_argument("--dtype", choices=["auto", "float32", "bfloat16"],
                       help="matmul dtype; weights and optimizer stay float32. auto: "
                            "bfloat16 on a GPU, or on a CPU where it is faster (AMD with "
                            "avx512_bf16, Intel with AMX), else float32 (as on an Intel CPU "
                            "with avx512_bf16 and no AMX); --resume keeps the run's "
                            f"dtype ({preset_help('compute_dtype')})")
    training = p.add_argument_group("training (defaults from the preset)")
    training.add_argument("--steps", type=int, help=f"optimizer steps in total ({preset_help('steps')})")
    training.add_argument("--batch-size", type=int, help=f"sequences per step ({preset_help('batch_size')})")
    training.add_argument("--seq-len", type=int, help=f"tokens per sequence ({preset_help('seq_len')})")
    training.add_argument("--lr", type=float, help=f"peak learning rate ({preset_help('lr')})")
    training.add_argument("--min-lr", type=float, help=f"cosine floor ({preset_help('min_lr')})")
    training.add_argument("--warmup-steps", type=int, help=f"linear warmup steps ({preset_help('warmup_steps')})")
    training.add_argument("--weight-decay", type=float,
                          help=f"decoupled weight decay ({preset_help('weight_decay')})")
    training.add_argument("--optimizer", choices=["adamw", "muon"],
                          help="adamw, or muon: Muon (momentum orthogonalised by Newton-Schulz) "
                               "for the blocks' matrices and AdamW for the embedding, output "
                               "and norms (docs/training.md) "
                               f"({preset_help('optimizer')})")
    training.add_argument("--adam-lr", type=float,
                          help="with --optimizer muon: the AdamW-trained weights' peak "
                               "learning rate (default: the gpu preset's "
                               f"{PRESETS['gpu'][1]['adam_lr']:g}, else --lr)")
    training.add_argument("--eval-every", type=int,
                          help=f"evaluate, plot and checkpoint every N steps ({preset_help('eval_every')})")
    training.add_argument("--log-every", type=int, help=f"a progress line every N steps ({preset_help('log_every')})")
    training.add_argument("--health", action=argparse.BooleanOptionalAction, default=None,
                          help="per-block gradient norms, update/weight ratios, residual RMS and "
                               "attention entropy from each step, to OUT/metrics.jsonl and "
                               "OUT/health.png (default on; tools/bench_health.py measures their cost)")
    training.add_argument("--seed", type=int, help=f"seeds the init, batch and dropout streams ({preset_help('seed')})")
    training.add_argument("--time-budget", type=float, metavar="MINUTES",
                          help="train for at most this much wall clock (compile included): "
                               "after 10 timed steps --steps is lowered so that the learning-"
                               "rate schedule ends inside the budget, and the run stops "
                               "cleanly at the budget (evaluate, checkpoint, sample)")
    scale = p.add_argument_group("many devices and hosts (docs/scaling.md)")
    scale.add_argument("--fsdp", default="1", metavar="N",
                       help="devices per FSDP group: weights and AdamW moments are split over N "
                            "devices and gathered when used (1, the default: pure data parallel, "
                            "every device holds them all; all: split over every device). The "
                            "batch is always split over every device")
    scale.add_argument("--grad-accum", type=int, metavar="N",
                       help="split each optimizer step's batch into N micro-batches run one "
                            "after the other: the same update, less activation memory "
                            "(default 1)")
    scale.add_argument("--remat", action=argparse.BooleanOptionalAction, default=None,
                       help="recompute each block's activations in the backward pass instead "
                            "of keeping them (jax.checkpoint): less memory, about a third more "
                            "compute")
    scale.add_argument("--coordinator", metavar="HOST:PORT",
                       help="several processes (hosts): process 0's address; give the same "
                            "command on every process with its own --process-id (under SLURM's "
                            "srun the three flags can be left out)")
    scale.add_argument("--num-processes", type=int, metavar="N", help="processes in the run")
    scale.add_argument("--process-id", type=int, metavar="I",
                       help="this process's number, 0 to N-1; 0 prints and writes the files")
    scale.add_argument("--coordinator-timeout", type=float, default=COORDINATOR_TIMEOUT_S,
                       metavar="SECONDS",
                       help=f"how long to wait for the coordinator and for every process to "
                            f"join; a process silent this long is declared lost and the others "
                            f"stop, naming it (default {COORDINATOR_TIMEOUT_S})")
    sampling = p.add_argument_group("sampling")
    sampling.add_argument("--prompt", default=PROMPT_DEFAULT,
                          help="text to continue (default: a newline, i.e. a fresh speech)")
    sampling.add_argument("--prompt-ids", help="comma-separated token ids instead of --prompt")
    sampling.add_argument("--max-new-tokens", type=int, default=200,
                          help="tokens to generate (default: 200); with --bench, 0 skips the "
                               "decoding benchmark")
    sampling.add_argument("--temperature", type=float, default=0.8,
                          help="0 is greedy; higher is more random (default: 0.8)")
    sampling.add_argument("--top-k", type=int, default=50,
                          help="sample among the k most likely tokens; 0 turns it off "
                               "(default: 50)")
    sampling.add_argument("--top-p", type=float,
                          help="nucleus sampling: the smallest set reaching this probability "
                               "(default: off)")
    sampling.add_argument("--hf-checkpoint", help="with --sample, --eval, --chat, --bench or an "
                                                  "export: a Hugging Face Llama folder "
                                                  "(config.json + safetensors)")
    sampling.add_argument("--gguf", metavar="FILE",
                          help="with --sample, --eval, --chat, --bench or an export: a "
                               "llama.cpp GGUF file of the "
                               "llama architecture, with its own tokenizer (needs the gguf "
                               "package; --dtype bfloat16 keeps the weights in bfloat16)")
    sampling.add_argument("--tokenizer", choices=["gpt2"],
                          help="with --hf-checkpoint: use GPT-2's tokenizer instead of the "
                               "folder's tokenizer.model")
    return p


def check_flags(parser, args):
    """Refuses two modes at once and any flag the chosen mode does not read
    (MODES), naming it. -> the Mode."""
    options = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    given = {a.dest for a in parser._actions
             if a.option_strings and a.dest != "help" and getattr(args, a.dest) != a.default}
    chosen = [m for m in MODES if m.flag and m.name in given]
    if len(chosen) > 1:
        raise InputError(f"{' and '.join(m.flag for m in chosen)}: choose one of them per "
                         "command")
    mode = chosen[0] if chosen else MODES[0]
    if "tokenizer" in given and "hf_checkpoint" not in given:
        raise InputError("--tokenizer applies to --hf-checkpoint's folder only")
    if "gguf" in given and "hf_checkpoint" in given:
        raise InputError("--gguf and --hf-checkpoint: give one model")
    model_given = bool(given & {"gguf", "hf_checkpoint"})
    reads = mode.reads_with_model if model_given and mode.reads_with_model else mode.reads
    extra = given - reads - {mode.name}
    if extra:
        names = ", ".join(sorted(options[d] for d in extra))
        what = mode.flag or "training"
        hint = (" (to train from a model, use --init-from)" if mode.flag is None and model_given
                else "")
        raise InputError(f"{names}: not used by {what}{hint}, so refused rather than ignored; "
                         "drop it, or see --help for what each mode reads")
    return mode


def main(argv=None):
    """python llama_jax.py [flags]: the mode the flags choose (MODES).
    -> exit code: 0 done, 1 a run diverged, 2 bad input, 130 interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        mode = check_flags(parser, args)
        # Before anything asks JAX for its devices.
        many = start_distributed(args.coordinator, args.num_processes, args.process_id,
                                 args.coordinator_timeout)
        if many and not mode.many_processes:
            raise InputError("several processes train (or --plan) together; run the other "
                             "modes as one process")
        return mode.run(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
