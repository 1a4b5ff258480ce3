"""The full training run behind python llama_jax.py: train(), resume, signals, time budgets."""

import contextlib
import dataclasses
import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from llama_jax import (DEFAULT_DATA, InputError, count_params, fixed_windows, learning_rate,
    progress_line, run_keys)
from llamatool.settings import RunModelConfig, RunTrainConfig, lr_schedule, run_configs
from llamatool.health import health_record, logged_entropy, save_health_plot, start_metrics
from llamatool.speed import evaluate_run
from llamatool.token_files import ChatWindows, host_batch, load_training_data
from llamatool.lora import merged_weights
from llamatool.devices import (batch_sharding, check_batch_split, describe_batch, make_mesh, place,
    place_state, replicated, sharded_optimizer_init)
from llamatool.step import run_step
from llamatool.plan import check_plan_fits, describe_plan, memory_plan
from llamatool.hosts import any_process, from_process_0
from llamatool.checkpoints import run_files
from llamatool.checkpoint_formats import (check_format_installed, checkpoint_format,
                                          checkpoint_names, checkpoint_writer, load_checkpoint,
                                          saved_checkpoint)
from llamatool.handover import finish_handover, hand_over, staging_dir
from llamatool.fine_tuning import (base_record, check_same_base, check_source_tokenizer,
    describe_fine_tuning, frozen_base, initial_weights, tree_sha256)
from llamatool.chat_data import load_chats


