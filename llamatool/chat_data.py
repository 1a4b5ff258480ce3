"""Conversations (JSONL) as training data: ChatWindows whose loss counts only the replies."""

import hashlib
import json
from pathlib import Path

import numpy as np

from llama_jax import InputError, load_text
from llamatool.speed import IGNORE
from llamatool.token_files import ChatWindows
from llamatool.chat import chat_end_token, chat_prompt


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
    if init is None or init.tokenizer is None:
        raise InputError(f"--data {path}: conversations are learned by a pretrained chat "
                         "model; pass --init-from with one (e.g. SmolLM2-135M-Instruct)")
    tokenizer, template = init.tokenizer, init.chat_template
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
