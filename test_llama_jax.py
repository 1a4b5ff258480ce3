"""The reference's tests (llama_jax.py): its math against independent oracles, the cached
decode against the full forward pass, and the layout of the reference and the package.
The README's quick command runs this file; tests/ holds the package's, one file per module.
Every test: python -m pytest -q -m "slow or not slow" test_llama_jax.py tests"""

import dataclasses
import functools
import hashlib
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util as jtu

import llama_jax as L
import llamatool as lt

from conftest import (CompileCounter, HERE, SAMPLERS, TINY, finished, forward, imported_modules,
    loss_grad, module_body, naive_greedy, np_llama_forward, package_modules, part_one,
    random_params, sampler_names, tokens_for)


@pytest.mark.parametrize("tied", [False, True])
def test_forward_matches_numpy_oracle(tied):
    config = dataclasses.replace(TINY, tie_embeddings=tied)
    params = random_params(config)
    tokens = tokens_for(config, 2, 12)
    logits, cache = forward(params, tokens, config)
    assert logits.shape == (2, 12, config.vocab_size) and logits.dtype == jnp.float32
    assert cache is None
    np.testing.assert_allclose(logits, np_llama_forward(params, tokens, config), atol=2e-4,
                               rtol=1e-4)


def test_causality_future_tokens_do_not_change_past_logits():
    params = random_params(TINY)
    tokens = tokens_for(TINY, 1, 16)
    t = 9
    changed = tokens.at[0, t + 1:].set((tokens[0, t + 1:] + 5) % TINY.vocab_size)
    a, _ = forward(params, tokens, TINY)
    b, _ = forward(params, changed, TINY)
    np.testing.assert_allclose(a[0, :t + 1], b[0, :t + 1], atol=1e-6)
    assert not np.allclose(a[0, t + 1:], b[0, t + 1:], atol=1e-3)  # the change is visible


def test_cached_decode_one_token_at_a_time_matches_full_forward():
    params = random_params(TINY)
    tokens = tokens_for(TINY, 2, 20)
    full, _ = forward(params, tokens, TINY)
    cache = L.init_cache(TINY, 2)
    step = jax.jit(L.model_forward, static_argnames="config")
    with CompileCounter("model_forward") as compiles:
        for t in range(20):
            logits, cache = step(params, tokens[:, t:t + 1], TINY, cache, t)
            np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-4, rtol=1e-4)
    assert compiles.count == 1  # a traced position: one program for every step


@pytest.mark.parametrize("split", [1, 7, 19])
def test_prefill_of_any_split_matches_full_forward(split):
    params = random_params(TINY)
    tokens = tokens_for(TINY, 2, 20)
    full, _ = forward(params, tokens, TINY)
    first, cache = forward(params, tokens[:, :split], TINY, L.init_cache(TINY, 2), 0)
    rest, _ = forward(params, tokens[:, split:], TINY, cache, split)
    np.testing.assert_allclose(jnp.concatenate([first, rest], 1), full, atol=1e-4, rtol=1e-4)


def test_cache_rows_at_different_positions():
    params = random_params(TINY)
    tokens = tokens_for(TINY, 2, 10)
    full, _ = forward(params, tokens, TINY)
    _, cache = forward(params, tokens[:, :6], TINY, L.init_cache(TINY, 2), 0)
    # Row 0 continues at position 4 (overwriting 4, 5); row 1 at position 6.
    nxt = jnp.stack([tokens[0, 4], tokens[1, 6]])[:, None]
    logits, _ = forward(params, nxt, TINY, cache, jnp.array([4, 6]))
    np.testing.assert_allclose(logits[:, 0], jnp.stack([full[0, 4], full[1, 6]]), atol=1e-4)


def test_grouped_query_attention_equals_mha_with_repeated_kv_heads():
    params = random_params(TINY)
    mha = dataclasses.replace(TINY, n_kv_heads=TINY.n_heads)
    G, Dh = TINY.n_heads // TINY.n_kv_heads, TINY.head_width
    repeated = jax.tree_util.tree_map(lambda x: x, params)
    for layer in repeated["layers"]:
        for name in ("wk", "wv"):
            w = layer["attention"][name].reshape(TINY.dim, TINY.n_kv_heads, Dh)
            layer["attention"][name] = jnp.repeat(w, G, axis=1).reshape(TINY.dim, -1)
    tokens = tokens_for(TINY, 2, 12)
    np.testing.assert_allclose(forward(params, tokens, TINY)[0],
                               forward(repeated, tokens, mha)[0], atol=1e-5)


