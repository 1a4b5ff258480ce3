"""What a checkpoint save costs each process, .npz against Orbax, on 2 processes x 4 devices.

    python tools/bench_checkpoint.py [--dim 768 --n-layers 12] [--saves 3] [--gap 10] [--json]
                                     [--formats npz,orbax] [--orbax-compression]

Starts two processes, each with 4 CPU devices (XLA's
--xla_force_host_platform_device_count), joined by jax.distributed as a run on
2 hosts would be, and places a model's weights and AdamW state over all 8
devices with FSDP (make_mesh("all")). Then, for each format in a pair of fresh
processes, it saves --saves times, as a run's evaluations do, and measures on
each process:
  - peak resident memory during the saves (VmRSS sampled every 5 ms), the
    same just before them, and before any array was made (the runtime's);
  - seconds the caller is blocked per save (what a training loop waits):
    .npz gathers every array onto each process and process 0 writes the file;
    Orbax returns once the shards are copied off the devices and writes them
    in a background thread (its finish time is reported too). Between saves
    the caller waits --gap seconds, as a run trains between evaluations; with
    --gap 0 the saves follow each other, and each Orbax save first waits for
    the write of the one before;
  - bytes the process wrote to disk (/proc/self/io's write_bytes), and
    the other bytes it passed to write() (wchar less those: the gather's
    messages between the processes, over sockets).
The default model, width 768 with 12 layers and GPT-2's vocabulary, untied,
has 153M parameters: 1.8 GB of float32 weights and AdamW moments.
Needs orbax-checkpoint (pip install 'orbax-checkpoint>=0.12,<0.13') and Linux.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def vm_rss():
    """This process's resident memory, bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def io_counts():
    """(bytes this process sent to storage, bytes it passed to write() and
    friends, sockets included) so far: /proc/self/io's write_bytes and wchar."""
    with open("/proc/self/io") as f:
        fields = dict(line.split(":") for line in f)
    return int(fields["write_bytes"]), int(fields["wchar"])


