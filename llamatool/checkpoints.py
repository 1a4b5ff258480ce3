"""What every checkpoint format shares: the record, the checks, the typed result, the interface.

A checkpoint format is one module implementing CheckpointFormat (checkpoint_npz.py,
checkpoint_orbax.py) and one row of checkpoint_formats.FORMATS, which everything
else reads: the --checkpoint flag's choices, the readers, --plan and the writer.
"""

import dataclasses
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import numpy as np

from llama_jax import InputError
from llamatool.settings import ARCHITECTURE_FIELDS, RunModelConfig, RunTrainConfig, param_shapes
from llamatool.muon import OPTIMIZERS
from llamatool.lora import lora_init


class RunFiles(NamedTuple):
    """The files a training run keeps in its --out-dir besides its checkpoint,
    whose name is its format's (CheckpointFormat.filename)."""
    metrics: Path      # metrics.jsonl: one JSON line per logged step (llamatool/health.py)
    loss_plot: Path    # loss.png
    health_plot: Path  # health.png (llamatool/health.py)


def run_files(out_dir):
    """Where a run in out_dir keeps its files. -> RunFiles."""
    out = Path(out_dir)
    return RunFiles(out / "metrics.jsonl", out / "loss.png", out / "health.png")


# 2: the key is the run's seed key, from which run_keys derives its streams.
# 1 (same arrays; the key was used directly) still loads, but resuming it
# cannot repeat the batches its run would have drawn.
CHECKPOINT_VERSION = 2


class CheckpointError(InputError):
    """A checkpoint that cannot be used: unreadable, or made for another model."""


def flatten_tree(tree, prefix=""):
    """Nested dicts and lists -> {"a/0/b": array}, in a fixed order."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    flat = {}
    for name, value in items:
        path = f"{prefix}{name}"
        if isinstance(value, (dict, list)):
            flat.update(flatten_tree(value, path + "/"))
        else:
            flat[path] = value
    return flat


def unflatten_like(template, flat, prefix=""):
    """Inverse of flatten_tree, taking the structure from template."""
    if isinstance(template, dict):
        return {k: unflatten_like(v, flat, f"{prefix}{k}/") for k, v in template.items()}
    if isinstance(template, list):
        return [unflatten_like(v, flat, f"{prefix}{i}/") for i, v in enumerate(template)]
    return flat[prefix[:-1]]


def config_from_json(cls, d):
    d = dict(d)
    for name in ("rope_scaling", "lora_targets"):  # JSON has lists; configs hold tuples
        if d.get(name) is not None:
            d[name] = tuple(d[name])
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in known})


def checkpoint_record(opt_state, config, tc, history, base):
    """A checkpoint's JSON part, the same in both formats."""
    return {"format_version": CHECKPOINT_VERSION, "model_config": dataclasses.asdict(config),
            "train_config": dataclasses.asdict(tc), "history": history,
            "step": int(opt_state["step"]), "base": base}


class Checkpoint(NamedTuple):
    """A loaded checkpoint, from any format (load_checkpoint)."""
    params: dict              # the weights; with LoRA, the adapters alone (load_source merges)
    opt_state: dict | None    # the optimizer's state; None when read with weights_only
    key: np.ndarray           # the run's seed key, uint32[2] (run_keys derives its streams)
    config: RunModelConfig    # the architecture (the caller's, when it passed one)
    train_config: RunTrainConfig
    history: dict             # {"train": [[step, loss]], "eval": [[step, train, val]]}
    format_version: int
    base: dict | None         # a fine-tuning run's base_record, else None
    placed: bool              # the arrays are already on a mesh's devices, sharded
    note: str | None          # what a reader should be told (a save passed over), or None


def loaded_checkpoint(meta, config, train_config, params, opt_state, key, placed=False,
                      note=None):
    """The one place a Checkpoint is built, from a format's reader: its JSON
    part (checkpoint_record), the configs check_checkpoint returned, and its
    arrays."""
    return Checkpoint(params, opt_state, key, config, train_config, meta["history"],
                      meta["format_version"], meta.get("base"), placed, note)