def test_mha_when_kv_heads_equal_heads_matches_oracle():
    mha = dataclasses.replace(TINY, n_kv_heads=TINY.n_heads)
    params = random_params(mha)
    tokens = tokens_for(mha, 1, 10)
    np.testing.assert_allclose(forward(params, tokens, mha)[0],
                               np_llama_forward(params, tokens, mha), atol=2e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- RoPE


def test_rope_scores_depend_only_on_relative_position():
    Dh = 16
    cos, sin = L.precompute_rope(Dh, 64, 10000.0)
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 1, Dh))
    k = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 1, Dh))

    def score(m, n):
        qm = L.apply_rope(q, cos[None, m:m + 1], sin[None, m:m + 1])
        kn = L.apply_rope(k, cos[None, n:n + 1], sin[None, n:n + 1])
        return float(jnp.sum(qm * kn))

    assert score(5, 2) == pytest.approx(score(40, 37), abs=1e-4)
    assert score(10, 10) == pytest.approx(score(0, 0), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


# ----------------------------------------------------------------------------- gradients, dropout


def test_gradients_match_finite_differences():
    config = L.ModelConfig(tie_embeddings=False, vocab_size=11, dim=8, n_layers=1, n_heads=2,
                           n_kv_heads=1, max_seq_len=8, vocab_multiple=8)
    with jax.enable_x64(True):
        params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64),
                                        random_params(config, scale=0.5))
        inputs = tokens_for(config, 2, 6)
        batch = (inputs, jnp.roll(inputs, -1, axis=1))

        @jax.jit
        def loss(p):
            return L.compute_loss(p, batch, config)

        assert loss(params).dtype == jnp.float64
        jtu.check_grads(loss, (params,), order=1, modes=["rev"], eps=1e-4,
                                  atol=1e-5, rtol=1e-5)


def test_dropout_off_ignores_the_key_and_training_false_is_deterministic():
    config = dataclasses.replace(TINY, dropout_rate=0.5)
    params, tokens = random_params(config), tokens_for(config, 2, 8)
    a, _ = forward(params, tokens, config, key=jax.random.PRNGKey(1))
    b, _ = forward(params, tokens, config, key=jax.random.PRNGKey(2))
    np.testing.assert_array_equal(a, b)
    off = dataclasses.replace(TINY, dropout_rate=0.0)
    c, _ = forward(params, tokens, off, training=True, key=jax.random.PRNGKey(1))
    np.testing.assert_array_equal(a, c)


def test_dropout_on_changes_outputs_with_the_key():
    config = dataclasses.replace(TINY, dropout_rate=0.5)
    params, tokens = random_params(config), tokens_for(config, 2, 8)
    a, _ = forward(params, tokens, config, training=True, key=jax.random.PRNGKey(1))
    b, _ = forward(params, tokens, config, training=True, key=jax.random.PRNGKey(2))
    c, _ = forward(params, tokens, config, training=True, key=jax.random.PRNGKey(1))
    assert not np.allclose(a, b, atol=1e-3)
    np.testing.assert_array_equal(a, c)
    with pytest.raises(ValueError, match="key"):
        forward(params, tokens, config, training=True)


def test_dropout_keeps_the_mean_scale():
    x = jnp.ones((200_000,))
    y = L.dropout(x, 0.3, jax.random.PRNGKey(0))
    assert float(jnp.mean(y == 0)) == pytest.approx(0.3, abs=0.01)
    assert float(jnp.mean(y)) == pytest.approx(1.0, abs=0.01)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("fields, message", [
    (dict(dim=30, n_heads=4), "divisible by n_heads"),
    (dict(n_heads=4, n_kv_heads=3), "divisible by\\s+n_kv_heads"),
    (dict(dim=12, n_heads=4, n_kv_heads=4), "must be even"),
    (dict(n_layers=0), "n_layers must be positive"),
    (dict(vocab_size=-1), "vocab_size must be positive"),
    (dict(dropout_rate=1.0), "dropout_rate"),
    (dict(head_dim=0), "head_dim must be positive"),
])
def test_invalid_config_names_the_field_and_rule(fields, message):
    with pytest.raises(ValueError, match=message):
        L.ModelConfig(**fields)


def test_ffn_width_follows_llamas_rule():
    assert L.ModelConfig(dim=4096, multiple_of=256).ffn_width == 11008  # Llama 2 7B
    assert L.ModelConfig(dim=8192, n_heads=64, n_kv_heads=8, multiple_of=4096,
                         ffn_dim_multiplier=1.3).ffn_width == 28672  # Llama 2 70B
    assert L.ModelConfig(dim=256, ffn_dim=1000).ffn_width == 1000


def test_padded_vocabulary_never_changes_loss_or_logits():
    padded = dataclasses.replace(TINY, vocab_multiple=64)  # 97 -> 128
    plain = dataclasses.replace(TINY, vocab_multiple=1)
    params = random_params(padded)  # random (non-zero) padding rows: must still not matter
    unpadded = dict(params, tok_embeddings=params["tok_embeddings"][:97],
                    output=params["output"][:, :97])
    tokens = tokens_for(TINY, 2, 10)
    batch = (tokens, jnp.roll(tokens, -1, 1))
    assert padded.padded_vocab == 128 and plain.padded_vocab == 97
    np.testing.assert_allclose(forward(params, tokens, padded)[0],
                               forward(unpadded, tokens, plain)[0], atol=1e-5)
    assert float(L.eval_loss(params, batch, padded)) == pytest.approx(
        float(L.eval_loss(unpadded, batch, plain)), abs=1e-5)
    out = L.generate(params, [1, 2, 3], 20, padded, jax.random.PRNGKey(0), temperature=1.0)
    assert all(t < 97 for t in out)
    assert out == L.generate(unpadded, [1, 2, 3], 20, plain, jax.random.PRNGKey(0),
                             temperature=1.0)


