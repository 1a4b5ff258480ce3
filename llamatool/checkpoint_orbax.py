"""The Orbax checkpoint: a folder of step folders, each process writing its own shards.

One row of checkpoint_formats.FORMATS (ORBAX, at the end); it needs the optional
package orbax-checkpoint, imported only when a checkpoint is read or written.
"""

import functools
import importlib.util
import logging
import sys
import traceback
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from llama_jax import InputError
from llamatool.devices import state_shardings
from llamatool.plan import gb
from llamatool.checkpoints import (CheckpointError, CheckpointFormat, check_checkpoint,
                                   checkpoint_record, flatten_tree, in_brief, loaded_checkpoint)


# The second format, for runs past one host: a folder (ckpt.orbax) of step
# folders written by Orbax, the JAX ecosystem's checkpointing library
# (orbax-checkpoint, https://orbax.readthedocs.io), as MaxText writes its own.
#   - Each process writes only the shards its devices hold: nothing is
#     gathered, so no host ever holds the whole state (.npz gathers all of it
#     onto every process, and process 0 writes it).
#   - Asynchronous: save returns once the shards are copied off the devices,
#     and a thread writes them while training goes on; the next save, the end
#     of the run or a stop waits for the one before.
#   - Atomic: a step is written under a temporary name and renamed into place
#     once every process has finished (Orbax's commit), so a crash mid-save
#     leaves the steps before it, and the reader passes over the rest.
#   - Restored onto any mesh: each device reads its own slice of each array.
#   - Uncompressed: Orbax compresses with zstd by default, which saved only 8%
#     of the bytes of float32 weights and AdamW moments (0.84 against 0.91 GB
#     a process, 153M parameters) but raised a process's peak memory during a
#     save by 1.0 to 1.5 GB (two runs, saves 10 s apart), where uncompressed
#     it rose by about 0.05 GB
#     (tools/bench_checkpoint.py --orbax-compression, docs/scaling.md).
# The arrays are one tree {"params", "opt", "key"} (PyTreeSave); the JSON
# part, checkpoint_record, is a second item ("meta").
ORBAX_REQUIREMENT = "orbax-checkpoint>=0.12,<0.13"  # tested: 0.12.8


