"""The run's configs from the flags: the preset's values, the flags given, a resumed run's own.

Also what sampling from the command line needs: the prompt, the decoding config.
"""

import dataclasses
import time

import jax
import jax.numpy as jnp

from llama_jax import ENDOFTEXT, InputError, TrainConfig, generate
from llamatool.settings import ARCHITECTURE_FIELDS, RunModelConfig, RunTrainConfig
from llamatool.speed import auto_compute_dtype, command_line_decoding
from llamatool.checkpoints import config_from_json
from llamatool.checkpoint_formats import (FORMATS, checkpoint_format, checkpoint_meta,
                                          saved_checkpoint)
from llamatool.bpe import special_token
from llamatool.chat import Sampling
from llamatool.sources import load_source
from llamatool.presets import PRESETS, adamw_rates, default_preset
from llamatool.flags import FLAGS, MODEL_FIELD_NAMES, TRAIN_FIELD_NAMES, field_overrides


def matmul_seconds(a, b, repeats=5):
    """Seconds for `repeats` products a @ b with float32 accumulation (as in
    dense), compiled and warmed up first."""
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = f(a, b)
    out.block_until_ready()
    return time.perf_counter() - t0


def decoding_config(config):
    """The config to sample with. Decoding one token at a time reads every
    weight per token, so it is bound by memory, not matmul speed; on CPU,
    XLA's bfloat16 matrix-vector products convert each weight before they
    multiply, and ran slower than float32 ones (docs/speed.md)."""
    if jax.default_backend() == "cpu":
        return dataclasses.replace(config, compute_dtype="float32")
    return config


def preset_configs(name=None, **overrides):
    """A preset (default: the one for this machine, default_preset) as
    configs, with overrides by field name (dim=64, steps=100, ...) and
    compute_dtype "auto" decided for this machine (auto_compute_dtype).
    -> (RunModelConfig, RunTrainConfig)."""
    model, training = (dict(d) for d in PRESETS[name or default_preset()])
    if overrides.get("optimizer") == "adamw":
        training = adamw_rates(training)
    model_fields = {f.name for f in dataclasses.fields(RunModelConfig)}
    unknown = set(overrides) - model_fields - {f.name for f in dataclasses.fields(RunTrainConfig)}
    if unknown:
        raise InputError(f"preset_configs: no config field named {', '.join(sorted(unknown))}")
    for field, value in overrides.items():
        (model if field in model_fields else training)[field] = value
    if "seq_len" in overrides and "max_seq_len" not in overrides:  # as --seq-len does
        model["max_seq_len"] = max(model["max_seq_len"], training["seq_len"])
    if model.get("compute_dtype") == "auto":
        model["compute_dtype"] = auto_compute_dtype()[0]
    training["min_lr"] = min(training.get("min_lr", TrainConfig.min_lr), training["lr"])
    return RunModelConfig(**model), RunTrainConfig(**training)


def resumed_meta(args):
    """With --resume, the metadata of the checkpoint the run continues from
    (checkpoint_meta), else None."""
    return checkpoint_meta(saved_checkpoint(args.out_dir)) if args.resume else None


def resolve_configs(args, saved=None, fields=None):
    """The preset's values, overridden by the flags that were given
    (preset_configs), with --dtype auto decided and said. saved: the resumed
    checkpoint's metadata where the caller has read it (resumed_meta);
    fields: the config fields the flags may set (default: all).
    -> (RunModelConfig, RunTrainConfig)."""
    preset = args.preset or default_preset()
    overrides = field_overrides(args, fields)
    saved = saved or resumed_meta(args)
    if saved and args.optimizer is None:  # a resumed run keeps the optimizer whose state it has
        overrides["optimizer"] = saved["train_config"].get("optimizer", "adamw")
    if overrides.get("compute_dtype", PRESETS[preset][0].get("compute_dtype")) == "auto":
        if saved:  # a resumed run keeps the dtype it started with
            dtype = saved["model_config"]["compute_dtype"]
            why = "the dtype of the run being resumed"
        else:
            dtype, why = auto_compute_dtype()
        print(f"--dtype auto: {dtype} matmuls ({why})", flush=True)
        overrides["compute_dtype"] = dtype
    return preset_configs(preset, **overrides)


