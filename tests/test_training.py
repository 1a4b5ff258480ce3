"""Tests of llamatool/training.py."""

import dataclasses
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax as L
import llamatool as lt

from conftest import CompileCounter, HAS_ORBAX, TRAIN_TINY, quick_tc, run_cli


@pytest.mark.slow
def test_training_lowers_the_loss(corpus, tmp_path):
    result = lt.training.train(TRAIN_TINY, quick_tc(steps=30, eval_every=30, lr=1e-2), corpus, tmp_path,
                     log=lambda s: None)
    losses = [loss for _, loss in result["history"]["train"]]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
    (step, train_loss, val_loss), = result["history"]["eval"]
    assert step == 30 and val_loss < np.log(50257)
    assert (tmp_path / "ckpt.npz").is_file() and (tmp_path / "loss.png").is_file()


@pytest.mark.slow
def test_same_seed_same_losses(corpus, tmp_path):
    a = lt.training.train(TRAIN_TINY, quick_tc(), corpus, tmp_path / "a", log=lambda s: None)
    b = lt.training.train(TRAIN_TINY, quick_tc(), corpus, tmp_path / "b", log=lambda s: None)
    c = lt.training.train(TRAIN_TINY, quick_tc(seed=1), corpus, tmp_path / "c", log=lambda s: None)
    assert a["history"]["train"] == b["history"]["train"]
    assert a["history"]["train"] != c["history"]["train"]


@pytest.mark.slow
def test_run_step_compiles_once(corpus, tmp_path):
    config = dataclasses.replace(TRAIN_TINY, dim=48)  # a config no other test compiled
    with CompileCounter("run_step") as compiles:
        lt.training.train(config, quick_tc(steps=5), corpus, tmp_path, log=lambda s: None)
    assert compiles.count == 1


@pytest.mark.slow
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(corpus, tmp_path):
    config = dataclasses.replace(TRAIN_TINY, dropout_rate=0.1)  # the dropout keys must resume too
    tc = quick_tc(steps=8, eval_every=100, health=True)
    straight = lt.training.train(config, tc, corpus, tmp_path / "straight", log=lambda s: None)

    def interrupt_at_step_4(line):
        if line.startswith("step     4/"):
            raise KeyboardInterrupt

    # The interrupted and resumed run in the other format, Orbax, where it is
    # installed (the straight one writes the .npz, auto's choice on one process).
    orbax_tc = dataclasses.replace(tc, checkpoint="orbax" if HAS_ORBAX else "npz",
                                   keep_checkpoints=1)
    first = lt.training.train(config, orbax_tc, corpus, tmp_path / "resumed", log=interrupt_at_step_4)
    assert first["stopped"] == "interrupted" and len(first["history"]["train"]) == 4
    resumed = lt.training.train(config, orbax_tc, corpus, tmp_path / "resumed", resume=True,
                      log=lambda s: None)
    a = np.array(straight["history"]["train"])
    b = np.array(resumed["history"]["train"])
    assert a.shape == b.shape == (8, 2)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert straight["checkpoint"].name == "ckpt.npz"
    if HAS_ORBAX:  # step 4's folder gone: only the last step is kept
        folder = tmp_path / "resumed" / "ckpt.orbax"
        assert resumed["checkpoint"] == folder and [p.name for p in folder.iterdir()] == ["8"]
    # metrics.jsonl: one line per logged step (every step here) and per
    # evaluation, none twice, none missing, the same figures as the straight run.
    lines = {name: [json.loads(line) for line in
                    (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
             for name in ("straight", "resumed")}
    for records in lines.values():
        assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 9))
        assert [r["step"] for r in records if r["kind"] == "eval"] == [8]
    for r, s in zip(lines["resumed"], lines["straight"]):
        assert r["kind"] == s["kind"] and r["step"] == s["step"]
        for name in ("loss", "grad_norm", "layer_grad_norm", "layer_rms", "layer_attn_entropy",
                     "val_loss"):
            if name in s:
                np.testing.assert_allclose(r[name], s[name], rtol=1e-5, err_msg=name)
    assert (tmp_path / "resumed" / "health.png").is_file()
    if HAS_ORBAX:
        # A fresh run in that folder (here a .npz one) replaces the earlier run's
        # checkpoint once its own first one is complete, or a reader would take
        # the later step: the old run's (tests/test_handover.py has the rest).
        lines = []
        lt.training.train(config, tc, corpus, tmp_path / "resumed", log=lines.append)  # compiled already
        assert any("its files replace the earlier run's" in line for line in lines)
        assert not folder.exists() and lt.checkpoint_formats.saved_checkpoint(tmp_path / "resumed").name == "ckpt.npz"


