"""Hugging Face folders: safetensors and config.json, read and written."""

import json
import ml_dtypes
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from llamatool.settings import RunModelConfig, param_shapes, replace_durably
from llamatool.checkpoints import CheckpointError, flatten_tree, unflatten_like


# A safetensors file is: 8 bytes (little-endian u64) header length N, N bytes
# of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, optional
# "__metadata__"}, then the raw little-endian tensor bytes, offsets relative
# to the end of the header.

SAFETENSORS_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
                      "BF16": np.dtype(ml_dtypes.bfloat16)}


def read_safetensors(path):
    """-> {name: np.ndarray}, memory-mapped (read lazily, never copied whole)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated: shorter than a safetensors header")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise CheckpointError(f"{path}: the header claims {n} bytes but the file has "
                                  f"{size - 8} after the length field (truncated?)")
        try:
            header = json.loads(f.read(n))
        except ValueError as err:
            raise CheckpointError(f"{path}: the safetensors header is not valid JSON") from err
    data_start, data_size = 8 + n, size - 8 - n
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_size,)) \
        if data_size else np.zeros(0, np.uint8)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is a JSON "
                              f"{type(header).__name__}, not an object of tensors")
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(info, dict) and isinstance(info.get("shape"), list)
                and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2):
            raise CheckpointError(f"{path}: the header entry of tensor {name} is "
                                  f"{json.dumps(info)[:80]}, not an object with dtype, shape "
                                  "and two data_offsets: the file is damaged or not safetensors")
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has dtype {info.get('dtype')}; "
                                  "llama_jax reads F32, F16 and BF16")
        shape, (begin, end) = tuple(info["shape"]), info["data_offsets"]
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != expected or not 0 <= begin <= end <= data_size:
            raise CheckpointError(f"{path}: tensor {name} claims bytes {begin}..{end} for shape "
                                  f"{list(shape)} {info['dtype']} ({expected} bytes) but the "
                                  f"data section has {data_size} bytes: the file is truncated "
                                  "or its header is wrong")
        tensors[name] = raw[begin:end].view(dtype).reshape(shape)
    return tensors


def write_safetensors(path, tensors):
    """{name: np.ndarray} -> a .safetensors file (atomically, like checkpoints)."""
    names = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors.items():
        code = next(c for c, d in names.items() if np.dtype(d) == t.dtype)
        header[name] = {"dtype": code, "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format asks for 8-byte aligned data
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for t in tensors.values():
            f.write(np.ascontiguousarray(t).tobytes())
        f.flush()
        os.fsync(f.fileno())
    replace_durably(tmp, path)


# (our path, Hugging Face name, transposed?) for one layer; see the table in 4.
# Our names and Hugging Face's (LlamaForCausalLM), one to one. Our matrices are
# stored [in, out] so that layers compute x @ w; Hugging Face stores torch's
# nn.Linear weight, [out, in], so the loader transposes ("T" below).
#   tok_embeddings                    model.embed_tokens.weight
#   layers.{i}.attention_norm         model.layers.{i}.input_layernorm.weight
#   layers.{i}.attention.wq  (T)      model.layers.{i}.self_attn.q_proj.weight
#   layers.{i}.attention.wk  (T)      model.layers.{i}.self_attn.k_proj.weight
#   layers.{i}.attention.wv  (T)      model.layers.{i}.self_attn.v_proj.weight
#   layers.{i}.attention.wo  (T)      model.layers.{i}.self_attn.o_proj.weight
#   layers.{i}.ffn_norm               model.layers.{i}.post_attention_layernorm.weight
#   layers.{i}.feed_forward.w1 (T)    model.layers.{i}.mlp.gate_proj.weight
#   layers.{i}.feed_forward.w2 (T)    model.layers.{i}.mlp.down_proj.weight
#   layers.{i}.feed_forward.w3 (T)    model.layers.{i}.mlp.up_proj.weight
#   norm                              model.norm.weight
#   output   (T)                      lm_head.weight (absent when embeddings are tied)


HF_LAYER_NAMES = [
    ("attention_norm", "input_layernorm.weight", False),
    ("attention/wq", "self_attn.q_proj.weight", True),
    ("attention/wk", "self_attn.k_proj.weight", True),
    ("attention/wv", "self_attn.v_proj.weight", True),
    ("attention/wo", "self_attn.o_proj.weight", True),
    ("ffn_norm", "post_attention_layernorm.weight", False),
    ("feed_forward/w1", "mlp.gate_proj.weight", True),
    ("feed_forward/w2", "mlp.down_proj.weight", True),
    ("feed_forward/w3", "mlp.up_proj.weight", True),
]


def name_map(config, embedding, norm, output, layer, layer_names):
    """-> [(our flat path, the file's name, transposed)] for every parameter.
    layer: the file's name of a block's tensor, formatted with the block's
    index i and the name from layer_names; output is absent when tied."""
    names = [("tok_embeddings", embedding, False), ("norm", norm, False)]
    for i in range(config.n_layers):
        names += [(f"layers/{i}/{ours}", layer.format(i=i, name=theirs), t)
                  for ours, theirs, t in layer_names]
    if not config.tie_embeddings:
        names.append(("output", output, True))
    return names


def hf_name_map(config):
    """-> [(our flat path, Hugging Face name, transposed)] for every parameter."""
    return name_map(config, "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                    "model.layers.{i}.{name}", HF_LAYER_NAMES)


def read_json(path):
    """A JSON object from a model folder, or CheckpointError naming the file."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}): the file is damaged or "
                              "was not written by transformers") from err
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def config_from_hf(hf):
    """A Hugging Face config.json dict -> ModelConfig, or CheckpointError naming
    the field that llama_jax does not support."""
    if hf.get("model_type") != "llama":
        raise CheckpointError(f"config.json: model_type is {hf.get('model_type')!r}; llama_jax "
                              "loads only 'llama' models")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise CheckpointError(f"config.json: {flag} is true; Llama has no biases and "
                                  "llama_jax does not support them")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"config.json: hidden_act is {hf['hidden_act']!r}; llama_jax "
                              "supports 'silu' (SwiGLU)")
    # transformers 4.x writes rope_theta and rope_scaling; 5.x one rope_parameters dict.
    rope = hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or (rope if "rope_type" in rope else None)
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "default":
            scaling = None
        elif kind != "llama3":
            raise CheckpointError(f"config.json: rope_scaling type {kind!r} is not supported "
                                  "(llama_jax supports 'llama3')")
        else:
            scaling = (float(scaling["factor"]), float(scaling["low_freq_factor"]),
                       float(scaling["high_freq_factor"]),
                       float(scaling["original_max_position_embeddings"]))
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size")
    missing = [k for k in required if not isinstance(hf.get(k), int)]
    if missing:
        raise CheckpointError(f"config.json: {', '.join(missing)} "
                              f"{'is' if len(missing) == 1 else 'are'} missing or not an integer; "
                              f"a Llama config needs all of {', '.join(required)}")
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    return RunModelConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=None if head_dim in (None, hf["hidden_size"] // n_heads) else head_dim,
        ffn_dim=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta), rope_scaling=scaling,
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), vocab_multiple=1,
        compute_dtype="bfloat16" if hf.get("torch_dtype", hf.get("dtype")) == "bfloat16" else "float32")


