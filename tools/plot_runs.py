"""Training runs side by side: a table and a plot of their validation loss.

    python tools/plot_runs.py --out assets/corpus_runs_cpu.png RUN_DIR [RUN_DIR ...]

For each run folder (a `python llama_jax.py --out-dir RUN_DIR ...` run), it
scores the model on the held-out plays (`--eval shakespeare_heldout.txt
--json`), reads the validation losses from RUN_DIR/metrics.jsonl, prints one
Markdown row per run (held-out nats per token, validation, steps, seconds per
step) and draws each run's validation loss against the step. A run is named by
its folder.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def summary(folder, heldout):
    records = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["val_loss"]) for r in records if r["kind"] == "eval"]
    timed = [r for r in records if r["kind"] == "train" and r.get("ms_per_step")]
    result = subprocess.run([sys.executable, "llama_jax.py", "--eval", heldout, "--json",
                             "--out-dir", str(folder)], cwd=HERE, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: --eval on {folder} failed:\n{result.stderr[-2000:]}")
    return {"run": folder.name, "curve": evals, "val_loss": evals[-1][1], "steps": evals[-1][0],
            "heldout": json.loads(result.stdout.strip().splitlines()[-1])["nats_per_token"],
            "s_per_step": sum(r["ms_per_step"] * r["steps"] for r in timed)
            / 1e3 / max(sum(r["steps"] for r in timed), 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--heldout", default=str(HERE / "shakespeare_heldout.txt"))
    p.add_argument("--out", type=Path, help="the plot's PNG file")
    p.add_argument("--title", default="validation loss of each run")
    args = p.parse_args(argv)
    results = [summary(folder, args.heldout) for folder in args.runs]
    print("| run | held-out plays, nats/token | validation | steps | s/step |")
    print("| --- | --- | --- | --- | --- |")
    for r in sorted(results, key=lambda r: r["heldout"]):
        print(f"| {r['run']} | {r['heldout']:.3f} | {r['val_loss']:.3f} | {r['steps']:,} | "
              f"{r['s_per_step']:.3f} |")
    if args.out:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 4.2), dpi=100)
        ax = fig.add_subplot()
        for r in sorted(results, key=lambda r: r["heldout"]):
            steps, losses = zip(*[(s, v) for s, v in r["curve"] if s > 0])  # not the start
            ax.plot(steps, losses, "o-", ms=3, label=f"{r['run']}: held-out {r['heldout']:.3f}")
        ax.set(xlabel="step", ylabel="validation loss (nats per token)", title=args.title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