def orbax_installed():
    """Whether orbax-checkpoint can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("orbax.checkpoint") is not None
    except ImportError:  # no orbax package at all
        return False


def orbax_module(why):
    """orbax.checkpoint, or InputError naming the package to install."""
    try:
        import orbax.checkpoint as ocp
    except ImportError as err:
        raise InputError(f"{why} needs the optional package orbax-checkpoint: pip install "
                         f"'{ORBAX_REQUIREMENT}' (or use --checkpoint npz)") from err
    quiet_background_failures()
    return ocp


class OrbaxFailureLogs(logging.Filter):
    """Drops the error logs of Orbax's failed background work: when a write
    fails (a full disk), each of its threads logs the failure with a
    traceback (absl's logger), and asyncio logs each task whose failure
    nobody read; the same error reaches the caller as an exception, which is
    reported in one line."""

    def filter(self, record):
        frames = traceback.extract_tb(record.exc_info[2]) if record.exc_info else []
        from_orbax = "/orbax/" in record.pathname or any("/orbax/" in f.filename for f in frames)
        # asyncio's, for a future of tensorstore's (no frame of Orbax's in it):
        # this package runs no event loop of its own, so it is Orbax's too.
        unread = record.name == "asyncio" and "exception was never retrieved" in record.msg
        return not (record.levelno >= logging.ERROR and (from_orbax or unread))


@functools.lru_cache(maxsize=None)  # once per process
def quiet_background_failures():
    """After one storage error (a damaged step, a full disk), tensorstore's
    threads go on answering to asyncio loops that Orbax has closed: each
    answer fails with "Event loop is closed", and Python prints each through
    sys.excepthook or sys.unraisablehook (44 tracebacks for one full disk
    here, up to 27 for one damaged step read). The error that matters has
    reached the caller already; those, and the logs of it (OrbaxFailureLogs),
    are dropped."""
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(OrbaxFailureLogs())
    # ... and the writes it had not started yet, which Python reports at exit
    # (this package runs no coroutines of its own).
    warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited",
                            category=RuntimeWarning)
    hook, unraisable = sys.excepthook, sys.unraisablehook

    def closed_loop(kind, value):
        return kind is RuntimeError and str(value) == "Event loop is closed"

    def excepthook(kind, value, tb):
        if not closed_loop(kind, value):
            hook(kind, value, tb)

    def unraisablehook(info):
        if not closed_loop(info.exc_type, info.exc_value):
            unraisable(info)

    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


def orbax_manager(path, keep=None, compress=False):
    """Orbax's CheckpointManager over the folder `path`: a writer's (keep:
    the steps it keeps; it creates the folder) or a reader's (keep None).
    compress: zstd, Orbax's default, off here (see above); a reader reads
    either."""
    ocp = orbax_module(f"the Orbax checkpoint {path}")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=keep is not None,
                                           cleanup_tmp_directories=keep is not None,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager(
        Path(path).absolute(), options=options,
        item_handlers={"state": ocp.PyTreeCheckpointHandler(use_compression=compress),
                       "meta": ocp.JsonCheckpointHandler()})


def orbax_args(state=None, meta=None, restore=True, partial=False):
    """The items of one save or restore: state (a tree of arrays, or for a
    restore their ShapeDtypeStructs; partial: a part of the saved tree) and
    meta (the JSON; True to restore it)."""
    ocp = orbax_module("an Orbax checkpoint")
    items = {}
    if state is not None:  # a restore's ShapeDtypeStructs carry the shardings to read into
        items["state"] = (ocp.args.PyTreeRestore(
            state, restore_args=ocp.checkpoint_utils.construct_restore_args(state),
            partial_restore=partial)
            if restore else ocp.args.PyTreeSave(state))
    if meta is not None:
        items["meta"] = ocp.args.JsonRestore() if restore else ocp.args.JsonSave(meta)
    return ocp.args.Composite(**items)


def unfinished_saves(path, step):
    """The folders an interrupted save left in an Orbax folder past `step`
    (Orbax names them STEP.orbax-checkpoint-tmp-*)."""
    return sorted(p.name for p in Path(path).iterdir()
                  if ".orbax-checkpoint-tmp" in p.name and p.name.split(".")[0].isdigit()
                  and int(p.name.split(".")[0]) > step)


def load_orbax(path, config=None, mesh=None, weights_only=False):
    """An Orbax folder's latest complete step -> Checkpoint. With `mesh`, each
    device reads its own shard of the state_shardings split (placed True);
    without, NumPy arrays. weights_only: the optimizer state is left on disk
    (opt_state None), as the readers of a run want: a state that needs Orbax
    may not fit one host with its moments. note: an unfinished save passed
    over, or None."""
    manager = orbax_manager(path)
    with manager:
        step = manager.latest_step()
        if step is None:
            raise CheckpointError(f"{path} holds no complete Orbax step (a save that never "
                                  "finished, or not a checkpoint folder): train again, or "
                                  "point --out-dir at another run")
        older = [s for s in manager.all_steps() if s < step]
        unreadable = (f"{path}: step {step} is not readable ({{}}); it is the latest, so it "
                      "is not passed over: " + (f"delete that step's folder to fall back to "
                                               f"step {max(older)}" if older else
                                               "no earlier step is kept, so train again"))
        try:
            meta = manager.restore(step, args=orbax_args(meta=True))["meta"]
            saved = manager.item_metadata(step)["state"].tree
            arrays = flatten_tree({"params": saved["params"], "opt": saved["opt"]})
        except Exception as err:  # Orbax's and tensorstore's errors, or another tree
            raise CheckpointError(unreadable.format(in_brief(err))) from err
        use, saved_tc, template, opt_template = check_checkpoint(path, meta, arrays, config)
        target = {"params": template, "opt": opt_template,
                  "key": jax.ShapeDtypeStruct((2,), jnp.uint32)}
        if weights_only:
            del target["opt"]
        if mesh is None:  # onto one device, then to the host
            one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            shardings = jax.tree_util.tree_map(lambda _: one, target)
        else:
            shardings = {"params": state_shardings(mesh, template),
                         "opt": state_shardings(mesh, opt_template),
                         "key": NamedSharding(mesh, P())}
            shardings = {k: shardings[k] for k in target}
        abstract = jax.tree_util.tree_map(
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), target, shardings)
        try:
            state = manager.restore(step, args=orbax_args(state=abstract,
                                                          partial=weights_only))["state"]
        except Exception as err:  # a missing or damaged shard file
            raise CheckpointError(unreadable.format(in_brief(err))) from err
    if mesh is None:
        state = jax.tree_util.tree_map(np.asarray, state)
    left = unfinished_saves(path, step)
    note = (f"{path}: passed over an unfinished save ({', '.join(left)}, from a run stopped "
            f"mid-save); step {step} is the last complete one") if left else None
    return loaded_checkpoint(meta, use, saved_tc, state["params"], state.get("opt"),
                             np.asarray(state["key"]), placed=mesh is not None, note=note)


class OrbaxWriter:
    """Writes a run's checkpoints into a folder (ckpt.orbax), one step folder
    each, asynchronously (see above), keeping the last tc.keep_checkpoints.
    close() waits for the save in flight."""

    def __init__(self, path, keep, compress=False):
        self.path = Path(path)
        self.how = (f", each process writing its own shards in the background, the last {keep} "
                    "steps kept")
        orbax_module("--checkpoint orbax")
        self.manager = orbax_manager(self.path, keep, compress)

    def save(self, params, opt_state, key, config, tc, history, base):
        meta = checkpoint_record(opt_state, config, tc, history, base)
        if meta["step"] in self.manager.all_steps():  # a stop just after an evaluation's save
            return
        state = {"params": params, "opt": opt_state, "key": np.asarray(key)}
        try:
            saved = self.manager.save(meta["step"], args=orbax_args(state, meta, restore=False))
        except Exception as err:  # the save before it failed in the background: disk, rights
            raise OSError(f"Orbax: {in_brief(err)}") from err
        if not saved:  # Orbax refuses a step at or before its latest one
            raise OSError(f"Orbax did not save step {meta['step']}: {self.path} holds later "
                          "steps of another run")

    def close(self):
        try:
            self.manager.wait_until_finished()
        except Exception as err:
            raise OSError(f"Orbax: {in_brief(err)}") from err
        finally:
            self.manager.close()




def is_orbax_folder(path):
    """A folder named as a run names its Orbax checkpoint (ckpt.orbax), or any
    NAME.orbax folder."""
    return Path(path).is_dir() and Path(path).suffix == ".orbax"


def orbax_meta(path):
    """The JSON part of an Orbax folder's latest complete step alone."""
    manager = orbax_manager(path)
    with manager:
        return manager.restore(manager.latest_step(), args=orbax_args(meta=True))["meta"]


def orbax_plan(state, shards):
    return (f"host memory {gb(shards):>10}  (only its own shards, copied off its devices); "
            f"writes at most {gb(shards)}, in the background")


ORBAX = CheckpointFormat(
    name="orbax", filename="ckpt.orbax", scales=True, keeps_steps=True,
    requirement=ORBAX_REQUIREMENT,
    installed=orbax_installed, recognises=is_orbax_folder, meta=orbax_meta, load=load_orbax,
    writer=OrbaxWriter, plan=orbax_plan)
