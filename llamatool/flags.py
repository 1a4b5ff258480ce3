"""Every command-line flag but the modes' own, in one table: FLAGS.

A flag that sets a config field names it (field=), and takes its type and
choices from there: argparse's default is None, so a flag left out keeps the
preset's value (presets.py). What each mode reads (cli.MODES) is a union of the
roles written here (reads=), and the config overrides (configs.resolve_configs)
are the field rows: nothing else lists flags. The modes' own flags (--sample,
--eval, ...) are cli.MODES' rows.
"""

import argparse
import dataclasses
import re
from dataclasses import dataclass, field

from llamatool.settings import RunModelConfig, RunTrainConfig
from llamatool.muon import OPTIMIZERS
from llamatool.hosts import COORDINATOR_TIMEOUT_S
from llamatool.checkpoint_formats import CHECKPOINT_CHOICES, FORMATS
from llamatool.gguf_file import GGUF_TYPES
from llamatool.presets import PRESETS, preset_help

PROMPT_DEFAULT = "\n"
MODEL_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(RunModelConfig))
TRAIN_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(RunTrainConfig))
FIELD_TYPES = {f.name: str(f.type) for f in dataclasses.fields(RunModelConfig)
               + dataclasses.fields(RunTrainConfig)}


@dataclass(frozen=True)
class Flag:
    """One row of FLAGS. option: "--dim"; group: its --help heading (GROUPS);
    help: what it does; field: the RunModelConfig or RunTrainConfig field it
    sets, or None; presets: append each preset's value of the field to the
    help; reads: roles beyond the field's own ("model" or "training"), which
    decide which modes read it (cli.MODES); kwargs: argparse's settings beyond
    those the field gives (type, default None)."""
    option: str
    group: str
    help: str
    field: str | None = None
    presets: bool = False
    reads: frozenset = frozenset()
    kwargs: dict = dataclasses.field(default_factory=dict)

    @property
    def dest(self):
        return self.kwargs.get("dest") or self.option[2:].replace("-", "_")

    @property
    def default(self):
        return self.kwargs.get("default", False if self.kwargs.get("action") == "store_true"
                               else None)

    @property
    def roles(self):
        own = ({"model"} if self.field in MODEL_FIELD_NAMES else
               {"training"} if self.field in TRAIN_FIELD_NAMES else set())
        return frozenset(own) | self.reads

    def argparse_settings(self):
        """add_argument's keywords: the field's type (a bool field is --x and
        --no-x), default None, the help with the presets' values."""
        settings = dict(self.kwargs)
        if self.field is not None:
            kind = FIELD_TYPES[self.field]
            if "bool" in kind:
                settings.setdefault("action", argparse.BooleanOptionalAction)
                settings.setdefault("default", None)
            elif "choices" not in settings:
                settings.setdefault("type", int if "int" in kind else
                                    float if "float" in kind else str)
        text = f"{self.help} ({preset_help(self.field)})" if self.presets else self.help
        return {**settings, "help": text}


def rows(group, *flags):
    return tuple(dataclasses.replace(f, group=group) for f in flags)


def flag(option, help, **settings):
    """A row; its group is set by rows()."""
    keys = {"field", "presets", "reads"}
    return Flag(option, "", help, **{k: v for k, v in settings.items() if k in keys},
                kwargs={k: v for k, v in settings.items() if k not in keys})


GROUPS = ("what to do", "files", "fine-tuning", "model (defaults from the preset)",
          "training (defaults from the preset)", "many devices and hosts (docs/scaling.md)",
          "sampling")

