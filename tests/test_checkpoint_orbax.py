"""Tests of llamatool/checkpoint_orbax.py."""

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax as L
import llamatool as lt

from conftest import (EIGHT_DEVICES, HERE, MESH_TINY, NEEDS_ORBAX, TRAIN_TINY, one_device,
    quick_tc, random_params, steps_on_mesh, wait_for_line)


@NEEDS_ORBAX
@pytest.mark.slow
def test_every_reader_takes_an_orbax_run_and_bad_input_gets_a_message(tmp_path, monkeypatch,
                                                                       capsys):
    config = lt.settings.run_configs(TRAIN_TINY)[0]
    tc = dataclasses.replace(quick_tc(), checkpoint="orbax")
    params = random_params(config)
    writer = lt.checkpoint_orbax.OrbaxWriter(tmp_path / "run" / "ckpt.orbax", keep=3)
    for step in (1, 2):
        writer.save(params, {**L.adamw_init(params), "step": jnp.int32(step)},
                    jax.random.PRNGKey(0), config, tc, {"train": [], "eval": []}, None)
    writer.close()
    run, folder = tmp_path / "run", tmp_path / "run" / "ckpt.orbax"
    assert lt.checkpoint_formats.saved_checkpoint(run) == folder
    # Written uncompressed (zstd, Orbax's default, cost memory for little gain on
    # float32 weights); a step written compressed, as earlier versions did, still
    # loads. The zero moments show which is which: zstd shrinks them to nothing.
    zstd = lt.checkpoint_orbax.OrbaxWriter(tmp_path / "zstd" / "ckpt.orbax", keep=1, compress=True)
    zstd.save(params, {**L.adamw_init(params), "step": jnp.int32(1)}, jax.random.PRNGKey(0),
              config, tc, {"train": [], "eval": []}, None)
    zstd.close()

    def size(step):
        return sum(f.stat().st_size for f in step.rglob("*") if f.is_file())

    assert size(tmp_path / "zstd" / "ckpt.orbax" / "1") < 0.7 * size(folder / "1")
    np.testing.assert_array_equal(lt.checkpoint_formats.load_checkpoint(tmp_path / "zstd" / "ckpt.orbax")
                                  .params["norm"], params["norm"])
    # Every reader of a run takes the folder: --sample, --eval, --export-hf,
    # --export-gguf (with gguf installed), --chat, --init-from.
    heldout = tmp_path / "heldout.txt"
    heldout.write_text((HERE / "shakespeare_heldout.txt").read_text()[:2000])
    readers = [["--sample", "--max-new-tokens", "3"], ["--eval", str(heldout), "--json"],
               ["--export-hf", str(tmp_path / "hf")]]
    if importlib.util.find_spec("gguf"):
        readers.append(["--export-gguf", str(tmp_path / "run.gguf")])
    for args in readers:
        assert lt.cli.main([*args, "--out-dir", str(run)]) == 0, capsys.readouterr()
    printed = capsys.readouterr().out
    assert json.loads(next(line for line in printed.splitlines()
                           if line.startswith("{")))["model"] == str(folder)
    if importlib.util.find_spec("gguf"):
        np.testing.assert_allclose(lt.gguf_file.load_gguf(tmp_path / "run.gguf")[0]["norm"], params["norm"],
                                   atol=1e-3)  # written as float16
    # --chat reads the model, then finds that a plain language model has no chat format.
    assert lt.cli.main(["--chat", "--prompt", "hi", "--out-dir", str(run)]) == 2
    assert "this model has no chat format" in capsys.readouterr().err
    for source in (run, folder, tmp_path / "hf"):
        np.testing.assert_allclose(lt.sources.load_source(source).params["norm"], params["norm"],
                                   atol=1e-7)
    # The readers read the weights alone: the optimizer's moments stay on disk.
    light = lt.checkpoint_formats.load_checkpoint(folder, weights_only=True)
    assert light.opt_state is None
    calls, load_checkpoint = [], lt.checkpoint_formats.load_checkpoint
    monkeypatch.setattr(lt.sources, "load_checkpoint", lambda *a, **k: calls.append(k) or
                        load_checkpoint(*a, **k))
    lt.sources.load_source(run)
    monkeypatch.setattr(lt.sources, "load_checkpoint", load_checkpoint)
    assert calls == [{"weights_only": True}]
    np.testing.assert_array_equal(light.params["layers"][1]["attention"]["wq"],
                                  params["layers"][1]["attention"]["wq"])
    # An unfinished save (a stop mid-save leaves it under a temporary name) is
    # passed over, and the reader says so.
    shutil.copytree(folder / "2", folder / "3.orbax-checkpoint-tmp-1234")
    (folder / "3.orbax-checkpoint-tmp-1234" / "commit_success.txt").unlink()
    saved = lt.checkpoint_formats.load_checkpoint(folder, config)
    assert int(saved.opt_state["step"]) == 2
    assert "passed over an unfinished save (3.orbax-checkpoint-tmp-1234" in saved.note
    # Bad input: another architecture, a folder with no step, no Orbax installed.
    with pytest.raises(lt.checkpoints.CheckpointError, match="dim: 32 in the checkpoint, 64 requested"):
        lt.checkpoint_formats.load_checkpoint(folder, dataclasses.replace(config, dim=64))
    (tmp_path / "empty" / "ckpt.orbax").mkdir(parents=True)
    assert lt.cli.main(["--sample", "--out-dir", str(tmp_path / "empty")]) == 2
    assert "holds no complete Orbax step" in capsys.readouterr().err
    # A step whose data files are gone: one line naming the step and the fix
    # (the storage library's own message runs to a thousand lines).
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    for data in (damaged / "ckpt.orbax" / "2" / "state").rglob("d/*"):
        data.unlink()
    assert lt.cli.main(["--sample", "--out-dir", str(damaged)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and len(err) < 500, err[:2000]
    assert "step 2 is not readable" in err and "delete that step's folder to fall back to step 1" in err
    monkeypatch.setitem(sys.modules, "orbax", None)
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)
    with pytest.raises(L.InputError, match="pip install 'orbax-checkpoint>=0.12,<0.13'"):
        lt.checkpoint_formats.checkpoint_writer(tmp_path / "x", tc, config)
    with pytest.raises(L.InputError, match="needs the optional package orbax-checkpoint"):
        lt.checkpoint_formats.load_checkpoint(folder)


@NEEDS_ORBAX
@pytest.mark.slow
def test_orbax_run_killed_mid_save_restores_its_last_complete_step(corpus, tmp_path):
    # SIGKILL lands at any point of a run that saves at every step, so often
    # while a step is being written in the background: the last step
    # committed before it restores, and resumes exactly where it was.
    flags = ["--data", str(corpus), "--dim", "32", "--n-layers", "2", "--n-heads", "4",
             "--n-kv-heads", "2", "--batch-size", "4", "--seq-len", "16", "--dtype", "float32",
             "--eval-every", "1", "--log-every", "1", "--checkpoint", "orbax"]
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(HERE / "llama_jax.py"), *flags, "--steps",
                                 "500", "--out-dir", "run"], cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    wait_for_line(log, "eval  step     4 |", [proc])
    proc.kill()
    proc.wait(timeout=60)
    saved = lt.checkpoint_formats.load_checkpoint(tmp_path / "run" / "ckpt.orbax")
    step = int(saved.opt_state["step"])
    assert step >= 2 and len(saved.history["train"]) == step
    config, tc = lt.configs.resolve_configs(lt.cli.build_parser().parse_args([*flags, "--steps", str(step + 2)]))
    lines = []
    resumed = lt.training.train(config, tc, corpus, tmp_path / "run", resume=True, log=lines.append)
    assert f"resumed from {tmp_path / 'run' / 'ckpt.orbax'} at step {step}" in lines
    assert len(resumed["history"]["train"]) == step + 2


