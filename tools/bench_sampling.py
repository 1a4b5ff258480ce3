"""Part I's sampler against the package's, one draw at a time, at batch 1 and 8.

    python tools/bench_sampling.py [--rounds 7] [--vocab 50257]

Part I's sample_token filters with lax.top_k and a sort and draws with
jax.random.categorical; the package's fast_sample_token (llamatool/speed.py) finds the
same thresholds by bisection and draws by inverting the cumulative
distribution. Each is jitted and compiled first; then, for each setting
(top-k 50, top-p 0.9, both, neither), the two are timed in alternating rounds
(Part I's, the package's, Part I's, ...) so that a change in the machine's load falls
on both, and the best round of each is reported in ms per draw.
"""

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import llama_jax as L  # noqa: E402
import llamatool as lt

SETTINGS = {"top-k 50": dict(top_k=50, top_p=1.0), "top-p 0.9": dict(top_k=None, top_p=0.9),
            "top-k 50, top-p 0.9": dict(top_k=50, top_p=0.9),
            "no filter": dict(top_k=None, top_p=1.0)}


def timed(fn, key, logits, repeats):
    """Best-of-one-round seconds per call of fn over `repeats` draws."""
    t0 = time.perf_counter()
    for i in range(repeats):
        out = fn(jax.random.fold_in(key, i), logits)
    out.block_until_ready()
    return (time.perf_counter() - t0) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=20, help="draws per round")
    parser.add_argument("--vocab", type=int, default=50257)
    args = parser.parse_args()
    print(f"JAX {jax.__version__} on {jax.devices()[0].platform}; vocabulary {args.vocab:,}; "
          f"best of {args.rounds} alternating rounds of {args.repeats} draws")
    print(f"{'setting':<22}{'batch':>6}{'Part I ms':>11}{'package ms':>12}{'ratio':>8}")
    for name, filters in SETTINGS.items():
        for batch in (1, 8):
            logits = 3 * jax.random.normal(jax.random.PRNGKey(batch), (batch, args.vocab))
            fns = [jax.jit(lambda k, x, s=s: s(k, x, jnp.float32(0.8), **filters))
                   for s in (L.sample_token, lt.speed.fast_sample_token)]
            for fn in fns:
                fn(jax.random.PRNGKey(0), logits).block_until_ready()  # compile
            best = [float("inf"), float("inf")]
            for r in range(args.rounds):
                for i, fn in enumerate(fns):
                    best[i] = min(best[i], timed(fn, jax.random.PRNGKey(r), logits, args.repeats))
            print(f"{name:<22}{batch:>6}{best[0] * 1e3:>11.2f}{best[1] * 1e3:>12.2f}"
                  f"{best[0] / best[1]:>7.1f}x")


if __name__ == "__main__":
    main()
