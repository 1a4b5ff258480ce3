"""Tests of llamatool/checkpoints.py."""

import dataclasses
import os

import pytest

import llamatool as lt

from conftest import TRAIN_TINY, quick_tc


def test_mismatched_checkpoint_is_refused_listing_every_mismatch(corpus, tmp_path):
    lt.training.train(TRAIN_TINY, quick_tc(steps=2), corpus, tmp_path, log=lambda s: None)
    other = dataclasses.replace(TRAIN_TINY, dim=64, n_layers=3)
    with pytest.raises(lt.checkpoints.CheckpointError) as err:
        lt.checkpoint_formats.load_checkpoint(tmp_path / "ckpt.npz", other)
    message = str(err.value)
    assert "dim: 32 in the checkpoint, 64 requested" in message
    assert "n_layers: 2 in the checkpoint, 3 requested" in message
    assert "missing array params/layers/2/attention/wq" in message
    assert "params/tok_embeddings: float32[50304, 32] in the file" in message


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupted_checkpoint_gets_a_clear_error(corpus, tmp_path, damage):
    lt.training.train(TRAIN_TINY, quick_tc(steps=2), corpus, tmp_path, log=lambda s: None)
    path = tmp_path / "ckpt.npz"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[:len(data) // 2], "garbage": os.urandom(5000),
                      "empty": b""}[damage])
    with pytest.raises(lt.checkpoints.CheckpointError, match="not a readable llama_jax checkpoint"):
        lt.checkpoint_formats.load_checkpoint(path, TRAIN_TINY)
