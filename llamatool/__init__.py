"""llamatool: the tool around the reference. llama_jax.py is Llama itself (Part I:
configs, layers, model, loss, AdamW, a training loop, sampling); everything the
command line adds is a module here, one concern each.

The modules, in import order: each imports llama_jax and only modules above it
(test_llama_jax.py checks this), so this list is also the reading order.
"""

from llamatool import settings           # RunModelConfig, RunTrainConfig: options beyond Part I's configs
from llamatool import health             # per-block figures from each step, metrics.jsonl, health.png
from llamatool import speed              # faster kernels and sampling, the blockwise loss, auto dtype
from llamatool import token_files        # --prepare: text tokenized once to disk, read a batch at a time
from llamatool import muon               # --optimizer muon: orthogonalised updates for the matrices
from llamatool import lora               # low-rank adapters over a frozen model
from llamatool import devices            # the mesh, FSDP shardings, placing arrays on devices
from llamatool import step               # the command line's training step (health, accumulation, mesh)
from llamatool import plan               # --plan: memory and communication per device
from llamatool import hosts              # many processes: start, watch, agree
from llamatool import checkpoints        # what checkpoint formats share: the record, the checks, the interface
from llamatool import checkpoint_npz     # the .npz checkpoint: one file, written by process 0
from llamatool import checkpoint_orbax   # the Orbax checkpoint: a folder of steps, each process its own shards
from llamatool import checkpoint_formats # the table of formats: choosing, reading, writing, --plan
from llamatool import handover           # a fresh run keeps the earlier run's files until it has a checkpoint
from llamatool import hugging_face       # Hugging Face folders: safetensors and config.json, in and out
from llamatool import bpe                # other models' tokenizers: Llama 3's, byte-level BPE
from llamatool import gguf_file          # GGUF (llama.cpp's file): read and write
from llamatool import chat               # chat templates and streaming replies
from llamatool import fine_tuning        # --init-from: the frozen base, LoRA's record, its checks
from llamatool import sources            # where a model comes from: a run, a Hugging Face folder, a GGUF file
from llamatool import chat_data          # conversations (JSONL) as training data, replies only
from llamatool import training           # train(): the full run, resume, signals, time budgets
from llamatool import evaluation         # --eval: nats per token, perplexity and bits per byte of a text
from llamatool import presets            # the cpu and gpu presets: default sizes and rates
from llamatool import flags              # every flag but the modes': one table, FLAGS
from llamatool import configs            # the run's configs from the preset and the flags
from llamatool import modes              # what each mode runs: train, sample, eval, chat, exports
from llamatool import bench              # --bench: training speed, MFU, decoding
from llamatool import tasks              # --tasks: HellaSwag, ARC, PIQA... accuracy, 0-shot, offline
from llamatool import cli                # the table of modes, the parser, main

__all__ = ["settings", "health", "speed", "token_files", "muon", "lora", "devices", "step", "plan",
           "hosts", "checkpoints", "checkpoint_npz", "checkpoint_orbax", "checkpoint_formats", "handover",
           "hugging_face", "bpe", "gguf_file", "chat",
           "fine_tuning", "sources", "chat_data", "training", "evaluation", "presets", "flags", "configs", "modes",
           "bench", "tasks", "cli"]
