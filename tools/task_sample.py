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
    def pick(questions):
        if not 0 < args.n <= len(questions):
            raise lt.tasks.InputError(f"--n {args.n}: {args.task} has {len(questions)} questions")
        chosen = np.random.RandomState(args.seed).choice(len(questions), args.n, replace=False)
        return [questions[i] for i in sorted(chosen)]

    try:
        model = lt.modes.load_model(argparse.Namespace(gguf=args.gguf, dtype=None,
                                                       hf_checkpoint=args.hf_checkpoint,
                                                       tokenizer=None, out_dir=args.out_dir))
        r = lt.tasks.evaluate_task(model, args.task, pick=pick, log=lambda line: print(
            line, file=sys.stderr, flush=True))
    except lt.tasks.InputError as err:
        sys.exit(f"error: {err}")
    r["sample"] = f"{args.n} of the questions at random, seed {args.seed}"
    print(json.dumps({"model": model.source, **r}) if args.json else lt.tasks.format_result(r))

if __name__ == "__main__":
    main()
