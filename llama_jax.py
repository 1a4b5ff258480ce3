"""llama_jax: the Llama architecture as one readable, pure-functional JAX module.

It is the project's reference, called Part I: the reading path, everything a
learner needs to understand Llama and train it on one device, top to bottom.

    1. configuration          ModelConfig (architecture), TrainConfig (optimisation)
    2. tokenizer and data     an offline GPT-2 tokenizer, text loading, batches
    3. layers                 rms_norm, rotary embeddings, attention, SwiGLU
    4. model                  init_params, init_cache, model_forward
    5. loss and optimizer     cross-entropy, AdamW, a jitted train_step
    6. training               train_loop: a plain loop with evaluation
    7. sampling               generate: a KV cache and one compiled decode loop

It trains and samples a model by itself:

    import jax, llama_jax as L
    config, tc = L.ModelConfig(), L.TrainConfig()  # 7.55M parameters, float32
    train, val = L.load_dataset(L.DEFAULT_DATA, tc.seq_len)  # Shakespeare, GPT-2 tokens
    params, opt_state, history = L.train_loop(config, tc, train, val)
    enc = L.get_tokenizer()
    tokens = L.generate(params, enc.encode_ordinary("ROMEO:"), 100, config,
                        jax.random.PRNGKey(0), temperature=0.8, top_k=50)
    print(enc.decode(tokens))

That is the whole of this file: the reference, with nothing else in it.
Everything the command line adds (presets, checkpoints, other models' files,
many devices, chat, fine-tuning, benchmarks) is the package beside it,
llamatool/, one module per concern; its __init__ lists them in reading order.
Each composes with this module from outside: it wraps a function here, passes
its own function where one here takes one with a plain default, or places
arrays on devices around a jitted call. Nothing here asks which feature is on,
and this module imports nothing of the package (its __main__ block hands the
command line over).

Shapes are written with these letters: B batch, T time (the tokens at hand),
S the keys each query can be compared with (T without a KV cache, the cache's
slots with one), D model width, H query heads, K key/value heads, G = H // K query heads per
key/value head, N either H or K (a function used for both), Dh head width, F
feed-forward width, V vocabulary, V_padded the vocabulary rounded up to a
multiple of vocab_multiple (the embedding's and output layer's width).

Parameters are a nested dict of arrays (a pytree); every function here is pure
(it mutates none of its arguments). Importing this module does no work.

The JAX to know before reading (the notebook runs each of these):
- jax.jit traces a function once per argument shape and dtype, and compiles it.
  A "static" argument (static_argnums/static_argnames) is an ordinary Python
  value, such as a ModelConfig, read while tracing: each distinct value
  compiles a program of its own, and a Python `if` on it is fine.
- Random numbers come from explicit keys: jax.random.split(key, n) makes n
  new keys and fold_in(key, i) one key for the number i. The same key always
  gives the same numbers, so a run is reproducible from its seed.
- jax.tree_util.tree_map(f, tree, ...) applies f leaf by leaf to pytrees of
  the same structure: how AdamW updates every weight at once.
- jax.vmap(f) runs f on each row of a batch, as if written for one row.
- jax.lax.while_loop(cond, body, state): a loop inside the compiled program,
  body(state) -> state (same shapes) while cond(state); generate decodes so.
- Donation: train_step gives its params and opt_state to XLA, which writes
  the new ones into the same memory; the donated arrays are deleted, so the
  caller keeps the returned ones (as every loop here does).
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
    """Bad input from the user (a setting, a file, a prompt). Its message
    names the value and the fix, so a caller can print it without a traceback."""


# =============================================================================
# 1. Configuration
# =============================================================================


@dataclass(frozen=True)
class ModelConfig:
    """The architecture. Frozen, so it is hashable and can be a static argument
    of jax.jit (jit compiles one program per distinct config). Field names
    follow Meta's reference model.py where it has the field. The defaults are a
    small model (7.55M parameters, most of them the embedding) that learns
    Shakespeare's look on a CPU: train_loop with the defaults, 1,000 steps,
    took 11 min 15 s on 2 cores of an AMD EPYC (validation loss 4.801)."""

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
    # The context: the longest sequence the model is meant to see. It is a
    # limit its callers check (train_loop refuses a longer seq_len; generate
    # refuses a longer request and sizes its KV cache to at most this many
    # slots), not a size inside the layers: the rotary tables are built for
    # the positions at hand.
    max_seq_len: int = 256
    # Llama itself has no dropout; a small model that sees its data many
    # times may need it (0.1 to 0.2 is usual).
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
        logits off."""
        return self.vocab_multiple * math.ceil(self.vocab_size / self.vocab_multiple)

    @property
    def dtype(self):
        return jnp.bfloat16 if self.compute_dtype == "bfloat16" else jnp.float32


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings: everything a training run needs beyond the model.
    The defaults are those that train ModelConfig()'s model on Shakespeare."""

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
    eval_every: int = 100  # evaluate this often
    eval_batches: int = 8  # batches of fixed windows per split for each evaluation
    log_every: int = 25  # a progress line every this many steps
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "log_every"):
            if getattr(self, name) <= 0:
                raise InputError(f"TrainConfig.{name} must be positive, got "
                                 f"{getattr(self, name)}")
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
        raise InputError(f"text file {path} not found: give the path of a UTF-8 text file "
                         f"(this repository ships {DEFAULT_DATA.name})")
    raw = path.read_bytes()
    if not raw.strip():
        raise InputError(f"text file {path} is empty: it needs some text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"text file {path} is not UTF-8 text (byte {err.start} is "
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
        raise InputError(f"{name} has {len(tokens)} tokens; windows of seq_len {seq_len} need "
                         f"at least {minimum} (one window of {need} tokens in the 90% training "
                         "part and one in the 10% validation part): use more text or a "
                         "smaller seq_len")
    return tokens[:n_train], tokens[n_train:]


def load_dataset(path, seq_len, enc=None):
    """Text file -> (train, val) token arrays, int32, tokenized by enc (default
    GPT-2's)."""
    text = load_text(path)
    tokens = np.asarray((enc or get_tokenizer()).encode_ordinary(text), dtype=np.int32)
    return split_tokens(tokens, seq_len, name=f"data file {path}")


def window_starts(key, n_tokens, batch_size, seq_len):
    """Where a batch's windows start: int32[B] positions, uniform in
    [0, n_tokens - seq_len), so that each window and its targets (one token
    further) fit in the data. A function of its own because evaluation
    (fixed_windows, below) draws its windows by the same rule."""
    return jax.random.randint(key, (batch_size,), 0, n_tokens - seq_len)


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
    """x in float32, or float64 if it already is (float64 keeps its precision,
    which a check of the gradients by finite differences needs): statistics
    and softmax never run in bfloat16."""
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
    no bias. x: [..., D], weight: [D] -> [..., D]. The statistics are taken in
    at least float32 whatever x's dtype (here x is float32, as dense returns
    float32 even under bfloat16 compute; a caller may pass bfloat16), so that
    small variance terms are not lost."""
    x32 = at_least_f32(x)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * weight).astype(x.dtype)


# Cached (functools.lru_cache: the same arguments return the same arrays
# without recomputing): the model calls this on every forward pass, and inside
# jit the NumPy tables become constants of the compiled program.
@functools.lru_cache(maxsize=None)
def precompute_rope(head_width, n_positions, theta, scaling=None):
    """Rotary embedding tables (Su et al. 2021) as NumPy constants.
    -> (cos, sin), each float32[n_positions, Dh / 2], the angles of positions
    0 .. n_positions - 1. Channel pair i rotates at frequency
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
    angles = np.outer(np.arange(n_positions), inv_freq)  # [n_positions, Dh / 2]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x, cos, sin):
    """Rotates channel pairs of queries or keys by their position's angle.
    x: [B, T, N, Dh], cos/sin: [B or 1, T, Dh/2] -> [B, T, N, Dh].
    The "half-split" layout pairs channel i with channel i + Dh/2 (Hugging
    Face's rotate_half). Meta's reference pairs 2i with 2i + 1 instead; the two
    agree once each head's output channels of wq and wk (our columns, Meta's
    rows) are permuted, which is how Meta's checkpoints are converted to this
    layout."""
    x1, x2 = jnp.split(at_least_f32(x), 2, axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def attention_weights(q, k, mask):
    """softmax(q k^T / sqrt(Dh) + mask): how much each query attends to each
    key. Grouped-query: each of the K key/value heads serves G = H // K query
    heads (query head h uses key/value head h // G, as Meta's repeat_kv); we
    reshape the queries into groups rather than copy each key and value head.
    q: [B, T, H, Dh], k: [B, S, K, Dh], mask: bool[B or 1, T, S] (True = may
    attend) -> float32[B, K, G, T, S] (float64 for float64 inputs), rows
    summing to 1."""
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


# A few functions take another function as an argument whose default is this
# file's own: `dense` and `attend` here, `block` in forward_hidden and
# model_forward, `sample`, `prepare` and `block` in generate. Called plainly,
# they run the code you read here. A caller may pass a faster function with
# the same arguments and results, without a branch in these bodies; the list
# before train_loop says which ones the command line passes, and why.


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
        # dynamic_update_slice writes one row's new keys [T, K, Dh] into its
        # cache [S, K, Dh] at one position. jax.vmap turns that function of one
        # row into a function of the batch (it maps over the leading axis of
        # every argument), so each row is written at its own position.
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
    # A key per matrix (embedding, 7 a block, output), split up front: tied or
    # not, every weight gets the same values.
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
    if not config.tie_embeddings:  # tied: the embedding is the output layer
        params["output"] = pad_vocab(normal((D, config.padded_vocab)), 1)
    return params


def count_params(params):
    return sum(x.size for x in jax.tree_util.tree_leaves(params))


def init_cache(config, batch_size, length=None):
    """A KV cache with room for `length` positions (default max_seq_len): a
    list over layers of {"k", "v"}: zeros[B, S, K, Dh] in the compute dtype.
    Preallocated, so its shape never changes while decoding and nothing
    recompiles per token. generate, below, sizes it to the request."""
    shape = (batch_size, length or config.max_seq_len, config.n_kv_heads, config.head_width)
    return [{"k": jnp.zeros(shape, config.dtype), "v": jnp.zeros(shape, config.dtype)}
            for _ in range(config.n_layers)]


def output_weight(params):
    """The output projection, [D, V_padded]: its own matrix, or the transposed
    input embedding when they are tied."""
    return params["output"] if "output" in params else params["tok_embeddings"].T


# The forward pass in two steps: forward_hidden runs the embedding and the
# blocks up to the final norm (building the one attention mask every block
# uses), and model_forward applies the output layer. Two steps, so that a
# caller can take the hidden states without the [B, T, V] logits (a loss that
# never forms them, for a large vocabulary: the list before train_loop).


def forward_hidden(params, tokens, config, cache=None, position=0, training=False, key=None,
                   block=transformer_block):
    """The transformer up to the final norm.
    tokens: int32[B, T]. Without a cache: causal attention over the T tokens.
    With a cache (from init_cache): the tokens sit at positions position ..
    position + T - 1 (position: a scalar or int32[B], traced is fine), their
    keys and values are written there, and each attends to the slots up to
    its own position. training=True applies dropout with `key`. block: the
    function each layer runs (transformer_block's arguments and results).
    -> (h [B, T, D], a list over layers of each block's second output: its
    updated cache, or None without one)."""
    B, T = tokens.shape
    dropout_on = training and config.dropout_rate > 0
    if dropout_on and key is None:
        raise InputError("training=True with dropout needs a PRNG key")
    h = params["tok_embeddings"][tokens]  # [B, T, D]
    S = T if cache is None else cache[0]["k"].shape[1]  # the positions a key can sit at
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
        # Slots past p may hold the keys of a shorter prompt's padding (generate,
        # below, pads prompts on the right); they are masked now and
        # overwritten before they are seen.
        mask = jnp.arange(S)[None, None, :] <= positions[:, :, None]  # [B, T, S]
    layer_keys = [None] * config.n_layers
    if dropout_on:
        # One key per layer (split; each block splits its own again for its
        # two dropouts), and one more for the embedding's dropout: fold_in
        # derives a further independent key without changing what split gave.
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


def model_forward(params, tokens, config, cache=None, position=0, training=False, key=None,
                  block=transformer_block):
    """The Llama forward pass: forward_hidden (above; the same arguments),
    then the output layer. tokens: int32[B, T]
    -> (logits float32[B, T, vocab_size] (float64 for float64 params), the
    updated cache or None)."""
    h, new_cache = forward_hidden(params, tokens, config, cache, position, training, key, block)
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
    STREAMS), where seed_key = jax.random.PRNGKey(seed). A JAX key is a
    value, not a hidden state: the same key always gives the same numbers, so
    every draw needs a key of its own. Evaluation windows have their own fixed
    key (fixed_windows), the same for every seed, so that runs are evaluated on
    the same text."""
    return {name: jax.random.fold_in(seed_key, i) for i, name in enumerate(STREAMS)}


def step_keys(keys, step):
    """One training step's (batch key, dropout key): its stream's key folded
    with the step number (which may be traced). They depend on the seed and the
    step alone, so a run restarted at step n draws exactly the batches and
    masks an uninterrupted run would draw there."""
    return jax.random.fold_in(keys["batches"], step), jax.random.fold_in(keys["dropout"], step)


@functools.partial(jax.jit, static_argnames=("config", "tc"),
                   donate_argnames=("params", "opt_state"))
def train_step(params, opt_state, batch, key, config, tc):
    """One optimisation step, compiled once: the loss of a batch and its
    gradients (dropout drawn with `key`), then AdamW at the schedule's
    learning rate. batch: (inputs, targets) int32[B, T]; key may be None
    when the model has no dropout (jit takes None as an empty pytree).
    config and tc are static: jit reads them while tracing, as constants
    (they are frozen, so hashable), and compiles one program per distinct
    value. params and opt_state are donated: XLA updates them in place
    instead of keeping two copies, so the caller must use the returned ones.
    -> (params, opt_state, loss)."""
    # value_and_grad differentiates by the first argument alone, params.
    loss, grads = jax.value_and_grad(compute_loss)(params, batch, config, True, key)
    lr = learning_rate(opt_state["step"], tc)
    params, opt_state = adamw_update(params, grads, opt_state, lr, tc)
    return params, opt_state, loss


# training keeps its default, False: an argument not passed is not traced.
eval_loss = jax.jit(compute_loss, static_argnames=("config",))


# =============================================================================
# 6. Training
# =============================================================================


def read_windows(data, starts, length):
    """Token windows read with NumPy, on the host: data int[N] (an array, or
    anything indexed like one), starts int[B] -> int32[B, length]."""
    return np.asarray(data[np.asarray(starts)[:, None] + np.arange(length)], np.int32)


def fixed_windows(data, n_batches, batch_size, seq_len, seed=1234):
    """The same evaluation batches every time, so successive evaluations (and
    runs) are comparable: the windows get_batch would draw with these keys,
    read on the host once. -> list of (inputs, targets) pairs, int32[B, T]."""
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
#
# What `python llama_jax.py` runs instead (about the tool, not Llama: skip it
# on a first reading). The command line trains with the package beside this
# file (llamatool/), which calls the functions above and passes its own where
# they take one. In its default run, the cpu preset
# (ModelConfig()'s and TrainConfig()'s sizes), these are this file's code:
# get_batch, init_params, the layers (with dense swapped where item 4 says),
# attend, forward_hidden, cross_entropy's formula, learning_rate,
# adamw_update (for the embedding and the norms), fixed_windows, and
# generate with sample_token (item 8 says when they are swapped).
#  1. The loop: llamatool/training.py's train(), for what a tool needs and a
#     lesson does not: checkpoints and exact resume, Ctrl-C, time budgets,
#     token files on disk, many devices, plots. Written as hooks into this
#     loop, they would bury it.
#  2. The step: llamatool/step.py's run_step, this train_step's three parts
#     (loss, gradients, adamw_update), and the package's options around them
#     (health figures, LoRA, micro-batches, a device mesh).
#  3. The optimizer for the blocks' matrices: Muon (llamatool/muon.py), which
#     orthogonalises each matrix's momentum, at lr 1.2e-2, with adamw_update
#     at 3e-3 for the rest, and weight decay 0.5. On the held-out plays it
#     scored 4.796 and 4.808 nats per token with two seeds, against
#     4.917 for this file's AdamW at TrainConfig()'s settings (1,000 steps,
#     AMD EPYC, 2 cores; docs/results.md).
#  4. dense (passed to transformer_block, the block forward_hidden runs),
#     where the machine computes in bfloat16 (the command line's
#     --dtype auto: a GPU, or a CPU whose bfloat16 matmuls are faster, such as
#     the AMD EPYC with avx512_bf16; float32 elsewhere, and there dense is this
#     one): the same product with a hand-written gradient (speed.run_dense).
#     JAX's own gradient of this dense multiplies in float32; the loss and its
#     gradients took 472 to 501 ms per step with run_dense, against 980 to 995
#     with this dense in bfloat16 and 605 to 624 in float32 (the cpu preset,
#     AMD EPYC, 2 cores, `python tools/bench_kernels.py`).
#  5. The loss: cross_entropy over the same logits, with targets that carry no
#     loss (a chat's prompts, for chat fine-tuning) skipped; equal to
#     cross_entropy on plain text. Where the [B, T, V] logits would not fit in
#     memory, a blockwise loss that never forms them; not at the cpu preset,
#     whose 8 x 128 tokens make 206 MB of float32 logits.
#  6. Evaluation: evaluate with that loss (speed.evaluate_run), on
#     fixed_windows, so that it measures what training minimises.
#  7. The attention, on a GPU only (the gpu preset): cuDNN's fused kernel, which
#     never writes the [B, H, T, T] scores to memory. attend's float32 scores
#     are about 0.8 GB per layer at the gpu check's 16 x 1,024 tokens and 12
#     heads, written and read again in the backward pass (docs/gpu.md).
#  8. Sampling, in the command line's generate: with top-p, a sampler that
#     finds the nucleus by bisection instead of a sort (0.73 ms a draw from
#     50,257 logits at batch 1, against sample_token's 11.7 ms, `python
#     tools/bench_sampling.py`, AMD EPYC); with top-k alone (the command
#     line's default sampling), this file's sample_token. On a GPU, where each
#     small kernel's launch costs more than its work, also the weights of q,
#     k, v and of w1, w3 joined: 6 matrix products a block instead of 9 (4
#     weight products instead of 7, plus attention's 2; speed.FAST_DECODING).
#     On a CPU they gained 6% at the cpu preset's model (901 against 850
#     tokens/s, AMD EPYC), too little to leave this file's code.

# batch_size and seq_len (arguments 2 and 3, counting from 0) set the batch's
# shape, and jit must know every shape when it compiles: static arguments are
# read as Python values while tracing, and each new value compiles a new
# program.
_get_batch = jax.jit(get_batch, static_argnums=(2, 3))


def train_loop(config, tc, train_data, val_data, log=print):
    """Trains a fresh model on token arrays (load_dataset) and returns (params,
    opt_state, history): history["train"] holds [step, loss] for every step,
    history["eval"] [step, train loss, validation loss] for each evaluation."""
    if tc.seq_len > config.max_seq_len:
        raise InputError(f"seq_len {tc.seq_len} is longer than the model's context "
                         f"(max_seq_len {config.max_seq_len}): lower seq_len or raise max_seq_len")
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
            # losses: the steps since the last line; the first is step done - len(losses) + 1
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
    from the softmax of what is left. Top-k alone draws among its k values
    (jax.random.categorical makes one random number per entry it draws from:
    k of them, not V); only top-p needs the whole sorted distribution. The two
    paths differ only at ties: lax.top_k keeps exactly k tokens, top_k_filter
    keeps every token tied with the k-th."""
    greedy = jnp.argmax(logits, axis=-1)
    logits = logits / jnp.maximum(temperature, 1e-6)
    if top_k is not None and top_p >= 1.0:
        values, indices = jax.lax.top_k(logits, top_k)  # [B, k] each, largest first
        choice = jax.random.categorical(key, values, axis=-1)  # [B], an index into the k
        sampled = jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0]
        return jnp.where(temperature == 0, greedy, sampled).astype(jnp.int32)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    sampled = jax.random.categorical(key, logits, axis=-1)
    return jnp.where(temperature == 0, greedy, sampled).astype(jnp.int32)


