"""GGUF, llama.cpp's file: read a llama model with its tokenizer, and write one."""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import ENDOFTEXT, InputError, precompute_rope
from llamatool.settings import RunModelConfig, param_shapes
from llamatool.checkpoints import CheckpointError, flatten_tree, unflatten_like
from llamatool.bpe import special_token
from llamatool.hugging_face import name_map
from llamatool.bpe import PRE_TOKENIZERS, bpe_tokenizer, byte_level_alphabet


# llama.cpp's single-file format: metadata (key -> value) then tensors, most
# of them quantized in blocks (Q8_0: 32 int8 values and one float16 scale per
# block; Q4_1: 32 4-bit values, a scale and a minimum; K-quants: super-blocks of
# 256). The `gguf` package (llama.cpp's own reader, an optional dependency)
# maps the file and dequantizes; we only name, transpose and check.
# Our names and GGUF's (llama.cpp's llama architecture):
#   tok_embeddings              token_embd.weight
#   layers.{i}.attention_norm   blk.{i}.attn_norm.weight
#   layers.{i}.attention.wq     blk.{i}.attn_q.weight       (T, rows interleaved, see below)
#   layers.{i}.attention.wk     blk.{i}.attn_k.weight       (T, rows interleaved)
#   layers.{i}.attention.wv     blk.{i}.attn_v.weight       (T)
#   layers.{i}.attention.wo     blk.{i}.attn_output.weight  (T)
#   layers.{i}.ffn_norm         blk.{i}.ffn_norm.weight
#   layers.{i}.feed_forward.w1  blk.{i}.ffn_gate.weight     (T)
#   layers.{i}.feed_forward.w2  blk.{i}.ffn_down.weight     (T)
#   layers.{i}.feed_forward.w3  blk.{i}.ffn_up.weight       (T)
#   norm                        output_norm.weight
#   output                      output.weight (T; absent when tied)

GGUF_LAYER_NAMES = [("attention_norm", "attn_norm", False), ("attention/wq", "attn_q", True),
                    ("attention/wk", "attn_k", True), ("attention/wv", "attn_v", True),
                    ("attention/wo", "attn_output", True), ("ffn_norm", "ffn_norm", False),
                    ("feed_forward/w1", "ffn_gate", True), ("feed_forward/w2", "ffn_down", True),
                    ("feed_forward/w3", "ffn_up", True)]


def gguf_name_map(config):
    """-> [(our flat path, GGUF tensor name, transposed)] for every parameter."""
    return name_map(config, "token_embd.weight", "output_norm.weight", "output.weight",
                    "blk.{i}.{name}.weight", GGUF_LAYER_NAMES)


def interleaved_to_half_split(w, n_heads):
    """w: [D, n_heads * Dh] whose output channels rotate as Meta's interleaved
    pairs (2j, 2j + 1), as llama.cpp stores wq and wk -> the same matrix with
    each head's channels reordered to the half-split pairs (j, j + Dh/2) that
    apply_rope uses. The attention scores are unchanged (a test proves it)."""
    D, width = w.shape
    Dh = width // n_heads
    order = np.concatenate([np.arange(0, Dh, 2), np.arange(1, Dh, 2)])  # [Dh]
    return w[:, (np.arange(n_heads)[:, None] * Dh + order).reshape(-1)]


def gguf_value(reader, key, required=True):
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise CheckpointError(f"GGUF metadata has no {key}: the file is incomplete or was "
                                  "not written for llama.cpp's llama architecture")
        return None
    return field.contents()


