"""Part I's sampler against the package's, one draw at a time, at batch 1 and 8.

    python tools/bench_sampling.py [--rounds 7] [--vocab 50257] [--generate]

Part I's sample_token draws among lax.top_k's k values for top-k alone,
and otherwise filters (a sort for top-p) and draws with
jax.random.categorical; the package's fast_sample_token (llamatool/speed.py)
calls it for top-k alone, and otherwise finds the same thresholds by
bisection and draws by inverting the cumulative distribution. Each is jitted
and compiled first; then, for each setting
(top-k 50, top-p 0.9, both, neither), the two are timed in alternating rounds
(Part I's, the package's, Part I's, ...) so that a change in the machine's load falls
on both, and the best round of each is reported in ms per draw.

--generate times whole decoding instead: generate at the seed configuration
(width 256, 6 blocks, 8 heads, 4 K/V heads) or, with --config cpu, the cpu
preset's model, batch 1, 16-token prompt, 200 new tokens at temperature 0.8
and top-k 50, in alternating rounds: Part I's generate as it is, with the
package's sampler, and with all the command line passes (FAST_DECODING):
tokens per second.
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


# The seed configuration, and the cpu preset's model (read from PRESETS; float32,
# as the command line decodes on a CPU).
CONFIGS = {"seed": lambda: L.ModelConfig(dim=256, n_layers=6, n_heads=8, n_kv_heads=4,
                                         max_seq_len=256),
           "cpu": lambda: lt.configs.preset_configs("cpu", compute_dtype="float32")[0]}


def time_generate(rounds, n_new=200, size="seed"):
    """generate's tokens/s with Part I's defaults, with the package's sampler
    alone, and with everything the command line passes (FAST_DECODING)."""
    config = CONFIGS[size]()
    params = L.init_params(jax.random.PRNGKey(0), config)
    ways = {"Part I's generate": {},
            "with fast_sample_token": dict(sample=lt.speed.fast_sample_token),
            "with the joined weights (prepare, block)": dict(
                prepare=lt.speed.fused_decoding_weights, block=lt.speed.decode_block),
            "with FAST_DECODING (the command line's)": lt.speed.FAST_DECODING}
    prompt, best = list(range(1, 17)), {}
    for kwargs in ways.values():  # compile
        L.generate(params, prompt, n_new, config, jax.random.PRNGKey(0), 0.8, 50, **kwargs)
    for r in range(rounds):
        for name, kwargs in ways.items():
            t0 = time.perf_counter()
            L.generate(params, prompt, n_new, config, jax.random.PRNGKey(r), 0.8, 50, **kwargs)
            best[name] = max(best.get(name, 0.0), n_new / (time.perf_counter() - t0))
    print(f"generate at the {size} configuration (width {config.dim}, {config.n_layers} blocks, "
          f"{config.n_heads} heads, {config.n_kv_heads} K/V heads), batch 1, {n_new} tokens, "
          f"temperature 0.8, top-k 50, best of {rounds} alternating rounds:")
    for name, rate in best.items():
        print(f"  {name:42s} {rate:8,.0f} tokens/s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generate", action="store_true", help="time generate instead")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="seed",
                        help="--generate's model: the seed configuration or the cpu preset's")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=20, help="draws per round")
    parser.add_argument("--vocab", type=int, default=50257)
    args = parser.parse_args()
    if args.generate:
        return time_generate(args.rounds, size=args.config)
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
