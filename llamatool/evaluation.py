"""--eval: nats per token, perplexity and bits per byte of a text (evaluate_text)."""

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import ENDOFTEXT, InputError, format_duration, model_forward
from llamatool.bpe import special_token


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
