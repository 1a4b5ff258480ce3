"""Tests of llamatool/devices.py."""

import dataclasses
import math

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import llama_jax as L
import llamatool as lt

from conftest import (CONVERSATION, EIGHT_DEVICES, HAS_ORBAX, MESH_TINY, finished, on_device_0,
    one_device, steps_on_mesh)


def test_fsdp_splits_the_vocabulary_and_each_matrix_along_its_wider_side():
    # Expectations written by hand for a model whose matrices all differ in
    # shape: the embedding and output layer along the vocabulary, every other
    # matrix along its wider side, vectors copied.
    config = L.ModelConfig(tie_embeddings=False, vocab_size=256, dim=64, n_layers=1, n_heads=4, n_kv_heads=1,
                           head_dim=32, ffn_dim=192, vocab_multiple=1)
    shapes = {k: v.shape for k, v in lt.checkpoints.flatten_tree(lt.settings.param_shapes(config)).items()}
    split = {"tok_embeddings": 0, "output": 1,  # [V, D] and [D, V]: the vocabulary
             "layers/0/attention/wq": 1,  # [64, 128]
             "layers/0/attention/wk": 0, "layers/0/attention/wv": 0,  # [64, 32]
             "layers/0/attention/wo": 0,  # [128, 64]
             "layers/0/feed_forward/w1": 1, "layers/0/feed_forward/w3": 1,  # [64, 192]
             "layers/0/feed_forward/w2": 0,  # [192, 64]
             "layers/0/attention_norm": None, "layers/0/ffn_norm": None, "norm": None}
    assert set(split) == set(shapes)
    for name, dim in split.items():
        expected = P() if dim is None else P(*["fsdp" if i == dim else None for i in range(2)])
        assert lt.devices.fsdp_spec(shapes[name], 8) == expected, name
    # The wider side first, unless n does not divide it; nothing n divides: copied.
    assert lt.devices.fsdp_spec((100, 64), 8) == P(None, "fsdp")
    assert lt.devices.fsdp_spec((30, 7), 8) == P()
    assert lt.devices.fsdp_spec((256, 64), 1) == P()


@EIGHT_DEVICES
def test_data_parallel_fsdp_and_2x4_give_one_devices_losses():
    tc = lt.settings.RunTrainConfig(batch_size=16, seq_len=8, lr=1e-2, warmup_steps=1, health=False)
    ref, ref_params, _ = steps_on_mesh(one_device(), MESH_TINY, tc)  # dropout 0.1 included
    assert ref[-1] < ref[0] - 0.02  # it learns: the comparison is not of constants
    for fsdp in (1, 4, "all"):  # 8 x 1, 2 x 4, 1 x 8
        mesh = lt.devices.make_mesh(fsdp)
        losses, params, opt_state = steps_on_mesh(mesh, MESH_TINY, tc)
        np.testing.assert_allclose(losses, ref, atol=1e-5, err_msg=str(mesh.shape))
        n = mesh.shape["fsdp"]
        for tree in (params, opt_state["mu"], opt_state["nu"]):
            for x in jax.tree_util.tree_leaves(tree):
                shard = x.addressable_shards[0].data.shape
                if x.ndim == 2:  # every matrix of this config: 1/n of it per device
                    assert math.prod(shard) * n == x.size, (x.shape, shard)
                else:  # norm gains: a copy on every device
                    assert shard == x.shape
        # --plan's figures are the bytes the devices hold
        plan = lt.plan.memory_plan(MESH_TINY, tc, mesh)
        assert plan["params"] == on_device_0(params)
        assert plan["optimizer"] == on_device_0((opt_state["mu"], opt_state["nu"]))
        assert plan["rows_per_device"] == 2
    full = lt.plan.tree_bytes(ref_params)
    assert lt.plan.memory_plan(MESH_TINY, tc, lt.devices.make_mesh("all"))["params"] < full / 7
    # Muon too: its Newton-Schulz iteration on matrices split over 8 devices
    # gives one device's losses.
    muon = dataclasses.replace(tc, optimizer="muon")
    ref, _, _ = steps_on_mesh(one_device(), MESH_TINY, muon)
    assert ref[-1] < ref[0] - 0.02
    np.testing.assert_allclose(steps_on_mesh(lt.devices.make_mesh("all"), MESH_TINY, muon)[0], ref,
                               atol=1e-5)