def test_bfloat16_compute_agrees_with_float32():
    bf16 = dataclasses.replace(TINY, compute_dtype="bfloat16")
    params = L.init_params(jax.random.PRNGKey(0), TINY)
    tokens = tokens_for(TINY, 2, 16)
    batch = (tokens, jnp.roll(tokens, -1, 1))
    a, _ = forward(params, tokens, TINY)
    b, _ = forward(params, tokens, bf16)
    assert b.dtype == jnp.float32
    # bf16 has an 8-bit mantissa: about 2-3 significant digits.
    np.testing.assert_allclose(a, b, atol=0.05, rtol=0.05)
    assert float(L.eval_loss(params, batch, bf16)) == pytest.approx(
        float(L.eval_loss(params, batch, TINY)), rel=1e-2)
    # The bfloat16 backward pass (Part I's dense, differentiated by JAX)
    # gives nearly the float32 gradient.
    g32 = loss_grad(params, batch, config=TINY)
    g16 = loss_grad(params, batch, config=bf16)
    for a, b in zip(jax.tree_util.tree_leaves(g32), jax.tree_util.tree_leaves(g16)):
        cosine = jnp.sum(a * b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + 1e-30)
        assert b.dtype == jnp.float32 and float(cosine) > 0.99


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_file_is_the_published_one():
    digest = hashlib.sha256((HERE / "gpt2.tiktoken").read_bytes()).hexdigest()
    assert digest == "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def test_tokenizer_matches_gpt2():
    enc = L.get_tokenizer()
    assert enc.n_vocab == 50257
    assert enc.encode("Hello world") == [15496, 995]  # GPT-2's published ids
    assert enc.encode(" there's") == [612, 338]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc.eot_token == 50256


def test_tokenizer_round_trips_the_corpus():
    enc = L.get_tokenizer()
    text = (HERE / "shakespeare.txt").read_text(encoding="utf-8")
    ids = enc.encode_ordinary(text)
    assert len(ids) == 1_435_485  # docs/sources.md
    assert enc.decode(ids) == text
    # 35 plays, each with its heading and author line, and none held out.
    assert text.count("\nby William Shakespeare\n") == 35
    heldout = (HERE / "shakespeare_heldout.txt").read_text(encoding="utf-8")
    assert heldout.splitlines()[0] not in text