class CheckpointFormat(NamedTuple):
    """One checkpoint format: what checkpoint_formats.py needs of it.
    name: --checkpoint's choice; filename: its name in a run's --out-dir;
    scales: --checkpoint auto picks it for several processes or a state over
    half the host's memory (else the first format of FORMATS);
    keeps_steps: it keeps several steps (--keep-checkpoints applies);
    requirement: the optional package it needs, as pip names it, or None;
    installed() -> bool; recognises(path) -> whether path is one;
    meta(path) -> its JSON part (checkpoint_record), raising on any failure;
    load(path, config, mesh, weights_only) -> Checkpoint;
    writer(path, keep) -> an object with .path, .save(params, opt_state, key,
    config, tc, history, base) and .close(); keep: the steps it keeps, where it
    keeps several;
    plan(state_bytes, shard_bytes) -> --plan's words on a save's cost."""
    name: str
    filename: str
    scales: bool
    keeps_steps: bool
    requirement: str | None
    installed: Callable
    recognises: Callable
    meta: Callable
    load: Callable
    writer: Callable
    plan: Callable


def _tree_mismatches(template, arrays, prefix):
    """Lists how flat `arrays` differ from a template's names, shapes, dtypes."""
    want = {f"{prefix}{k}": v for k, v in flatten_tree(template).items()}
    problems = [f"missing array {k}" for k in want if k not in arrays]
    problems += [f"unexpected array {k}" for k in arrays if k.startswith(prefix) and k not in want]
    for k, v in want.items():
        if k in arrays and (arrays[k].shape != v.shape or arrays[k].dtype != v.dtype):
            problems.append(f"{k}: {arrays[k].dtype}{list(arrays[k].shape)} in the file, "
                            f"{np.dtype(v.dtype)}{list(v.shape)} expected")
    return problems


def in_brief(err, width=160):
    """An error as one short line: its type and the start of its first line
    (a storage library's message can run to a thousand lines)."""
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {first[:width]}{'...' if len(first) > width else ''}"


def unreadable_checkpoint(path, err):
    """The CheckpointError for a file or metadata that cannot be read."""
    return CheckpointError(f"{path} is not a readable llama_jax checkpoint ({in_brief(err)}); "
                           "it may be truncated or corrupted: delete it and train again")


def upgrade_muon_placeholders(arrays, opt_template):
    """Muon's state kept an empty float32[0] in place of each hidden matrix's
    second moment until Orbax was found to refuse arrays of size 0; it is now
    a scalar 0 (muon_init, llamatool/muon.py). .npz checkpoints of that time
    hold the empty arrays: each one the template wants as a scalar becomes a
    scalar 0, in `arrays` (flat names -> NumPy arrays). Nothing else changes."""
    for k, v in flatten_tree(opt_template).items():
        name = "opt/" + k
        if (v.shape == () and isinstance(arrays.get(name), np.ndarray)
                and arrays[name].shape == (0,)):
            arrays[name] = np.zeros((), arrays[name].dtype)


def check_checkpoint(path, meta, arrays, config):
    """The checks of load_checkpoint, for either format: the format version,
    the architecture against `config` and every array's name, shape and dtype
    (arrays: flat names -> anything with .shape and .dtype).
    -> (the config to use, the saved TrainConfig, the params' and the
    optimizer state's shape trees). Old Muon placeholders in `arrays` are
    upgraded first (upgrade_muon_placeholders)."""
    try:
        version = meta["format_version"]
        saved_config = config_from_json(RunModelConfig, meta["model_config"])
        saved_tc = config_from_json(RunTrainConfig, meta["train_config"])
    except Exception as err:  # missing keys, wrong types: the metadata is not ours
        raise unreadable_checkpoint(path, err) from err
    if version not in (1, CHECKPOINT_VERSION):
        raise CheckpointError(f"{path} has checkpoint format {version}; this llama_jax reads "
                              f"format {CHECKPOINT_VERSION}")
    problems = []
    if config is not None:
        for field in ARCHITECTURE_FIELDS:
            a, b = getattr(saved_config, field), getattr(config, field)
            if a != b:
                problems.append(f"{field}: {a} in the checkpoint, {b} requested")
    use = config or saved_config
    template = (jax.eval_shape(lambda: lora_init(jax.random.PRNGKey(0), use, saved_tc))
                if saved_tc.lora_rank else param_shapes(use))
    opt_template = jax.eval_shape(OPTIMIZERS[saved_tc.optimizer].init, template)
    upgrade_muon_placeholders(arrays, opt_template)
    problems += _tree_mismatches(template, arrays, "params/")
    problems += _tree_mismatches(opt_template, arrays, "opt/")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match this model:\n  - "
                              + "\n  - ".join(problems)
                              + "\nuse the flags it was trained with, or another --out-dir")
    return use, saved_tc, template, opt_template