# jit compiles one program per input shape. Prompts and requests come in every
# length, so generate rounds both up to a power of two (padding the prompts):
# a handful of programs serve every request, and the short ones stay fast.


def _bucket(n, smallest=16):
    """Rounds n up to a power of two, at least `smallest`."""
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
    """generate's top_k and top_p in the form the compiled program takes them
    (as static arguments, each distinct value compiles once): top_k at most
    the vocabulary, top_p 1.0 (off) for None."""
    return (None if top_k is None else min(int(top_k), config.vocab_size),
            1.0 if top_p is None else float(top_p))


def check_generate_args(prompts, max_new_tokens, config, temperature, top_k, top_p):
    """Raises InputError naming the first bad argument of generate. Checked in
    Python, before anything compiles: inside jit the values are traced, and a
    bad one would surface as a tracing error or a silently wrong sample."""
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
                                             "sample", "prepare", "block"))
def _generate(params, prompts, lengths, key, temperature, n_new, stop_token, *, config, top_k,
              top_p, n_slots, cache_len, sample, prepare, block):
    """The compiled part of generate. prompts: int32[B, P] (right-padded),
    lengths: int32[B], n_new: how many tokens to draw (traced, <= n_slots).
    The cache is created here, so it never leaves the device; the decode loop is
    one lax.while_loop, so the whole generation is one XLA program.
    temperature, n_new and stop_token are traced: any value reuses the program.
    top_k and top_p are static (each new value compiles once): top_k is
    lax.top_k's output size, and top_p 1.0 leaves the nucleus filter out of
    the program. sample, prepare and block are static too: a function is
    hashable, and each one passed compiles its own program.
    Right padding is harmless: the prefill writes the padding's keys and
    values into a short row's cache slots past its length, but the mask lets
    each query see only slots up to its own position, and each new token is
    written at its row's next position (lengths + i), over the padding, before
    any query can see that slot.
    The cache has cache_len slots (decoding_shapes), so a model with a long
    context decodes a short request as fast as a short-context model would.
    -> int32[B, n_slots]: the new tokens (after a row's stop token: the stop token)."""
    B = prompts.shape[0]
    params = prepare(params, config)
    logits, cache = model_forward(params, prompts, config, init_cache(config, B, cache_len),
                                  position=0, block=block)
    last = logits[jnp.arange(B), lengths - 1]  # [B, V] each row's next-token logits
    out = jnp.full((B, n_slots), stop_token, jnp.int32)

    # The loop's state, a pytree whose shapes never change: i, the tokens drawn
    # so far; the cache; last, the next token's logits [B, V]; out, the tokens
    # [B, n_slots]; done, which rows have drawn stop_token [B]; the PRNG key.
    def cond(s):
        return (s["i"] < n_new) & ~jnp.all(s["done"])

    def body(s):
        key, sub = jax.random.split(s["key"])
        token = jnp.where(s["done"], stop_token, sample(sub, s["last"], temperature, top_k, top_p))
        logits, cache = model_forward(params, token[:, None], config, s["cache"],
                                      lengths + s["i"], block=block)
        # Arrays are immutable: .at[:, i].set returns a new array with column i
        # set (inside jit, XLA writes it in place).
        return {"i": s["i"] + 1, "cache": cache, "last": logits[:, 0],
                "out": s["out"].at[:, s["i"]].set(token),
                "done": s["done"] | (token == stop_token), "key": key}

    state = {"i": jnp.int32(0), "cache": cache, "last": last, "out": out,
             "done": jnp.zeros((B,), bool), "key": key}
    return jax.lax.while_loop(cond, body, state)["out"]


