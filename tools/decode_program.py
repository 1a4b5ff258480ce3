"""What one decoded token costs in the compiled program, Part I's decoding
beside the package's (llamatool/speed.py, FAST_DECODING: q, k, v and w1, w3
read as one matrix each, the cache written without a scatter at batch 1):
the decoding loop's top-level instructions (each roughly a kernel on a GPU),
its matrix products, scatters and copies, read from XLA's compiled program on
this machine, and the scatters the lowered program asks for.

    python tools/decode_program.py [--dim 256 --n-layers 6 --n-heads 8 --n-kv-heads 4]
                                   [--batch 1 8] [--smollm2] [--rounds 5]

--rounds N also times both, at batch 1, 200 new tokens after a 16-token
prompt, greedy, alternating rounds (best of each): tokens per second.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

import llama_jax as L  # noqa: E402
import llamatool as lt  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=6)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--n-kv-heads", type=int, default=4)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--smollm2", action="store_true",
                   help="SmolLM2-135M's shape instead (30 blocks, width 576, 9 heads, 3 K/V)")
    p.add_argument("--rounds", type=int, default=0, help="also time both, this many rounds")
    args = p.parse_args()
    if args.smollm2:
        config = L.ModelConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                               ffn_dim=1536, max_seq_len=2048, tie_embeddings=True)
    else:
        config = L.ModelConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                               n_kv_heads=args.n_kv_heads, max_seq_len=256)
    params = L.init_params(jax.random.PRNGKey(0), config)
    print(f"width {config.dim}, {config.n_layers} blocks, {config.n_heads} heads, "
          f"{config.n_kv_heads} K/V heads; one token of the decoding loop, {jax.devices()[0]}")
    for batch in args.batch:
        for name, decoding in (("Part I", None), ("package", lt.speed.FAST_DECODING)):
            c = lt.bench.decode_loop_counts(params, config, batch, decoding)
            print(f"batch {batch} {name:8s} {c['instructions']:4d} instructions, {c['dots']:3d} "
                  f"matrix products, {c['scatters']:2d} scatters ({c['scatters_lowered']} asked "
                  f"for before XLA's passes), {c['copies']:3d} copies", flush=True)
    if args.rounds:
        time_both(params, config, args.rounds)


def time_both(params, config, rounds, n_new=200):
    """Best tokens/s of each decoding at batch 1, alternating rounds."""
    kinds = {"Part I's blocks": dict(sample=lt.speed.fast_sample_token),
             "package's blocks": lt.speed.FAST_DECODING}
    prompt = list(range(1, 17))
    best = {}
    for name, kw in kinds.items():  # compile
        L.generate(params, prompt, n_new, config, jax.random.PRNGKey(0), temperature=0.0, **kw)
    for r in range(rounds):
        for name, kw in kinds.items():
            t0 = time.perf_counter()
            L.generate(params, prompt, n_new, config, jax.random.PRNGKey(r), temperature=0.0, **kw)
            best[name] = max(best.get(name, 0.0), n_new / (time.perf_counter() - t0))
    print("decoding at batch 1, both with the package's sampler, best of "
          f"{rounds} alternating rounds: " + ", ".join(f"{k} {v:,.0f} tokens/s"
                                                       for k, v in best.items()), flush=True)


if __name__ == "__main__":
    main()
