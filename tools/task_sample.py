"""--tasks' scores on a seeded random sample of a task's questions, for tasks
too long to score whole on a CPU (HellaSwag: 10,042 questions). --limit N
takes the first N in the file's order, which for HellaSwag are all from
ActivityNet; this takes N chosen uniformly at random (numpy's
RandomState(seed).choice, without replacement), scored in the file's order.

    python tools/task_sample.py hellaswag --n 1000 --seed 0 (--gguf FILE | --hf-checkpoint DIR | --out-dir DIR) [--json]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import llamatool as lt  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("task")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gguf")
    p.add_argument("--hf-checkpoint")
    p.add_argument("--out-dir", default="out")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    try:
        path = lt.tasks.task_file(args.task)
        questions = lt.tasks.read_questions(path)
        if not 0 < args.n <= len(questions):
            raise lt.tasks.InputError(f"--n {args.n}: {args.task} has {len(questions)} questions")
        pick = sorted(np.random.RandomState(args.seed).choice(len(questions), args.n,
                                                              replace=False))
        questions = [questions[i] for i in pick]
        model = lt.modes.load_model(argparse.Namespace(gguf=args.gguf, dtype=None,
                                                       hf_checkpoint=args.hf_checkpoint,
                                                       tokenizer=None, out_dir=args.out_dir))
    except lt.tasks.InputError as err:
        sys.exit(f"error: {err}")
    import time
    t0 = time.perf_counter()
    encoded = lt.tasks.encode_questions(model.tokenizer, questions,
                                        model.config.max_seq_len, args.task)
    scores = lt.tasks.score_questions(model.params, model.config, encoded,
                                      log=lambda line: print(line, file=sys.stderr, flush=True))
    seconds = time.perf_counter() - t0
    r = {"task": args.task, "sample": f"{args.n} of the questions at random, seed {args.seed}",
         "questions": args.n, **lt.tasks.accuracies(questions, scores), "seconds": seconds,
         "questions_per_s": args.n / seconds}
    print(json.dumps({"model": model.source, **r}) if args.json else lt.tasks.format_result(r))


if __name__ == "__main__":
    main()