@pytest.mark.slow
def test_muon_runs_learn_resume_exactly_and_plan_counts_their_state(corpus, tmp_path, capsys):
    tc = quick_tc(steps=8, eval_every=100, optimizer="muon", adam_lr=2e-3, lr=2e-2)
    straight = lt.training.train(TRAIN_TINY, tc, corpus, tmp_path / "straight", log=lambda s: None)

    def interrupt_at_step_2(line):
        if line.startswith("step     2/"):
            raise KeyboardInterrupt

    lt.training.train(TRAIN_TINY, tc, corpus, tmp_path / "resumed", log=interrupt_at_step_2)
    saved = lt.checkpoint_formats.load_checkpoint(tmp_path / "resumed" / "ckpt.npz")
    assert saved.train_config.optimizer == "muon"  # its momentum is in the checkpoint
    assert saved.opt_state["nu"]["layers"][0]["attention"]["wq"].shape == ()
    assert float(np.abs(saved.opt_state["mu"]["layers"][0]["attention"]["wq"]).max()) > 0
    resumed = lt.training.train(TRAIN_TINY, tc, corpus, tmp_path / "resumed", resume=True,
                      log=lambda s: None)
    a, b = np.array(straight["history"]["train"]), np.array(resumed["history"]["train"])
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert a[-1, 1] < a[0, 1]  # it learns
    with pytest.raises(L.InputError, match="trains with muon, whose state it holds"):
        lt.training.train(TRAIN_TINY, dataclasses.replace(tc, optimizer="adamw", adam_lr=None, steps=8),
                corpus, tmp_path / "resumed", resume=True, log=lambda s: None)
    # From the command line, --resume without --optimizer keeps the run's: an
    # AdamW run resumed under the cpu preset (Muon) stays AdamW.
    config = lt.settings.run_configs(TRAIN_TINY)[0]
    params = L.init_params(jax.random.PRNGKey(0), config)
    (tmp_path / "adamw").mkdir()
    lt.checkpoint_npz.save_checkpoint(
        tmp_path / "adamw" / "ckpt.npz", params, L.adamw_init(params), jax.random.PRNGKey(1),
        config, dataclasses.replace(tc, optimizer="adamw", adam_lr=None), {"train": [], "eval": []})
    _, kept = lt.configs.resolve_configs(lt.cli.build_parser().parse_args(
        ["--preset", "cpu", "--dtype", "float32", "--resume", "--out-dir",
         str(tmp_path / "adamw")]))
    assert kept.optimizer == "adamw" and lt.presets.PRESETS["cpu"][1]["optimizer"] == "muon"
    # --plan: Muon keeps one moment for the blocks' matrices (and a float32
    # scalar in place of the other), AdamW's two for the rest.
    mesh = lt.devices.make_mesh(1)
    params = lt.settings.param_shapes(config)
    mask = lt.checkpoints.flatten_tree(lt.muon.muon_mask(params))
    hidden = [v.size for k, v in lt.checkpoints.flatten_tree(params).items() if mask[k]]
    adamw = lt.plan.memory_plan(config, dataclasses.replace(tc, optimizer="adamw", adam_lr=None),
                          mesh)["optimizer"]
    assert lt.plan.memory_plan(config, tc, mesh)["optimizer"] == adamw - 4 * sum(hidden) + 4 * len(hidden)
    # The flags; and LoRA, which it refuses, saying why.
    _, flagged = lt.configs.resolve_configs(lt.cli.build_parser().parse_args(
        ["--optimizer", "muon", "--adam-lr", "1e-3", "--preset", "cpu", "--dtype", "float32"]))
    assert (flagged.optimizer, flagged.adam_lr) == ("muon", 1e-3)
    with pytest.raises(L.InputError, match="LoRA update is the product of two thin factors"):
        lt.settings.RunTrainConfig(optimizer="muon", lora_rank=4)
    # bfloat16 compute: the master weights stay float32 through a Muon step.
    bf16 = dataclasses.replace(config, compute_dtype="bfloat16")
    weights = L.init_params(jax.random.PRNGKey(0), bf16)
    new, _, loss, _ = lt.step.run_step(weights, lt.muon.muon_init(weights), jnp.arange(300) % 97,
                                 L.run_keys(jax.random.PRNGKey(0)), bf16, tc)
    assert np.isfinite(float(loss))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(new))