def sampling_from(args):
    """The sampling flags as a Sampling (llamatool/chat.py)."""
    return Sampling(args.max_new_tokens, args.temperature, args.top_k or None, args.top_p)


def print_sample(params, config, tokenizer, args, key, log=print):
    """Encodes the prompt, generates, prints the decoded text."""
    if args.prompt_ids:
        try:
            prompt = [int(t) for t in args.prompt_ids.split(",")]
        except ValueError as err:
            raise InputError("--prompt-ids must be comma-separated integers") from err
    elif tokenizer is None:
        raise InputError("this checkpoint comes without a tokenizer llama_jax can read: pass "
                         "--prompt-ids 1,2,3 (and read ids back), or --tokenizer gpt2")
    else:
        prompt = tokenizer.encode_ordinary(args.prompt)
        bos = special_token(tokenizer, "<|begin_of_text|>")  # Llama 3 prompts start with it
        if bos is not None:
            prompt = [bos] + prompt
    max_new = args.max_new_tokens
    if len(prompt) + max_new > config.max_seq_len:
        if len(prompt) >= config.max_seq_len:
            raise InputError(f"the prompt is {len(prompt)} tokens; the model's context is "
                             f"{config.max_seq_len}: use a shorter --prompt")
        max_new = config.max_seq_len - len(prompt)
        log(f"(--max-new-tokens lowered to {max_new} to fit the {config.max_seq_len}-token "
            "context)")
    stop = None
    if tokenizer is not None:
        stop = special_token(tokenizer, ENDOFTEXT, "<|end_of_text|>")
    t0 = time.perf_counter()
    out = generate(params, prompt, max_new, config, key, temperature=args.temperature,
                   top_k=args.top_k or None, top_p=args.top_p, stop_token=stop,
                   **command_line_decoding())
    elapsed = time.perf_counter() - t0
    new = out[len(prompt):]
    if new and new[-1] == stop:
        new = new[:-1]
    log(f"--- sample ({len(out) - len(prompt)} tokens in {elapsed:.1f}s, compile included; "
        f"temperature {args.temperature}, top-k {args.top_k or 'off'}, "
        f"top-p {args.top_p or 'off'}) ---")
    if tokenizer is None:
        log(",".join(map(str, out)))
    else:
        log(tokenizer.decode(out[:len(prompt)] + new)
            .replace("<|begin_of_text|>", ""))


# Fine-tuning's defaults where the preset's (made for random weights) do not
# fit: a pretrained model needs far smaller steps than one trained from
# scratch, and LoRA's few, freshly initialised weights take larger ones (the
# LoRA paper used 2e-4 to 5e-4 on GPT-2 Medium and RoBERTa; a short CPU run of a
# small model takes the top of that range and more: docs/finetuning.md).
# Fine-tuning uses AdamW, whatever the preset trains with: the published
# models were trained with it, and Muon is refused for LoRA (llamatool/muon.py).
# Its weight decay is AdamW's usual 0.1 (TrainConfig's), not a Muon preset's.
FINE_TUNING = {"full": dict(lr=5e-5, min_lr=5e-6, warmup_steps=10, optimizer="adamw",
                            adam_lr=None, weight_decay=TrainConfig.weight_decay),
               "lora": dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, optimizer="adamw",
                            adam_lr=None, weight_decay=TrainConfig.weight_decay)}