class PeakRSS:
    """Samples VmRSS in a thread while the block runs; .peak: the largest."""

    def __enter__(self):
        self.peak, self.running = vm_rss(), True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while self.running:
            self.peak = max(self.peak, vm_rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def worker(args):
    """One of the two processes: build the state, save it --saves times."""
    import jax
    import numpy as np
    sys.path.insert(0, str(ROOT))
    import llama_jax as L
    import llamatool as lt
    lt.hosts.start_distributed(args.coordinator, 2, args.process_id)
    runtime_rss = vm_rss()  # Python, JAX and its runtime, before any array
    config = lt.settings.RunModelConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.dim // 64,
                              n_kv_heads=max(1, args.dim // 256), tie_embeddings=False,
                              max_seq_len=256, compute_dtype="float32")
    tc = lt.settings.RunTrainConfig(batch_size=8, seq_len=32)
    mesh = lt.devices.make_mesh("all")
    params = lt.devices.sharded_init(jax.random.PRNGKey(0), config, mesh)
    opt_state = lt.devices.sharded_optimizer_init(params, mesh, tc)
    # Moments as a trained run has them, not zeros (Orbax's files compress
    # zeros to almost nothing).
    opt_state = {**opt_state, "mu": jax.tree_util.tree_map(lambda p: 0.5 * p, params),
                 "nu": jax.tree_util.tree_map(lambda p: p * p, params)}
    jax.block_until_ready((params, opt_state))
    key, history = np.asarray(jax.random.PRNGKey(1)), {"train": [], "eval": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    writer = (lt.checkpoint_orbax.OrbaxWriter(out / "ckpt.orbax", keep=2,
                                                  compress=args.orbax_compression)
              if args.format == "orbax"
              else lt.checkpoint_npz.NpzWriter(out / "ckpt.npz"))
    before_rss, (before_disk, before_chars) = vm_rss(), io_counts()
    blocked = []
    with PeakRSS() as peak:
        for i in range(args.saves):
            if i:
                time.sleep(args.gap)  # the training between two evaluations
            # A new step each time, as a run saves at each evaluation.
            opt_state = {**opt_state, "step": opt_state["step"] + 1}
            t0 = time.perf_counter()
            writer.save(params, opt_state, key, config, tc, history, None)
            blocked.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        writer.close()
        finish = time.perf_counter() - t0
    disk, chars = io_counts()
    print(json.dumps({"process": jax.process_index(), "format": args.format,
                      "params": L.count_params(params), "saves": args.saves,
                      "rss_runtime_gb": runtime_rss / 1e9, "rss_before_gb": before_rss / 1e9,
                      "peak_rss_gb": peak.peak / 1e9,
                      "blocked_s": blocked, "finish_s": finish,
                      "written_gb_per_save": (disk - before_disk) / args.saves / 1e9,
                      # what else went through write(): the gather's messages
                      "sent_gb_per_save": max(0, (chars - before_chars) - (disk - before_disk))
                      / args.saves / 1e9}),
          flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_format(fmt, args, folder):
    """Both processes for one format -> their JSON records."""
    port = free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    # Each process's output to a file of its own: a pipe left unread would
    # stop one process while the other waits for it at a collective.
    logs = [folder / f"{fmt}_{i}.log" for i in range(2)]
    procs = []
    for i, log in enumerate(logs):
        with open(log, "w") as out:
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "--worker", "--format", fmt, "--process-id", str(i),
                 "--coordinator", f"localhost:{port}", "--out", str(folder / fmt), "--dim",
                 str(args.dim), "--n-layers", str(args.n_layers), "--saves", str(args.saves),
                 "--gap", str(args.gap)] + (["--orbax-compression"] if args.orbax_compression
                                            else []),
                env=env, stdout=out, stderr=subprocess.STDOUT, text=True))
    records = []
    for p, log in zip(procs, logs):
        try:
            p.wait(timeout=1800)
        except subprocess.TimeoutExpired:
            pass
        lines = log.read_text().splitlines()
        if p.returncode != 0:
            for other in procs:  # the other waits in a collective: end it too
                other.kill()
            sys.exit(f"{fmt} process failed:\n" + "\n".join(lines[-30:]))
        records.append(json.loads(next(line for line in reversed(lines)
                                       if line.startswith("{"))))
    return records


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--n-layers", type=int, default=12)
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--gap", type=float, default=10.0,
                        help="seconds between saves, as training between evaluations would "
                             "take (0: back to back)")
    parser.add_argument("--formats", default="npz,orbax", help="which formats: npz,orbax")
    parser.add_argument("--orbax-compression", action="store_true",
                        help="Orbax with zstd compression, its default, which llama_jax.py "
                             "turns off")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--format", help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = set(args.formats.split(",")) - {"npz", "orbax"}
    if unknown:
        parser.error(f"--formats: {', '.join(sorted(unknown))}; choose among npz,orbax")
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        results = {fmt: run_format(fmt, args, Path(tmp)) for fmt in args.formats.split(",")}
    if args.json:
        for records in results.values():
            for r in records:
                print(json.dumps(r))
    params = next(iter(results.values()))[0]["params"]
    print(f"{params / 1e6:.0f}M parameters on 2 processes x 4 CPU devices, FSDP over 8, "
          f"{args.saves} saves each, {args.gap:g} s apart")
    print(f"{'format':7s} {'process':>7s} {'RSS before':>10s} {'peak RSS':>9s} "
          f"{'blocked/save':>12s} {'finish':>7s} {'disk/save':>10s} {'sent/save':>10s}")
    for fmt, records in results.items():
        for r in records:
            print(f"{fmt:7s} {r['process']:7d} {r['rss_before_gb']:8.2f} GB {r['peak_rss_gb']:6.2f} GB"
                  f" {sum(r['blocked_s']) / len(r['blocked_s']):10.2f} s {r['finish_s']:5.2f} s"
                  f" {r['written_gb_per_save']:7.2f} GB {r['sent_gb_per_save']:7.2f} GB")
    if len(results) < 2:
        return
    for name, key, agg in (("peak RSS", "peak_rss_gb", max),
                           ("blocked per save", "blocked_s", lambda v: max(sum(x) / len(x) for x in v))):
        npz = agg([r[key] for r in results["npz"]])
        orbax = agg([r[key] for r in results["orbax"]])
        print(f"{name}, the larger process: orbax / npz = {orbax:.2f} / {npz:.2f} = "
              f"{orbax / npz:.2f}")


if __name__ == "__main__":
    main()