@pytest.mark.slow
def test_gradient_accumulation_gives_the_losses_of_the_whole_batch():
    """On one device here; on 8 (FSDP) in the 8-device process."""
    config = dataclasses.replace(MESH_TINY, dropout_rate=0.0)  # masks differ per micro-batch
    tc = lt.settings.RunTrainConfig(batch_size=32, seq_len=8, lr=1e-2, warmup_steps=1)
    ref, _, _ = steps_on_mesh(one_device(), config, tc)
    mesh = lt.devices.make_mesh("all")  # every device of this process: 1 here, 8 there
    losses, _, _ = steps_on_mesh(mesh, config, dataclasses.replace(tc, grad_accum=4))
    np.testing.assert_allclose(losses, ref, atol=1e-5, err_msg=str(mesh.shape))
    if mesh.size > 1:  # Muon steps on the gradient accumulated over 8 devices
        muon = dataclasses.replace(tc, optimizer="muon")
        ref, _, _ = steps_on_mesh(one_device(), config, muon)
        losses, _, _ = steps_on_mesh(mesh, config, dataclasses.replace(muon, grad_accum=4))
        np.testing.assert_allclose(losses, ref, atol=1e-5, err_msg=str(mesh.shape))
    with pytest.raises(L.InputError, match=f"use a multiple of {8 * mesh.size}"):
        lt.devices.check_batch_split(dataclasses.replace(tc, grad_accum=8, batch_size=36), mesh)


@EIGHT_DEVICES
def test_checkpoints_move_between_one_device_and_eight(tmp_path):
    # The steps and checkpoint functions train() uses: 2 steps on one mesh,
    # save_checkpoint, load_checkpoint, 3 more on another, against 5 on one
    # device. (train() itself resumes across device counts in the two-process
    # test below.)
    tc = lt.settings.RunTrainConfig(batch_size=16, seq_len=8, lr=1e-2, warmup_steps=1, health=False)
    ref, _, _ = steps_on_mesh(one_device(), MESH_TINY, tc)
    for first, then in ((lt.devices.make_mesh("all"), one_device()), (one_device(), lt.devices.make_mesh(4))):
        _, params, opt_state = steps_on_mesh(first, MESH_TINY, tc, n_steps=2)
        path = tmp_path / "ckpt.npz"
        lt.checkpoint_npz.save_checkpoint(path, params, opt_state, jax.random.PRNGKey(1), MESH_TINY, tc,
                          {"train": [], "eval": []})
        saved = lt.checkpoint_formats.load_checkpoint(path, MESH_TINY)
        losses, _, _ = steps_on_mesh(then, MESH_TINY, tc, n_steps=3,
                                     state=(saved.params, saved.opt_state))
        np.testing.assert_allclose(losses, ref[2:], atol=1e-5, err_msg=f"{first.shape} then "
                                   f"{then.shape}")


@pytest.mark.slow
def test_chat_batches_split_over_the_mesh_give_one_devices_losses(chat_model):
    """On one device here; on 8 (FSDP) in the 8-device process: conversations
    drawn on the host by the run's keys, split over the devices by rows."""
    init = lt.sources.load_source(chat_model)
    config, enc = init.config, init.tokenizer
    chats = [(i, "", CONVERSATION[:3] if i % 2 else CONVERSATION) for i in range(12)]
    windows, _ = lt.chat_data.chat_windows(chats, enc, None, 96, "chats")
    tc = lt.settings.RunTrainConfig(batch_size=8, seq_len=96, lr=1e-2, warmup_steps=1, health=False)

    def losses(mesh):
        params, opt_state = lt.devices.place_state(mesh, (init.params, L.adamw_init(init.params)))
        keys = lt.devices.replicated(mesh, L.run_keys(jax.random.PRNGKey(1)))
        out = []
        for step in range(3):
            batch = lt.devices.place(lt.token_files.host_batch(windows, keys, step, tc.batch_size, tc.seq_len),
                            (lt.devices.batch_sharding(mesh),) * 2)
            params, opt_state, loss, _ = lt.step.run_step(params, opt_state, batch, keys, config, tc,
                                                    None, mesh)
            out.append(float(loss))
        return np.array(out)

    ref = losses(one_device())
    assert ref[-1] < ref[0]  # it learns: the comparison is not of constants
    np.testing.assert_allclose(losses(lt.devices.make_mesh("all", jax.devices())), ref, rtol=1e-5)


@pytest.mark.slow
def test_one_device_and_eight_train_the_same_model(programs_beside):
    """Runs the EIGHT_DEVICES tests above in a process with 8 CPU devices."""
    code, out, _ = finished(programs_beside, "test_one_device_and_eight_train_the_same_model")
    assert code == 0, out[-8000:]
    assert ("6 passed" if HAS_ORBAX else "5 passed, 1 skipped") in out, out[-2000:]