@pytest.mark.slow
def test_unreadable_metrics_lines_are_dropped_with_a_message_and_the_run_goes_on(corpus, tmp_path):
    lt.training.train(TRAIN_TINY, quick_tc(steps=2), corpus, tmp_path, log=lambda s: None)
    path = tmp_path / "metrics.jsonl"
    # A crash in mid-write leaves half a line; a line past the checkpoint's step
    # (written before a kill) must not be kept either, or step 3 would appear twice.
    path.write_text(path.read_text() + '{"kind": "train", "step": 3, "loss": 1.0}\n{"kind": "tr')
    lines = []
    lt.training.train(TRAIN_TINY, quick_tc(steps=3), corpus, tmp_path, resume=True, log=lines.append)
    assert any("dropped 1 unreadable line" in line for line in lines)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert train[2]["loss"] != 1.0  # the step that ran again, not the stale line


@pytest.mark.slow
def test_out_dir_that_is_a_file_and_a_full_disk_are_messages(corpus, tmp_path, monkeypatch):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    for out_dir in (taken, taken / "run"):
        with pytest.raises(L.InputError, match=f"{taken} is a file, not a folder; choose another"):
            lt.training.train(TRAIN_TINY, quick_tc(steps=2), corpus, out_dir, log=lambda s: None)
    # The disk fills at the second save (step 4): a message, and step 2's checkpoint kept.
    real_savez, saves = np.savez, []

    def full_at_the_second(f, **arrays):
        saves.append(1)
        if len(saves) == 2:
            raise OSError(28, "No space left on device")
        real_savez(f, **arrays)

    monkeypatch.setattr(np, "savez", full_at_the_second)
    with pytest.raises(L.InputError, match=r"could not write the run's files in .*\(No space "
                       r"left on device\); the last complete checkpoint there is kept"):
        lt.training.train(TRAIN_TINY, quick_tc(steps=4, eval_every=2), corpus, tmp_path / "run",
                log=lambda s: None)
    monkeypatch.undo()
    assert lt.checkpoint_formats.checkpoint_meta(tmp_path / "run" / "ckpt.npz")["step"] == 2


def test_progress_lines_time_finished_steps_not_their_dispatch(corpus, tmp_path, monkeypatch):
    # Dispatch returns at once; the steps finish when their losses are read.
    # Here reading takes 0.2 s more, as slow device work would: a line's speed
    # must include it (it did not when the clock was read before the wait).
    read_losses = lt.training.read_losses

    def slow_read(*args):
        time.sleep(0.2)
        return read_losses(*args)

    monkeypatch.setattr(lt.training, "read_losses", slow_read)
    lines = []
    lt.training.train(TRAIN_TINY, quick_tc(steps=3), corpus, tmp_path, log=lines.append)
    speeds = [float(m.group(1)) for line in lines
              if (m := re.search(r"\|\s+([\d,]+) ms/step", line.replace(",", "")))]
    assert len(speeds) == 2 and min(speeds) >= 200, lines  # steps 2 and 3, one step each


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    (b"", "is empty"),
    (b"  \n\n", "is empty"),
    (b"To be, or not to be", "has 7 tokens; windows of seq_len 16 need at least 161 "),
    (b"caf\xe9 au lait" * 100, "not UTF-8 text \\(byte 3 is 0xe9\\)"),
])
def test_bad_data_files_get_clear_errors(tmp_path, content, message):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(L.InputError, match=message):
        lt.training.train(TRAIN_TINY, quick_tc(), path, tmp_path / "out", log=lambda s: None)


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(corpus, tmp_path):
    lines = []
    result = lt.training.train(TRAIN_TINY, quick_tc(steps=40, lr=1e25, warmup_steps=0, eval_every=1,
                                          min_lr=0.0),
                     corpus, tmp_path, log=lines.append)
    assert result["stopped"] == "non-finite"
    assert any("non-finite at step" in line for line in lines)
    lt.checkpoint_formats.load_checkpoint(tmp_path / "ckpt.npz", TRAIN_TINY)  # still readable


@pytest.mark.slow
def test_ctrl_c_stops_after_the_step_and_saves_a_resumable_checkpoint(corpus, tmp_path):
    import signal

    def press_ctrl_c_at_step_3(line):
        if line.startswith("step     3/"):
            os.kill(os.getpid(), signal.SIGINT)  # the handler only sets a flag

    # Whatever handler was there before the run is put back (the default one in a
    # terminal; SIG_IGN when the suite itself runs in the background).
    before = signal.getsignal(signal.SIGINT)
    result = lt.training.train(TRAIN_TINY, quick_tc(steps=8, eval_every=100), corpus, tmp_path,
                     log=press_ctrl_c_at_step_3)
    assert result["stopped"] == "interrupted"
    assert int(lt.checkpoint_formats.load_checkpoint(tmp_path / "ckpt.npz", TRAIN_TINY).opt_state["step"]) == 3
    assert signal.getsignal(signal.SIGINT) is before  # restored


