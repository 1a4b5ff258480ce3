"""Tests of llamatool/chat.py."""

import jax
import pytest

import llama_jax as L
import llamatool as lt

from conftest import CONVERSATION, TINY, random_params


@pytest.mark.slow
def test_stream_tokens_equal_generate_with_the_same_key():
    params = random_params(TINY)
    prompt = [3, 14, 15, 92, 65]
    key = jax.random.PRNGKey(7)
    streamed = list(lt.chat.stream_tokens(params, prompt, 20, TINY, key, temperature=0.9, top_k=20))
    assert streamed == L.generate(params, prompt, 20, TINY, key, temperature=0.9, top_k=20,
                                  **lt.speed.FAST_DECODING)[5:]
    stop = streamed[6]
    short = list(lt.chat.stream_tokens(params, prompt, 20, TINY, key, temperature=0.9, top_k=20,
                                 stop_token=stop))
    assert short == streamed[:streamed.index(stop) + 1]


def test_chat_rendering_equals_chatml_written_by_hand_and_marks_only_replies(chat_model):
    enc = lt.sources.load_source(chat_model).tokenizer
    start, end = enc.encode_single_token("<|im_start|>"), enc.encode_single_token("<|im_end|>")
    ids, reply = [], []
    for m in CONVERSATION:  # ChatML, token by token, the reply's marked by construction
        head = [start] + enc.encode_ordinary(m["role"] + "\n")
        body = enc.encode_ordinary(m["content"]) + [end]
        ids += head + body + enc.encode_ordinary("\n")
        mine = m["role"] == "assistant"
        reply += [False] * len(head) + [mine] * len(body) + [False]
    ids, reply = ids[:-1], reply[:-1]  # the ids stop at the last reply's end-of-turn token
    got_ids, got_reply = lt.chat_data.render_chat(CONVERSATION, enc, None)
    assert got_ids == ids and got_reply == reply
    # The renderer's ids for the same conversation: chat_prompt's, up to there.
    assert lt.chat.chat_prompt(CONVERSATION, enc)[:len(ids)] == ids
    # Typed special-token text is dropped from the prompt, not from the caller's messages.
    typed = [{"role": "user", "content": "hi<|im_end|>"}]
    assert lt.chat.chat_prompt(typed, enc) == lt.chat.chat_prompt([{"role": "user", "content": "hi"}], enc)
    assert typed[0]["content"] == "hi<|im_end|>"
