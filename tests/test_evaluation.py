"""Tests of llamatool/evaluation.py."""

import dataclasses

import numpy as np
import pytest

import llama_jax as L
import llamatool as lt

from conftest import TINY, random_params


@pytest.mark.slow
def test_evaluate_text_predicts_every_token_once_and_counts_its_bytes():
    enc = L.get_tokenizer()
    text = "KING RICHARD.\nA horse! a horse! my kingdom for a horse! Caf\u00e9, na\u00efve \u2014 done."
    config = dataclasses.replace(TINY, vocab_size=enc.n_vocab, max_seq_len=64)
    params = random_params(config)
    ids = np.array([enc.eot_token] + enc.encode_ordinary(text))  # the start token is context
    n = len(ids) - 1
    assert n < 64
    whole = lt.evaluation.evaluate_text(params, config, enc, text)
    one_window = float(L.eval_loss(params, (ids[None, :-1], ids[None, 1:]), config))
    assert whole["tokens"] == n and whole["bytes"] == len(text.encode("utf-8"))
    assert whole["nats_per_token"] == pytest.approx(one_window, rel=1e-5)
    assert whole["bits_per_byte"] == pytest.approx(one_window * n / np.log(2) / whole["bytes"],
                                                   rel=1e-5)
    # Windows of 7 predictions, batches of 3 windows (the last one padded): each
    # window starts afresh; the total is the sum of the windows' own losses.
    windows = lt.evaluation.evaluate_text(params, config, enc, text, seq_len=7, batch_size=3)
    total = sum(float(L.eval_loss(params, (ids[None, i:min(i + 7, n)], ids[None, i + 1:i + 8]),
                                  config)) * (min(i + 7, n) - i) for i in range(0, n, 7))
    assert windows["nats_per_token"] == pytest.approx(total / n, rel=1e-5)
    with pytest.raises(L.InputError, match="too short"):
        lt.evaluation.evaluate_text(params, config, enc, "")
