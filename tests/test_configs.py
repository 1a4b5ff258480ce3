"""Tests of llamatool/configs.py."""

import jax
import pytest

import llama_jax as L
import llamatool as lt

from conftest import TRAIN_TINY, random_params


def test_presets_resolve_to_valid_configs_and_flags_override_them(tmp_path, monkeypatch):
    parser = lt.cli.build_parser()
    for name in lt.presets.PRESETS:
        config, tc = lt.configs.resolve_configs(parser.parse_args(["--preset", name]))
        assert config.compute_dtype in ("float32", "bfloat16")
        assert tc.seq_len <= config.max_seq_len
    config, tc = lt.configs.resolve_configs(parser.parse_args(
        ["--preset", "cpu", "--dim", "64", "--seq-len", "512", "--dtype", "float32", "--lr", "1e-4",
         "--attention", "explicit"]))
    assert (config.dim, config.max_seq_len, config.compute_dtype) == (64, 512, "float32")
    assert config.attention == "explicit"
    assert (tc.seq_len, tc.lr, tc.min_lr) == (512, 1e-4, 1e-4)  # the floor never exceeds lr
    # The gpu preset trains with Muon; --optimizer adamw takes its AdamW rates, not Muon's
    # 4x larger ones, and --adam-lr, which cannot apply to AdamW, is refused.
    _, gpu = lt.configs.resolve_configs(parser.parse_args(["--preset", "gpu"]))
    assert (gpu.optimizer, gpu.adam_lr, gpu.lr / gpu.adam_lr) == ("muon", 1e-3, 4)
    _, adamw = lt.configs.resolve_configs(parser.parse_args(["--preset", "gpu", "--optimizer", "adamw"]))
    assert (adamw.optimizer, adamw.lr, adamw.min_lr, adamw.adam_lr) == ("adamw", 1e-3,
                                                                        pytest.approx(1e-4), None)
    # Both presets train with Muon; on the cpu preset --optimizer adamw is Part I's AdamW
    # (lr 3e-3, weight decay 0.1), not the preset's Muon weight decay of 0.5.
    _, cpu = lt.configs.resolve_configs(parser.parse_args(["--preset", "cpu"]))
    assert (cpu.optimizer, cpu.lr, cpu.adam_lr, cpu.weight_decay) == ("muon", 1.2e-2, 3e-3, 0.5)
    _, adamw = lt.configs.resolve_configs(parser.parse_args(["--preset", "cpu", "--optimizer", "adamw"]))
    assert (adamw.lr, adamw.weight_decay) == (3e-3, L.TrainConfig.weight_decay)
    for flags in (["--preset", "cpu", "--optimizer", "adamw"], ["--preset", "gpu", "--optimizer", "adamw"]):
        with pytest.raises(L.InputError, match="needs --optimizer muon"):
            lt.configs.training_configs(parser.parse_args([*flags, "--adam-lr", "1e-3"]))
    # A run saved when --adam-lr was ignored with AdamW still loads.
    assert lt.checkpoints.config_from_json(lt.settings.RunTrainConfig, {"optimizer": "adamw", "adam_lr": 1e-3})
    # Fine-tuning uses AdamW whatever the preset's optimizer (Muon refuses LoRA).
    source = lt.sources.Model({}, config, None, "a base model", "hf")
    for lora in ([], ["--lora-rank", "4"]):
        _, tuned = lt.configs.fine_tuning_configs(parser.parse_args(["--preset", "gpu", *lora]), source)
        assert (tuned.optimizer, tuned.adam_lr, tuned.weight_decay) == ("adamw", None, 0.1)
    # ... and a resumed fine-tuning run keeps the optimizer whose state it holds.
    tiny = lt.settings.run_configs(TRAIN_TINY)[0]
    weights = random_params(tiny)
    lt.checkpoint_npz.save_checkpoint(tmp_path / "ckpt.npz", weights, lt.muon.muon_init(weights),
                      jax.random.PRNGKey(0), tiny, lt.settings.RunTrainConfig(optimizer="muon", adam_lr=1e-4),
                      {"train": [], "eval": []})
    reads = []  # its checkpoint's metadata is read once, not once per function that uses it
    monkeypatch.setattr(lt.configs, "checkpoint_meta",
                        lambda path, read=lt.checkpoint_formats.checkpoint_meta: reads.append(path) or read(path))
    _, resumed = lt.configs.fine_tuning_configs(parser.parse_args(
        ["--preset", "cpu", "--resume", "--out-dir", str(tmp_path)]),
        lt.sources.Model({}, tiny, None, "a base", "hf"))
    assert (resumed.optimizer, resumed.adam_lr) == ("muon", 1e-4)
    assert reads == [tmp_path / "ckpt.npz"]
    reads.clear()  # and once when training_configs passes it down to resolve_configs
    _, _, init = lt.configs.training_configs(parser.parse_args(
        ["--preset", "cpu", "--resume", "--out-dir", str(tmp_path)]))
    assert init is None and reads == [tmp_path / "ckpt.npz"]


def test_preset_configs_equal_the_command_lines_and_take_overrides():
    parser = lt.cli.build_parser()
    for name in lt.presets.PRESETS:
        config, tc = lt.configs.preset_configs(name)
        assert (config, tc) == lt.configs.resolve_configs(parser.parse_args(["--preset", name]))
        assert isinstance(config, lt.settings.RunModelConfig) and isinstance(tc, lt.settings.RunTrainConfig)
    config, tc = lt.configs.preset_configs("cpu", dim=64, steps=7, lr=1e-4)
    assert (config.dim, tc.steps, tc.lr, tc.min_lr) == (64, 7, 1e-4, 1e-4)
    with pytest.raises(L.InputError, match="no config field named widht"):
        lt.configs.preset_configs("cpu", widht=64)


def test_prompt_longer_than_the_context_is_a_clear_error():
    args = lt.cli.build_parser().parse_args(["--prompt", "To be, or not to be " * 20])
    params = L.init_params(jax.random.PRNGKey(0), TRAIN_TINY)
    with pytest.raises(L.InputError, match="the prompt is 141 tokens; the model's context is 32"):
        lt.configs.print_sample(params, TRAIN_TINY, L.get_tokenizer(), args, jax.random.PRNGKey(0))
    lines = []
    args = lt.cli.build_parser().parse_args(["--prompt", "To be", "--max-new-tokens", "100"])
    lt.configs.print_sample(params, TRAIN_TINY, L.get_tokenizer(), args, jax.random.PRNGKey(0),
                   log=lines.append)
    assert "--max-new-tokens lowered to 30" in lines[0]