def test_the_package_imports_one_way_toward_the_reference():
    # llama_jax.py imports nothing of the package at module level (its
    # __main__ hands the command line over); each package module imports
    # llama_jax and only the modules __init__ lists above it.
    import ast

    top = [n for n in module_body(HERE / "llama_jax.py")
           if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not [ast.unparse(n) for n in top if "llamatool" in ast.unparse(n)]
    order = package_modules()
    on_disk = sorted(p.stem for p in (HERE / "llamatool").glob("*.py") if p.stem != "__init__")
    assert sorted(order) == on_disk, "llamatool/__init__.py lists every module once"
    init = (HERE / "llamatool" / "__init__.py").read_text()
    assert [m for m in re.findall(r"^from llamatool import (\w+)", init, re.M)] == order
    later = [(m, used) for k, m in enumerate(order)
             for used in imported_modules(HERE / "llamatool" / f"{m}.py")
             if used != "llama_jax" and order.index(used) >= k]
    assert not later, f"modules importing their own or a later module: {later}"
    assert "llama_jax" in imported_modules(HERE / "llamatool" / "settings.py")


def test_the_package_tests_sit_in_files_named_after_its_modules():
    # tests/test_X.py tests llamatool/X.py; this file holds the reference's.
    names = {p.stem[5:] for p in (HERE / "tests").glob("*.py")}
    assert names and names <= set(lt.__all__), names - set(lt.__all__)


def test_the_reference_and_each_module_are_short_and_their_functions_fit_a_screen():
    import ast

    assert len((HERE / "llama_jax.py").read_text().splitlines()) <= 1100
    sizes = {m: len((HERE / "llamatool" / f"{m}.py").read_text().splitlines())
             for m in package_modules()}
    assert max(sizes.values()) <= 620, sizes
    files = [HERE / "llama_jax.py"] + [HERE / "llamatool" / f"{m}.py" for m in package_modules()]
    long = [(f.name, n.name, n.end_lineno - n.lineno + 1) for f in files
            for node in module_body(f) for n in ast.walk(node)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno >= 60]
    assert not long, f"functions over 60 lines: {long}"


def test_the_reference_is_one_module_in_memory_when_run():
    # python llama_jax.py registers itself as llama_jax before the package
    # imports it: one copy of its classes, so the package's configs are
    # instances of the reference's.
    code = ("import runpy, sys; sys.argv = ['llama_jax.py', '--help'];\n"
            "try: runpy.run_path('llama_jax.py', run_name='__main__')\n"
            "except SystemExit: pass\n"
            "import llamatool.settings as s; m = sys.modules['llama_jax']\n"
            "print(m.__name__ == '__main__', issubclass(s.RunModelConfig, m.ModelConfig))")
    result = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "True True"


def test_the_module_docstrings_example_runs(monkeypatch, capsys):
    # The example at the top of llama_jax.py, as written, with a two-step
    # TrainConfig in place of the default's 1,000 steps.
    example = L.__doc__.split("It trains and samples a model by itself:")[1].split("\n\n")[1]
    assert "L.train_loop(config, tc, train, val)" in example
    monkeypatch.setattr(L, "TrainConfig", functools.partial(
        L.TrainConfig, steps=2, eval_every=2, eval_batches=1, log_every=1))
    exec(textwrap.dedent(example), {})
    printed = capsys.readouterr().out
    assert "ROMEO:" in printed.rsplit("eval  step", 1)[-1]  # the sample, after the training lines


def test_the_reference_contents_name_its_sections():
    source = (HERE / "llama_jax.py").read_text()
    lines = source.splitlines()
    banners = [int(m.group(1)) for i, line in enumerate(lines)
               if (m := re.match(r"# (\d+)\. ", line)) and lines[i - 1].startswith("# ===")]
    assert banners == list(range(1, 8))
    contents = re.findall(r"^ +(\d+)\. ", L.__doc__, re.MULTILINE)
    assert [int(n) for n in contents] == banners


def test_part_one_reads_without_part_two():
    # Part I's comments, docstrings and messages name no section number, flag,
    # test or package module, except in the one list of what the command line swaps in
    # (before train_loop), the module docstring (which introduces both parts)
    # and the __main__ block (which hands over to the package).
    import ast
    import io
    import tokenize

    source = (HERE / "llama_jax.py").read_text()
    texts = [(t.start[0], t.string) for t in tokenize.generate_tokens(io.StringIO(source).readline)
             if t.type == tokenize.COMMENT]
    tree = ast.parse(source)
    module_docstring = tree.body[0].value
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node):
            first = node.body[0].lineno
            texts += [(first + i, line) for i, line in
                      enumerate(ast.get_docstring(node, clean=False).splitlines())]
        if (isinstance(node, ast.Constant) and isinstance(node.value, str)  # messages too
                and node is not module_docstring):
            texts += [(node.lineno + i, line) for i, line in enumerate(node.value.splitlines())]
    line_of = lambda marker: source[:source.index(marker)].count("\n") + 1
    swaps = (line_of("# What `python llama_jax.py` runs instead"), line_of("_get_batch = jax.jit("))
    main = line_of('if __name__ == "__main__":')
    pattern = re.compile(r"(?<!paper, )\bsection \d|(?<![\w-])--[a-z]|\btests?\b|llamatool|"
                         r"\bpackage\b|\bPart II\b")
    named = [(n, t.strip()) for n, t in texts
             if pattern.search(t) and not swaps[0] <= n <= swaps[1] and n < main]
    assert not named, named
    assert "speed.run_dense" in source[source.index("# What `python llama_jax.py`"):]


def test_part_one_mutates_no_argument_while_traced():
    # Pure in the module's sense. Statically: no Part I function appends to,
    # updates, or assigns into one of its own arguments.
    import ast

    _, part1, _ = part_one()
    mutating = {"append", "extend", "insert", "update", "pop", "clear", "setdefault", "remove"}
    for fn in (n for node in part1 for n in ast.walk(node) if isinstance(n, ast.FunctionDef)):
        args = {a.arg for a in fn.args.args + fn.args.kwonlyargs} - {"self"}
        for n in ast.walk(fn):
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute):
                target, name = n.func.value, n.func.attr
                assert not (isinstance(target, ast.Name) and target.id in args
                            and name in mutating), f"{fn.name} calls {target.id}.{name}"
            for t in getattr(n, "targets", []) + [getattr(n, "target", None)]:
                if isinstance(t, (ast.Subscript, ast.Attribute)) and isinstance(t.value, ast.Name):
                    assert t.value.id not in args, f"{fn.name} assigns into {t.value.id}"
    # And by running: the loss, its gradient, a cached forward pass and the
    # sampler leave every argument as it was (same leaves, same values).
    config = dataclasses.replace(TINY, dropout_rate=0.1)
    params = random_params(config)
    tokens = tokens_for(config, 2, 8)
    batch = (tokens, jnp.roll(tokens, -1, 1))
    before = jax.tree_util.tree_map(np.array, params)
    key = jax.random.PRNGKey(0)
    jax.jit(jax.grad(L.compute_loss), static_argnames=("config", "training"))(
        params, batch, config, True, key)
    L.model_forward(params, tokens, config, L.init_cache(config, 2), 0)
    L.generate(params, [1, 2, 3], 4, config, key)
    after = jax.tree_util.tree_map(np.array, params)
    assert jax.tree_util.tree_structure(after) == jax.tree_util.tree_structure(before)
    for a, b in zip(jax.tree_util.tree_leaves(after), jax.tree_util.tree_leaves(before)):
        np.testing.assert_array_equal(a, b)