def save_loss_plot(history, path):
    """Train (per step, smoothed) and validation loss against step, as a PNG.
    Uses matplotlib's Figure directly: no pyplot, no GUI backend needed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    if history["train"]:
        steps, losses = np.array(history["train"], dtype=np.float64).T
        window = max(1, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, lw=0.8)
        ax.plot(steps[window - 1:], smooth, color="tab:blue", label="train (per step)")
    if history["eval"]:
        steps, train_eval, val_eval = np.array(history["eval"], dtype=np.float64).T
        ax.plot(steps, train_eval, "o-", color="tab:green", label="train (fixed windows)")
        ax.plot(steps, val_eval, "o-", color="tab:red", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = Path(path).with_name(Path(path).name + ".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def stop_requests(log):
    """While training: Ctrl-C (SIGINT) or a polite kill (SIGTERM, as SLURM sends
    before preemption) only appends to the yielded list, which the loop reads
    between steps. Raising inside run_step instead could leave params
    pointing at buffers already donated to the step. A second Ctrl-C aborts
    at once. The previous handlers come back on exit."""
    requests = []

    def request_stop(signum, frame):
        if requests:
            raise KeyboardInterrupt
        requests.append(signum)
        log("stopping after this step (press Ctrl-C again to abort without saving)")

    handlers = {}
    if threading.current_thread() is threading.main_thread():  # signals reach only it
        handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requests
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def read_losses(pending, history):
    """Moves the losses of dispatched steps, [(step, loss, health) on the
    device], into history["train"] as [step + 1, float] and returns their
    health dicts (on the host). Reading a loss waits for its step, so this
    runs only when a line is printed, and the device is never idle waiting for
    Python. Raises FloatingPointError(step) at a non-finite loss."""
    fetched = jax.device_get(pending)
    pending.clear()
    for step, value, _ in fetched:
        if not np.isfinite(value):
            raise FloatingPointError(step)
        history["train"].append([step + 1, float(value)])
    return [health for _, _, health in fetched]


def steps_within_budget(tc, step, seconds_left, per_step, eval_seconds):
    """How many steps in total fit a wall-clock budget: the steps already done,
    plus as many more as the time left allows at the measured seconds per step,
    an evaluation's cost counted every tc.eval_every steps and 5% kept in hand.
    Never more than tc.steps: a budget only shortens a run."""
    per_step_with_evals = per_step + eval_seconds / tc.eval_every
    more = int(0.95 * seconds_left / per_step_with_evals)
    return max(step + 1, min(tc.steps, step + more))


def fit_schedule_to_budget(tc, done, seconds_left, per_step, eval_seconds, budget, log):
    """-> tc with fewer steps if the rest of the run would overrun the budget,
    so that the cosine ends inside it (the warmup is kept, or cut to a fifth
    of the run if it is longer)."""
    fit = steps_within_budget(tc, done, seconds_left, per_step, eval_seconds)
    if fit >= tc.steps:
        return tc
    log(f"time budget {budget:g} min: at {per_step * 1e3:.0f} ms/step and {eval_seconds:.1f}s "
        f"per evaluation, {fit} of {tc.steps} steps fit; the schedule now ends at step {fit}")
    return dataclasses.replace(tc, steps=fit, warmup_steps=min(tc.warmup_steps,
                                                               max(done, fit // 5)))


def keep_schedule(tc, saved, log):
    """On --resume: the learning-rate schedule stays the one the run started
    with (saved, the checkpoint's TrainConfig), whatever --steps says now.
    Stretching the cosine to a new --steps would send the learning rate back
    up mid-run (600 -> 1000 steps: from 1.5e-4 to 1.2e-3 at step 600); steps
    past the schedule's end run at min_lr instead, and a smaller --steps just
    stops early. -> tc with schedule_steps set."""
    schedule = saved.schedule_steps or saved.steps
    if tc.steps > schedule:
        log(f"--steps {tc.steps} goes past the {schedule}-step schedule of the run being "
            f"resumed: steps {schedule + 1} to {tc.steps} continue at the floor, lr "
            f"{tc.min_lr:.2e} (the cosine is kept, not stretched)")
    elif tc.steps < schedule:
        log(f"--steps {tc.steps} stops before the end of the run's {schedule}-step schedule")
    return dataclasses.replace(tc, schedule_steps=schedule)


def start_or_resume(config, tc, out_dir, resume, log, init=None, mesh=None):
    """A fresh run's state, or the state saved in out_dir for --resume
    (saved_checkpoint: its ckpt.npz or ckpt.orbax).
    init: the pretrained model a fine-tuning run starts from (llamatool/sources.py).
    mesh: where the weights and optimizer state live, each split by
    state_shardings (llamatool/devices.py; default: every device, pure data parallel).
    A checkpoint loads onto any mesh, whatever the devices that wrote it.
    -> (params, opt_state, history, seed_key, tc): the seed key (saved in the
    checkpoint) gives the run's key streams; a resumed tc keeps its schedule."""
    mesh = mesh or make_mesh()
    ckpt_path = saved_checkpoint(out_dir)
    if not resume:
        seed_key = jax.random.PRNGKey(tc.seed)
        params = initial_weights(run_keys(seed_key)["init"], config, tc, init, mesh)
        return (params, sharded_optimizer_init(params, mesh, tc), {"train": [], "eval": []},
                seed_key, tc)
    if ckpt_path is None or not ckpt_path.exists():
        raise InputError(f"--resume: no checkpoint in {out_dir} ({checkpoint_names()}); train "
                         "without --resume first, or point --out-dir at the run to continue")
    ckpt = load_checkpoint(ckpt_path, config, mesh)
    if ckpt.note:
        log(ckpt.note)
    check_same_base(ckpt, init, ckpt_path)
    if ckpt.train_config.optimizer != tc.optimizer:
        raise InputError(f"--optimizer {tc.optimizer}: the run in {ckpt_path} trains with "
                         f"{ckpt.train_config.optimizer}, whose state it holds; resume it "
                         f"with --optimizer {ckpt.train_config.optimizer}")
    log(f"resumed from {ckpt_path} at step {int(ckpt.opt_state['step'])}")
    if ckpt.format_version == 1:
        log("(a format-1 checkpoint: its key predates run_keys, so the resumed steps draw "
            "other batches than the original run would have)")
    params, opt_state = ckpt.params, ckpt.opt_state
    if not ckpt.placed:  # Orbax reads each shard in place; .npz arrays are on the host
        params, opt_state = place_state(mesh, (params, opt_state))
    return (params, opt_state, ckpt.history, ckpt.key,
            keep_schedule(tc, ckpt.train_config, log))


# train() is the loop behind `python llama_jax.py`. It is Part I's train_loop
# grown for real runs, in pieces: start_run gathers the state (checkpoint or
# fresh weights, data, metrics), run_steps is the loop, log_progress and
# evaluate_and_save are what it does every few steps, and train joins them
# inside stop_requests. The state every piece shares is one Run, `run`.


@dataclass
class RunState:
    """What changes as a run trains: the trained weights (params: the whole
    model's, or with LoRA the adapters), the optimizer's state (opt_state,
    with the step count), the training config (tc: a time budget shortens
    its schedule once), where its files go (out_dir: the run's --out-dir, or
    a fresh run's staging folder until its first checkpoint is complete,
    llamatool/handover.py) and what saves its checkpoints there (writer)."""
    params: dict
    opt_state: dict
    tc: RunTrainConfig
    out_dir: Path
    writer: object


@dataclass(frozen=True)
class Run:
    """A training run between its steps (start_run builds it; run_steps,
    evaluate_and_save and save_run use it). The lists and dicts grow in
    place; what is replaced as it trains is in state.
      config      the model's RunModelConfig
      mesh        the devices it trains on (llamatool/devices.py)
      log         prints a line (a no-op on processes other than 0)
      init        the pretrained model it fine-tunes (load_source), or None
      frozen      with LoRA, the frozen base weights; else None
      train_data  training tokens (an array, a TokenFile or ChatWindows)
      on_device   the training tokens on every device, or None when batches
                  are read on the host (token files, chat data)
      rows        the shardings of a batch's inputs and targets
      eval_sets   {"train": [...], "val": [...]}: fixed evaluation batches
      history     {"train": [[step, loss]], "eval": [[step, train, val]]}
      seed_key    the run's key; keys: the streams drawn from it (run_keys)
      records     the metrics.jsonl records so far
      pending     (step, loss, health) of steps dispatched but not yet read
      final_dir   its --out-dir; state.out_dir is where it writes now (a staging
                  folder until a fresh run's first checkpoint: llamatool/handover.py)
      question    chat data: the held-out question the final sample answers
      state       RunState: params, opt_state, tc"""
    config: RunModelConfig
    mesh: object
    log: object
    init: object  # a Model, or None
    frozen: dict | None
    train_data: object
    on_device: object
    rows: tuple
    eval_sets: dict
    history: dict
    seed_key: object
    keys: object
    records: list
    pending: list
    final_dir: Path
    question: object
    state: RunState


def check_out_dir(out_dir, init, resume):
    """Refuses an --out-dir that is a file or inside one (checked before any
    work: mkdir would fail only after the data is loaded), and a fresh run's
    --out-dir that holds the model it starts from, which it would replace."""
    for folder in (out_dir, *out_dir.parents):
        if folder.exists() and not folder.is_dir():
            raise InputError(f"--out-dir {out_dir}: {folder} is a file, not a folder; choose "
                             "another --out-dir")
    source = Path(init.source).resolve() if init is not None else None
    if source is not None and not resume and out_dir.resolve() in (source, *source.parents):
        raise InputError(f"--init-from {init.source} is in --out-dir {out_dir}, whose earlier "
                         "run this fresh run replaces: choose another --out-dir")


def start_files(out_dir, resume, step, log):
    """The folder a run writes into (out_dir, or a fresh run's staging folder
    while an earlier run's files are there: llamatool/handover.py) and the
    metrics records kept (start_metrics). -> (folder, records)."""
    if jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    run_dir = staging_dir(out_dir, resume)
    if run_dir != out_dir:
        log(f"{out_dir} holds an earlier run's files: they stay until this run's first "
            f"checkpoint is complete (in {run_dir} until then), which then takes their place")
    return run_dir, start_metrics(run_files(run_dir).metrics, resume, step, log)


def start_run(config, tc, data_path, out_dir, resume, log, init, mesh):
    """Checks and loads everything a run needs before its first step. -> Run."""
    if tc.seq_len > config.max_seq_len:
        raise InputError(f"--seq-len {tc.seq_len} is longer than the model's context "
                         f"(max_seq_len {config.max_seq_len}): lower --seq-len")
    config, tc = run_configs(config, tc)
    out_dir = Path(out_dir)
    check_out_dir(out_dir, init, resume)
    mesh = mesh or make_mesh()
    if jax.process_index() != 0:
        log = lambda *args, **kwargs: None  # noqa: E731 (process 0 speaks for all)
    check_format_installed(checkpoint_format(tc, config)[0])  # before anything is touched
    finish_handover(out_dir, log)  # one a crash cut short; before a resume reads the folder
    check_batch_split(tc, mesh)
    if init is not None:
        check_source_tokenizer(init, config)
        init = init._replace(sha256=tree_sha256(init.params))
    # Will it fit? From shapes alone, before any data is read or code compiled.
    plan = memory_plan(config, tc, mesh)
    check_plan_fits(plan, config, tc, mesh)
    frozen = frozen_base(init, config, tc)  # LoRA's fixed weights, else None
    if frozen is not None:
        frozen = place_state(mesh, frozen)
    question = None  # chat data: the held-out question the final sample answers
    if str(data_path).endswith(".jsonl"):
        train_data, val_data, data_note, question = load_chats(data_path, tc.seq_len, init, log)
    else:
        train_data, val_data, data_note = load_training_data(data_path, tc.seq_len,
                                                             init and init.tokenizer)
    params, opt_state, history, seed_key, tc = start_or_resume(config, tc, out_dir, resume, log,
                                                               init, mesh)
    run_dir, records = start_files(out_dir, resume, int(opt_state["step"]), log)
    rows = (batch_sharding(mesh),) * 2
    eval_sets = {name: [place(b, rows) for b in evaluation_batches(d, tc, name)]
                 for name, d in (("train", train_data), ("val", val_data))}
    log(f"model: {count_params(frozen or params) / 1e6:.2f}M parameters ({config.dim} wide, "
        f"{config.n_layers} layers, {config.n_heads} heads, {config.n_kv_heads} kv heads), "
        f"{config.compute_dtype} compute{', --remat' if config.remat else ''}")
    log(f"{describe_batch(tc, mesh)}; {describe_plan(plan)}")
    if init is not None:
        log(describe_fine_tuning(init, params, frozen, tc))
    if question is None:
        log(f"data: {len(train_data):,} training and {len(val_data):,} validation tokens from "
            f"{data_path} ({data_note})")
    else:
        log(f"data: {data_path}: {data_note}; the loss counts the replies' tokens only")
    # A text file's tokens live on every device and each step draws its batch
    # there; a token file's batches are read on the host, one step at a time,
    # and each device receives its rows.
    on_device = replicated(mesh, train_data) if isinstance(train_data, np.ndarray) else None
    writer = checkpoint_writer(run_dir, tc, config, log)  # last: train() closes it
    return Run(config=config, mesh=mesh, log=log, init=init, frozen=frozen,
               train_data=train_data, on_device=on_device, rows=rows, eval_sets=eval_sets,
               history=history, seed_key=seed_key, keys=replicated(mesh, run_keys(seed_key)),
               records=records, pending=[], final_dir=out_dir, question=question,
               state=RunState(params, opt_state, tc, run_dir, writer))


def evaluation_batches(data, tc, split):
    """The fixed evaluation batches of one split: Part I's fixed_windows of a
    text's tokens, or for chat data (ChatWindows) every held-out conversation,
    and the first tc.eval_batches batches of the training ones."""
    if isinstance(data, ChatWindows):
        batches = data.batches(tc.batch_size)
        return batches if split == "val" else batches[:tc.eval_batches]
    return fixed_windows(data, tc.eval_batches, tc.batch_size, tc.seq_len)


def batch_for(run, step):
    """What run_step draws step `step`'s batch from: the tokens on the device,
    or the batch read from a token file and placed on the mesh."""
    if run.on_device is not None:
        return run.on_device
    tc = run.state.tc
    return place(host_batch(run.train_data, run.keys, step, tc.batch_size, tc.seq_len),
                 run.rows)


def run_weights(run):
    """What the model runs on: params, or with LoRA the base plus the adapters."""
    if run.frozen is None:
        return run.state.params
    return merged_weights(run.frozen, run.state.params, run.state.tc)


def write_record(run, record):
    """Keeps a metrics record and appends it to out_dir/metrics.jsonl."""
    run.records.append(record)
    if jax.process_index() == 0:
        with open(run_files(run.state.out_dir).metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


@contextlib.contextmanager
def closing_writer(run):
    """Closes the run's checkpoint writer at the end, however the run ends:
    Orbax waits there for the save in flight, and a failed background write
    gets save_run's message."""
    try:
        yield
    finally:
        try:
            run.state.writer.close()
        except OSError as err:
            raise InputError(f"could not write the run's checkpoint in {run.state.out_dir} ({err}); "
                             "the last complete one there is kept: free some space (or "
                             "choose another --out-dir) and continue with --resume") from err


def what_is_kept(run):
    """What a run that stops without saving leaves on disk, in words."""
    if run.state.out_dir != run.final_dir:
        return (f"this run saved no checkpoint, and the earlier run's files in {run.final_dir} "
                "are as they were")
    if not run.state.writer.path.exists():
        return "this run saved no checkpoint"
    return f"the last good checkpoint ({run.state.writer.path}) was kept"


def save_run(run):
    """The checkpoint, atomically, and the loss and health plots. A failed
    write (a full disk, a folder made read-only) ends the run with a message;
    the last complete checkpoint stays as it was."""
    files = run_files(run.state.out_dir)
    try:
        run.state.writer.save(run.state.params, run.state.opt_state, run.seed_key, run.config,
                        run.state.tc, run.history, run.init and base_record(run.init))
        if jax.process_index() == 0:
            save_loss_plot(run.history, files.loss_plot)
            save_health_plot(run.records, files.health_plot)
        if run.state.out_dir != run.final_dir:  # a fresh run's first checkpoint: hand over
            run.state.writer.close()  # Orbax: the save complete on disk
            hand_over(run.state.out_dir, run.final_dir)
            run.state.out_dir = run.final_dir
            run.state.writer = checkpoint_writer(run.final_dir, run.state.tc, run.config)
            run.log(f"this run's first checkpoint is complete: its files replace the earlier "
                    f"run's in {run.final_dir}")
    except OSError as err:
        raise InputError(f"could not write the run's files in {run.state.out_dir} "
                         f"({err.strerror or err}); the last complete checkpoint there is "
                         "kept: free some space (or choose another --out-dir) and continue "
                         "with --resume") from err


def evaluate_splits(run):
    """Part I's evaluation on the fixed windows of both splits: (train, val)."""
    weights = run_weights(run)
    return tuple(evaluate_run(weights, run.config, run.eval_sets[s]) for s in ("train", "val"))


def evaluate_and_save(run, step):
    """evaluate_splits, logged, recorded and checkpointed. -> the seconds
    the saving took."""
    train_loss, val_loss = evaluate_splits(run)
    run.history["eval"].append([step, train_loss, val_loss])
    write_record(run, {"kind": "eval", "step": step, "train_loss": train_loss,
                       "val_loss": val_loss})
    run.log(f"eval  step {step:5d} | train {train_loss:.4f} | val {val_loss:.4f}")
    t0 = time.perf_counter()
    save_run(run)
    return time.perf_counter() - t0


def log_progress(run, done, since):
    """Reads the losses of the steps dispatched since the last line (waiting
    for them), records step `done`'s metrics and prints Part I's progress
    line with the gradient norm and the steps clipped since the last line.
    since: (clock, step) of the last line. The clock is read after the wait,
    so the speed is that of finished steps, not of their dispatch (which
    returns at once). -> that clock reading, for the next line."""
    tc = run.state.tc
    healths = read_losses(run.pending, run.history)
    now = time.perf_counter()
    seconds_per_step = (now - since[0]) / (done - since[1]) if done > since[1] else None
    # The attention entropy: a forward pass of its own, outside the timed
    # window (the next one starts after it; health.py says why).
    entropy = (logged_entropy(run_weights(run), batch_for(run, done - 1), run.keys, done - 1,
                              run.config, tc) if tc.health else None)
    record = health_record(done, run.history["train"][-1][1],
                           float(learning_rate(done - 1, lr_schedule(tc))), seconds_per_step,
                           tc.batch_size * tc.seq_len, healths, entropy)
    write_record(run, record)
    if seconds_per_step is None:  # the step that compiled: no speed to report
        return time.perf_counter()
    line = progress_line(done, tc, record["loss"], record["lr"], seconds_per_step)
    if "grad_norm" in record:
        line += f" | grad {record['grad_norm']:.2f}"
        if record["clipped_steps"]:
            line += f" ({record['clipped_steps']}/{record['steps']} clipped)"
    run.log(line)
    return time.perf_counter()


def run_steps(run, stop, time_budget):
    """The loop: steps until tc.steps, the time budget or a stop request
    (raised as KeyboardInterrupt); a progress line every tc.log_every steps,
    evaluate_and_save every tc.eval_every and at the end. With a budget, after
    10 timed steps and one timed evaluation, the schedule is fitted to it."""
    log = run.log
    start_step = step = int(run.state.opt_state["step"])
    t_start = time.perf_counter()
    deadline = None if time_budget is None else t_start + 60.0 * time_budget
    while step < run.state.tc.steps:
        tc = run.state.tc
        run.state.params, run.state.opt_state, loss, health = run_step(
            run.state.params, run.state.opt_state, batch_for(run, step), run.keys, run.config,
            tc, run.frozen, run.mesh)
        run.pending.append((step, loss, health))
        done = step + 1
        if step == start_step:  # the first call compiled the step: time it apart
            loss.block_until_ready()
            t_first = t_last = time.perf_counter()
            step_last = done
            log(f"compiled and ran the first step in {t_first - t_start:.1f}s")
        calibrate = deadline is not None and done == start_step + 11 and done < tc.steps
        # With several processes, all must take the same branches at the same step,
        # agreed by a collective of their own; the step's collectives must finish
        # first, or the two could interleave differently on different processes.
        if jax.process_count() > 1:
            loss.block_until_ready()
        out_of_time = deadline is not None and any_process(time.perf_counter() > deadline)[0]
        last = done == tc.steps or out_of_time
        evaluate_now = done % tc.eval_every == 0 or last or calibrate
        if done % tc.log_every == 0 or evaluate_now:
            now = log_progress(run, done, (t_last, step_last))
            t_last, step_last = now, done
        if evaluate_now:
            if out_of_time and done < tc.steps:
                log(f"time budget of {time_budget:g} min reached at step {done}: "
                    "evaluating and saving")
            save_seconds = evaluate_and_save(run, done)
            if calibrate:
                # That evaluation compiled its programs (on a GPU, most of its
                # time): a second, compiled pass is what each later one costs.
                t0 = time.perf_counter()
                evaluate_splits(run)
                eval_seconds = time.perf_counter() - t0 + save_seconds
                # A new schedule recompiles the step: count one more compile.
                tc = fit_schedule_to_budget(
                    tc, done, deadline - time.perf_counter() - (t_first - t_start),
                    (now - t_first) / (done - start_step - 1), eval_seconds, time_budget, log)
                run.state.tc = dataclasses.replace(tc, steps=from_process_0(tc.steps),
                                                   warmup_steps=from_process_0(tc.warmup_steps))
            t_last, step_last = time.perf_counter(), done  # evaluation time is not training speed
        if any_process(bool(stop))[0]:
            raise KeyboardInterrupt
        step = done
        if out_of_time:
            break
    if start_step >= run.state.tc.steps:
        log(f"nothing to do: the checkpoint is at step {start_step} and --steps is "
            f"{run.state.tc.steps}")


def train(config, tc, data_path=DEFAULT_DATA, out_dir="out", resume=False, log=print,
          time_budget=None, init=None, mesh=None):
    """Trains a model and returns {"params", "opt_state", "history", "stopped",
    "weights", "question", "checkpoint"} (weights: the model's, which are
    params except with LoRA; checkpoint: the path of its checkpoint).
    Writes a checkpoint (out_dir/ckpt.npz, or the ckpt.orbax folder with
    --checkpoint orbax; llamatool/checkpoints.py) and out_dir/loss.png at every evaluation
    and at the end. With resume=True, continues from that checkpoint; it
    must have been written with the same architecture.
    time_budget (minutes of wall clock, compile included) shortens the run to
    fit: after 10 timed steps and one timed evaluation, tc.steps is lowered so
    that the cosine schedule ends inside the budget (the step recompiles once
    for the new schedule), and a run that still reaches the budget stops there
    cleanly, evaluates and checkpoints.
    init: fine-tune this pretrained model (load_source, llamatool/sources.py) instead of
    starting from random weights; its tokenizer reads the data, and it is
    evaluated before the first step (step 0 of the history). A .jsonl
    data_path holds conversations (load_chats, llamatool/chat_data.py), and "question"
    in the result is the first held-out one's question (else None).
    mesh: the devices to train on (make_mesh, llamatool/devices.py; default: all of
    them, data parallel). With several processes, every one calls train;
    only process 0 logs and writes files, except Orbax's checkpoint, where
    each process writes its own shards."""
    run = start_run(config, tc, data_path, out_dir, resume, log, init, mesh)
    stopped, ckpt_path = None, run.final_dir / run.state.writer.path.name
    with stop_requests(run.log) as stop, closing_writer(run):
        try:
            if init is not None and not resume:  # the pretrained model's own losses: step 0
                evaluate_and_save(run, 0)
            run_steps(run, stop, time_budget)
        except FloatingPointError as err:
            run.log(f"stopped: the loss became non-finite at step {int(err.args[0]) + 1}; "
                    f"{what_is_kept(run)}. Lower --lr or check the data.")
            stopped = "non-finite"
        except KeyboardInterrupt:
            stopped = "interrupted"
            state = (run.state.params, run.state.opt_state)
            if any(x.is_deleted() for x in jax.tree_util.tree_leaves(state)):
                run.log(f"aborted inside a step: {what_is_kept(run)}")
            else:
                run.history["train"] += [[s + 1, float(v)]
                                         for s, v, _ in jax.device_get(run.pending)]
                run.log(f"interrupted: saving a checkpoint at step "
                        f"{int(run.state.opt_state['step'])} to {ckpt_path}; continue with "
                        "--resume")
                save_run(run)
    return {"params": run.state.params, "opt_state": run.state.opt_state, "history": run.history,
            "stopped": stopped, "weights": None if stopped == "interrupted" else run_weights(run),
            "question": run.question, "checkpoint": ckpt_path}
