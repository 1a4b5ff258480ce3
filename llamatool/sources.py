"""Where a model comes from: one loader row each for a run, a Hugging Face folder and a GGUF file.

load_source picks the row (SOURCES) whose recognise() takes the path, and its
load() returns a Model: the one typed value every reader (--sample, --eval,
--chat, the exports, --bench, --init-from) works with. Adding a model format is
its reader module plus one row here.
"""

from pathlib import Path
from typing import Callable, NamedTuple

from llama_jax import InputError, ModelConfig, get_tokenizer
from llamatool.lora import merged_weights
from llamatool.checkpoints import CheckpointError
from llamatool.checkpoint_formats import (FORMATS, checkpoint_names, format_of,
                                          load_checkpoint, saved_checkpoint)
from llamatool.hugging_face import load_hf_checkpoint, read_json, save_hf_checkpoint
from llamatool.bpe import hf_bpe_tokenizer, llama3_tokenizer
from llamatool.gguf_file import gguf_value, load_gguf, open_gguf
from llamatool.fine_tuning import tree_sha256


class Model(NamedTuple):
    """A model to sample, evaluate, chat with, fine-tune or export."""
    params: dict
    config: ModelConfig
    tokenizer: object | None      # a tiktoken Encoding, or None where none could be read
    source: str                   # the path it was read from
    kind: str                     # its SOURCES row: "ckpt", "hf" or "gguf"
    chat_template: str | None = None
    seq_len: int | None = None    # the length a run trained at, else None
    tokenizer_files: tuple = ()   # a Hugging Face base's tokenizer files, for --export-hf
    special: dict | None = None   # bos, eos and pad ids and whether it adds bos (None: GPT-2's)
    sha256: str | None = None     # its weights' hash, once a fine-tuning run has taken it


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json")


def hf_folder_tokenizer(folder, gpt2=False):
    """A Hugging Face folder's tokenizer: tiktoken's tokenizer.model (Llama 3),
    else a byte-level BPE tokenizer.json, else None (also for SentencePiece
    models, Llama 1 and 2). gpt2=True: GPT-2's, whatever the folder holds."""
    if gpt2:
        return get_tokenizer()
    for f in (folder / "tokenizer.model", folder / "original" / "tokenizer.model"):
        if f.is_file():
            try:
                return llama3_tokenizer(f)
            except InputError:
                return None  # a SentencePiece model, not tiktoken format
    if (folder / "tokenizer.json").is_file():
        return hf_bpe_tokenizer(folder / "tokenizer.json")
    return None


def hf_special_tokens(settings, tokenizer):
    """A Hugging Face folder's bos, eos and pad token ids, from its
    tokenizer_config.json (names, or {"content": name}), and whether a prompt
    starts with bos (add_bos_token; when absent, whether bos is a token of
    its own, not eos as in GPT-2). -> Model.special, or None."""
    config = read_json(settings) if settings.is_file() else {}
    if tokenizer is None or not config:
        return None
    special = {}
    for role in ("bos", "eos", "pad"):
        name = config.get(f"{role}_token")
        name = name.get("content") if isinstance(name, dict) else name
        special[role] = (tokenizer.encode_single_token(name)
                         if isinstance(name, str) and name in tokenizer.special_tokens_set
                         else None)
    special["add_bos"] = bool(config.get("add_bos_token",
                                         special["bos"] not in (None, special["eos"])))
    return special


def load_gguf_source(path, dtype="float32", gpt2_tokenizer=False):
    """A GGUF file, with its own tokenizer, chat template and special tokens."""
    reader = open_gguf(path)  # once: parsing the metadata takes seconds
    params, config, tokenizer = load_gguf(path, dtype, reader=reader)
    template = gguf_value(reader, "tokenizer.chat_template", required=False)
    special = {role: gguf_value(reader, f"tokenizer.ggml.{key}_token_id", required=False)
               for role, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))}
    special["add_bos"] = bool(gguf_value(reader, "tokenizer.ggml.add_bos_token", required=False))
    return Model(params, config, tokenizer, str(path), "gguf", template, special=special)


def load_hf_source(path, dtype="float32", gpt2_tokenizer=False):
    """A Hugging Face folder, with its tokenizer (or GPT-2's: gpt2_tokenizer)."""
    folder = Path(path)
    params, config = load_hf_checkpoint(folder)
    settings = folder / "tokenizer_config.json"
    template = read_json(settings).get("chat_template") if settings.is_file() else None
    tokenizer = hf_folder_tokenizer(folder, gpt2_tokenizer)
    return Model(params, config, tokenizer, str(path), "hf",
                 template if isinstance(template, str) else None,
                 tokenizer_files=tuple(folder / f for f in TOKENIZER_FILES
                                       if (folder / f).is_file()),
                 special=None if gpt2_tokenizer else hf_special_tokens(settings, tokenizer))