def test_part_one_training_loop_lowers_the_validation_loss():
    config = L.ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                           max_seq_len=16, vocab_multiple=1)
    tc = L.TrainConfig(steps=60, batch_size=8, seq_len=16, lr=1e-2, warmup_steps=5,
                       eval_every=30, eval_batches=2, log_every=20)
    # A text with structure to learn: a repeated ramp of 64 token ids.
    data = np.arange(6000, dtype=np.int32) % 64
    lines = []
    params, opt_state, history = L.train_loop(config, tc, data[:5400], data[5400:],
                                              log=lines.append)
    assert int(opt_state["step"]) == 60
    assert [s for s, _ in history["train"]] == list(range(1, 61))
    first, last = history["eval"][0][2], history["eval"][-1][2]
    assert last < first < np.log(64) and last < 1.0
    assert sum(line.startswith("step") for line in lines) == 3
    assert sum(line.startswith("eval") for line in lines) == 2


def test_import_prints_nothing_and_creates_no_file(tmp_path):
    result = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(HERE)!r});"
                             " import llama_jax"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- loss, optimizer


def test_loss_at_init_is_log_vocab():
    params = L.init_params(jax.random.PRNGKey(0), TINY)
    tokens = tokens_for(TINY, 4, 16)
    loss = float(L.eval_loss(params, (tokens, jnp.roll(tokens, -1, 1)), TINY))
    assert loss == pytest.approx(np.log(TINY.vocab_size), abs=0.1)


def test_loss_is_mean_cross_entropy_against_numpy():
    params = random_params(TINY)
    tokens = tokens_for(TINY, 2, 10)
    targets = jnp.roll(tokens, -1, 1)
    logits = np_llama_forward(params, tokens, TINY)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    expected = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1).mean()
    assert float(L.eval_loss(params, (tokens, targets), TINY)) == pytest.approx(expected, abs=1e-4)


def test_window_starts_stay_in_range_and_reach_the_last_window():
    # A window of seq_len + 1 tokens (inputs and the targets one further)
    # starting at s reads s .. s + seq_len, so the last valid start is
    # n - seq_len - 1. Every start must be in [0, that], and both ends drawn.
    n_tokens, seq_len = 40, 7
    last = n_tokens - (seq_len + 1)
    starts = np.concatenate([np.asarray(L.window_starts(k, n_tokens, 64, seq_len))
                             for k in jax.random.split(jax.random.PRNGKey(0), 20)])
    assert starts.min() == 0 and starts.max() == last
    assert set(starts.tolist()) == set(range(last + 1))


def test_learning_rate_schedule_warmup_peak_and_floor():
    tc = L.TrainConfig(steps=1000, lr=1e-3, min_lr=1e-4, warmup_steps=100)
    assert float(L.learning_rate(0, tc)) == pytest.approx(1e-5)
    assert float(L.learning_rate(49, tc)) == pytest.approx(5e-4)
    assert float(L.learning_rate(99, tc)) == pytest.approx(1e-3)  # peak at the end of warmup
    assert float(L.learning_rate(100, tc)) == pytest.approx(1e-3)
    mid = 100 + (999 - 100) / 2
    assert float(L.learning_rate(mid, tc)) == pytest.approx(5.5e-4, rel=1e-4)  # halfway down
    # The floor is reached at the last step, tc.steps - 1 (steps count from 0), not before,
    # and holds after it (a resumed run with more steps).
    assert float(L.learning_rate(999, tc)) == pytest.approx(1e-4)
    assert float(L.learning_rate(998, tc)) > 1e-4 + 1e-10
    assert float(L.learning_rate(1500, tc)) == pytest.approx(1e-4)
    lrs = [float(L.learning_rate(s, tc)) for s in range(100, 1000, 50)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    # Every step against the schedule written out in NumPy: a linear decay
    # meets the cosine at its start, middle and end, so those points alone
    # would not tell them apart.
    s = np.arange(1500)
    progress = np.clip((s - 100) / (999 - 100), 0, 1)
    want = np.where(s < 100, 1e-3 * (s + 1) / 100,
                    1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + np.cos(np.pi * progress)))
    np.testing.assert_allclose(L.learning_rate(jnp.arange(1500), tc), want, rtol=1e-5)