def generate(params, prompt_tokens, max_new_tokens, config, key, temperature=1.0, top_k=None,
             top_p=None, stop_token=None, sample=sample_token, prepare=decoding_weights,
             block=transformer_block):
    """Continues one prompt (a list of token ids) or a batch of them (a list of
    lists, lengths may differ). The prompts are prefilled into a KV cache in
    one forward pass, then tokens are drawn one at a time inside one compiled
    loop; compilation happens once per (batch size, prompt-length bucket,
    max_new_tokens bucket, top_k, top_p), never per token. Rows that draw
    stop_token stop there (the stop token ends their list). sample: a function
    with sample_token's arguments; prepare: what the weights become once,
    before the loop; block: what each layer runs (the command line passes
    faster ones: the list before train_loop).
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
                    cache_len=cache_len, sample=sample, prepare=prepare, block=block)
    results = []
    for p, row in zip(prompts, np.asarray(new)):
        row = row[:max_new_tokens].tolist()
        if stop in row:
            row = row[:row.index(stop) + 1]
        results.append(p + row)
    return results[0] if single else results


if __name__ == "__main__":
    # The command line is the package beside this file (llamatool/cli.py). It
    # imports this module by name, so register this run of it under that name
    # first: one copy in memory, not a second import of the same file.
    import sys

    sys.modules.setdefault("llama_jax", sys.modules["__main__"])
    from llamatool.cli import main

    sys.exit(main())