def open_gguf(path):
    """A gguf.GGUFReader over the file (it parses the metadata, about 2 s for
    SmolLM2's 49,152 tokens and merges, and maps the tensors), or a clear error."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"GGUF file {path} not found")
    try:
        import gguf
    except ImportError as err:
        raise InputError("reading GGUF files needs the gguf package (llama.cpp's reader): "
                         "pip install gguf") from err
    try:
        return gguf.GGUFReader(path)
    except Exception as err:  # the reader raises ValueError, IndexError, struct errors...
        raise CheckpointError(f"{path} is not a readable GGUF file ({type(err).__name__}: "
                              f"{err}); it may be truncated or not GGUF at all") from err


def gguf_config(reader, path, dtype="float32"):
    """The ModelConfig of a GGUF file of the llama architecture, from its
    metadata and tensor names. -> RunModelConfig."""
    import gguf

    arch = gguf_value(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path} holds a {arch!r} model; llama_jax reads the 'llama' "
                              "architecture only")
    p = "llama."
    n_heads = int(gguf_value(reader, p + "attention.head_count"))
    dim = int(gguf_value(reader, p + "embedding_length"))
    head_dim = gguf_value(reader, p + "attention.key_length", required=False)
    rope_scaling = gguf_value(reader, p + "rope.scaling.type", required=False)
    if rope_scaling not in (None, "none"):
        raise CheckpointError(f"{path}: rope.scaling.type {rope_scaling!r} is not supported")
    tensors = {t.name: t for t in reader.tensors}
    scaling = None
    if "rope_freqs.weight" in tensors:  # Llama 3.1+: scaling factors per RoPE frequency
        scaling = gguf_value(reader, "llama_jax.rope_scaling", required=False)
        if scaling is None:
            raise CheckpointError(f"{path} carries RoPE frequency factors (rope_freqs.weight, "
                                  "Llama 3.1-style scaling) without the four numbers that made "
                                  "them, which llama_jax reads only from its own exports: load "
                                  "the model's Hugging Face folder with --hf-checkpoint")
        scaling = tuple(float(x) for x in scaling)
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path} has no token_embd.weight tensor")
    vocab_size = gguf_value(reader, p + "vocab_size", required=False)
    if vocab_size is None:
        vocab_size = len(gguf_value(reader, "tokenizer.ggml.tokens"))
    config = RunModelConfig(
        vocab_size=int(vocab_size), dim=dim, n_layers=int(gguf_value(reader, p + "block_count")),
        n_heads=n_heads,
        n_kv_heads=int(gguf_value(reader, p + "attention.head_count_kv", required=False)
                       or n_heads),
        head_dim=None if head_dim in (None, dim // n_heads) else int(head_dim),
        ffn_dim=int(gguf_value(reader, p + "feed_forward_length")),
        # float32 in the file: 1e-5 reads 9.9999997e-06; 7 digits give it back
        norm_eps=float(f"{gguf_value(reader, p + 'attention.layer_norm_rms_epsilon'):.7g}"),
        rope_theta=float(gguf_value(reader, p + "rope.freq_base", required=False) or 10000.0),
        max_seq_len=int(gguf_value(reader, p + "context_length")), rope_scaling=scaling,
        tie_embeddings="output.weight" not in tensors, vocab_multiple=1,
        compute_dtype="bfloat16" if dtype == "bfloat16" else "float32")
    if scaling is not None:
        factors = gguf.quants.dequantize(tensors["rope_freqs.weight"].data,
                                         tensors["rope_freqs.weight"].tensor_type)
        if not np.allclose(np.ravel(factors), rope_frequency_factors(config), rtol=1e-5):
            raise CheckpointError(f"{path}: rope_freqs.weight disagrees with "
                                  "llama_jax.rope_scaling; the file was edited after export")
    return config


def read_gguf_tensor(tensors, path, name, shape, transpose):
    """A GGUF tensor of tensors (name -> the reader's tensor), dequantized to
    float32 and, with transpose, turned to our [in, out]; shape: what the
    metadata implies. -> np.ndarray."""
    import gguf

    if name not in tensors:
        raise CheckpointError(f"{path}: tensor {name} is missing")
    t = tensors[name]
    try:
        value = gguf.quants.dequantize(t.data, t.tensor_type)
    except (NotImplementedError, KeyError, ValueError) as err:
        raise CheckpointError(f"{path}: tensor {name} has type {t.tensor_type.name}, which "
                              f"the gguf package cannot dequantize ({err})") from err
    value = np.asarray(value, np.float32)
    value = value.T if transpose else value  # GGUF rows are outputs, like torch's [out, in]
    if value.shape != tuple(shape):
        raise CheckpointError(f"{path}: tensor {name} has shape {list(value.shape)} after "
                              f"dequantizing, but the metadata implies {list(shape)}")
    return value


def load_gguf(path, dtype="float32", reader=None):
    """Reads a llama.cpp GGUF file of the llama architecture: every tensor type
    that the gguf package dequantizes (F32, F16, BF16, Q8_0, Q4_0, Q4_1, the
    K-quants, ...) becomes float32 (or bfloat16 with dtype="bfloat16"), the
    hyperparameters come from the metadata, and the tokenizer (byte-level BPE)
    from its token list and merges. Embeddings are tied when the file has no
    output.weight. reader: the file's open_gguf, if the caller has it already.
    -> (params, ModelConfig, tiktoken Encoding)."""
    path = Path(path)
    reader = reader or open_gguf(path)  # checks that gguf is installed
    config = gguf_config(reader, path, dtype)
    tensors = {t.name: t for t in reader.tensors}
    target = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    shapes = param_shapes(config)
    template, flat = flatten_tree(shapes), {}
    for ours, theirs, transposed in gguf_name_map(config):
        value = read_gguf_tensor(tensors, path, theirs, template[ours].shape,
                                 transposed)
        if ours.endswith(("/wq", "/wk")):  # llama.cpp's converter interleaved these rows
            value = interleaved_to_half_split(
                value, config.n_heads if ours.endswith("/wq") else config.n_kv_heads)
        flat[ours] = jnp.asarray(value, target)
    params = unflatten_like(shapes, flat)
    return params, config, gguf_tokenizer(reader, path)


def gguf_tokenizer(reader, path):
    """The tokenizer stored in a GGUF file, as a tiktoken Encoding: byte-level
    BPE (tokenizer.ggml.model "gpt2", as in Llama 3, SmolLM, Qwen...) from its
    token list and merges; unknown, control, user-defined and unused tokens
    (GGUF token types 2 to 5) are special."""
    model = gguf_value(reader, "tokenizer.ggml.model")
    if model == "llama":
        raise CheckpointError(f"{path} has a SentencePiece tokenizer (Llama 1 and 2), which "
                              "llama_jax does not read: pass token ids with --prompt-ids "
                              "instead of text")
    if model != "gpt2":
        raise CheckpointError(f"{path}: tokenizer.ggml.model is {model!r}; llama_jax reads "
                              "byte-level BPE ('gpt2')")
    tokens = gguf_value(reader, "tokenizer.ggml.tokens")
    types = gguf_value(reader, "tokenizer.ggml.token_type", required=False) or [1] * len(tokens)
    pre = gguf_value(reader, "tokenizer.ggml.pre", required=False) or "default"
    try:
        return bpe_tokenizer(tokens, gguf_value(reader, "tokenizer.ggml.merges"),
                             [i for i, t in enumerate(types) if t in (2, 3, 4, 5)], pre,
                             name=Path(path).stem)
    except InputError as err:
        raise CheckpointError(f"{path}: {err}") from err


# ----------------------------------------------------------------------------- writing GGUF
# --export-gguf FILE writes a model as llama.cpp's own converter
# (convert_hf_to_gguf.py) would: the llama architecture's metadata, the
# tokenizer as byte-level BPE tokens and merges, the chat template, and the
# tensors under GGUF_LAYER_NAMES, [out, in] rows, with wq and wk back in the
# interleaved layout that load_gguf undoes. Norm gains stay float32 (llama.cpp
# keeps 1-D tensors in F32); matrices are F32, F16, or Q8_0: blocks of 32
# weights along a row, each stored as int8 with one float16 scale (a matrix
# whose rows do not split into blocks of 32 is written F16, as llama.cpp does).
# Llama 3.1's RoPE scaling is written as llama.cpp's rope_freqs.weight (the
# factors per frequency) and as the four numbers load_gguf reads back.

GGUF_TYPES = ("f32", "f16", "q8_0")


def half_split_to_interleaved(w, n_heads):
    """The inverse of interleaved_to_half_split: w [D, n_heads * Dh] with
    half-split channel pairs (j, j + Dh/2) -> llama.cpp's interleaved pairs
    (2j, 2j + 1), head by head."""
    D, width = w.shape
    Dh = width // n_heads
    order = np.concatenate([np.arange(0, Dh, 2), np.arange(1, Dh, 2)])  # [Dh]
    return w[:, (np.arange(n_heads)[:, None] * Dh + np.argsort(order)).reshape(-1)]


def bpe_merges(ranks):
    """The merges of a tiktoken BPE ({token bytes: rank}), in rank order: each
    token of two or more bytes is what BPE makes of its bytes with only the
    lower-ranked tokens, which leaves two parts, and those two are its merge
    (tiktoken merges the pair whose result has the lowest rank, so a merge's
    priority is its result's rank). -> [(left bytes, right bytes)]."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, i = min(pairs)
            if best >= rank:
                raise InputError(f"token {rank} ({token!r}) is not a merge of lower-ranked "
                                 "tokens: not a BPE vocabulary GGUF can hold")
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def gguf_vocabulary(tokenizer, vocab_size):
    """A tiktoken Encoding in GGUF's byte-level BPE terms: token strings in
    byte-level characters (id = position; special tokens by name, control
    type), token types (1 normal, 3 control, 5 unused for ids the tokenizer
    does not use) and merges "a b" in priority order. -> (tokens, types, merges)."""
    to_char = {b: c for c, b in byte_level_alphabet().items()}
    special = {tokenizer.encode_single_token(s): s for s in tokenizer.special_tokens_set}
    tokens, types, ranks = [], [], {}
    for i in range(vocab_size):
        if i in special:
            tokens.append(special[i])
            types.append(3)
            continue
        try:
            raw = tokenizer.decode_single_token_bytes(i)
        except KeyError:  # an id the tokenizer never produces
            tokens.append(f"[PAD{i}]")
            types.append(5)
            continue
        ranks[raw] = i
        tokens.append("".join(to_char[b] for b in raw))
        types.append(1)
    merges = [" ".join("".join(to_char[b] for b in part) for part in pair)
              for pair in bpe_merges(ranks)]
    return tokens, types, merges


def pre_tokenizer_name(tokenizer):
    """The name llama.cpp gives the tokenizer's split pattern (PRE_TOKENIZERS;
    llama.cpp's llama-vocab.cpp spells GPT-2's "gpt-2"), or None when
    llama.cpp names no such pattern. tiktoken keeps the pattern in the
    Encoding's _pat_str."""
    pattern = getattr(tokenizer, "_pat_str", None)
    for name in ("gpt-2", "llama-bpe", "smollm"):
        if PRE_TOKENIZERS[name] == pattern:
            return name
    return None


def gguf_matrix(gguf, value, kind):
    """One matrix as GGUF stores it: (data, GGML type). value: float32 [rows,
    columns], already in llama.cpp's [out, in] layout."""
    types = gguf.GGMLQuantizationType
    if kind == "f32":
        return value, types.F32
    if kind == "q8_0" and value.shape[-1] % 32 == 0:
        return gguf.quants.quantize(value, types.Q8_0), types.Q8_0
    return value.astype(np.float16), types.F16


def rope_frequency_factors(config):
    """Llama 3.1's RoPE scaling as llama.cpp reads it: float32[Dh / 2], how
    many times slower each channel pair rotates than plain RoPE would turn it
    (llama.cpp divides each angle by its factor). Read off precompute_rope's
    tables: the angle at position 1 is each pair's frequency."""
    def frequencies(scaling):
        cos, sin = precompute_rope(config.head_width, 2, config.rope_theta, scaling)
        return np.arctan2(sin[1].astype(np.float64), cos[1].astype(np.float64))

    return (frequencies(None) / frequencies(config.rope_scaling)).astype(np.float32)


def check_gguf_export(path, config, tokenizer, kind):
    """Refuses what would lose something: an existing file, an unknown type, a
    model without a tokenizer llama.cpp can read, or an architecture that the
    llama architecture's metadata cannot state. -> the pre-tokenizer's name."""
    path = Path(path)
    if path.exists():
        raise InputError(f"--export-gguf {path}: the file exists; choose a new name (nothing "
                         "was written)")
    if not path.parent.is_dir():
        raise InputError(f"--export-gguf {path}: the folder {path.parent} does not exist")
    if kind not in GGUF_TYPES:
        raise InputError(f"--gguf-type {kind}: choose one of {', '.join(GGUF_TYPES)}")
    if tokenizer is None:
        raise InputError("--export-gguf: the model has no tokenizer llama_jax can read, and "
                         "llama.cpp needs one in the file")
    pre = pre_tokenizer_name(tokenizer)
    if pre is None:
        raise InputError(f"--export-gguf: the tokenizer {tokenizer.name!r} splits text by a "
                         "pattern that llama.cpp has no name for (it knows gpt2, llama-bpe, "
                         "smollm and others), so llama.cpp would tokenize differently")
    return pre


def add_gguf_tokenizer(w, tokenizer, vocabulary, pre, special, chat_template):
    """The tokenizer's keys of a GGUF file, to GGUFWriter w: vocabulary's
    byte-level BPE (tokens, types, merges: gguf_vocabulary), pre-tokenizer
    pre, the special tokens (save_gguf's special) and the chat template."""
    tokens, types, merges = vocabulary
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    end = special_token(tokenizer, ENDOFTEXT, "<|end_of_text|>")
    special = special or {"bos": end, "eos": end, "add_bos": False}
    for role in ("bos", "eos", "pad"):
        if special.get(role) is not None:
            getattr(w, f"add_{role}_token_id")(int(special[role]))
    w.add_add_bos_token(bool(special.get("add_bos")))
    if chat_template:
        w.add_chat_template(chat_template)


def add_gguf_tensors(w, gguf, params, config, kind):
    """The model's tensors, to GGUFWriter w under llama.cpp's names: the
    padded vocabulary cut, wq and wk interleaved back, matrices as kind."""
    flat = flatten_tree(jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params))
    for ours, theirs, transposed in gguf_name_map(config):
        value = flat[ours]
        if ours == "tok_embeddings":
            value = value[:config.vocab_size]  # [V, D]: the padding rows go
        elif ours == "output":
            value = value[:, :config.vocab_size]  # [D, V]
        if ours.endswith(("/wq", "/wk")):
            value = half_split_to_interleaved(
                value, config.n_heads if ours.endswith("/wq") else config.n_kv_heads)
        value = np.ascontiguousarray(value.T if transposed else value)
        if value.ndim == 1:
            w.add_tensor(theirs, value)
        else:
            data, ggml_type = gguf_matrix(gguf, value, kind)
            w.add_tensor(theirs, data, raw_dtype=ggml_type)


def save_gguf(path, params, config, tokenizer, kind="f16", chat_template=None, special=None,
              name="llama_jax", log=print):
    """Writes a model (params over the padded vocabulary are cut to
    vocab_size, which llama.cpp's token list must match) as a GGUF file of
    type kind (GGUF_TYPES). special: the source's {"bos", "eos", "pad": token
    id or None, "add_bos": whether llama.cpp puts bos in front of a prompt}
    (load_source); default: the end-of-text token as bos and eos, added to
    no prompt, as GPT-2 does. Written beside its name and
    renamed over it, so a failure leaves no partial file."""
    import gguf  # checked by the caller

    pre = check_gguf_export(path, config, tokenizer, kind)
    path = Path(path)
    tokens, types, merges = gguf_vocabulary(tokenizer, config.vocab_size)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
    architecture = {  # llama.<key> in the file, written by GGUFWriter.add_<key>
        "context_length": config.max_seq_len, "embedding_length": config.dim,
        "block_count": config.n_layers, "feed_forward_length": config.ffn_width,
        "head_count": config.n_heads, "head_count_kv": config.n_kv_heads,
        "key_length": config.head_width, "value_length": config.head_width,
        "rope_dimension_count": config.head_width, "rope_freq_base": config.rope_theta,
        "layer_norm_rms_eps": config.norm_eps, "vocab_size": config.vocab_size}
    for key, value in architecture.items():
        getattr(w, f"add_{key}")(value)
    if config.rope_scaling is not None:  # Llama 3.1: llama.cpp reads the factors' tensor,
        w.add_tensor("rope_freqs.weight", rope_frequency_factors(config))  # we the 4 numbers
        w.add_array("llama_jax.rope_scaling", [float(x) for x in config.rope_scaling])
    add_gguf_tokenizer(w, tokenizer, (tokens, types, merges), pre, special,
                       chat_template)
    add_gguf_tensors(w, gguf, params, config, kind)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    log(f"wrote {path} ({kind}, {path.stat().st_size / 1e6:,.1f} MB): {config.n_layers} "
        f"layers, {config.vocab_size:,} tokens ({pre} pre-tokenizer), "
        f"{'a chat template' if chat_template else 'no chat template'}")