def test_adamw_matches_numpy_reference_over_several_steps():
    tc = L.TrainConfig(lr=1e-2, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=1.0)
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=(4,))}
    grads = [{"w": rng.normal(size=(3, 4)) * s, "b": rng.normal(size=(4,)) * s}
             for s in (0.1, 5.0, 0.3)]  # the second step is clipped
    state = L.adamw_init(jax.tree_util.tree_map(jnp.asarray, params))
    ours = jax.tree_util.tree_map(jnp.asarray, params)
    p = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, g in enumerate(grads, 1):
        ours, state = L.adamw_update(ours, jax.tree_util.tree_map(jnp.asarray, g), state, tc.lr, tc)
        norm = np.sqrt(sum((x ** 2).sum() for x in g.values()))
        scale = min(1.0, tc.grad_clip / (norm + 1e-6))
        for k in p:
            gk = g[k] * scale
            m[k] = 0.9 * m[k] + 0.1 * gk
            v[k] = 0.95 * v[k] + 0.05 * gk ** 2
            update = (m[k] / (1 - 0.9 ** t)) / (np.sqrt(v[k] / (1 - 0.95 ** t)) + 1e-8)
            decay = 0.1 * p[k] if p[k].ndim > 1 else 0.0  # matrices only
            p[k] = p[k] - tc.lr * (update + decay)
        for k in p:
            np.testing.assert_allclose(ours[k], p[k], rtol=1e-5, atol=1e-6)
    assert int(state["step"]) == 3


def test_tiny_model_overfits_one_batch():
    config = L.ModelConfig(tie_embeddings=False, vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                           max_seq_len=32)
    tc = L.TrainConfig(lr=1e-2, warmup_steps=10, steps=300, weight_decay=0.0)
    tokens = tokens_for(config, 4, 17)
    batch = (tokens[:, :-1], tokens[:, 1:])
    params = L.init_params(jax.random.PRNGKey(0), config)
    state = L.adamw_init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(L.compute_loss)(params, batch, config)
        params, state = L.adamw_update(params, grads, state, L.learning_rate(state["step"], tc), tc)
        return params, state, loss

    losses = []
    for _ in range(tc.steps):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[0] > 4.0 and losses[-1] < 0.5


def test_greedy_generate_matches_naive_full_forward_loop_for_a_batch():
    params = random_params(TINY)
    prompts = [[5, 17, 3], [9, 1, 4, 4, 60, 2, 8], [42]]
    out = L.generate(params, prompts, 22, TINY, jax.random.PRNGKey(0), temperature=0.0)
    for prompt, got in zip(prompts, out):
        assert got == naive_greedy(params, prompt, 22, TINY)


def test_generation_sizes_its_cache_to_the_request_not_the_context(monkeypatch):
    # Llama 3.x declares 131,072 positions; a 5-token prompt and 20 new tokens
    # need a cache of the prompt's bucket (16) plus the new tokens' bucket (32).
    long = dataclasses.replace(TINY, max_seq_len=131072)
    params = random_params(TINY)
    built, real_init_cache = [], L.init_cache

    def recording_init_cache(config, batch_size, length=None):
        cache = real_init_cache(config, batch_size, length)
        built.append(cache[0]["k"].shape)
        return cache

    monkeypatch.setattr(L, "init_cache", recording_init_cache)
    prompt = [5, 17, 3, 9, 60]
    out_long = L.generate(params, prompt, 20, long, jax.random.PRNGKey(0), temperature=0.0)
    assert built == [(1, 48, TINY.n_kv_heads, TINY.head_width)]
    # The same tokens as with a short context: RoPE's angles at a position do
    # not depend on how many positions the model declares.
    out_short = L.generate(params, prompt, 20, TINY, jax.random.PRNGKey(0), temperature=0.0)
    assert out_long == out_short == naive_greedy(params, prompt, 20, TINY)


@sampler_names
def test_top_k_1_equals_greedy(sampler):
    params = random_params(TINY)
    greedy = L.generate(params, [3, 1, 4], 15, TINY, jax.random.PRNGKey(0), temperature=0.0)
    top1 = L.generate(params, [3, 1, 4], 15, TINY, jax.random.PRNGKey(7), temperature=1.0,
                      top_k=1, sample=SAMPLERS[sampler][2])
    assert top1 == greedy


@sampler_names
def test_top_p_keeps_the_smallest_set_reaching_p(sampler):
    top_k_filter, top_p_filter, sample_token = SAMPLERS[sampler]
    probs = np.array([[0.05, 0.5, 0.15, 0.3]])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))

    def kept(p):
        return set(np.flatnonzero(np.isfinite(np.asarray(top_p_filter(logits, p))[0])))

    assert kept(0.4) == {1}  # 0.5 alone reaches 0.4
    assert kept(0.5) == {1}
    assert kept(0.75) == {1, 3}  # 0.5 + 0.3
    assert kept(0.9) == {1, 3, 2}  # 0.5 + 0.3 + 0.15 = 0.95
    assert kept(1.0) == {0, 1, 2, 3}


