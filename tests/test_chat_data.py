"""Tests of llamatool/chat_data.py."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax as L
import llamatool as lt

from conftest import CONVERSATION, LORA_TC, forward, quick_tc, random_params, write_chats


def test_masked_loss_equals_a_numpy_mean_over_the_reply_tokens(chat_model, tmp_path):
    init = lt.sources.load_source(chat_model)
    config, enc = init.config, init.tokenizer
    other = [{"role": "user", "content": "in?"}, {"role": "assistant", "content": "a"},
             {"role": "user", "content": "the?"}, {"role": "assistant", "content": "t he hen"}]
    windows, cut = lt.chat_data.chat_windows([(1, "", CONVERSATION), (2, "", other)], enc, None, 96,
                                  "chats")
    assert cut == 0
    x, y = windows.rows(np.array([0, 1]))
    params = random_params(config)
    logits = np.asarray(forward(params, x, config)[0], np.float64)
    logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                  keepdims=True)) - logits.max(-1, keepdims=True)
    nats, n = 0.0, 0
    for row, conversation in enumerate((CONVERSATION, other)):
        ids, reply = lt.chat_data.render_chat(conversation, enc, None)
        for t in range(1, len(ids)):  # the loss predicts token t from the ones before
            if reply[t]:
                nats -= logp[row, t - 1, ids[t]]
                n += 1
    assert n == sum(len(enc.encode_ordinary(m["content"])) + 1
                    for c in (CONVERSATION, other) for m in c if m["role"] == "assistant")
    for impl in ("plain", "blockwise"):
        run_config = dataclasses.replace(config, loss_impl=impl, loss_block=16)
        got = float(lt.speed.run_eval_loss(params, (jnp.asarray(x), jnp.asarray(y)), run_config))
        assert got == pytest.approx(nats / n, rel=1e-5), impl


@pytest.mark.slow
def test_chat_fine_tuning_learns_a_fixed_reply_and_resumes_exactly(chat_model, tmp_path):
    init = lt.sources.load_source(chat_model)
    question = [{"role": "user", "content": "the hat?"}]
    answer = "in the hat, a hen"
    chats = write_chats(tmp_path / "chats.jsonl",
                        [[{"role": "system", "content": s}] + question
                         + [{"role": "assistant", "content": answer}]
                         for s in ("a", "the", "in", "hen", "hat", "at", "he", "t", "n", "h")])
    tc = quick_tc(steps=40, lr=1e-2, warmup_steps=4, eval_every=20, batch_size=4, seq_len=64)
    result = lt.training.train(init.config, tc, chats, tmp_path / "run", log=lambda s: None, init=init)
    assert result["history"]["eval"][-1][2] < 0.1  # held-out reply loss, nats per token
    enc = init.tokenizer
    prompt = lt.chat.chat_prompt([dict(m) for m in question], enc)
    out = L.generate(result["weights"], prompt, 12, init.config, jax.random.PRNGKey(0),
                     temperature=0.0, stop_token=enc.encode_single_token("<|im_end|>"))
    assert enc.decode(out[len(prompt):]) == answer + "<|im_end|>"
    assert result["question"] and result["question"][-1]["role"] == "user"
    # LoRA, interrupted after 3 steps and resumed: the losses of a straight run.
    tc = quick_tc(**LORA_TC, steps=6, batch_size=4, seq_len=64)
    straight = lt.training.train(init.config, tc, chats, tmp_path / "straight", log=lambda s: None,
                       init=init)
    def interrupt_at_step_3(line):
        if line.startswith("step     3/"):
            raise KeyboardInterrupt

    lt.training.train(init.config, tc, chats, tmp_path / "resumed", log=interrupt_at_step_3, init=init)
    resumed = lt.training.train(init.config, tc, chats, tmp_path / "resumed", resume=True,
                      log=lambda s: None, init=init)
    np.testing.assert_allclose([l for _, l in resumed["history"]["train"]],
                               [l for _, l in straight["history"]["train"]], rtol=1e-6)


def test_bad_chat_data_is_refused_with_the_line_and_the_fix(chat_model, bpe_model, tmp_path):
    init = lt.sources.load_source(chat_model)
    good = {"messages": CONVERSATION}
    cases = {"not JSON": ("{oops", "line 2: not JSON"),
             "no messages": ('{"text": "hi"}', 'line 2: no "messages" list'),
             "unknown role": ('{"messages": [{"role": "bot", "content": "hi"}]}',
                              "line 2: unknown role 'bot'"),
             "no assistant": ('{"messages": [{"role": "user", "content": "hi"}]}',
                              "line 2: no assistant turn")}
    for name, (line, message) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(good) + "\n" + line + "\n")
        with pytest.raises(L.InputError, match=re.escape(message)):
            lt.chat_data.load_chats(path, 32, init, log=lambda s: None)
    one = write_chats(tmp_path / "one.jsonl", [CONVERSATION])
    with pytest.raises(L.InputError, match="at least two"):
        lt.chat_data.load_chats(one, 32, init, log=lambda s: None)
    two = write_chats(tmp_path / "two.jsonl", [CONVERSATION, CONVERSATION[1:]])
    with pytest.raises(L.InputError, match="no chat format"):
        lt.chat_data.load_chats(two, 32, lt.sources.load_source(bpe_model), log=lambda s: None)
    with pytest.raises(L.InputError, match="--init-from"):
        lt.chat_data.load_chats(two, 32, None, log=lambda s: None)
    warnings = []
    train, val, _, _ = lt.chat_data.load_chats(two, 12, init, log=warnings.append)
    assert len(train) + len(val) == 2 and "were cut" in warnings[0]
