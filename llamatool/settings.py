"""Settings: the reference's configs plus the options of the package's features."""

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import jax

from llama_jax import InputError, ModelConfig, TrainConfig, init_params


# Subclasses, so that every Part I function takes them where it takes a
# ModelConfig or TrainConfig, and the frozen dataclasses stay static
# arguments of jax.jit. Checkpoints store their fields, as they always have.


@dataclass(frozen=True)
class RunModelConfig(ModelConfig):
    """ModelConfig plus the speed and memory options of llamatool/speed.py."""

    # The training loss: "plain" (the logits of run_dense, then
    # masked_cross_entropy: Part I's cross_entropy with the targets of IGNORE
    # skipped), "blockwise" (blockwise_cross_entropy: never holds the [B*T, V]
    # logits), or "auto": blockwise where memory needs it (use_blockwise).
    loss_impl: str = "auto"
    loss_block: int = 0  # tokens per block of the blockwise loss; 0: by memory (loss_block_size)
    # jax.checkpoint around each block: the backward pass recomputes a block's
    # activations from its input instead of keeping them (--remat).
    remat: bool = False
    # --attention: "fused" trains with jax.nn.dot_product_attention
    # (fused_attend: cuDNN's kernel on a GPU); "explicit" with Part I's attend.
    attention: str = "fused"

    def __post_init__(self):
        super().__post_init__()
        if self.loss_impl not in ("auto", "plain", "blockwise"):
            raise InputError(f"ModelConfig.loss_impl must be 'auto', 'plain' or 'blockwise', "
                             f"got {self.loss_impl!r}")
        if self.loss_block < 0:
            raise InputError(f"--loss-block {self.loss_block}: give a positive number of tokens, "
                             "or leave it out to let memory decide")
        if self.attention not in ("fused", "explicit"):
            raise InputError(f"--attention {self.attention}: choose fused or explicit")


# The matrices LoRA can adapt, and the part of a block each belongs to.
LORA_MATRICES = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
                 "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}


@dataclass(frozen=True)
class RunTrainConfig(TrainConfig):
    """TrainConfig plus the options of the package's training: health figures
    (llamatool/health.py), LoRA (llamatool/lora.py) and gradient accumulation (llamatool/devices.py)."""

    health: bool = True  # per-layer health figures from each step (llamatool/health.py)
    # LoRA: rank 0 trains every weight; rank R > 0 trains only low-rank
    # adapters A [I, R], B [R, O] on the named matrices.
    lora_rank: int = 0
    lora_alpha: float = 16.0  # the adapters' update is scaled by lora_alpha / lora_rank
    lora_targets: tuple = ("wq", "wk", "wv", "wo")
    # Micro-batches per optimizer step (--grad-accum): the batch is split in
    # this many parts, run one after the other, and their gradients averaged.
    grad_accum: int = 1
    # The cosine's length; None means steps. A resumed run keeps the schedule
    # it started with (keep_schedule, llamatool/training.py): a longer --steps then runs
    # on at min_lr. learning_rate reads it through lr_schedule.
    schedule_steps: int | None = None
    # --optimizer: "adamw" (Part I's), or "muon" for the blocks' matrices with
    # AdamW for the rest (llamatool/muon.py), whose peak rate is then adam_lr (None:
    # lr, as Muon's update is scaled to AdamW's size).
    optimizer: str = "adamw"
    adam_lr: float | None = None
    muon_momentum: float = 0.95  # Jordan's and optax's
    # --checkpoint: "npz" (one file, gathered), "orbax" (each process writes
    # its own shards, in the background; llamatool/checkpoints.py) or "auto"
    # (checkpoint_format); with Orbax, the last keep_checkpoints steps are kept.
    checkpoint: str = "auto"
    keep_checkpoints: int = 3

    def __post_init__(self):
        super().__post_init__()
        if self.optimizer not in ("adamw", "muon"):
            raise InputError(f"--optimizer {self.optimizer}: choose adamw or muon")
        if self.optimizer == "muon" and self.lora_rank:
            raise InputError("--optimizer muon with --lora-rank: Muon orthogonalises the "
                             "update of a whole matrix, and a LoRA update is the product of "
                             "two thin factors, for which it is neither published nor tested "
                             "here; use --optimizer adamw (the default) for LoRA")
        if not 0 <= self.muon_momentum < 1:
            raise InputError(f"TrainConfig.muon_momentum must be in [0, 1), got "
                             f"{self.muon_momentum}")
        if self.adam_lr is not None and self.adam_lr <= 0:
            raise InputError(f"--adam-lr must be positive, got {self.adam_lr}")
        if self.grad_accum <= 0:
            raise InputError(f"TrainConfig.grad_accum (--grad-accum) must be positive, "
                             f"got {self.grad_accum}")
        if self.keep_checkpoints < 1:
            raise InputError(f"--keep-checkpoints must be at least 1, got "
                             f"{self.keep_checkpoints}")
        if self.lora_rank < 0 or self.lora_alpha <= 0:
            raise InputError(f"TrainConfig: need lora_rank >= 0 (--lora-rank) and lora_alpha "
                             f"> 0 (--lora-alpha), got {self.lora_rank} and {self.lora_alpha}")
        unknown = [t for t in self.lora_targets if t not in LORA_MATRICES]
        if unknown or not self.lora_targets:
            raise InputError(f"--lora-targets {','.join(self.lora_targets)}: choose among "
                             f"{','.join(LORA_MATRICES)} (the attention's wq, wk, wv, wo and "
                             "the feed-forward's w1, w2, w3)")


def lr_schedule(tc):
    """The TrainConfig whose steps are the learning-rate schedule's length:
    Part I's learning_rate ends its cosine at tc.steps, and a resumed run's
    schedule may be longer or shorter than the steps it runs now."""
    if getattr(tc, "schedule_steps", None) is None:
        return tc
    return dataclasses.replace(tc, steps=tc.schedule_steps)


def run_configs(config, tc=None):
    """Part I configs as the package's (a RunModelConfig or RunTrainConfig is returned as it is), with
    the package's defaults for the options. -> (RunModelConfig, RunTrainConfig
    or None)."""
    if not isinstance(config, RunModelConfig):
        config = RunModelConfig(**{f.name: getattr(config, f.name)
                                   for f in dataclasses.fields(config)})
    if tc is not None and not isinstance(tc, RunTrainConfig):
        tc = RunTrainConfig(**{f.name: getattr(tc, f.name) for f in dataclasses.fields(tc)})
    return config, tc


def replace_durably(tmp, path):
    """Renames the finished file tmp over path (atomic: a reader sees the old
    file or the new one), then flushes the folder to disk as well: the rename
    is an entry in the folder, and without that it can be lost to a power
    failure even though the file's bytes were flushed (POSIX fsync on a
    directory; where a folder cannot be opened, as on Windows, the rename is
    all there is)."""
    os.replace(tmp, path)
    try:
        folder = os.open(Path(path).parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def param_shapes(config):
    """init_params's tree as jax.ShapeDtypeStructs, computed without
    allocating: the template that loaders fill and check against."""
    return jax.eval_shape(lambda: init_params(jax.random.PRNGKey(0), config))


ARCHITECTURE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                       "ffn_dim", "ffn_dim_multiplier", "multiple_of", "norm_eps", "rope_theta",
                       "rope_scaling", "max_seq_len", "tie_embeddings", "vocab_multiple")