def fine_tuning_configs(args, source, saved=None):
    """--init-from: the source's architecture with the run's compute settings,
    and the training flags over fine-tuning's defaults. An architecture flag
    that disagrees with the source is refused, naming it. saved: as
    resolve_configs takes it. -> (ModelConfig, TrainConfig)."""
    for field, given in field_overrides(args, ARCHITECTURE_FIELDS).items():
        theirs = source.config.ffn_width if field == "ffn_dim" else getattr(source.config, field)
        option = next(f.option for f in FLAGS if f.field == field)
        if given != theirs:
            raise InputError(f"{option} {given} disagrees with {source.source}, whose "
                             f"{field} is {theirs}: the architecture comes from --init-from, "
                             f"so leave {option} out")
    saved = saved or resumed_meta(args)
    rest = (MODEL_FIELD_NAMES | TRAIN_FIELD_NAMES) - set(ARCHITECTURE_FIELDS)
    preset, tc = resolve_configs(args, saved, rest)  # compute dtype, dropout, loss; training
    config = dataclasses.replace(source.config, compute_dtype=preset.compute_dtype,
                                 dropout_rate=preset.dropout_rate, loss_impl=preset.loss_impl,
                                 loss_block=preset.loss_block, remat=preset.remat,
                                 attention=preset.attention)
    lora = dict(lora_rank=args.lora_rank or 0, lora_alpha=args.lora_alpha or 16.0,
                lora_targets=tuple(args.lora_targets.split(",")) if args.lora_targets
                else RunTrainConfig.lora_targets)
    if saved:  # a resumed run keeps its adapters' shape; a flag may only repeat it
        saved_tc = config_from_json(RunTrainConfig, saved["train_config"])
        for name in lora:
            ours, theirs = lora[name], getattr(saved_tc, name)
            if getattr(args, name) is not None and ours != theirs:
                raise InputError(f"--{name.replace('_', '-')} {getattr(args, name)}: the run "
                                 f"being resumed has {name} {theirs}; leave the flag out")
            lora[name] = theirs
    defaults = FINE_TUNING["lora" if lora["lora_rank"] else "full"]
    if saved:  # and the optimizer whose state it holds
        defaults = {**defaults, "optimizer": saved_tc.optimizer, "adam_lr": saved_tc.adam_lr,
                    "weight_decay": saved_tc.weight_decay}
    given = {name: getattr(args, name) for name in defaults if getattr(args, name) is not None}
    tc = dataclasses.replace(tc, **{**defaults, **given}, **lora)
    return config, dataclasses.replace(tc, min_lr=min(tc.min_lr, tc.lr))


def training_configs(args):
    """The run's configs, from the flags, or from --init-from's source (a
    resumed fine-tuning run finds its base in its checkpoint).
    -> (ModelConfig, TrainConfig, the source or None)."""
    saved = resumed_meta(args)  # read once, for the three functions that need it
    source = args.init_from
    if source is None and saved:  # a fine-tuning run resumes from its own base
        source = saved.get("base") and saved["base"]["source"]
    if source:
        init = load_source(source)
        config, tc = fine_tuning_configs(args, init, saved)
    elif args.lora_rank:
        raise InputError("--lora-rank adapts a pretrained model: pass --init-from SOURCE")
    else:
        (config, tc), init = resolve_configs(args, saved), None
    chosen, why = checkpoint_format(tc, config)
    if args.keep_checkpoints is not None and not chosen.keeps_steps:  # refused, not ignored
        raise InputError(f"--keep-checkpoints applies to a format that keeps several steps "
                         f"({', '.join(f.name for f in FORMATS if f.keeps_steps)}), and this "
                         f"run writes {chosen.name} ({why}): drop it, or add --checkpoint "
                         f"{next(f.name for f in FORMATS if f.keeps_steps)}")
    if args.adam_lr is not None and tc.optimizer != "muon":  # refused, not ignored
        raise InputError("--adam-lr sets the rate of the weights Muon leaves to AdamW, so "
                         "it needs --optimizer muon; with AdamW, --lr is the rate of all")
    return config, tc, init
