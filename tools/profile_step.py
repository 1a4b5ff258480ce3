"""Where the training step's time goes: a jax.profiler trace, summed by kernel.

    python tools/profile_step.py [llama_jax.py's model and training flags] [--trace-steps 5]
        [--trace-out FILE.json.gz] [--json]

The step is --bench's (the package's run_step on every device, the same flags:
--dim, --batch-size, --dtype, ...). It is compiled, run twice, and then
--trace-steps more steps are traced with jax.profiler. The trace is written as
Perfetto JSON (create_perfetto_trace), which this script reads back with the
standard library alone: no TensorBoard. Each kernel's time on the device is
summed by name and by kind (matrix products, attention, XLA's own fusions,
copies, collectives), and the largest costs are printed per step, beside the
step's wall time, so that the gap (the device idle, waiting for the host) shows
too. On a CPU there are no device streams; XLA's work on the host threads is
summed instead (tools/gpu_check.sh --dry-run runs it so).
"""

import collections
import glob
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import llama_jax as L  # noqa: E402
import llamatool as lt

# Kernel-name fragments -> kind, tried in order (lower case). cuBLAS's and
# cuDNN's GEMM kernels carry gemm/xmma/nvjet/cutlass; XLA's Triton GEMMs
# "triton_gemm"; cuDNN's fused attention "fmha"/"flash"/"sdpa"; XLA's own
# kernels are named after the fusion they run ("loop_add_fusion",
# "input_reduce_fusion").
KINDS = [("attention", ("fmha", "flash", "sdpa", "attention", "cudnn")),
         ("matrix products", ("gemm", "xmma", "nvjet", "cutlass", "cublas", "matmul", "dot")),
         ("collectives", ("nccl", "all-reduce", "all_reduce", "all-gather", "reduce-scatter")),
         ("copies", ("memcpy", "memset", "copy", "transpose")),
         ("XLA fusions", ("fusion", "reduce", "convert", "loop_", "input_", "triton"))]


def kind_of(name):
    low = name.lower()
    return next((kind for kind, parts in KINDS if any(p in low for p in parts)), "other")


def read_trace(path):
    """Perfetto JSON -> (complete events, {pid: process name}, {(pid, tid): thread name})."""
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    procs = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    return [e for e in events if e.get("ph") == "X" and "dur" in e], procs, threads


def kernel_events(events, procs, threads):
    """The events that are work on the device: on a GPU, those on its
    streams ("Stream #..." lines of a "/device:GPU:N" process; the derived
    "XLA Ops" and "XLA Modules" lines would count the same time twice);
    without a device process (CPU), XLA's work on the host's threads, leaving
    out the Python thread and the runtime's own spans."""
    device = {pid for pid, name in procs.items() if "/device:" in name and "GPU" in name.upper()}
    if device:
        return [e for e in events if e["pid"] in device
                and "stream" in threads.get((e["pid"], e.get("tid")), "").lower()]
    return [e for e in events if threads.get((e["pid"], e.get("tid"))) != "python"
            and not e["name"].startswith(("$", "Pjit", "Thunk", "Execute"))]


def summarize(events, n_steps, wall_s, top=10):
    by_name = collections.Counter()
    op_of = {}
    for e in events:
        by_name[e["name"]] += e["dur"]  # microseconds
        op = (e.get("args") or {}).get("hlo_op")
        if op:
            op_of.setdefault(e["name"], op)
    busy = sum(by_name.values()) / n_steps / 1e3  # ms per step
    kinds = collections.Counter()
    for name, us in by_name.items():
        kinds[kind_of(name)] += us / n_steps / 1e3
    step_ms = wall_s / n_steps * 1e3
    return {"kind": "profile", "step_ms": step_ms, "device_busy_ms": busy,
            "device_idle_fraction": max(0.0, 1 - busy / step_ms), "kernels": len(by_name),
            "by_kind_ms": {k: round(v, 3) for k, v in kinds.most_common()},
            "top": [{"name": name[:120], "hlo_op": op_of.get(name), "kind": kind_of(name),
                     "ms": round(us / n_steps / 1e3, 3),
                     "share_of_busy": round(us / n_steps / 1e3 / busy, 4) if busy else None}
                    for name, us in by_name.most_common(top)]}


def main():
    parser = lt.cli.build_parser()
    parser.add_argument("--trace-steps", type=int, default=5)
    parser.add_argument("--trace-out", help="also keep the Perfetto trace here (.json.gz)")
    args = parser.parse_args()
    on_gpu = jax.default_backend() == "gpu"
    args.batch_size = args.batch_size or (16 if on_gpu else 8)  # --bench's defaults
    args.seq_len = args.seq_len or (1024 if on_gpu else 256)
    config, tc = lt.configs.resolve_configs(args)
    mesh = lt.devices.make_mesh(args.fsdp)
    lt.devices.check_batch_split(tc, mesh)
    data, params, opt_state, keys = lt.bench.bench_state(config, tc, mesh)  # --bench's

    def steps(n, params, opt_state):
        for _ in range(n):
            params, opt_state, loss, _ = lt.step.run_step(params, opt_state, data, keys, config, tc,
                                                    None, mesh)
        loss.block_until_ready()
        return params, opt_state

    params, opt_state = steps(3, params, opt_state)  # compile, then warm
    trace_dir = tempfile.mkdtemp(prefix="profile_step_")
    try:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            t0 = time.perf_counter()
            params, opt_state = steps(args.trace_steps, params, opt_state)
            wall = time.perf_counter() - t0
        path = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                         recursive=True)[0]
        if args.trace_out:
            shutil.copyfile(path, args.trace_out)
        events, procs, threads = read_trace(path)
    finally:
        shutil.rmtree(trace_dir, ignore_errors=True)
    r = summarize(kernel_events(events, procs, threads), args.trace_steps, wall)
    r.update(device=getattr(jax.devices()[0], "device_kind", jax.default_backend()),
             batch_size=tc.batch_size, seq_len=tc.seq_len, dim=config.dim,
             n_layers=config.n_layers, dtype=config.compute_dtype, attention=config.attention)
    if args.json:
        print(json.dumps(r), flush=True)
        return
    print(f"{r['device']}: {r['step_ms']:.2f} ms per step (traced), kernels busy "
          f"{r['device_busy_ms']:.2f} ms ({r['device_idle_fraction']:.0%} idle), "
          f"{r['kernels']} distinct kernels")
    for kind, ms in r["by_kind_ms"].items():
        print(f"  {kind:16s} {ms:8.2f} ms  {ms / r['device_busy_ms']:6.1%}")
    print("largest kernels:")
    for t in r["top"]:
        print(f"  {t['ms']:8.3f} ms  {t['share_of_busy']:6.1%}  {t['kind']:16s} {t['name']}"
              + (f"  ({t['hlo_op']})" if t["hlo_op"] else ""))


if __name__ == "__main__":
    main()
