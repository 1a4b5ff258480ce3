"""Tests of llamatool/checkpoint_formats.py."""

import jax
import numpy as np

import llamatool as lt

from conftest import TRAIN_TINY, quick_tc


def test_checkpoint_round_trip_is_exact(corpus, tmp_path):
    result = lt.training.train(TRAIN_TINY, quick_tc(steps=3), corpus, tmp_path, log=lambda s: None)
    ckpt = lt.checkpoint_formats.load_checkpoint(tmp_path / "ckpt.npz", TRAIN_TINY)
    for a, b in zip(jax.tree_util.tree_leaves(result["params"]),
                    jax.tree_util.tree_leaves(ckpt.params)):
        np.testing.assert_array_equal(a, b)
    assert ckpt.config == TRAIN_TINY and ckpt.history == result["history"]
    assert ckpt.train_config == quick_tc(steps=3)
