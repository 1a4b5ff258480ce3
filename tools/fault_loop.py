"""Kill a training run at random moments, resume it each time, and check that nothing is lost.

    python tools/fault_loop.py --format npz --kills 10 --out /tmp/faults
    python tools/fault_loop.py --format orbax --kills 10 --out /tmp/faults
    python tools/fault_loop.py --format npz --file-limit-kb 5000 --out /tmp/faults

A tiny model trains on shakespeare.txt and saves every 5 steps. Each round starts the run
(fresh the first time, --resume after), sends SIGKILL at a random moment, then reads the
run's checkpoint the way --resume does (saved_checkpoint, load_checkpoint): it must load, and
its step must never be below the one before. With --file-limit-kb, the second round instead
resumes under a limit on the size of any file it writes (ulimit -f; below the checkpoint's
size): its save fails, and a run without the limit must then resume from the last complete
step. Last, a run resumes to the end. It prints
one line per round and a count, and exits 1 if any check failed.
"""

import argparse
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import llamatool as lt  # noqa: E402

TINY = ["--dim", "32", "--n-layers", "2", "--n-heads", "4", "--n-kv-heads", "2",
        "--batch-size", "4", "--seq-len", "32", "--eval-every", "5", "--log-every", "5",
        "--max-new-tokens", "1", "--dtype", "float32", "--health"]


def saved_step(out):
    """The step of the checkpoint --resume would load (None: no checkpoint),
    loading it whole to prove it complete."""
    path = lt.checkpoint_formats.saved_checkpoint(out)
    if path is None:
        return None
    return int(lt.checkpoint_formats.load_checkpoint(path).opt_state["step"])


def command(args, out, resume):
    return [sys.executable, str(ROOT / "llama_jax.py"), *TINY, "--steps", str(args.steps),
            "--checkpoint", args.format, "--out-dir", str(out)] + (["--resume"] if resume else [])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--format", choices=["npz", "orbax"], default="npz")
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--file-limit-kb", type=int,
                   help="two rounds: a kill, then a resume under ulimit -f (below the "
                        "checkpoint's size)")
    p.add_argument("--out", default="/tmp/fault_loop")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    out = Path(args.out) / args.format
    if out.exists():  # this tool's own scratch folder, from an earlier call
        shutil.rmtree(out)
    last, failures = None, 0
    rounds = 2 if args.file_limit_kb else args.kills
    for i in range(rounds):
        resume = last is not None
        if args.file_limit_kb and i == 1 and last is not None:  # a save that cannot finish
            proc = subprocess.run(  # the shell's ulimit: no fork of this threaded process
                ["bash", "-c", f'ulimit -f {args.file_limit_kb} && exec "$@"', "bash",
                 *command(args, out, resume)], capture_output=True, text=True)
            what = f"under ulimit -f {args.file_limit_kb} KB: exit {proc.returncode}, " + \
                   (proc.stderr.strip().splitlines() or ["(no message)"])[-1][:160]
        else:
            proc = subprocess.Popen(command(args, out, resume), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            wait = rng.uniform(3, 25)
            time.sleep(wait)
            proc.kill()
            proc.wait()
            what = f"killed after {wait:.1f}s"
        try:
            step = saved_step(out)
            # No checkpoint yet is fine before the first save; after it, never.
            ok = (last is None and step is None) or (
                step is not None and (last is None or step >= last))
            said = (f"resumes at step {step}" if step is not None else "no checkpoint yet") + (
                "" if ok else f" (before: {last})")
        except Exception as err:  # a checkpoint that does not load is a failure
            step, ok, said = last, False, f"does not load: {type(err).__name__}: {err}"[:200]
        failures += not ok
        last = step if step is not None else last
        print(f"round {i + 1}: {what}; {said}{'' if ok else '  <- FAILED'}", flush=True)
    final = subprocess.run(command(args, out, last is not None), capture_output=True, text=True)
    step = saved_step(out)
    ok = final.returncode == 0 and step == args.steps
    failures += not ok
    print(f"last run: exit {final.returncode}, ends at step {step} of {args.steps}"
          f"{'' if ok else '  <- FAILED'}")
    print(f"{rounds} round(s), {failures} failed ({args.format})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
