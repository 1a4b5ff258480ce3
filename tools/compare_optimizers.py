"""AdamW against Muon at a preset, on text the model has not seen.

For each optimizer and each of its learning rates, one run of the preset
under the same wall-clock budget (--time-budget), the runs of the two
optimizers alternating so that the machine's drift falls on both; then
--eval on the held-out plays. Prints a table (held-out nats per token,
validation loss, steps done, seconds per step) and draws each optimizer's
validation loss against training seconds, its best learning rate in bold.

    python tools/compare_optimizers.py --budget 3 --out /tmp/optimizers

Every run's folder stays in --out (checkpoint, metrics.jsonl, the log), so a
figure can be checked, and a run that exists already is not run again.
"""

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def run(cmd, log):
    with open(log, "a") as f:
        return subprocess.run(cmd, cwd=HERE, stdout=f, stderr=subprocess.STDOUT).returncode


def curve(folder):
    """(training seconds, validation loss) at each evaluation, the seconds
    summed from metrics.jsonl's step records (evaluation time left out)."""
    seconds, points = 0.0, []
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "train" and r.get("ms_per_step") is not None:
            seconds += r["ms_per_step"] / 1e3 * r["steps"]
        elif r["kind"] == "eval":
            points.append((seconds, r["val_loss"]))
    return points


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=3.0, help="minutes per run (--time-budget)")
    p.add_argument("--adamw-lrs", default="1.5e-3,3e-3,6e-3")
    p.add_argument("--muon-lrs", default="3e-3,6e-3,1.2e-2")
    p.add_argument("--muon-adam-lr",
                   help="the Muon runs' --adam-lr (embedding, output, norms); default: the "
                        "preset's AdamW rate (3e-3 for cpu, 1e-3 for gpu), so that the Muon "
                        "runs vary Muon's rate alone")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--heldout", default=str(HERE / "shakespeare_heldout.txt"))
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.muon_adam_lr is None:
        sys.path.insert(0, str(HERE))
        import llama_jax as L
        import llamatool as lt
        args.muon_adam_lr = f"{lt.presets.adamw_rates(lt.presets.PRESETS[args.preset][1])['lr']:g}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lrs = {"adamw": args.adamw_lrs.split(","), "muon": args.muon_lrs.split(",")}
    # alternating, AdamW's first, while both lists last (then the longer one's rest)
    order = [(opt, lr) for pair in itertools.zip_longest(*lrs.values())
             for opt, lr in zip(lrs, pair) if lr is not None]
    results = []
    for opt, lr in order:
        folder = out / f"{opt}-{lr}"
        log = out / f"{opt}-{lr}.log"  # beside the folder (lr has dots: no with_suffix)
        if not (folder / "ckpt.npz").is_file():
            extra = ["--adam-lr", args.muon_adam_lr] if opt == "muon" else []
            code = run([sys.executable, "llama_jax.py", "--preset", args.preset, "--optimizer",
                        opt, "--lr", lr, *extra, "--time-budget", str(args.budget), "--out-dir",
                        str(folder), "--max-new-tokens", "0"], log)
            if code != 0:
                print(f"{opt} lr {lr}: the run failed (exit {code}); see {log}", flush=True)
                continue
        heldout = subprocess.run([sys.executable, "llama_jax.py", "--eval", args.heldout,
                                  "--json", "--out-dir", str(folder)], cwd=HERE,
                                 capture_output=True, text=True)
        figures = json.loads(heldout.stdout.strip().splitlines()[-1])
        points = curve(folder)
        records = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        timed = [r for r in records if r["kind"] == "train" and r.get("ms_per_step")]
        results.append({"optimizer": opt, "lr": float(lr), "steps": records[-1]["step"],
                        "val_loss": points[-1][1], "heldout": figures["nats_per_token"],
                        "s_per_step": sum(r["ms_per_step"] * r["steps"] for r in timed)
                        / 1e3 / max(sum(r["steps"] for r in timed), 1),
                        "curve": points})
        r = results[-1]
        print(f"{opt:5s} lr {lr:>7s}: held-out {r['heldout']:.4f} nats/token, validation "
              f"{r['val_loss']:.4f}, {r['steps']} steps, {r['s_per_step']:.3f} s/step",
              flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n| optimizer | lr | held-out nats/token | validation | steps | s/step |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in sorted(results, key=lambda r: (r["optimizer"], r["lr"])):
        print(f"| {r['optimizer']} | {r['lr']:g} | {r['heldout']:.4f} | {r['val_loss']:.4f} | "
              f"{r['steps']} | {r['s_per_step']:.3f} |")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=100)
    ax = fig.add_subplot()
    for opt, color in (("adamw", "tab:blue"), ("muon", "tab:red")):
        mine = [r for r in results if r["optimizer"] == opt]
        if not mine:
            continue
        best = min(mine, key=lambda r: r["heldout"])
        for r in mine:
            xs, ys = zip(*r["curve"])
            ax.plot(xs, ys, "o-", color=color, alpha=1.0 if r is best else 0.3,
                    lw=2 if r is best else 1, ms=3,
                    label=f"{opt} lr {r['lr']:g}" + (" (best held-out)" if r is best else ""))
    ax.set_xlabel("training seconds (evaluations left out)")
    ax.set_ylabel("validation loss (nats per token)")
    ax.set_title(f"{args.preset} preset, {args.budget:g} minutes a run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "optimizers.png")
    print(f"wrote {out / 'results.json'} and {out / 'optimizers.png'}")


if __name__ == "__main__":
    main()
