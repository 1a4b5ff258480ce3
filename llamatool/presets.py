"""The presets: the default model and training sizes for a CPU and for a GPU.

--preset picks one (default_preset: gpu when JAX sees a GPU); every model and
training flag left out takes its value from here (configs.resolve_configs).
"""

import dataclasses

import jax

from llama_jax import TrainConfig
from llamatool.settings import RunModelConfig, RunTrainConfig


# The defaults a new user gets, chosen by measurement (docs/results.md).
# compute_dtype "auto" is decided per machine by auto_compute_dtype (llamatool/speed.py).
PRESETS = {
    # 2-core CPU: about 10 minutes. Narrow (128), so that the output layer,
    # most of the FLOPs, costs half what it does at 256 and the same minutes
    # hold 1,000 steps instead of 600 (docs/results.md). 1,000 steps of 8 x 128
    # tokens read 0.8 of the 35 plays' training text, so no dropout; small
    # batches give more optimizer steps in the time.
    # Part I's attend (attention "explicit"): the fused call was only 1% and 5%
    # faster in two runs of tools/bench_kernels.py on the AMD EPYC (bfloat16),
    # 3% in float32 (docs/speed.md), too little to run other code than the one
    # a learner reads.
    # Muon at 1.2e-2 for the blocks' matrices, AdamW at 3e-3 for the rest, and
    # weight decay 0.5: chosen on the held-out plays (docs/results.md), where
    # it scored 4.796 and 4.808 nats per token with two seeds, against
    # Part I's AdamW (lr 3e-3, weight decay 0.1) at 4.917 (AMD EPYC).
    "cpu": (dict(dim=128, n_layers=6, n_heads=4, n_kv_heads=2, max_seq_len=256,
                 dropout_rate=0.0, tie_embeddings=True, compute_dtype="auto",
                 attention="explicit"),
            dict(steps=1000, batch_size=8, seq_len=128, optimizer="muon", lr=1.2e-2,
                 adam_lr=3e-3, min_lr=1.5e-4, warmup_steps=50, weight_decay=0.5,
                 eval_every=100)),
    # One H100/H200, bfloat16 compute. Not yet tuned (docs/gpu.md), and not
    # yet measured on the 35 plays: a wider, deeper model with dropout, about
    # 5 passes over their training text (it was 20 over the eight history
    # plays that the corpus held before; 15 ms per step on an H200), and
    # cuDNN's fused attention (not yet timed against attend there).
    # Muon, not yet measured on a GPU, at 4x the AdamW rate for the matrices
    # and that rate for the rest, as the cpu preset found, so here 4 x 1e-3
    # and 1e-3, the floor a tenth of the peak. --lr is Muon's rate;
    # --optimizer adamw takes the AdamW rates (adamw_rates).
    "gpu": (dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, max_seq_len=512,
                 dropout_rate=0.2, tie_embeddings=True, compute_dtype="bfloat16",
                 vocab_multiple=128, attention="fused"),
            dict(steps=800, batch_size=32, seq_len=256, optimizer="muon", lr=4e-3,
                 adam_lr=1e-3, min_lr=4e-4, warmup_steps=100, eval_every=100)),
}


def adamw_rates(training):
    """A preset's training values for AdamW: a Muon preset's lr and min_lr
    are Muon's, and its adam_lr is the rate AdamW would take (llamatool/muon.py), so
    --optimizer adamw starts from those: lr adam_lr, the floor scaled alike,
    and Part I's weight decay (TrainConfig's, AdamW's own)."""
    if training.get("optimizer", "adamw") == "adamw":
        return training
    adam_lr = training.get("adam_lr") or training["lr"]
    ratio = adam_lr / training["lr"]
    return {**training, "optimizer": "adamw", "lr": adam_lr,
            "min_lr": training.get("min_lr", TrainConfig.min_lr) * ratio, "adam_lr": None,
            "weight_decay": TrainConfig.weight_decay}


def preset_help(field):
    """'cpu preset: 256, gpu preset: 512' for a --help text, read from PRESETS
    (a field a preset leaves out takes the config's default)."""
    defaults = {f.name: f.default for f in dataclasses.fields(RunModelConfig)}
    defaults.update({f.name: f.default for f in dataclasses.fields(RunTrainConfig)})
    return ", ".join(f"{name} preset: {({**defaults, **model, **training})[field]}"
                     for name, (model, training) in PRESETS.items())


def default_preset():
    return "gpu" if jax.default_backend() == "gpu" else "cpu"