@sampler_names
def test_top_k_keeps_exactly_the_k_largest_against_numpy(sampler):
    top_k_filter, top_p_filter, sample_token = SAMPLERS[sampler]
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50257)).astype(np.float32) * 4
    logits[2, :10] = 30.0  # ten tied maxima: top-3 keeps all ten
    for k in (1, 7, 50, 1000):
        kept = np.isfinite(np.asarray(top_k_filter(jnp.asarray(logits), k)))
        for row in range(2):
            assert set(np.flatnonzero(kept[row])) == set(np.argsort(-logits[row])[:k])
    kept = np.isfinite(np.asarray(top_k_filter(jnp.asarray(logits), 3)))
    assert set(np.flatnonzero(kept[2])) == set(range(10))


@sampler_names
def test_top_k_ignores_masked_minus_infinity_entries(sampler):
    top_k_filter, top_p_filter, sample_token = SAMPLERS[sampler]
    # Logits already masked to -inf (a filter before, a padded vocabulary)
    # must not stretch the bisection's range past the finite logits.
    logits = jnp.asarray([[5.0, 3.0, -jnp.inf, 1.0], [-jnp.inf, -jnp.inf, 2.0, 7.0]])
    for k, expected in ((1, [[1, 0, 0, 0], [0, 0, 0, 1]]), (2, [[1, 1, 0, 0], [0, 0, 1, 1]])):
        kept = np.isfinite(np.asarray(top_k_filter(logits, k))).astype(int)
        np.testing.assert_array_equal(kept, expected)


@sampler_names
def test_top_p_matches_a_sorting_numpy_reference(sampler):
    top_k_filter, top_p_filter, sample_token = SAMPLERS[sampler]
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(4, 5000)) * 3).astype(np.float32)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for p in (0.1, 0.5, 0.9, 0.99):
        kept = np.isfinite(np.asarray(top_p_filter(jnp.asarray(logits), p)))
        for row in range(4):
            order = np.argsort(-probs[row])
            n = np.searchsorted(np.cumsum(probs[row][order]), p) + 1  # smallest prefix >= p
            assert set(np.flatnonzero(kept[row])) == set(order[:n]), (p, row)


@sampler_names
def test_samples_follow_the_softmax_distribution(sampler):
    top_k_filter, top_p_filter, sample_token = SAMPLERS[sampler]
    logits = jnp.array([[2.0, 1.0, 0.5, -1.0, 0.0]])
    n = 40_000
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    for temperature in (1.0, 2.0):
        draws = jax.vmap(lambda k: sample_token(k, logits, temperature)[0])(keys)
        freq = np.bincount(np.asarray(draws), minlength=5) / n
        expected = np.asarray(jax.nn.softmax(logits[0] / temperature))
        # Chi-square with 4 degrees of freedom: 18.5 is its 0.999 quantile.
        chi2 = n * np.sum((freq - expected) ** 2 / expected)
        assert chi2 < 18.5, (temperature, freq, expected)
    top2 = jax.vmap(lambda k: sample_token(k, logits, 1.0, top_k=2)[0])(keys[:5000])
    assert set(np.asarray(top2).tolist()) == {0, 1}
    # Top-k draws from the softmax of the k largest, renormalised.
    draws = jax.vmap(lambda k: sample_token(k, logits, 1.0, top_k=3)[0])(keys)
    freq = np.bincount(np.asarray(draws), minlength=5)[[0, 1, 2]] / n
    expected = np.asarray(jax.nn.softmax(logits[0, :3]))
    chi2 = n * np.sum((freq - expected) ** 2 / expected)  # 2 degrees of freedom: 13.8
    assert chi2 < 13.8, (freq, expected)


def test_same_key_same_tokens_and_different_keys_differ():
    params = random_params(TINY, scale=0.1)  # a flat distribution: samples vary
    a = L.generate(params, [1, 2], 20, TINY, jax.random.PRNGKey(0))
    b = L.generate(params, [1, 2], 20, TINY, jax.random.PRNGKey(0))
    c = L.generate(params, [1, 2], 20, TINY, jax.random.PRNGKey(1))
    assert a == b and a != c
    assert len(a) == 22 and a[:2] == [1, 2]


def test_stop_token_ends_a_row():
    params = random_params(TINY)
    greedy = L.generate(params, [[5, 6], [7]], 12, TINY, jax.random.PRNGKey(0), temperature=0)
    stop = greedy[0][4]  # the third new token of row 0
    out = L.generate(params, [[5, 6], [7]], 12, TINY, jax.random.PRNGKey(0), temperature=0,
                     stop_token=stop)
    assert out[0] == greedy[0][:5]
    row1 = greedy[1][1:]
    expected = greedy[1][:1 + row1.index(stop) + 1] if stop in row1 else greedy[1]
    assert out[1] == expected