FLAGS = rows(
    "what to do",
    flag("--gguf-type", "with --export-gguf: how matrices are stored: f32, f16 (default) or "
         "q8_0 (llama.cpp's 8-bit blocks: 32 weights, one f16 scale)", choices=GGUF_TYPES),
    flag("--json", "with --bench, --eval or --tasks: print JSON instead of text",
         action="store_true"),
    flag("--limit", "with --tasks: score the first N questions of each task, in the file's "
         "order, so that anyone can score the same ones (default: all)", type=int,
         metavar="N"),
    flag("--preset", "default model and training sizes (default: gpu when JAX sees a GPU, "
         "else cpu)", choices=sorted(PRESETS), reads=frozenset({"training"})),
) + rows(
    "files",
    flag("--data", "what to train on: a UTF-8 text file (tokenized at start; its last 10%% is "
         "validation) or a data set made by --prepare (NAME.json or NAME; read from disk a "
         "batch at a time), or conversations, CHATS.jsonl, to fine-tune a chat model "
         "(--init-from) on its replies only. With --prepare: the name to write. Default: "
         "shakespeare.txt beside llama_jax.py", reads=frozenset({"training"})),
    flag("--out-dir", f"where the checkpoint ({' or '.join(f.filename for f in FORMATS)}), "
         "loss.png, health.png and metrics.jsonl go (default: out)", default="out",
         reads=frozenset({"source"})),
    flag("--checkpoint", "the checkpoint's format: npz, one file that process 0 writes after "
         "gathering the whole state; orbax, a folder of steps where each process writes its "
         "own shards in the background (needs orbax-checkpoint; docs/scaling.md). auto (the "
         "default): orbax with several processes or a state over half the host's memory, when "
         "installed; else npz", field="checkpoint", choices=CHECKPOINT_CHOICES),
    flag("--keep-checkpoints", "with --checkpoint orbax: the last N steps kept (default: 3)",
         field="keep_checkpoints"),
    flag("--resume", "continue training from --out-dir's checkpoint up to --steps, with the "
         "same batches and dropout masks as an uninterrupted run. The learning-rate schedule "
         "stays the original run's: a larger --steps runs on at --min-lr after its end",
         action="store_true", reads=frozenset({"training"})),
) + rows(
    "fine-tuning",
    flag("--init-from", "start training from a pretrained model instead of random weights: a "
         "Hugging Face folder, a GGUF file or a llama_jax run (its folder or its checkpoint). "
         "Its architecture and tokenizer are used (--data is tokenized with it; with "
         "--prepare, the data set is written with it); defaults become --lr 5e-5 (LoRA: "
         "1e-3), --min-lr lr/10, --warmup-steps 10", metavar="SOURCE",
         reads=frozenset({"training"})),
    flag("--lora-rank", "with --init-from: train only rank-R LoRA adapters on --lora-targets "
         "and keep the base frozen (default 0: train every weight)", type=int, metavar="R",
         reads=frozenset({"training"})),
    flag("--lora-alpha", "LoRA's update is scaled by alpha / R (default 16)", type=float,
         reads=frozenset({"training"})),
    flag("--lora-targets", "comma-separated matrices to adapt, among wq,wk,wv,wo (attention) "
         "and w1,w2,w3 (feed-forward) (default: wq,wk,wv,wo)", metavar="NAMES",
         reads=frozenset({"training"})),
) + rows(
    "model (defaults from the preset)",
    flag("--dim", "model width D", field="dim", presets=True),
    flag("--n-layers", "transformer blocks", field="n_layers", presets=True),
    flag("--n-heads", "query heads H", field="n_heads", presets=True),
    flag("--n-kv-heads", "key/value heads K; H must be a multiple", field="n_kv_heads",
         presets=True),
    flag("--ffn-dim", "feed-forward width F (default: Llama's rule, 8/3 * D rounded up)",
         field="ffn_dim"),
    flag("--max-seq-len", "context length and KV-cache size", field="max_seq_len", presets=True),
    flag("--dropout", "dropout rate", field="dropout_rate", presets=True),
    flag("--tie-embeddings", "share the input embedding with the output layer",
         field="tie_embeddings", presets=True),
    flag("--attention", "the training step's attention: fused, jax.nn.dot_product_attention "
         "(cuDNN's kernel on a GPU), or explicit, Part I's attend; decoding always runs attend",
         field="attention", presets=True, choices=["fused", "explicit"]),
    flag("--loss", "how the cross-entropy is computed: plain holds the [B*T, V] logits; "
         "blockwise takes --loss-block tokens at a time and never does (for large "
         "vocabularies and batches); auto: plain where its temporaries (about 12 bytes per "
         "token and vocabulary entry) fit an eighth of the device's memory, else blockwise; "
         "and blockwise for float32 compute on a CPU, where it is faster (default auto; "
         "--plan shows the choice)", field="loss_impl",
         dest="loss_impl", choices=["auto", "plain", "blockwise"]),
    flag("--loss-block", "tokens per block of the blockwise loss (default: the largest power "
         "of two whose temporaries fit an eighth of the device's memory)", field="loss_block"),
    flag("--dtype", "matmul dtype; weights and optimizer stay float32. auto: bfloat16 on a "
         "GPU, or on a CPU where it is faster (AMD with avx512_bf16, Intel with AMX), else "
         "float32 (as on an Intel CPU with avx512_bf16 and no AMX); --resume keeps the run's "
         "dtype", field="compute_dtype", presets=True, choices=["auto", "float32", "bfloat16"],
         reads=frozenset({"source"})),
) + rows(
    "training (defaults from the preset)",
    flag("--steps", "optimizer steps in total", field="steps", presets=True),
    flag("--batch-size", "sequences per step", field="batch_size", presets=True),
    flag("--seq-len", "tokens per sequence", field="seq_len", presets=True),
    flag("--lr", "peak learning rate", field="lr", presets=True),
    flag("--min-lr", "cosine floor", field="min_lr", presets=True),
    flag("--warmup-steps", "linear warmup steps", field="warmup_steps", presets=True),
    flag("--weight-decay", "decoupled weight decay", field="weight_decay", presets=True),
    flag("--optimizer", "adamw, or muon: Muon (momentum orthogonalised by Newton-Schulz) for "
         "the blocks' matrices and AdamW for the embedding, output and norms "
         "(docs/training.md)", field="optimizer", presets=True, choices=list(OPTIMIZERS)),
    flag("--adam-lr", "with --optimizer muon: the AdamW-trained weights' peak learning rate "
         f"(default: the gpu preset's {PRESETS['gpu'][1]['adam_lr']:g}, else --lr)",
         field="adam_lr"),
    flag("--eval-every", "evaluate, plot and checkpoint every N steps", field="eval_every",
         presets=True),
    flag("--log-every", "a progress line every N steps", field="log_every", presets=True),
    flag("--health", "per-block gradient norms, update/weight ratios, residual RMS and "
         "attention entropy from each step, to OUT/metrics.jsonl and OUT/health.png (default "
         "on; tools/bench_health.py measures their cost)", field="health"),
    flag("--seed", "seeds the init, batch and dropout streams", field="seed", presets=True,
         reads=frozenset({"sampling"})),
    flag("--time-budget", "train for at most this much wall clock (compile included): after "
         "10 timed steps --steps is lowered so that the learning-rate schedule ends inside the "
         "budget, and the run stops cleanly at the budget (evaluate, checkpoint, sample)",
         type=float, metavar="MINUTES", reads=frozenset({"training"})),
) + rows(
    "many devices and hosts (docs/scaling.md)",
    flag("--fsdp", "devices per FSDP group: weights and AdamW moments are split over N devices "
         "and gathered when used (1, the default: pure data parallel, every device holds them "
         "all; all: split over every device). The batch is always split over every device",
         default="1", metavar="N", reads=frozenset({"training"})),
    flag("--grad-accum", "split each optimizer step's batch into N micro-batches run one after "
         "the other: the same update, less activation memory (default 1)", field="grad_accum",
         metavar="N"),
    flag("--remat", "recompute each block's activations in the backward pass instead of "
         "keeping them (jax.checkpoint): less memory, about a third more compute",
         field="remat"),
    flag("--coordinator", "several processes (hosts): process 0's address; give the same "
         "command on every process with its own --process-id (under SLURM's srun the three "
         "flags can be left out)", metavar="HOST:PORT", reads=frozenset({"training"})),
    flag("--num-processes", "processes in the run", type=int, metavar="N",
         reads=frozenset({"training"})),
    flag("--process-id", "this process's number, 0 to N-1; 0 prints and writes the files",
         type=int, metavar="I", reads=frozenset({"training"})),
    flag("--coordinator-timeout", "how long to wait for the coordinator and for every process "
         "to join; a process silent this long is declared lost and the others stop, naming it "
         f"(default {COORDINATOR_TIMEOUT_S})", type=float, default=COORDINATOR_TIMEOUT_S,
         metavar="SECONDS", reads=frozenset({"training"})),
) + rows(
    "sampling",
    flag("--prompt", "text to continue (default: a newline, i.e. a fresh speech)",
         default=PROMPT_DEFAULT, reads=frozenset({"sampling"})),
    flag("--prompt-ids", "comma-separated token ids instead of --prompt",
         reads=frozenset({"sampling"})),
    flag("--max-new-tokens", "tokens to generate (default: 200); with --bench, 0 skips the "
         "decoding benchmark", type=int, default=200, reads=frozenset({"sampling"})),
    flag("--temperature", "0 is greedy; higher is more random (default: 0.8)", type=float,
         default=0.8, reads=frozenset({"sampling"})),
    flag("--top-k", "sample among the k most likely tokens; 0 turns it off (default: 50)",
         type=int, default=50, reads=frozenset({"sampling"})),
    flag("--top-p", "nucleus sampling: the smallest set reaching this probability (default: "
         "off)", type=float, reads=frozenset({"sampling"})),
    flag("--hf-checkpoint", "with --sample, --eval, --chat, --bench or an export: a Hugging "
         "Face Llama folder (config.json + safetensors)", reads=frozenset({"source"})),
    flag("--gguf", "with --sample, --eval, --chat, --bench or an export: a llama.cpp GGUF file "
         "of the llama architecture, with its own tokenizer (needs the gguf package; --dtype "
         "bfloat16 keeps the weights in bfloat16)", metavar="FILE",
         reads=frozenset({"source"})),
    flag("--tokenizer", "with --hf-checkpoint: use GPT-2's tokenizer instead of the folder's "
         "tokenizer.model", choices=["gpt2"], reads=frozenset({"source"})),
)


def read_by(role):
    """The dests of the flags with this role ("model", "training", "sampling",
    "source")."""
    return frozenset(f.dest for f in FLAGS if role in f.roles)


def field_overrides(args, fields=None):
    """The config fields the given flags set: {field: value} for each field
    row whose flag was given (not None), among `fields` (default: all)."""
    return {f.field: getattr(args, f.dest) for f in FLAGS
            if f.field and getattr(args, f.dest) is not None
            and (fields is None or f.field in fields)}


def in_flag_words(message):
    """Part I's messages name config fields ("TrainConfig.steps must be
    positive"); on the command line the field is a flag: each
    ModelConfig.NAME or TrainConfig.NAME whose field a row of FLAGS sets
    becomes that flag ("--steps must be positive")."""
    options = {f.field: f.option for f in FLAGS if f.field}
    return re.sub(r"\b(?:Model|Train)Config\.(\w+)",
                  lambda m: options.get(m.group(1), m.group(0)), message)


def add_flags(parser, groups):
    """Adds every row of FLAGS to its --help group (groups: heading -> the
    argparse group)."""
    for f in FLAGS:
        groups[f.group].add_argument(f.option, **f.argparse_settings())
