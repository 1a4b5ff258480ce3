"""Tests of llamatool/hugging_face.py."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax as L
import llamatool as lt

from conftest import (FIXTURES, TINY, copy_fixture, damage_config_not_json,
    damage_config_without_hidden_size, damage_header_entry_is_a_list,
    damage_index_names_a_missing_shard, forward, random_params, tokens_for)


@pytest.mark.parametrize("name", ["hf_tiny", "hf_tiny_tied", "hf_tiny_bf16"])
def test_hf_fixture_logits_match_transformers(name):
    """Logits that transformers' LlamaForCausalLM computed for these weights
    (fixtures/make_hf_fixtures.py): GQA, head_dim 24 != 64/4 and Llama 3.1
    RoPE scaling (hf_tiny); tied embeddings in shards (hf_tiny_tied);
    bfloat16 weights, compared in float32 (hf_tiny_bf16)."""
    params, config = lt.hugging_face.load_hf_checkpoint(FIXTURES / name)
    if name == "hf_tiny_bf16":
        assert config.compute_dtype == "bfloat16"
        assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params))
        params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params)
        config = dataclasses.replace(config, compute_dtype="float32")
    tokens = np.load(FIXTURES / name / "tokens.npy")
    logits, _ = forward(params, jnp.asarray(tokens), config)
    np.testing.assert_allclose(logits, np.load(FIXTURES / name / "expected_logits.npy"),
                               atol=1e-4, rtol=1e-4)


def test_hf_fixture_config_is_read_field_by_field():
    _, config = lt.hugging_face.load_hf_checkpoint(FIXTURES / "hf_tiny")
    assert (config.vocab_size, config.dim, config.n_layers, config.n_heads, config.n_kv_heads,
            config.head_width, config.ffn_width) == (128, 64, 2, 4, 2, 24, 96)
    assert config.rope_theta == 500000.0 and config.rope_scaling == (8.0, 1.0, 4.0, 16.0)
    assert config.norm_eps == 1e-5 and config.max_seq_len == 64 and not config.tie_embeddings
    _, tied = lt.hugging_face.load_hf_checkpoint(FIXTURES / "hf_tiny_tied")
    assert tied.tie_embeddings and tied.rope_scaling is None and tied.head_dim is None


@pytest.mark.parametrize("config", [
    L.ModelConfig(tie_embeddings=False, vocab_size=100, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16,
                  vocab_multiple=1),
    L.ModelConfig(vocab_size=100, dim=32, n_layers=1, n_heads=4, n_kv_heads=1, max_seq_len=16,
                  head_dim=12, tie_embeddings=True, rope_scaling=(4.0, 1.0, 4.0, 8.0),
                  rope_theta=5e5, ffn_dim=40, vocab_multiple=1),
])
@pytest.mark.slow
def test_hf_save_then_load_round_trips_arrays_and_config(config, tmp_path):
    params = random_params(config)
    lt.hugging_face.save_hf_checkpoint(tmp_path, params, config)
    loaded, loaded_config = lt.hugging_face.load_hf_checkpoint(tmp_path)
    assert loaded_config == lt.settings.run_configs(dataclasses.replace(config, ffn_dim=config.ffn_width))[0]
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_hf_save_drops_the_padded_vocabulary(tmp_path):
    params = random_params(TINY)  # vocabulary 97 padded to 128
    lt.hugging_face.save_hf_checkpoint(tmp_path, params, TINY)
    tensors = lt.hugging_face.read_safetensors(tmp_path / "model.safetensors")
    assert tensors["model.embed_tokens.weight"].shape == (97, 32)
    assert tensors["lm_head.weight"].shape == (97, 32)
    loaded, config = lt.hugging_face.load_hf_checkpoint(tmp_path)
    tokens = tokens_for(TINY, 1, 8)
    np.testing.assert_allclose(forward(loaded, tokens, config)[0],
                               forward(params, tokens, TINY)[0], atol=1e-5)


def test_hf_float16_weights_load_as_float32(tmp_path):
    folder = copy_fixture(tmp_path)
    tensors = lt.hugging_face.read_safetensors(folder / "model.safetensors")
    lt.hugging_face.write_safetensors(folder / "model.safetensors",
                        {k: np.asarray(v, np.float16) for k, v in tensors.items()})
    params, config = lt.hugging_face.load_hf_checkpoint(folder)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    np.testing.assert_array_equal(params["norm"],
                                  np.asarray(tensors["model.norm.weight"], np.float16))
    tokens = np.load(FIXTURES / "hf_tiny" / "tokens.npy")
    np.testing.assert_allclose(forward(params, jnp.asarray(tokens), config)[0],
                               np.load(FIXTURES / "hf_tiny" / "expected_logits.npy"), atol=0.05)


def test_hf_truncated_safetensors_is_a_clear_error(tmp_path):
    folder = copy_fixture(tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) - 1000])
    with pytest.raises(lt.checkpoints.CheckpointError, match="truncated or its header is wrong"):
        lt.hugging_face.load_hf_checkpoint(folder)
    (folder / "model.safetensors").write_bytes(data[:4])
    with pytest.raises(lt.checkpoints.CheckpointError, match="shorter than a safetensors header"):
        lt.hugging_face.load_hf_checkpoint(folder)


def test_hf_header_that_lies_about_sizes_names_the_tensor(tmp_path):
    folder = copy_fixture(tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["model.norm.weight"]["shape"] = [65]  # 65 floats do not fit 64 floats' bytes
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data[8 + n:])
    with pytest.raises(lt.checkpoints.CheckpointError, match="tensor model.norm.weight claims bytes"):
        lt.hugging_face.load_hf_checkpoint(folder)


def test_hf_missing_tensor_and_wrong_shape_are_named(tmp_path):
    folder = copy_fixture(tmp_path)
    tensors = {k: np.array(v) for k, v in lt.hugging_face.read_safetensors(folder / "model.safetensors").items()}
    del tensors["model.layers.1.mlp.up_proj.weight"]
    lt.hugging_face.write_safetensors(folder / "model.safetensors", tensors)
    with pytest.raises(lt.checkpoints.CheckpointError, match="tensor model.layers.1.mlp.up_proj.weight is missing"):
        lt.hugging_face.load_hf_checkpoint(folder)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 100
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(lt.checkpoints.CheckpointError,
                       match=r"model.layers.0.mlp.gate_proj.weight has shape \[96, 64\], but "
                             r"config.json implies \[100, 64\]"):
        lt.hugging_face.load_hf_checkpoint(folder)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mistral"}, "model_type is 'mistral'"),
    ({"attention_bias": True}, "attention_bias is true"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     "rope_scaling type 'yarn' is not supported"),
])
def test_hf_unsupported_config_names_the_field(tmp_path, change, message):
    folder = copy_fixture(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(lt.checkpoints.CheckpointError, match=message):
        lt.hugging_face.load_hf_checkpoint(folder)


@pytest.mark.parametrize("damage", [damage_config_not_json, damage_config_without_hidden_size,
                                    damage_header_entry_is_a_list,
                                    damage_index_names_a_missing_shard])
def test_damaged_hf_folders_get_a_message_naming_the_file(tmp_path, damage):
    # Each of these was a Python traceback (JSONDecodeError, KeyError,
    # AttributeError, FileNotFoundError) before the loader checked it.
    folder = copy_fixture(tmp_path)
    message = damage(folder)
    with pytest.raises(lt.checkpoints.CheckpointError, match=message):
        lt.hugging_face.load_hf_checkpoint(folder)


# Optional: needs torch and transformers (not in requirements.txt); skipped without them.


@pytest.mark.parametrize("shape", [
    dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, intermediate_size=80,
         num_hidden_layers=2, tie_word_embeddings=False),
    dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, intermediate_size=64,
         num_hidden_layers=3, tie_word_embeddings=True),
    dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, intermediate_size=96,
         num_hidden_layers=1, head_dim=32, tie_word_embeddings=False, rope_theta=5e5,
         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
])
def test_random_transformers_models_load_and_save_with_equal_logits(shape, tmp_path):
    torch = pytest.importorskip("torch", reason="needs the optional torch package")
    transformers = pytest.importorskip("transformers", reason="needs the optional transformers package")
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(vocab_size=90, max_position_embeddings=32,
                                         rms_norm_eps=1e-6, attn_implementation="eager", **shape)
    model = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "hf")
    tokens = np.random.default_rng(0).integers(0, 90, size=(2, 20))
    with torch.no_grad():
        expected = model(torch.from_numpy(tokens)).logits.numpy()
    params, config = lt.hugging_face.load_hf_checkpoint(tmp_path / "hf")
    np.testing.assert_allclose(forward(params, jnp.asarray(tokens), config)[0], expected,
                               atol=1e-4, rtol=1e-4)
    lt.hugging_face.save_hf_checkpoint(tmp_path / "ours", params, config)
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours",
                                                          attn_implementation="eager").eval()
    with torch.no_grad():
        np.testing.assert_allclose(again(torch.from_numpy(tokens)).logits.numpy(), expected,
                                   atol=1e-4, rtol=1e-4)