def test_generate_compiles_once_not_per_token():
    config = dataclasses.replace(TINY, n_layers=1)  # a config no other test compiled
    params = random_params(config)
    with CompileCounter("_generate") as compiles:
        L.generate(params, [1, 2, 3], 10, config, jax.random.PRNGKey(0))
        L.generate(params, [4, 5], 30, config, jax.random.PRNGKey(1))
    assert compiles.count == 1  # same batch size, prompt and max_new_tokens buckets


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_tokens=[]), "at least one token"),
    (dict(prompt_tokens=[[1], []]), "at least one token"),
    (dict(prompt_tokens=[1, 97]), "token ids must be in \\[0, 97\\)"),
    (dict(prompt_tokens=[-1]), "token ids must be in"),
    (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_p=0.0), "top_p must be in \\(0, 1\\]"),
    (dict(top_p=1.5), "top_p must be in"),
    (dict(top_k=0), "top_k must be >= 1"),
    (dict(prompt_tokens=list(range(30)), max_new_tokens=5),
     "the prompt \\(30 tokens\\) plus max_new_tokens \\(5\\) is 35, more than the model's "
     "context of 32"),
])
def test_generate_rejects_bad_arguments(kwargs, message):
    args = dict(params=None, prompt_tokens=[1, 2], max_new_tokens=4, config=TINY,
                key=jax.random.PRNGKey(0))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        L.generate(**args)


def test_llama3_rope_scaling_changes_only_slow_frequencies():
    plain_cos, plain_sin = L.precompute_rope(64, 4, 500000.0)
    cos, sin = L.precompute_rope(64, 4, 500000.0, (8.0, 1.0, 4.0, 64.0))
    plain, scaled = np.arctan2(plain_sin[1], plain_cos[1]), np.arctan2(sin[1], cos[1])
    wavelength = 2 * np.pi / plain
    fast, slow = wavelength < 64 / 4, wavelength > 64 / 1
    np.testing.assert_allclose(scaled[fast], plain[fast], rtol=1e-5)
    np.testing.assert_allclose(scaled[slow], plain[slow] / 8, rtol=1e-5)
    between = ~fast & ~slow
    assert np.all((scaled[between] < plain[between]) & (scaled[between] > plain[between] / 8))


@pytest.mark.slow
def test_walkthrough_notebook_runs_in_fast_mode(programs_beside):
    import nbformat

    code, out, folder = finished(programs_beside, "test_walkthrough_notebook_runs_in_fast_mode")
    assert code == 0, out[-5000:]
    notebook = nbformat.read(folder / "executed.ipynb", as_version=4)
    # The training cell redraws its plot in place; the health cell draws its own.
    for marker in ("L.train_step(params, opt_state, batch, dropout_key", "lt.step.run_step("):
        cell = next(c for c in notebook.cells if marker in c.source)
        assert any("image/png" in out.get("data", {}) for out in cell.outputs), marker
    assert "fast mode: True" in notebook.cells[1].outputs[0]["text"]


def test_committed_notebook_shows_a_real_run_and_stays_small():
    import nbformat

    path = HERE / "walkthrough.ipynb"
    assert path.stat().st_size < 1_500_000
    notebook = nbformat.read(path, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "run tools/make_notebook.py to fill the outputs"
    assert "fast mode: False" in code[0].outputs[0]["text"]
    assert not any(out.output_type == "error" for c in code for out in c.outputs)
    # The committed cells are the ones tools/make_notebook.py builds.
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_notebook", HERE / "tools" / "make_notebook.py")
    make_notebook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_notebook)
    assert [c.source for c in make_notebook.build().cells] == [c.source for c in notebook.cells]


def test_initialisation_statistics_per_matrix():
    config = L.ModelConfig(vocab_size=1000, dim=128, n_layers=4, n_heads=4, n_kv_heads=2,
                           max_seq_len=32, vocab_multiple=64, tie_embeddings=False)
    params = L.init_params(jax.random.PRNGKey(0), config)
    residual_std = 0.02 / np.sqrt(2 * config.n_layers)  # GPT-2 paper, section 2.3: 0.00707 here
    for layer in params["layers"]:
        for group, name, std in [("attention", "wq", 0.02), ("attention", "wk", 0.02),
                                 ("attention", "wv", 0.02), ("attention", "wo", residual_std),
                                 ("feed_forward", "w1", 0.02), ("feed_forward", "w3", 0.02),
                                 ("feed_forward", "w2", residual_std)]:
            w = np.asarray(layer[group][name])
            assert abs(w.std() / std - 1) < 0.05, (group, name, w.std(), std)
            assert abs(w.mean()) < 0.1 * std
        np.testing.assert_array_equal(layer["attention_norm"], 1.0)
        np.testing.assert_array_equal(layer["ffn_norm"], 1.0)
    np.testing.assert_array_equal(params["norm"], 1.0)
    emb, out = np.asarray(params["tok_embeddings"]), np.asarray(params["output"])
    assert emb.shape == (1024, 128) and out.shape == (128, 1024)
    assert not emb[1000:].any() and not out[:, 1000:].any()  # padding rows and columns are zero
    assert abs(emb[:1000].std() / 0.02 - 1) < 0.05 and abs(out[:, :1000].std() / 0.02 - 1) < 0.05
