"""Tests of llamatool/handover.py: a fresh run over an earlier one loses nothing."""

import dataclasses
import shutil

import pytest

import llamatool as lt

from conftest import HAS_ORBAX, TRAIN_TINY, quick_tc


def run_files_bytes(folder):
    """{name: bytes} of a run's files in folder (an Orbax folder: its file names)."""
    out = {}
    for path in lt.handover.files_of_a_run(folder):
        out[path.name] = (sorted(str(p.relative_to(path)) for p in path.rglob("*"))
                          if path.is_dir() else path.read_bytes())
    return out


def train(corpus, out, lines=None, **overrides):
    log = (lines.append if lines is not None else lambda line: None)
    return lt.training.train(TRAIN_TINY, quick_tc(**overrides), corpus, out, log=log)


def test_a_fresh_run_that_fails_before_its_first_checkpoint_keeps_the_earlier_run(corpus,
                                                                                  tmp_path):
    out = tmp_path / "out"
    train(corpus, out, steps=3, eval_every=3)
    before = run_files_bytes(out)
    assert {"ckpt.npz", "metrics.jsonl", "loss.png"} <= before.keys()
    lines = []
    result = train(corpus, out, lines, steps=6, eval_every=6, lr=1e30, min_lr=0.0)
    assert result["stopped"] == "non-finite"
    said = next(line for line in lines if line.startswith("stopped:"))
    assert "this run saved no checkpoint, and the earlier run's files in" in said
    assert run_files_bytes(out) == before  # every byte of the earlier run's files
    # The next run clears the failed one's staging folder and resumes the earlier run.
    lines = []
    resumed = lt.training.train(TRAIN_TINY, quick_tc(steps=4, eval_every=4), corpus, out,
                                resume=True, log=lines.append)
    assert any("a fresh run there stopped before its first checkpoint" in line for line in lines)
    assert [s for s, _ in resumed["history"]["train"]] == [1, 2, 3, 4]
    assert not (out / lt.handover.STAGING).exists()


@pytest.mark.slow
@pytest.mark.parametrize("first, second", [("npz", "orbax"), ("orbax", "npz")])
def test_a_fresh_run_replaces_the_earlier_run_once_its_first_checkpoint_is_complete(
        corpus, tmp_path, first, second):
    if not HAS_ORBAX:
        pytest.skip("needs the optional orbax-checkpoint package")
    out = tmp_path / "out"
    train(corpus, out, steps=3, eval_every=3, checkpoint=first)
    lines = []
    result = train(corpus, out, lines, steps=4, eval_every=2, checkpoint=second)
    assert any("its files replace the earlier run's" in line for line in lines)
    name = {"npz": "ckpt.npz", "orbax": "ckpt.orbax"}
    assert sorted(p.name for p in out.iterdir()) == [name[second], "loss.png", "metrics.jsonl"]
    assert result["checkpoint"] == out / name[second]
    assert lt.checkpoint_formats.checkpoint_meta(out / name[second])["step"] == 4


def test_a_format_that_is_not_installed_is_refused_before_anything_is_touched(
        corpus, tmp_path, monkeypatch):
    out = tmp_path / "out"
    train(corpus, out, steps=2, eval_every=2)
    before = run_files_bytes(out)
    npz, orbax = lt.checkpoint_formats.FORMATS
    monkeypatch.setattr(lt.checkpoint_formats, "FORMATS",
                        (npz, orbax._replace(installed=lambda: False)))
    with pytest.raises(lt.checkpoints.InputError, match="pip install 'orbax-checkpoint"):
        train(corpus, out, steps=2, eval_every=2, checkpoint="orbax")
    assert run_files_bytes(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)


def test_a_handover_cut_short_is_finished_before_the_next_run(corpus, tmp_path):
    earlier, later = tmp_path / "earlier", tmp_path / "later"
    train(corpus, earlier, steps=2, eval_every=2)
    train(corpus, later, steps=3, eval_every=3)
    step = lambda folder: lt.checkpoint_formats.checkpoint_meta(folder / "ckpt.npz")["step"]  # noqa: E731
    # Killed after the first checkpoint, before any move: the new run takes the folder.
    out = tmp_path / "a"
    shutil.copytree(earlier, out)
    shutil.copytree(later, out / lt.handover.STAGING)
    lt.handover.finish_handover(out)
    assert step(out) == 3 and sorted(p.name for p in out.iterdir()) == sorted(p.name for p in later.iterdir())
    # Killed after the earlier run was moved aside, before the new one moved in.
    out = tmp_path / "b"
    (out / lt.handover.PREVIOUS).mkdir(parents=True)
    shutil.copytree(later, out / lt.handover.STAGING)
    for f in earlier.iterdir():
        shutil.copy(f, out / lt.handover.PREVIOUS / f.name)
    lt.handover.finish_handover(out)
    assert step(out) == 3 and not (out / lt.handover.PREVIOUS).exists()
    # Killed after the new run moved in, before the earlier one was deleted.
    out = tmp_path / "c"
    shutil.copytree(later, out)
    shutil.copytree(earlier, out / lt.handover.PREVIOUS)
    (out / lt.handover.PREVIOUS / lt.handover.MOVED).touch()
    lt.handover.finish_handover(out)
    assert step(out) == 3 and not (out / lt.handover.PREVIOUS).exists()
    # Killed while the new run's files moved in (its metrics moved, its
    # checkpoint, which goes last, not yet): they are the new run's, and stay.
    out = tmp_path / "e"
    shutil.copytree(earlier, out / lt.handover.PREVIOUS)
    (out / lt.handover.PREVIOUS / lt.handover.MOVED).touch()
    shutil.copytree(later, out / lt.handover.STAGING)
    (out / lt.handover.STAGING / "metrics.jsonl").replace(out / "metrics.jsonl")
    lt.handover.finish_handover(out)
    assert step(out) == 3 and not (out / lt.handover.PREVIOUS).exists()
    assert (out / "metrics.jsonl").read_bytes() == (later / "metrics.jsonl").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in later.iterdir())
    # Moved aside, and nothing to take its place: the earlier run comes back.
    out = tmp_path / "d"
    shutil.copytree(earlier, out / lt.handover.PREVIOUS)
    lt.handover.finish_handover(out)
    assert step(out) == 2 and not (out / lt.handover.PREVIOUS).exists()


def test_a_fresh_run_may_not_start_from_a_model_in_its_own_out_dir(corpus, tmp_path, capsys):
    # It would replace the run it starts from (and a LoRA run reads its base
    # again to sample or resume).
    out = tmp_path / "out"
    train(corpus, out, steps=2, eval_every=2)
    before = run_files_bytes(out)
    assert lt.cli.main(["--init-from", str(out), "--out-dir", str(out), "--data", str(corpus),
                        "--seq-len", "16", "--batch-size", "4",
                        "--steps", "2"]) == 2
    assert "is in --out-dir" in capsys.readouterr().err
    assert run_files_bytes(out) == before