@EIGHT_DEVICES
@NEEDS_ORBAX
def test_orbax_checkpoints_move_from_eight_devices_to_one_and_2x4(tmp_path):
    # Saved from 8 devices with FSDP (each device's shards written where they
    # are), restored onto 1 device and onto 2 x 4, each reading its own slice.
    tc = lt.settings.RunTrainConfig(batch_size=16, seq_len=8, lr=1e-2, warmup_steps=1, health=False)
    ref, _, _ = steps_on_mesh(one_device(), MESH_TINY, tc)
    _, params, opt_state = steps_on_mesh(lt.devices.make_mesh("all"), MESH_TINY, tc, n_steps=2)
    writer = lt.checkpoint_orbax.OrbaxWriter(tmp_path / "ckpt.orbax", keep=2)
    writer.save(params, opt_state, jax.random.PRNGKey(1), MESH_TINY, tc, {"train": [], "eval": []},
                None)
    writer.close()
    for then in (one_device(), lt.devices.make_mesh(4)):
        saved = lt.checkpoint_formats.load_checkpoint(tmp_path / "ckpt.orbax", MESH_TINY, then)
        assert saved.placed and saved.note is None
        for a, b in zip(jax.tree_util.tree_leaves((saved.params, saved.opt_state)),
                        jax.tree_util.tree_leaves((params, opt_state))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
        wq = saved.params["layers"][0]["attention"]["wq"]
        assert wq.sharding == lt.devices.state_shardings(then, {"w": wq})["w"]  # split as that mesh splits
        losses, _, _ = steps_on_mesh(then, MESH_TINY, tc, n_steps=3,
                                     state=(saved.params, saved.opt_state))
        np.testing.assert_allclose(losses, ref[2:], atol=1e-5, err_msg=str(then.shape))


@NEEDS_ORBAX
@pytest.mark.slow
def test_an_orbax_save_into_a_full_disk_and_a_garbage_step_are_one_line_each(
        corpus, tmp_path):
    # A save into a full disk (here a file-size limit, ulimit -f): one line
    # naming the fix, exit 2, and the step before it still loads. Orbax's own
    # logs and tensorstore's "Event loop is closed" reports, 589 lines of
    # tracebacks here before, are dropped (quiet_background_failures).
    flags = [sys.executable, str(HERE / "llama_jax.py"), "--data", str(corpus), "--dim", "32",
             "--n-layers", "2", "--n-heads", "4", "--n-kv-heads", "2", "--batch-size", "4",
             "--seq-len", "16", "--dtype", "float32", "--eval-every", "2", "--log-every", "1",
             "--max-new-tokens", "1", "--checkpoint", "orbax", "--out-dir", "run"]
    first = subprocess.run([*flags, "--steps", "2"], cwd=tmp_path, capture_output=True,
                           text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    limited = subprocess.run(["bash", "-c", 'ulimit -f 300 && exec "$@"', "bash", *flags,
                              "--steps", "4", "--resume"], cwd=tmp_path, capture_output=True,
                             text=True)
    assert limited.returncode == 2
    assert len(limited.stderr.splitlines()) == 1, limited.stderr[-3000:]
    assert "could not write the run's" in limited.stderr and "--resume" in limited.stderr
    saved = lt.checkpoint_formats.load_checkpoint(tmp_path / "run" / "ckpt.orbax")
    assert int(saved.opt_state["step"]) == 2
    # A step whose manifest is garbage: one line naming the step and the fix
    # (with 16 to 27 "Event loop is closed" tracebacks after it, before).
    for manifest in (tmp_path / "run" / "ckpt.orbax" / "2" / "state").rglob("manifest.ocdbt"):
        manifest.write_bytes(b"garbage")
    sample = subprocess.run([sys.executable, str(HERE / "llama_jax.py"), "--sample",
                             "--max-new-tokens", "2", "--out-dir", "run"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert sample.returncode == 2 and len(sample.stderr.splitlines()) == 1, sample.stderr[-3000:]
    assert "step 2 is not readable" in sample.stderr


@NEEDS_ORBAX
def test_muon_state_saves_and_restores_with_orbax(tmp_path):
    # Muon keeps one moment per hidden matrix; its placeholder for the second
    # is a scalar, which Orbax saves (an empty float32[0] it refused).
    tc = lt.settings.RunTrainConfig(batch_size=4, seq_len=8, lr=1e-2, warmup_steps=1, health=False,
                                    optimizer="muon", adam_lr=3e-3)
    _, params, opt_state = steps_on_mesh(one_device(), MESH_TINY, tc, n_steps=2)
    writer = lt.checkpoint_orbax.OrbaxWriter(tmp_path / "ckpt.orbax", keep=1)
    writer.save(params, opt_state, jax.random.PRNGKey(1), MESH_TINY, tc, {"train": [], "eval": []},
                None)
    writer.close()
    saved = lt.checkpoint_formats.load_checkpoint(tmp_path / "ckpt.orbax", MESH_TINY, one_device())
    assert saved.train_config.optimizer == "muon"
    assert saved.opt_state["nu"]["layers"][0]["attention"]["wq"].shape == ()
    for a, b in zip(jax.tree_util.tree_leaves((saved.params, saved.opt_state)),
                    jax.tree_util.tree_leaves((params, opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
