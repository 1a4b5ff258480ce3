"""Tests of llamatool/checkpoint_npz.py."""

import dataclasses
import os
import stat

import jax
import numpy as np
import pytest

import llama_jax as L
import llamatool as lt

from conftest import BEFORE, TRAIN_TINY, quick_tc


@pytest.mark.slow
def test_interrupted_save_leaves_the_previous_checkpoint_loadable(corpus, tmp_path, monkeypatch):
    lt.training.train(TRAIN_TINY, quick_tc(steps=3), corpus, tmp_path, log=lambda s: None)
    before = lt.checkpoint_formats.load_checkpoint(tmp_path / "ckpt.npz")
    real_savez = np.savez

    def crash_midway(f, **arrays):
        real_savez(f, **dict(list(arrays.items())[:3]))
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        lt.checkpoint_npz.save_checkpoint(tmp_path / "ckpt.npz", before.params, before.opt_state,
                          before.key, before.config, before.train_config,
                          before.history)
    monkeypatch.undo()
    after = lt.checkpoint_formats.load_checkpoint(tmp_path / "ckpt.npz")
    assert int(after.opt_state["step"]) == 3
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []
    # A save that completes flushes the file and then its folder, so that the
    # rename survives a power failure too (a directory fsync, after the rename).
    synced, real_fsync = [], os.fsync

    def record(fd):
        synced.append((stat.S_ISDIR(os.fstat(fd).st_mode), (tmp_path / "ckpt.npz").exists()))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    (tmp_path / "ckpt.npz").unlink()
    lt.checkpoint_npz.save_checkpoint(tmp_path / "ckpt.npz", after.params, after.opt_state, after.key,
                      after.config, after.train_config, after.history)
    assert synced == [(False, False), (True, True)]  # the file before the rename, the folder after


def test_a_checkpoint_written_before_the_package_loads():
    # fixtures/before_the_package/ckpt.npz was written by the single-module
    # code (315207a): it loads, and its weights give the logits they gave then.
    loaded = lt.checkpoint_formats.load_checkpoint(BEFORE / "ckpt.npz")
    config = loaded.config
    assert (config.vocab_size, config.dim, config.n_layers) == (64, 16, 2)
    assert int(loaded.opt_state["step"]) == 2
    assert loaded.history["train"][1][0] == 2
    tokens = (np.arange(400) % 64).astype(np.int32)[None, :8]
    logits, _ = L.model_forward(loaded.params, tokens, config)
    np.testing.assert_allclose(logits, np.load(BEFORE / "logits.npy"), rtol=1e-6, atol=1e-6)


def test_a_muon_checkpoint_with_the_old_empty_placeholders_loads(tmp_path):
    # Muon's state once held an empty float32[0] for each hidden matrix's
    # second moment (Orbax refused it; now a scalar 0). A .npz file of that
    # time loads, with the same weights and momentum.
    config = L.ModelConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, n_kv_heads=1,
                           max_seq_len=16)
    tc = lt.settings.RunTrainConfig(optimizer="muon", adam_lr=3e-3)
    params = L.init_params(jax.random.PRNGKey(0), config)
    opt_state = lt.muon.muon_init(params)
    opt_state["mu"] = jax.tree_util.tree_map(lambda p: p + 1.0, opt_state["mu"])
    path = tmp_path / "ckpt.npz"
    lt.checkpoint_npz.save_checkpoint(path, params, opt_state, jax.random.PRNGKey(1), config, tc,
                                      {"train": [], "eval": []})
    with np.load(path) as npz:
        arrays = dict(npz)
    old = {k: (np.zeros((0,), v.dtype) if k.startswith("opt/nu/") and v.shape == () else v)
           for k, v in arrays.items()}
    assert sum(v.shape == (0,) for v in old.values()) == 2 * 7  # 7 matrices a block
    np.savez(path, **old)
    with pytest.raises(L.InputError, match="does not match"):  # a real mismatch still says so
        lt.checkpoint_formats.load_checkpoint(path, dataclasses.replace(config, dim=32))
    loaded = lt.checkpoint_formats.load_checkpoint(path)
    for a, b in zip(jax.tree_util.tree_leaves((loaded.params, loaded.opt_state)),
                    jax.tree_util.tree_leaves((params, opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
