"""What the run-health figures cost: training tokens/s of the cpu preset's
model and batch with TrainConfig.health on and off, alternating rounds in one
process so that both see the same machine load.

    python tools/bench_health.py [--rounds 4] [--steps 10]
"""
import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import llama_jax as L  # noqa: E402

import llamatool as lt
from bench_vs_hf import best_of_rounds, jax_stepper  # noqa: E402  (this folder)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round and setting")
    args = p.parse_args(argv)
    config, tc = lt.configs.preset_configs("cpu")
    contenders = {f"health {name}": jax_stepper(config, dataclasses.replace(tc, health=on))
                  for name, on in (("on", True), ("off", False))}
    best = best_of_rounds(contenders, tc.batch_size * tc.seq_len, args.steps, args.rounds,
                          lambda r, name, tps: print(f"round {r}: {name:10s} {tps:8,.0f} tokens/s",
                                                     flush=True))
    on, off = best["health on"], best["health off"]
    print(f"best rounds: on {on:,.0f}, off {off:,.0f} tokens/s: the health figures cost "
          f"{1 - on / off:.1%}")


if __name__ == "__main__":
    main()