# ----------------------------------------------------------------------------- time budget and the GPU check


def test_steps_within_budget_counts_evaluations_and_never_lengthens_a_run():
    tc = quick_tc(steps=1000, eval_every=100)
    # 100 s left at 0.1 s/step plus a 5 s evaluation every 100 steps: 0.15 s per
    # step, 95% of 100 s -> 633 more steps after the 10 done.
    assert lt.training.steps_within_budget(tc, 10, 100.0, 0.1, 5.0) == 10 + 633
    assert lt.training.steps_within_budget(tc, 10, 1e9, 0.1, 5.0) == 1000  # only ever shortens
    assert lt.training.steps_within_budget(tc, 10, -5.0, 0.1, 5.0) == 11  # at least one more step


@pytest.mark.slow
def test_time_budget_that_is_not_reached_changes_no_loss(corpus, tmp_path, monkeypatch):
    tc = quick_tc(steps=14, eval_every=100)
    plain = lt.training.train(TRAIN_TINY, tc, corpus, tmp_path / "plain", log=lambda s: None)
    # The first evaluation compiles (simulated: 1 s per split); the fit must be
    # given what a compiled one costs, or it would cut a GPU run short.
    calls, fits = [], []
    evaluate_run, fit = lt.speed.evaluate_run, lt.training.fit_schedule_to_budget

    def slow_first_evaluation(*args):
        calls.append(1)
        if len(calls) <= 2:
            time.sleep(1.0)
        return evaluate_run(*args)

    def recording_fit(tc, done, seconds_left, per_step, eval_seconds, *rest):
        fits.append(eval_seconds)
        return fit(tc, done, seconds_left, per_step, eval_seconds, *rest)

    monkeypatch.setattr(lt.training, "evaluate_run", slow_first_evaluation)
    monkeypatch.setattr(lt.training, "fit_schedule_to_budget", recording_fit)
    lines = []
    timed = lt.training.train(TRAIN_TINY, tc, corpus, tmp_path / "timed", log=lines.append,
                    time_budget=600.0)
    np.testing.assert_array_equal(np.array(plain["history"]["train"]),
                                  np.array(timed["history"]["train"]))
    assert [e[0] for e in timed["history"]["eval"]] == [11, 14]  # the timed evaluation, the end
    assert not any("steps fit" in line for line in lines)
    assert len(fits) == 1 and fits[0] < 1.0 and len(calls) == 2 + 2 + 2  # at 11 twice, at 14


@pytest.mark.slow
def test_time_budget_reached_stops_cleanly_with_an_evaluation_and_a_checkpoint(corpus, tmp_path):
    lines = []
    result = lt.training.train(TRAIN_TINY, quick_tc(steps=50, eval_every=100), corpus, tmp_path,
                     log=lines.append, time_budget=1e-9)
    assert result["stopped"] is None
    assert any("time budget of 1e-09 min reached at step 1" in line for line in lines)
    ckpt = lt.checkpoint_formats.load_checkpoint(tmp_path / "ckpt.npz", TRAIN_TINY)
    assert int(ckpt.opt_state["step"]) == 1 and ckpt.history["eval"][-1][0] == 1
    assert (tmp_path / "loss.png").is_file()
    bad = run_cli("--time-budget", "0", "--out-dir", "x", cwd=tmp_path)
    assert bad.returncode == 2 and "--time-budget must be a positive" in bad.stderr


@pytest.mark.slow
def test_resume_with_more_steps_keeps_the_schedule_and_runs_on_at_min_lr(corpus, tmp_path):
    tc = quick_tc(steps=6, eval_every=100)
    lt.training.train(TRAIN_TINY, tc, corpus, tmp_path, log=lambda s: None)
    lines = []
    longer = dataclasses.replace(tc, steps=9)
    result = lt.training.train(TRAIN_TINY, longer, corpus, tmp_path, resume=True, log=lines.append)
    assert any("goes past the 6-step schedule" in line for line in lines)
    lrs = [line.split("| lr ")[1].split(" |")[0] for line in lines if line.startswith("step")]
    assert lrs == ["1.50e-04"] * 2  # steps 8 and 9 (7 compiles, unreported) at the floor
    saved = lt.checkpoint_formats.load_checkpoint(tmp_path / "ckpt.npz").train_config
    assert saved.schedule_steps == 6 and saved.steps == 9
    for step in (5, 6, 7, 8):  # the last step of the schedule, then no jump back up
        assert float(L.learning_rate(step, lt.settings.lr_schedule(saved))) == pytest.approx(1.5e-4)
    assert len(result["history"]["train"]) == 9