def load_run_source(path, dtype="float32", gpt2_tokenizer=False):
    """A llama_jax run (its folder, or its checkpoint in any format): its
    weights alone. A fine-tuned run brings its base's tokenizer and chat
    format, and a LoRA run is merged into its base, which is read again and
    checked against the hash the run recorded."""
    path = Path(path)
    if path.is_dir() and format_of(path) is None:  # a run's folder
        path = saved_checkpoint(path) or path / FORMATS[0].filename
    ckpt = load_checkpoint(path, weights_only=True)
    model = Model(ckpt.params, ckpt.config, get_tokenizer(), str(path), "ckpt",
                  seq_len=ckpt.train_config.seq_len)
    return base_model(ckpt, model, dtype) if ckpt.base is not None else model


def is_run(path):
    """A run's folder (it holds a checkpoint), or a checkpoint in any format."""
    path = Path(path)
    return format_of(path) is not None or path.is_dir() and saved_checkpoint(path) is not None


def is_gguf(path):
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


class Source(NamedTuple):
    """One kind of model source: one row of SOURCES."""
    kind: str          # its name, as checkpoints record a fine-tuning run's base
    what: str          # for messages
    recognises: Callable  # path -> bool (an existing file or folder)
    load: Callable     # (path, dtype, gpt2_tokenizer) -> Model


# The order matters where two could take a path: a folder with config.json is
# a Hugging Face model before it is anything else.
SOURCES = (
    Source("hf", "a Hugging Face folder (config.json and safetensors)",
           lambda p: p.is_dir() and (p / "config.json").is_file(), load_hf_source),
    Source("gguf", "a GGUF file", lambda p: p.is_file() and is_gguf(p), load_gguf_source),
    Source("ckpt", f"a llama_jax run (its folder, or its {checkpoint_names()})", is_run,
           load_run_source),
)


def source_kind(path):
    """The SOURCES row that reads path, by what the path holds. -> its kind."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder (a model source is "
                         + ", ".join(s.what for s in SOURCES[:-1]) + f" or {SOURCES[-1].what})")
    for source in SOURCES:
        if source.recognises(path):
            return source.kind
    raise InputError(f"{path} is none of the model sources: "
                     + "; ".join(s.what for s in SOURCES))


def load_source(path, kind=None, dtype="float32", gpt2_tokenizer=False):
    """A model to sample, evaluate, chat with, fine-tune or export, read by
    the SOURCES row named kind (default: the one source_kind finds).
    dtype: a GGUF file's weights may stay bfloat16. -> Model."""
    kind = kind or source_kind(path)
    return next(s for s in SOURCES if s.kind == kind).load(path, dtype, gpt2_tokenizer)


def base_model(ckpt, model, dtype):
    """A fine-tuned run (model, from its checkpoint ckpt) with its base's
    tokenizer, chat format and tokenizer files, a LoRA run's adapters merged
    into the base's weights."""
    record = ckpt.base
    if not Path(record["source"]).exists():
        raise CheckpointError(f"{model.source} was fine-tuned from {record['source']}, which is "
                              "gone: its tokenizer (and, for LoRA, its weights) are read from "
                              "there; put the base model back at that path")
    base = load_source(record["source"], record["kind"], dtype)
    params, tc = ckpt.params, ckpt.train_config
    if tc.lora_rank:
        if tree_sha256(base.params) != record["sha256"]:
            raise CheckpointError(f"{record['source']} has changed since {model.source} was "
                                  "trained on it (its weights' sha256 differs): the adapters "
                                  "belong to the old weights")
        params = merged_weights(base.params, params, tc)
    return model._replace(params=params, tokenizer=base.tokenizer,
                          chat_template=base.chat_template,
                          tokenizer_files=base.tokenizer_files, special=base.special)


def export_hf(model, folder, log=print):
    """--export-hf: writes a Model (LoRA already merged) as
    a Hugging Face folder, with its base's tokenizer files when it has them.
    Refuses a folder that is not empty, so nothing is overwritten."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise InputError(f"--export-hf {folder}: the folder exists and is not empty; choose a "
                         "new one (nothing was written)")
    save_hf_checkpoint(folder, model.params, model.config)
    for f in model.tokenizer_files:
        (folder / f.name).write_bytes(f.read_bytes())
    names = [f.name for f in model.tokenizer_files]
    if names:
        note = f", and the base's {', '.join(names)}"
    elif model.tokenizer is not None and model.tokenizer.name == "gpt2":
        note = "; its tokenizer is GPT-2's (in transformers: AutoTokenizer.from_pretrained('gpt2'))"
    else:
        note = "; no tokenizer files (the model did not come from a Hugging Face folder)"
    log(f"wrote {folder / 'config.json'} and {folder / 'model.safetensors'} (float32){note}")
