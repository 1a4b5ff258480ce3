"""Chat: chat templates (a model's own, or ChatML) and replies streamed as they are generated."""

import codecs
import functools
import sys
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import (ENDOFTEXT, InputError, check_generate_args, decoding_shapes,
    init_cache, model_forward, sampling_filters)
from llamatool.speed import decode_block, fast_sample_token, fused_decoding_weights
from llamatool.bpe import special_token


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
# traced). With the same key, the tokens equal generate's with the package's
# FAST_DECODING (llamatool/speed.py; a test checks it).


@functools.partial(jax.jit, static_argnames=("config", "cache_len"))
def _prefill(params, prompt, length, *, config, cache_len):
    """prompt: int32[1, P] right-padded, length: its real length (traced)
    -> (the next token's logits [1, V], a cache of cache_len slots)."""
    logits, cache = model_forward(params, prompt, config, init_cache(config, 1, cache_len),
                                  position=0, block=decode_block)
    return logits[:, length - 1], cache


@functools.partial(jax.jit, static_argnames=("config", "top_k", "top_p"),
                   donate_argnames=("cache",))
def _decode_step(params, last, cache, position, key, temperature, *, config, top_k, top_p):
    """Draws a token from `last` [1, V] and runs it through the model at
    `position` -> (token int32[1], the next logits [1, V], cache)."""
    token = fast_sample_token(key, last, temperature, top_k, top_p)
    logits, cache = model_forward(params, token[:, None], config, cache, position,
                                  block=decode_block)
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
    params = fused_decoding_weights(params, config)  # once per reply, not per token
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
