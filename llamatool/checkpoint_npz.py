"""The .npz checkpoint: one file, written by process 0 after gathering the state.

One row of checkpoint_formats.FORMATS (NPZ, at the end). Readable with NumPy
alone: arrays named by their place in the tree ("params/layers/0/attention/wq"),
plus one JSON string ("meta", checkpoint_record). No pickle.
"""

import json
import os
from pathlib import Path

import jax
import numpy as np

from llamatool.settings import replace_durably
from llamatool.devices import gather
from llamatool.plan import gb
from llamatool.checkpoints import (CheckpointError, CheckpointFormat, check_checkpoint,
                                   checkpoint_record, flatten_tree, loaded_checkpoint,
                                   unflatten_like, unreadable_checkpoint)


def save_checkpoint(path, params, opt_state, key, config, tc, history, base=None):
    """Writes everything a resume needs into one .npz file: parameters,
    optimizer state, the step, the PRNG key, both configs, the loss history
    and a format version. The file is written beside its final name, flushed
    to disk, then renamed over it (replace_durably: atomic, and the folder
    flushed too), so a crash mid-save leaves the old one intact.
    base: for a fine-tuning run, where its pretrained model came from and the
    hash of its weights (base_record, llamatool/fine_tuning.py).
    On a mesh, each array is gathered to the host one at a time (gather,
    llamatool/devices.py): the whole state is never copied onto one device.
    With several processes, all take part in gathering and process 0 writes."""
    path = Path(path)
    meta = checkpoint_record(opt_state, config, tc, history, base)
    arrays = {"params/" + k: v for k, v in flatten_tree(params).items()}
    arrays.update({"opt/" + k: v for k, v in flatten_tree(opt_state).items()})
    arrays = {k: gather(v) for k, v in arrays.items()}
    arrays["key"] = gather(key)  # a raw uint32[2] key from jax.random.PRNGKey
    if jax.process_index() != 0:
        return
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        replace_durably(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def is_npz(path):
    """Whether path is a file that starts as a zip archive does (.npz is one)."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def npz_meta(path):
    """The JSON part of a .npz checkpoint alone."""
    with np.load(path, allow_pickle=False) as npz:
        return json.loads(npz["meta"].tobytes())


def load_npz(path, config=None, mesh=None, weights_only=False):
    """A .npz checkpoint -> Checkpoint, its arrays NumPy arrays on the host (a
    run on a mesh places each one into its shards: place, llamatool/devices.py).
    mesh and weights_only change nothing here: the file is read whole."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: train first (python llama_jax.py "
                              "--out-dir DIR) or pass the --out-dir that holds it")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        meta = json.loads(arrays.pop("meta").tobytes())
    except Exception as err:  # zipfile, zlib, JSON, missing keys: all mean "unreadable"
        raise unreadable_checkpoint(path, err) from err
    use, saved_tc, template, opt_template = check_checkpoint(path, meta, arrays, config)
    params = unflatten_like(template, {k[7:]: v for k, v in arrays.items()
                                       if k.startswith("params/")})
    opt_state = unflatten_like(opt_template, {k[4:]: v for k, v in arrays.items()
                                              if k.startswith("opt/")})
    return loaded_checkpoint(meta, use, saved_tc, params, opt_state, arrays["key"])


class NpzWriter:
    """Writes a run's checkpoints over one file (save_checkpoint)."""

    how = ""  # for the run's log line

    def __init__(self, path, keep=None):
        self.path = Path(path)

    def save(self, params, opt_state, key, config, tc, history, base):
        save_checkpoint(self.path, params, opt_state, key, config, tc, history, base)

    def close(self):
        pass


NPZ = CheckpointFormat(
    name="npz", filename="ckpt.npz", scales=False, keeps_steps=False, requirement=None,
    installed=lambda: True, recognises=is_npz, meta=npz_meta, load=load_npz, writer=NpzWriter,
    plan=lambda state, shards: (f"host memory {gb(state):>10}  (every array gathered onto each "
                                f"process); process 0 writes {gb(state)}, the others nothing"))
