"""Part I's kernels against the package's, in the training step's loss and gradients.

    python tools/bench_kernels.py [--preset cpu] [--dtype bfloat16] [--rounds 5]

Part I's transformer_block takes `dense` and `attend` with Part I's functions
as defaults; the package's training passes run_dense (under bfloat16, a matmul
whose gradient is written by hand) and, where a preset chooses it,
fused_attend (jax.nn.dot_product_attention). This times jax.value_and_grad of
the loss for each combination at the preset's model and batch, compiled first,
then in alternating rounds (so that a change in the machine's load falls on
all of them), and prints the best round of each in ms per step.
"""

import argparse
import functools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import llama_jax as L  # noqa: E402
import llamatool as lt


def loss_fn(params, batch, config, dense, attend):
    """The package's plain loss with the given kernels."""
    block = functools.partial(L.transformer_block, dense=dense, attend=attend)
    h, _ = L.forward_hidden(params, batch[0], config, block=block)
    logits = L.at_least_f32(dense(h, L.output_weight(params), config))
    return lt.speed.masked_cross_entropy(logits, batch[1], config)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu", choices=sorted(lt.presets.PRESETS))
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5, help="steps per round")
    args = parser.parse_args()
    config, tc = lt.configs.preset_configs(args.preset, compute_dtype=args.dtype)
    fused = functools.partial(lt.speed.fused_attend, dtype=config.dtype)
    variants = {"Part I's dense, attend": (L.dense, L.attend),
                "Part I's dense, fused_attend": (L.dense, fused),
                "run_dense, attend": (lt.speed.run_dense, L.attend),
                "run_dense, fused_attend": (lt.speed.run_dense, fused)}
    if args.dtype == "float32":  # run_dense is Part I's matmul there
        variants = {k: v for k, v in variants.items() if k.startswith("Part I")}
    params = L.init_params(jax.random.PRNGKey(0), config)
    tokens = jnp.asarray(np.random.RandomState(0).randint(
        0, config.vocab_size, (tc.batch_size, tc.seq_len + 1)).astype(np.int32))
    batch = (tokens[:, :-1], tokens[:, 1:])
    steps = {name: jax.jit(jax.value_and_grad(functools.partial(
        loss_fn, config=config, dense=d, attend=a))) for name, (d, a) in variants.items()}
    for step in steps.values():
        jax.block_until_ready(step(params, batch))  # compile
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(args.rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                out = step(params, batch)
            jax.block_until_ready(out)
            best[name] = min(best[name], (time.perf_counter() - t0) / args.repeats)
    print(f"JAX {jax.__version__} on {jax.devices()[0].platform}; the {args.preset} preset's "
          f"model, {args.dtype}, batch {tc.batch_size} x {tc.seq_len}; loss and gradients, best "
          f"of {args.rounds} alternating rounds of {args.repeats}")
    first = next(iter(best.values()))
    for name, seconds in best.items():
        print(f"{name:<32}{seconds * 1e3:8.0f} ms/step  {first / seconds:5.2f}x")


if __name__ == "__main__":
    main()
