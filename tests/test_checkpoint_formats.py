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


def test_a_reader_never_passes_over_a_checkpoint_it_cannot_read_in_silence(corpus, tmp_path,
                                                                          capsys):
    # out/ holds a .npz and an Orbax folder it cannot read (damaged here, or
    # orbax-checkpoint not installed): the folder may hold the later step, so
    # the readers refuse, naming both, rather than take the .npz.
    lt.training.train(TRAIN_TINY, quick_tc(steps=2, eval_every=2), corpus, tmp_path,
                      log=lambda s: None)
    (tmp_path / "ckpt.orbax" / "6").mkdir(parents=True)
    for argv in (["--sample", "--max-new-tokens", "2"], ["--eval", str(corpus)]):
        assert lt.cli.main([*argv, "--out-dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert "ckpt.orbax cannot be read" in err and "may hold a later step than" in err
        assert str(tmp_path / "ckpt.npz") in err and len(err.splitlines()) == 1, err