def config_to_hf(config):
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
          "vocab_size": config.vocab_size, "hidden_size": config.dim,
          "intermediate_size": config.ffn_width, "num_hidden_layers": config.n_layers,
          "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
          "head_dim": config.head_width, "hidden_act": "silu", "rms_norm_eps": config.norm_eps,
          "rope_theta": config.rope_theta, "max_position_embeddings": config.max_seq_len,
          "tie_word_embeddings": config.tie_embeddings, "attention_bias": False,
          "mlp_bias": False, "torch_dtype": "float32", "rope_scaling": None}
    if config.rope_scaling is not None:
        factor, low, high, original = config.rope_scaling
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                              "high_freq_factor": high,
                              "original_max_position_embeddings": int(original)}
    return hf


def load_hf_checkpoint(path):
    """Reads a Hugging Face Llama folder (config.json plus model.safetensors, or
    shards listed in model.safetensors.index.json). float32 and float16 weights
    load as float32, bfloat16 stays bfloat16 (and sets bfloat16 compute). One
    tensor is converted at a time from the memory-mapped files, so host memory
    holds about one copy of the weights. -> (params, ModelConfig)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: pass a Hugging Face Llama model folder")
    config = config_from_hf(read_json(path / "config.json"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map object (tensor name -> file)")
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not (path / f).is_file()]
        if absent:
            raise CheckpointError(f"{index} names {', '.join(absent)}, which "
                                  f"{'is' if len(absent) == 1 else 'are'} not in {path}: the "
                                  "download is incomplete; fetch every shard the index lists")
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{path} has neither model.safetensors nor "
                              "model.safetensors.index.json (PyTorch .bin files are not read)")
    tensors = {}
    for name in files:
        tensors.update(read_safetensors(path / name))
    shapes = param_shapes(config)
    template, flat = flatten_tree(shapes), {}
    for ours, theirs, transposed in hf_name_map(config):
        if theirs not in tensors:
            raise CheckpointError(f"{path}: tensor {theirs} is missing")
        t = tensors[theirs]
        t = t.T if transposed else t
        if t.shape != template[ours].shape:
            implied = template[ours].shape[::-1] if transposed else template[ours].shape
            raise CheckpointError(f"{path}: tensor {theirs} has shape {list(tensors[theirs].shape)}"
                                  f", but config.json implies {list(implied)}")
        dtype = jnp.bfloat16 if t.dtype == ml_dtypes.bfloat16 else jnp.float32
        flat[ours] = jnp.asarray(t, dtype=dtype)
    return unflatten_like(shapes, flat), config


def save_hf_checkpoint(path, params, config):
    """Writes config.json and model.safetensors (float32) that transformers'
    LlamaForCausalLM.from_pretrained(path) loads. Padded vocabulary rows are
    dropped."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat = flatten_tree(params)
    tensors = {}
    for ours, theirs, transposed in hf_name_map(config):
        t = np.asarray(flat[ours], dtype=np.float32)
        if ours == "tok_embeddings":
            t = t[:config.vocab_size]
        elif ours == "output":
            t = t[:, :config.vocab_size]
        tensors[theirs] = np.ascontiguousarray(t.T if transposed else t)
    write_safetensors(path / "model.safetensors", tensors)
    (path / "config.json").write_text(json.dumps(config_to_hf(config), indent=2) + "\n")
