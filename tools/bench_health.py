"""What the run-health figures cost: training tokens/s of the cpu preset's
model and batch with TrainConfig.health on and off, alternating rounds in one
process so that both see the same machine load. "On" is what a run pays: the
figures inside the step (gradient norms, update ratios, residual RMS) and,
every --log-every steps, the attention entropy's forward pass of its own
(llamatool.health.logged_entropy).

    python tools/bench_health.py [--rounds 4] [--steps N] [--seq-len T] [--batch-size B]
"""
import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

import llama_jax as L  # noqa: E402

import llamatool as lt  # noqa: E402
from bench_vs_hf import best_of_rounds  # noqa: E402  (this folder)


def stepper(config, tc, log_every):
    """(step, wait) for best_of_rounds: run_step, and with health on the
    entropy pass at every log_every-th step, as training.log_progress runs it."""
    data = jax.random.randint(jax.random.PRNGKey(0), (1_000_000,), 0, config.vocab_size)
    state = {"params": L.init_params(jax.random.PRNGKey(1), config), "n": 0}
    state["opt"] = L.adamw_init(state["params"])
    keys = L.run_keys(jax.random.PRNGKey(2))

    def step():
        state["params"], state["opt"], loss, _ = lt.step.run_step(
            state["params"], state["opt"], data, keys, config, tc)
        state["n"] += 1
        if tc.health and state["n"] % log_every == 0:
            lt.health.logged_entropy(state["params"], data, keys, state["n"] - 1, config, tc)
        return loss

    return step, lambda loss: loss.block_until_ready()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, help="timed steps per round and setting (default: "
                   "--log-every, so that each round of health on holds one entropy pass)")
    p.add_argument("--seq-len", type=int, help="tokens per row (default: the preset's)")
    p.add_argument("--batch-size", type=int, help="rows per step (default: the preset's)")
    p.add_argument("--log-every", type=int, help="steps between entropy passes (default: the "
                   "preset's log_every)")
    args = p.parse_args(argv)
    config, tc = lt.configs.preset_configs("cpu")
    tc = dataclasses.replace(tc, seq_len=args.seq_len or tc.seq_len,
                             batch_size=args.batch_size or tc.batch_size)
    config = dataclasses.replace(config, max_seq_len=max(config.max_seq_len, tc.seq_len))
    log_every = args.log_every or tc.log_every
    steps = args.steps or log_every
    print(f"cpu preset, {tc.batch_size} x {tc.seq_len} tokens a step, {config.compute_dtype}, "
          f"attention {config.attention}, entropy every {log_every} steps", flush=True)
    contenders = {f"health {name}": stepper(config, dataclasses.replace(tc, health=on), log_every)
                  for name, on in (("on", True), ("off", False))}
    best = best_of_rounds(contenders, tc.batch_size * tc.seq_len, steps, args.rounds,
                          lambda r, name, tps: print(f"round {r}: {name:10s} {tps:8,.0f} tokens/s",
                                                     flush=True))
    on, off = best["health on"], best["health off"]
    print(f"best rounds: on {on:,.0f}, off {off:,.0f} tokens/s: the health figures cost "
          f"{1 - on / off:.1%}")


if __name__ == "__main__":
    main()
