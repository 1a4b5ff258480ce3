"""What the run-health figures cost: training tokens/s of the cpu preset's
model and batch with TrainConfig.health on and off, alternating rounds in one
process so that both see the same machine load.

    python tools/bench_health.py [--rounds 4] [--steps 10]
"""
import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

import llama_jax as L  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round and setting")
    args = p.parse_args(argv)
    config, tc = L.resolve_configs(L.build_parser().parse_args(["--preset", "cpu"]))
    data = jax.random.randint(jax.random.PRNGKey(0), (1_000_000,), 0, config.vocab_size)
    keys = L.run_keys(jax.random.PRNGKey(2))
    states = {}
    for health in (True, False):
        params = L.init_params(jax.random.PRNGKey(1), config)
        states[health] = [params, L.adamw_init(params), dataclasses.replace(tc, health=health)]
    best = {True: 0.0, False: 0.0}
    for r in range(args.rounds):
        for health, state in states.items():
            def step():
                state[0], state[1], loss, h = L.train_step(state[0], state[1], data, keys,
                                                           config, state[2])
                return loss
            step().block_until_ready()  # compiles in the first round
            t0 = time.perf_counter()
            for _ in range(args.steps):
                loss = step()
            loss.block_until_ready()
            tps = tc.batch_size * tc.seq_len * args.steps / (time.perf_counter() - t0)
            best[health] = max(best[health], tps)
            print(f"round {r}: health {'on ' if health else 'off'} {tps:8,.0f} tokens/s", flush=True)
    print(f"best rounds: on {best[True]:,.0f}, off {best[False]:,.0f} tokens/s: the health "
          f"figures cost {1 - best[True] / best[False]:.1%}")


if __name__ == "__main__":
    main()
