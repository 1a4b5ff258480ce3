"""Measures the token-file path (docs/data.md), in one run:

1. --prepare's throughput on a folder of text (MB/s), beside tiktoken's own
   speed on the same documents held in memory (the ceiling);
2. training tokens/s at the seed architecture (width 256, 6 layers, 8 heads,
   4 K/V heads, untied, batch 8 x 256, bfloat16) with the tokens on the device
   and with batches read from a token file, in alternating rounds;
3. resident memory (VmRSS) over a long run of a tiny model that reads random
   windows of a large token file.

    python tools/bench_token_files.py [--mb 48] [--rss-tokens 200000000] [--rss-steps 5000]

Writes its scratch files under a temporary folder and deletes them.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import jax  # noqa: E402
import llama_jax as L  # noqa: E402
import llamatool as lt


def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_prepare(tmp, mb):
    text = L.DEFAULT_DATA.read_text(encoding="utf-8")
    n_files = max(2, round(mb * 1e6 / len(text.encode())))
    folder = tmp / "text"
    folder.mkdir()
    docs = []
    for i in range(n_files):
        doc = f"Copy {i}.\n" + text  # distinct files, the same kind of text
        (folder / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
        docs.append(doc)
    total = sum(len(d.encode()) for d in docs)
    enc = L.get_tokenizer()
    t0 = time.perf_counter()
    enc.encode_ordinary_batch(docs, num_threads=2)
    tiktoken_batch = total / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for d in docs[:4]:
        enc.encode_ordinary(d)
    tiktoken_single = sum(len(d.encode()) for d in docs[:4]) / (time.perf_counter() - t0)
    del docs
    t0 = time.perf_counter()
    header = lt.token_files.prepare_tokens([str(folder)], tmp / "ds", log=lambda s: None)
    prepare = total / (time.perf_counter() - t0)
    return {"kind": "prepare", "text_mb": total / 1e6, "files": n_files,
            "tokens": header["train_tokens"] + header["val_tokens"],
            "prepare_mb_per_s": prepare / 1e6, "tiktoken_batch_2_threads_mb_per_s":
            tiktoken_batch / 1e6, "tiktoken_single_thread_mb_per_s": tiktoken_single / 1e6}


def bench_training_paths(tmp, rounds=3, steps=6):
    config = L.ModelConfig(dim=256, n_layers=6, n_heads=8, n_kv_heads=4, max_seq_len=256,
                           compute_dtype="bfloat16")
    tc = L.TrainConfig(batch_size=8, seq_len=256)
    train, val = L.load_dataset(L.DEFAULT_DATA, tc.seq_len)
    train.astype(np.uint16).tofile(tmp / "mem.train.bin")
    token_file = lt.token_files.TokenFile(tmp / "mem.train.bin", "uint16", len(train))
    on_device = jax.numpy.asarray(train)
    params = L.init_params(jax.random.PRNGKey(0), config)
    opt_state = L.adamw_init(params)
    key = L.run_keys(jax.random.PRNGKey(1))
    step = 0
    seconds = {"device": 0.0, "token_file": 0.0}
    for r in range(rounds + 1):  # round 0 compiles both and is not counted
        for path in ("device", "token_file"):
            t0 = time.perf_counter()
            for _ in range(steps):
                data = on_device if path == "device" else lt.token_files.host_batch(
                    token_file, key, step, tc.batch_size, tc.seq_len)
                params, opt_state, loss, _ = lt.step.run_step(params, opt_state, data, key, config, tc)
                step += 1
            loss.block_until_ready()
            if r:
                seconds[path] += time.perf_counter() - t0
    tokens = rounds * steps * tc.batch_size * tc.seq_len
    return {"kind": "train_paths", "steps_each": rounds * steps,
            "device_tokens_per_s": tokens / seconds["device"],
            "token_file_tokens_per_s": tokens / seconds["token_file"],
            "ratio": seconds["device"] / seconds["token_file"]}


def bench_rss(tmp, n_tokens, n_steps):
    rng = np.random.default_rng(0)
    path = tmp / "big.train.bin"
    with open(path, "wb") as f:
        for _ in range(0, n_tokens, 10_000_000):
            rng.integers(0, 1000, 10_000_000, dtype=np.uint16).tofile(f)
    n = path.stat().st_size // 2
    rng.integers(0, 1000, 100_000, dtype=np.uint16).tofile(tmp / "big.val.bin")
    header = {"format": lt.token_files.TOKEN_FORMAT, "version": 1, "tokenizer": "gpt2",
              "tokenizer_sha256": lt.token_files.tokenizer_fingerprint(L.get_tokenizer()), "dtype": "uint16",
              "train_file": "big.train.bin", "val_file": "big.val.bin", "train_tokens": n,
              "val_tokens": 100_000}
    (tmp / "big.json").write_text(json.dumps(header))
    # Ids below 1000 and a 1000-token model: the steps are fast, so the run is long
    # in steps, and its memory is the loader's rather than the logits'.
    config = L.ModelConfig(vocab_size=1000, dim=32, n_layers=1, n_heads=4, n_kv_heads=2,
                           max_seq_len=128)
    tc = L.TrainConfig(steps=n_steps, batch_size=16, seq_len=128, eval_every=n_steps,
                       eval_batches=1, log_every=max(1, n_steps // 10))
    result = {"kind": "rss", "file_mb": n * 2 / 1e6, "steps": n_steps,
              "windows_read_mb": n_steps * tc.batch_size * (tc.seq_len + 1) * 2 / 1e6}
    # As shipped (a fresh mapping per batch), then with one mapping kept open
    # for the whole run, as a plain np.memmap loader would do.
    kept = {}

    def windows_one_mapping(self, starts, length):
        if self.path not in kept:
            kept[self.path] = np.memmap(self.path, dtype=self.dtype, mode="r")
        return L.read_windows(kept[self.path], starts, length)

    for variant in ("fresh_mapping", "one_mapping"):
        samples = []

        def log(line):
            if line.startswith("step"):
                samples.append((int(line.split()[1].split("/")[0]), round(rss_mb())))

        if variant == "one_mapping":
            lt.token_files.TokenFile.windows = windows_one_mapping
        lt.training.train(config, tc, tmp / "big.json", tmp / variant, log=log)
        result[f"rss_mb_by_step_{variant}"] = samples
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=48, help="text to prepare, MB")
    p.add_argument("--rss-tokens", type=int, default=200_000_000)
    p.add_argument("--rss-steps", type=int, default=5000)
    p.add_argument("--only", choices=["prepare", "paths", "rss"], nargs="+",
                   default=["prepare", "paths", "rss"], help="which measurements to run")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "prepare" in args.only:
            print(json.dumps(bench_prepare(tmp, args.mb)), flush=True)
        if "paths" in args.only:
            print(json.dumps(bench_training_paths(tmp)), flush=True)
        if "rss" in args.only:
            print(json.dumps(bench_rss(tmp, args.rss_tokens, args.rss_steps)), flush=True)


if __name__ == "__main__":
    main()
