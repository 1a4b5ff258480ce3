"""Training tokens/s of llama_jax beside Hugging Face transformers'
LlamaForCausalLM (PyTorch), the same architecture and batch, in one process,
alternating rounds so that both see the same machine load.

    python tools/bench_vs_hf.py [--rounds 3] [--steps 6] [--batch-size 8] [--seq-len 256]

Needs torch and transformers (optional packages; this script is the only
place that imports them outside the tests). The architecture is the
benchmark configuration of docs/speed.md (width 256, 6 layers, 8 heads, 4 K/V
heads, FFN 704, untied, vocabulary 50,257). transformers runs in float32 and
under torch.autocast(bfloat16); llama_jax in float32 and bfloat16 (--dtype),
each with the plain and the blockwise cross-entropy (--loss). Prints one line
per measurement and a summary; --json writes JSON lines instead.
"""
import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import llama_jax as L  # noqa: E402

import llamatool as lt


def jax_stepper(config, tc):
    data = jax.random.randint(jax.random.PRNGKey(0), (1_000_000,), 0, config.vocab_size)
    state = {"params": L.init_params(jax.random.PRNGKey(1), config)}
    state["opt"] = L.adamw_init(state["params"])
    keys = L.run_keys(jax.random.PRNGKey(2))

    def step():
        state["params"], state["opt"], loss, _ = lt.step.run_step(state["params"], state["opt"], data,
                                                         keys, config, tc)
        return loss

    return step, lambda loss: loss.block_until_ready()


def hf_stepper(config, tc, autocast):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim,
        intermediate_size=config.ffn_width, num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta, tie_word_embeddings=config.tie_embeddings,
        attn_implementation="sdpa")
    model = LlamaForCausalLM(hf_config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                            weight_decay=tc.weight_decay)
    rng = np.random.default_rng(0)

    def step():
        x = torch.from_numpy(rng.integers(0, config.vocab_size, (tc.batch_size, tc.seq_len + 1)))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, lambda loss: loss.item()


def time_steps(step, wait, n):
    wait(step())
    t0 = time.perf_counter()
    for _ in range(n):
        loss = step()
    wait(loss)
    return (time.perf_counter() - t0) / n


def best_of_rounds(contenders, tokens, steps, rounds, report):
    """contenders: {name: (step, wait)}. Times `steps` steps of each in turn,
    round after round, so that all see the same machine load, and calls
    report(round, name, tokens/s) after each. -> {name: best tokens/s}."""
    best = {}
    for r in range(rounds):
        for name, (step, wait) in contenders.items():
            tps = tokens / time_steps(step, wait, steps)
            best[name] = max(best.get(name, 0.0), tps)
            report(r, name, tps)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6, help="timed steps per round and contender")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--loss", nargs="+", default=["plain", "blockwise"],
                   choices=["plain", "blockwise"], help="llama_jax's cross-entropy(s) to time")
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"],
                   choices=["float32", "bfloat16"], help="llama_jax's compute dtype(s) to time")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        import torch
        import transformers
    except ImportError:
        sys.exit("error: this benchmark needs torch and transformers: "
                 "pip install torch transformers")
    torch.set_num_threads(os.cpu_count())
    config = lt.settings.RunModelConfig(dim=256, n_layers=6, n_heads=8, n_kv_heads=4, tie_embeddings=False,
                              max_seq_len=args.seq_len)
    # No health figures (llamatool/health.py): transformers computes nothing of the kind.
    tc = lt.settings.RunTrainConfig(batch_size=args.batch_size, seq_len=args.seq_len, health=False)
    tokens = args.batch_size * args.seq_len
    contenders = {f"llama_jax {dtype}, {impl} loss":
                  jax_stepper(dataclasses.replace(config, compute_dtype=dtype, loss_impl=impl), tc)
                  for dtype in args.dtype for impl in args.loss}
    contenders.update({"transformers float32": hf_stepper(config, tc, autocast=False),
                       "transformers autocast bfloat16": hf_stepper(config, tc, autocast=True)})

    def report(r, name, tps):
        line = {"round": r, "name": name, "tokens_per_s": round(tps, 1)}
        print(json.dumps(line) if args.json else f"round {r}: {name:32s} {tps:8,.0f} tokens/s",
              flush=True)

    best = best_of_rounds(contenders, tokens, args.steps, args.rounds, report)
    hf = max(v for k, v in best.items() if k.startswith("transformers"))
    ours = max(v for k, v in best.items() if k.startswith("llama_jax"))
    summary = {"kind": "summary", "best_tokens_per_s": {k: round(v, 1) for k, v in best.items()},
               "ratio_vs_best_transformers": round(ours / hf, 3), "torch": torch.__version__,
               "transformers": transformers.__version__, "jax": jax.__version__}
    print(json.dumps(summary) if args.json else
          f"best of {args.rounds} rounds: llama_jax {ours:,.0f} tokens/s, best transformers "
          f"{hf:,.0f}: {ours / hf:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
