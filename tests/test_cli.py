"""Tests of llamatool/cli.py."""

import dataclasses
import importlib.util
import json
import re

import numpy as np
import pytest

import llama_jax as L
import llamatool as lt

from conftest import (BEFORE, FIXTURES, TRAIN_TINY, forward, free_port, make_corpus_folder,
    naive_greedy, quick_tc, random_params, run_cli, tokens_for)


@pytest.mark.slow
def test_command_line_evaluates_a_checkpoint_on_a_text_file(corpus, tmp_path, monkeypatch, capsys):
    # The --eval command line in this process: one JSON line, every byte counted.
    lt.training.train(TRAIN_TINY, quick_tc(steps=2), corpus, tmp_path / "run", log=lambda s: None)
    monkeypatch.chdir(tmp_path)
    evaluate_text = lt.evaluation.evaluate_text

    def with_progress(*args, log, **kwargs):  # a long text's progress line, at once
        log("eval 1/2 windows")
        return evaluate_text(*args, log=log, **kwargs)

    monkeypatch.setattr(lt.modes, "evaluate_text", with_progress)
    assert lt.cli.main(["--eval", str(corpus), "--out-dir", "run", "--json"]) == 0
    out = capsys.readouterr()
    assert "eval 1/2 windows" in out.err  # stdout holds only the JSON line
    [line] = out.out.strip().splitlines()
    figures = json.loads(line)
    assert figures["bytes"] == len(corpus.read_bytes()) and 0 < figures["bits_per_byte"] < 20
    assert figures["tokens"] == len(L.get_tokenizer().encode_ordinary(corpus.read_text()))
    assert lt.cli.main(["--eval", str(corpus), "--out-dir", "nothing"]) == 2
    assert "no checkpoint in nothing (ckpt.npz or ckpt.orbax)" in capsys.readouterr().err


