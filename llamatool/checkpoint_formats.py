"""The table of checkpoint formats, and everything that chooses among them.

Adding a format is a module implementing CheckpointFormat (llamatool/checkpoints.py)
and one row of FORMATS; the --checkpoint flag's choices, the readers, --plan
and the writer all read the table.
"""

import os
from pathlib import Path

import jax

from llama_jax import InputError
from llamatool.muon import OPTIMIZERS
from llamatool.plan import gb, run_shapes, tree_bytes
from llamatool.checkpoints import CheckpointError
from llamatool.checkpoint_npz import NPZ
from llamatool.checkpoint_orbax import ORBAX

# The first is what --checkpoint auto writes when nothing asks for one that scales.
FORMATS = (NPZ, ORBAX)
CHECKPOINT_CHOICES = ("auto",) + tuple(f.name for f in FORMATS)


def checkpoint_names():
    """'ckpt.npz or ckpt.orbax', for messages."""
    return " or ".join(f.filename for f in FORMATS)


def format_named(name):
    """The row of FORMATS called name, or InputError naming the choices."""
    for f in FORMATS:
        if f.name == name:
            return f
    raise InputError(f"--checkpoint {name}: choose {', '.join(CHECKPOINT_CHOICES)}")


def format_of(path):
    """The row of FORMATS whose checkpoint path is (by its name in a run's
    folder, else by what the path holds), or None."""
    path = Path(path)
    return (next((f for f in FORMATS if path.name == f.filename), None)
            or next((f for f in FORMATS if f.recognises(path)), None))


def checkpoint_meta(path):
    """A checkpoint's JSON metadata alone (configs, history, step), or None if
    there is no readable checkpoint there (load_checkpoint says why). path: a
    checkpoint of any format, or None."""
    fmt = format_of(path) if path is not None else None
    try:
        return fmt.meta(path) if fmt else None
    except Exception:  # missing, unreadable, its package not installed: the load reports it
        return None


def load_checkpoint(path, config=None, mesh=None, weights_only=False):
    """Reads a checkpoint of any format (FORMATS). With `config`, refuses
    (CheckpointError listing every mismatch) a checkpoint whose architecture,
    tree, shapes or dtypes differ from it; without, uses its own. mesh: where
    the format can, each device reads its own shard (Checkpoint.placed).
    weights_only: the optimizer's state may be left on disk (opt_state None).
    -> Checkpoint."""
    fmt = format_of(path)
    if fmt is None:
        raise CheckpointError(f"no checkpoint at {path}: train first (python llama_jax.py "
                              f"--out-dir DIR) or pass the --out-dir that holds "
                              f"{checkpoint_names()}")
    return fmt.load(Path(path), config, mesh, weights_only)


def saved_checkpoint(out_dir):
    """The checkpoint a run in out_dir left, in whichever format; where several
    are there (a run that changed --checkpoint), the one at the latest step.
    -> Path, or None when there is none."""
    present = [Path(out_dir) / f.filename for f in FORMATS if (Path(out_dir) / f.filename).exists()]
    if len(present) > 1:
        steps = {p: (checkpoint_meta(p) or {}).get("step") for p in present}
        unread = [p for p, step in steps.items() if step is None]
        if unread:  # it may hold a later step: never pass over it in silence
            read = [p for p in present if p not in unread]
            fmt = format_of(unread[0])
            why = (f"it needs the optional package: pip install '{fmt.requirement}'"
                   if not fmt.installed() else "it is damaged or unfinished")
            raise CheckpointError(f"{unread[0]} cannot be read ({why}), and it may hold a later "
                                  f"step than {read[0] if read else 'the others'}: fix that, "
                                  f"or move it out of {out_dir} to use the older one")
        return max(present, key=lambda p: steps[p])
    return present[0] if present else None


def checkpoint_bytes(config, tc):
    """Bytes of what a checkpoint holds: the trained weights (with LoRA, the
    adapters) and the optimizer's state."""
    trainable = run_shapes(config, tc)[0]
    return tree_bytes(trainable) + tree_bytes(jax.eval_shape(OPTIMIZERS[tc.optimizer].init,
                                                             trainable))


def checkpoint_format(tc, config):
    """--checkpoint auto: a format that scales (CheckpointFormat.scales), when its
    package is installed, where the first would not: with several processes
    (.npz gathers the whole state onto each), or where the state
    (checkpoint_bytes: 12 bytes a parameter with AdamW) would take over half
    of this host's memory. Else the first format, .npz: one file, readable
    with NumPy alone. -> (the format's row, why, in words)."""
    if tc.checkpoint != "auto":
        return format_named(tc.checkpoint), f"--checkpoint {tc.checkpoint}"
    first, scaling = FORMATS[0], next(f for f in FORMATS if f.scales)
    state = checkpoint_bytes(config, tc)
    try:
        host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        host = None
    reasons = ([f"{jax.process_count()} processes"] if jax.process_count() > 1 else []) + (
        [f"the state, {gb(state)}, is over half this host's memory"]
        if host is not None and state > host / 2 else [])
    if not reasons:
        return first, f"--checkpoint auto: {first.name}, one process"
    if not scaling.installed():
        return first, (f"--checkpoint auto: {first.name}, gathered onto every process; with "
                       f"{' and '.join(reasons)}, {scaling.name} would scale better (pip "
                       f"install '{scaling.requirement}')")
    return scaling, f"--checkpoint auto: {scaling.name}, as {' and '.join(reasons)}"


def checkpoint_plan(config, tc, mesh):
    """--plan's lines on saving a checkpoint, in each format, per process."""
    state = checkpoint_bytes(config, tc)
    # The distinct FSDP shards one process's devices hold (each group of fsdp
    # devices holds one copy of the state; a process's devices are contiguous).
    fsdp = mesh.shape["fsdp"]
    shards = state * min(jax.local_device_count(), fsdp) / fsdp
    chosen, why = checkpoint_format(tc, config)
    return ([f"checkpoint ({chosen.name}: {why}), per process, for {gb(state)} of weights and "
             "optimizer state:"]
            + [f"  {f.name:<6} {f.plan(state, shards)}" for f in FORMATS])


def check_format_installed(chosen):
    """The chosen format's package (a row of FORMATS) is there, or InputError
    naming it: checked before a run touches anything."""
    if not chosen.installed():
        raise InputError(f"--checkpoint {chosen.name} needs the optional package "
                         f"{chosen.requirement.split('>')[0].split('=')[0]}: pip install "
                         f"'{chosen.requirement}' (or use --checkpoint {FORMATS[0].name})")


def checkpoint_writer(out_dir, tc, config, log=lambda line: None):
    """The writer of a run's checkpoints into out_dir, in the format
    checkpoint_format chooses, which it logs. It removes no earlier run's files: a fresh run
    over an earlier one writes into a folder of its own until its first
    checkpoint is complete (llamatool/handover.py)."""
    chosen, why = checkpoint_format(tc, config)
    check_format_installed(chosen)
    writer = chosen.writer(Path(out_dir) / chosen.filename, tc.keep_checkpoints)
    log(f"checkpoints: {writer.path}{writer.how} ({why})")
    return writer
