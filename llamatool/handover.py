"""A fresh run over an earlier one: the earlier run's files stay until the new run has a checkpoint.

A fresh run in an --out-dir that holds an earlier run's files (a checkpoint in
any format, metrics.jsonl, the plots) writes its own into OUT/.fresh/ until its
first checkpoint there is complete. Then hand_over moves the earlier run's
files into OUT/.previous/ (marking it MOVED), this run's into OUT/ (its
checkpoint last), and only then deletes .previous/. A run that stops before its first checkpoint, for any reason,
leaves the earlier run's files as they were. Each move is a rename within one
file system, so a crash leaves every file whole in one of the three folders,
and finish_handover, before the next run, completes what it began.
"""

import shutil
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from llamatool.checkpoints import CheckpointError, run_files
from llamatool.checkpoint_formats import FORMATS, checkpoint_meta, format_of, saved_checkpoint

STAGING, PREVIOUS, MOVED = ".fresh", ".previous", "MOVED"


def run_file_names():
    """The names of the files a run keeps in its --out-dir."""
    files = run_files(".")
    return [f.filename for f in FORMATS] + [files.metrics.name, files.loss_plot.name,
                                            files.health_plot.name]


def files_of_a_run(folder):
    """The run files that exist in folder -> [Path]."""
    return [Path(folder) / name for name in run_file_names() if (Path(folder) / name).exists()]


def complete_checkpoint(folder):
    """Whether folder holds a checkpoint whose metadata reads (for Orbax: a
    committed step). One whose format's package is not installed is not
    judged: CheckpointError, so that nothing is deleted on a guess."""
    path = saved_checkpoint(folder) if Path(folder).is_dir() else None
    if path is None:
        return False
    fmt = format_of(path)
    if not fmt.installed():
        raise CheckpointError(f"{path} needs the optional package to be read: pip install "
                              f"'{fmt.requirement}', then run again")
    return checkpoint_meta(path) is not None


def move_into(files, folder):
    folder.mkdir(exist_ok=True)
    for f in files:
        f.replace(folder / f.name)


def move_in_new_files(staging, out):
    """The new run's files from staging into out, its checkpoint last: once
    the checkpoint is in out, nothing of the new run is left to move."""
    files = files_of_a_run(staging)
    checkpoints = {f.filename for f in FORMATS}
    move_into([f for f in files if f.name not in checkpoints], out)
    move_into([f for f in files if f.name in checkpoints], out)
    shutil.rmtree(staging)


def replace_earlier_run(staging, out):
    """The handover itself, or what a crash left of it: the earlier run's
    files aside into out/.previous/ (marked MOVED once all are there), the
    new run's in (move_in_new_files), then .previous/ deleted."""
    previous = out / PREVIOUS
    if not (previous / MOVED).exists():
        move_into(files_of_a_run(out), previous)
        (previous / MOVED).touch()
    move_in_new_files(staging, out)
    shutil.rmtree(previous)


def finish_handover(out_dir, log=lambda line: None):
    """Before a run starts (or resumes) in out_dir: completes a handover that a
    crash interrupted, or clears the staging folder of a fresh run that
    stopped before its first checkpoint (it holds that run's first metrics
    and nothing else). MOVED in .previous/ marks that the earlier run's files
    are all there, so the files in out_dir are the new run's. Process 0 alone
    touches the files."""
    out = Path(out_dir)
    staging, previous = out / STAGING, out / PREVIOUS
    moved = (previous / MOVED).exists()
    if jax.process_index() == 0 and staging.is_dir():
        if complete_checkpoint(staging):  # the new run's first checkpoint: hand over
            log(f"{staging} holds a run's first complete checkpoint: finishing its handover "
                f"to {out}")
            replace_earlier_run(staging, out)
        elif moved and complete_checkpoint(out):  # cut short after its checkpoint moved in
            replace_earlier_run(staging, out)
        else:
            log(f"removing {staging}: a fresh run there stopped before its first checkpoint")
            shutil.rmtree(staging)
    if jax.process_index() == 0 and previous.is_dir():
        if not (moved and complete_checkpoint(out)):  # the earlier run comes back
            move_into([f for f in files_of_a_run(previous) if not (out / f.name).exists()],
                      out)
        shutil.rmtree(previous)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("llama_jax: handover finished")


def staging_dir(out_dir, resume):
    """Where a run writes until its first checkpoint is complete: out_dir,
    unless it is a fresh run over an earlier run's files; then out_dir/.fresh.
    Process 0 decides (it alone writes the run's files) and tells the others."""
    out = Path(out_dir)
    over_earlier = not resume and jax.process_index() == 0 and bool(files_of_a_run(out))
    if jax.process_count() > 1:
        over_earlier = bool(multihost_utils.broadcast_one_to_all(np.int32(over_earlier)))
    if not over_earlier:
        return out
    if jax.process_index() == 0:
        (out / STAGING).mkdir(parents=True, exist_ok=True)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("llama_jax: staging folder made")
    return out / STAGING


def hand_over(staging, out_dir):
    """The run in staging has its first complete checkpoint: its files replace
    the earlier run's in out_dir (moved aside first, deleted last). Every
    process calls it, after its checkpoint writer is closed."""
    out = Path(out_dir)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("llama_jax: first checkpoint complete")
    if jax.process_index() == 0:
        replace_earlier_run(Path(staging), out)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("llama_jax: handover done")