def test_command_line_trains_checkpoints_plots_and_samples(corpus, tmp_path, monkeypatch, capsys):
    args = ["--data", str(corpus), "--out-dir", "run", "--dim", "32", "--n-layers", "2",
            "--n-heads", "4", "--n-kv-heads", "2", "--steps", "4", "--batch-size", "2",
            "--seq-len", "16", "--eval-every", "2", "--log-every", "1",
            "--max-new-tokens", "10", "--preset", "cpu"]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "compiled and ran the first step" in out
    assert "step     4/4 | loss" in out and "tok/s" in out and "ETA" in out
    assert "eval  step     4 | train" in out
    assert "--- sample" in out
    assert (tmp_path / "run" / "ckpt.npz").is_file() and (tmp_path / "run" / "loss.png").is_file()
    assert (tmp_path / "run" / "health.png").stat().st_size > 10_000
    assert all(json.loads(line)["step"] for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    # The rest in this process (main is what the command line runs).
    monkeypatch.chdir(tmp_path)
    assert lt.cli.main(["--sample", "--out-dir", "run", "--prompt", "ROMEO:", "--max-new-tokens", "5",
                   "--seed", "3"]) == 0
    assert "ROMEO:" in capsys.readouterr().out
    # A mismatched resume and a missing data file are one-line errors (main
    # returns 2 and prints "error: ..."; an exception would fail the test).
    assert lt.cli.main([*args, "--resume", "--dim", "64"]) == 2
    assert "dim: 32 in the checkpoint, 64 requested" in capsys.readouterr().err
    assert lt.cli.main(["--data", "nope.txt", "--out-dir", "x"]) == 2
    assert "nope.txt not found" in capsys.readouterr().err
    # --export-gguf: the run as a GGUF file that load_gguf reads back, once only.
    if importlib.util.find_spec("gguf"):
        assert lt.cli.main(["--export-gguf", "run.gguf", "--out-dir", "run"]) == 0
        params, config, _ = lt.gguf_file.load_gguf(tmp_path / "run.gguf")
        assert config.dim == 32 and config.vocab_size == 50257 and config.tie_embeddings
        assert lt.cli.main(["--export-gguf", "run.gguf", "--out-dir", "run"]) == 2
        assert "the file exists" in capsys.readouterr().err


@pytest.mark.slow
def test_command_line_samples_from_an_hf_folder(tmp_path, capsys):
    result = run_cli("--sample", "--hf-checkpoint", str(FIXTURES / "hf_tiny"), "--prompt-ids",
                     "1,5,9", "--max-new-tokens", "6", "--temperature", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    ids = [int(t) for t in result.stdout.strip().splitlines()[-1].split(",")]
    params, config = lt.hugging_face.load_hf_checkpoint(FIXTURES / "hf_tiny")
    assert ids == naive_greedy(params, [1, 5, 9], 6, config)
    assert lt.cli.main(["--sample", "--hf-checkpoint", str(FIXTURES / "hf_tiny"),
                   "--prompt", "hello"]) == 2
    err = capsys.readouterr().err
    assert "--prompt-ids" in err and "--tokenizer gpt2" in err


def test_the_table_of_modes_drives_help_refusals_and_dispatch(monkeypatch, capsys):
    parser = lt.cli.build_parser()
    dests = {f.dest for f in lt.flags.FLAGS} | {m.name for m in lt.cli.MODES if m.flag}
    help_text = parser.format_help()
    what_to_do = help_text[help_text.index("what to do:"):help_text.index("files:")]
    flags = re.findall(r"^  (--[a-z-]+)", what_to_do, re.M)
    assert flags[:len(lt.cli.MODES) - 1] == [m.flag for m in lt.cli.MODES[1:]]  # training: no flag
    for mode in lt.cli.MODES:
        assert mode.reads <= dests, mode.reads - dests  # every flag it reads exists
        assert mode.name == "train" or mode.name in dests
    # Every row of FLAGS is in --help, under its heading, and parses.
    for f in lt.flags.FLAGS:
        assert f.option in help_text
    assert vars(parser.parse_args([])).keys() == dests
    # Each mode's row runs it: a stand-in for the sample mode's function is called.
    calls = []
    sample = next(m for m in lt.cli.MODES if m.name == "sample")
    monkeypatch.setattr(lt.cli, "MODES", tuple(
        dataclasses.replace(m, run=lambda args: calls.append(args.prompt) or 0)
        if m is sample else m for m in lt.cli.MODES))
    assert lt.cli.main(["--sample", "--prompt", "hi"]) == 0 and calls == ["hi"]
    assert lt.cli.main(["--sample", "--lr", "1"]) == 2  # a flag its row does not read
    assert "--lr: not used by --sample" in capsys.readouterr().err


@pytest.mark.slow
def test_command_line_prepares_a_folder_then_trains_from_it(tmp_path, monkeypatch, capsys):
    make_corpus_folder(tmp_path / "in")
    prepared = run_cli("--prepare", "in/*.txt", "in/sub", "--data", "ds", cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    assert "skipping" in prepared.stdout and "MB/s" in prepared.stdout
    monkeypatch.chdir(tmp_path)  # training from it runs in this process (faster)
    assert lt.cli.main(["--data", "ds", "--out-dir", "run", "--dim", "32", "--n-layers", "2",
                   "--n-heads", "4", "--n-kv-heads", "2", "--steps", "2", "--batch-size", "2",
                   "--seq-len", "16", "--eval-every", "2", "--max-new-tokens", "4",
                   "--preset", "cpu", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "token files, memory-mapped" in out and "eval  step     2" in out
    assert lt.cli.main(["--prepare", "in"]) == 2
    assert "--prepare needs --data NAME" in capsys.readouterr().err


@pytest.mark.slow
def test_command_line_chats_with_smollm2_and_it_knows_paris(smollm2, monkeypatch, capsys):
    # The command line in this process, with the file already loaded (the test
    # above checks the loading): the chat template from the file, streaming,
    # the stop at <|im_end|>.
    path, params, config, enc = smollm2
    monkeypatch.setattr(lt.sources, "load_gguf", lambda *args, **kwargs: (params, config, enc))
    code = lt.cli.main(["--gguf", str(path), "--chat", "--prompt", "What is the capital of France?",
                   "--temperature", "0", "--max-new-tokens", "24"])
    out, err = capsys.readouterr()
    assert code == 0 and "Paris" in out and "tokens in" in err
    assert "<|im_end|>" not in out


@pytest.mark.slow
def test_flags_that_cannot_apply_are_refused_and_bench_measures_a_given_model(capsys):
    cases = [(["--sample", "--lr", "1e-3"], "--lr: not used by --sample"),
             (["--gguf-type", "q8_0"], "--gguf-type: not used by training"),
             (["--bench", "--eval", "x.txt"], "--bench and --eval: choose one"),
             (["--gguf", "m.gguf", "--steps", "3"], "use --init-from"),
             (["--tokenizer", "gpt2", "--sample"], "--tokenizer applies to --hf-checkpoint"),
             (["--bench", "--hf-checkpoint", "d", "--dim", "64"], "--dim: not used by --bench"),
             (["--export-hf", "d", "--json"], "--json: not used by --export-hf")]
    for argv, message in cases:
        assert lt.cli.main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    # --bench with a model times that model's decoding, and says that training is not timed.
    assert lt.cli.main(["--bench", "--json", "--hf-checkpoint", str(FIXTURES / "hf_tiny")]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["kind"] for r in records] == ["train", "decode", "decode"]
    assert "not timed" in records[0]["skipped"] and records[1]["model"].endswith("hf_tiny")
    assert [r["batch"] for r in records[1:]] == [1, 8]


@pytest.mark.slow
def test_command_line_fine_tunes_an_hf_folder_and_exports_it(bpe_model, corpus, tmp_path,
                                                             monkeypatch, capsys):
    args = ["--init-from", str(bpe_model), "--data", str(corpus), "--out-dir", "run",
            "--lora-rank", "4", "--steps", "4", "--batch-size", "2", "--seq-len", "16",
            "--eval-every", "2", "--log-every", "1", "--max-new-tokens", "5", "--preset", "cpu"]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "with LoRA: rank 4" in result.stdout and "--- sample" in result.stdout
    assert "peak host memory" in result.stdout
    monkeypatch.chdir(tmp_path)
    assert lt.cli.main(["--export-hf", "export", "--out-dir", "run"]) == 0
    assert "the base's tokenizer.json" in capsys.readouterr().out
    # The merged export gives the adapted model's logits, and keeps the tokenizer.
    exported, config = lt.hugging_face.load_hf_checkpoint(tmp_path / "export")
    adapted = lt.sources.load_source(tmp_path / "run")
    tokens = tokens_for(config, 2, 12)
    np.testing.assert_allclose(forward(exported, tokens, config)[0],
                               forward(adapted.params, tokens, config)[0], atol=1e-5)
    assert (tmp_path / "export" / "tokenizer.json").read_text() == \
        (bpe_model / "tokenizer.json").read_text()
    try:  # optional (not in requirements.txt): transformers reads the export the same way
        import torch
        import transformers
    except ImportError:
        pass
    else:
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "export",
                                                           attn_implementation="eager").eval()
        with torch.no_grad():
            theirs = hf(torch.from_numpy(np.array(tokens))).logits.numpy()
        np.testing.assert_allclose(theirs, forward(adapted.params, tokens, config)[0],
                                   atol=1e-4, rtol=1e-4)
    # Bad input: one line each, nothing overwritten.
    assert lt.cli.main(["--export-hf", "export", "--out-dir", "run"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert lt.cli.main([*args, "--dim", "64"]) == 2
    assert "--dim 64 disagrees with" in capsys.readouterr().err
    assert lt.cli.main([*args, "--out-dir", "big", "--lora-rank", "33"]) == 2
    assert "--lora-rank 33 is larger than wq's smaller side" in capsys.readouterr().err
    other = tmp_path / "other"
    config_other = lt.hugging_face.config_from_hf(json.loads((bpe_model / "config.json").read_text()))
    lt.hugging_face.save_hf_checkpoint(other, random_params(config_other, seed=5), config_other)
    (other / "tokenizer.json").write_text((bpe_model / "tokenizer.json").read_text())
    before = (tmp_path / "run" / "ckpt.npz").read_bytes()
    assert lt.cli.main([*args, "--init-from", str(other), "--resume", "--steps", "6"]) == 2
    assert "trained on a base model with other weights" in capsys.readouterr().err
    assert (tmp_path / "run" / "ckpt.npz").read_bytes() == before
    (tmp_path / "docs").mkdir()
    make_corpus_folder(tmp_path / "docs")
    assert lt.token_files.prepare_tokens([str(tmp_path / "docs")], tmp_path / "gpt2set", log=lambda s: None)
    assert lt.cli.main([*args, "--out-dir", "tok", "--data", "gpt2set"]) == 2
    assert "not this model's tokenizer" in capsys.readouterr().err
    # --prepare with --init-from writes the data set with the source's tokenizer.
    assert lt.cli.main(["--prepare", "docs", "--data", "bpeset", "--init-from", str(bpe_model)]) == 0
    header = json.loads((tmp_path / "bpeset.json").read_text())
    assert header["tokenizer_sha256"] == lt.token_files.tokenizer_fingerprint(adapted.tokenizer)
    assert lt.cli.main([*args, "--out-dir", "none", "--init-from", str(FIXTURES / "hf_tiny")]) == 2
    assert "comes without a tokenizer" in capsys.readouterr().err


def test_many_process_flags_are_checked_before_anything_starts(capsys):
    assert lt.cli.main(["--fsdp", "two"]) == 2
    assert "--fsdp two: give a number of devices per FSDP group, or all" in capsys.readouterr().err
    assert lt.cli.main(["--fsdp", "2"]) == 2  # this process has one device
    assert "--fsdp 2 does not divide the 1 device: choose one of 1 or all" in capsys.readouterr().err
    assert lt.cli.main(["--num-processes", "2"]) == 2
    assert "--coordinator and --process-id missing" in capsys.readouterr().err
    assert lt.cli.main(["--coordinator", "localhost:1", "--num-processes", "2", "--process-id", "2"]) == 2
    assert "--process-id 2 must be between 0 and --num-processes - 1 (1)" in capsys.readouterr().err
    port = free_port()  # nobody listens there
    assert lt.cli.main(["--coordinator", f"localhost:{port}", "--num-processes", "2",
                   "--process-id", "1", "--coordinator-timeout", "1"]) == 2
    assert f"could not reach the coordinator at localhost:{port} within 1s" in \
        capsys.readouterr().err


@pytest.mark.slow
def test_the_default_run_loses_what_it_lost_before_the_package(tmp_path):
    # The default run's first three steps, in float32, give the losses the
    # single-module code gave at the same seed (fixtures/before_the_package).
    # That code's cpu preset trained with AdamW; the preset now trains with
    # Muon, and --optimizer adamw gives the settings it had (lr 3e-3, weight
    # decay 0.1; only the schedule's floor differs, which 3 steps of a 50-step
    # warmup never reach).
    want = json.loads((BEFORE / "default_run.json").read_text())
    argv = want["command"].split()[2:] + ["--optimizer", "adamw"]
    argv[argv.index("OUT")] = str(tmp_path)
    assert lt.cli.main(argv) == 0
    got = lt.checkpoint_formats.load_checkpoint(tmp_path / "ckpt.npz").history
    for key in ("train", "eval"):
        np.testing.assert_allclose(np.array(got[key]), np.array(want["history"][key]),
                                   rtol=1e-6, atol=1e-6)


def test_values_and_flags_that_cannot_apply_to_the_format_or_mode_are_one_line_refusals(
        corpus, tmp_path, monkeypatch, capsys):
    # Each ends in one line naming the value and the fix, exit code 2, and no
    # file written (issue: nothing lost, nothing silently ignored).
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be.")
    out = tmp_path / "out"
    data = ["--data", str(corpus)]
    cases = [([*data, "--time-budget", "nan"], "--time-budget must be a positive number of minutes"),
             ([*data, "--time-budget", "inf"], "--time-budget must be a positive number of minutes"),
             (["--eval", str(text), "--seq-len", "-5"], "--seq-len -5: the window must hold"),
             (["--eval", str(text), "--seq-len", "0"], "--seq-len 0: the window must hold"),
             # Part I names the config field; the command line names the flag.
             ([*data, "--steps", "0"], "error: --steps must be positive, got 0"),
             ([*data, "--n-layers", "0"], "error: --n-layers must be positive, got 0"),
             ([*data, "--keep-checkpoints", "2", "--checkpoint", "npz"],
              "--keep-checkpoints applies to a format that keeps several steps")]
    for argv, message in cases:
        assert lt.cli.main([*argv, "--out-dir", str(out)]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not out.exists()
    # --plan plans only a save the run would make: without orbax-checkpoint, it
    # refuses --checkpoint orbax as the run does.
    npz, orbax = lt.checkpoint_formats.FORMATS
    monkeypatch.setattr(lt.checkpoint_formats, "FORMATS",
                        (npz, orbax._replace(installed=lambda: False)))
    assert lt.cli.main(["--plan", "--checkpoint", "orbax", "--dim", "32", "--n-layers", "1"]) == 2
    assert "--checkpoint orbax needs the optional package" in capsys.readouterr().err
