"""--bench: training speed, MFU and decoding, measured on this machine."""

import dataclasses
import json
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import (_generate, count_params, decoding_shapes, decoding_weights, generate,
    model_forward, run_keys, transformer_block)
from llamatool.speed import FAST_DECODING, fast_sample_token, loss_block_size, loss_buffer_bytes, use_blockwise
from llamatool.devices import (check_batch_split, describe_mesh, make_mesh, replicated,
    sharded_init, sharded_optimizer_init)
from llamatool.step import run_step
from llamatool.plan import gb
from llamatool.checkpoints import flatten_tree
from llamatool.configs import decoding_config, matmul_seconds, resolve_configs
from llamatool.modes import load_model


# Dense bfloat16 peak of the cards we quote MFU against, and their memory
# bandwidth, which decoding at batch 1 is bound by (NVIDIA datasheets, SXM).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.039e12}


def flops_per_token(config, seq_len):
    """Training FLOPs per token: 6 per weight for forward + backward (PaLM,
    appendix B) over every matmul weight (all but the input embedding, whose
    lookup is not a matmul; the output layer counts even when tied), plus
    attention's 6 * L * D * T (the QK^T and AV products, halved for causality)."""
    D, L = config.dim, config.n_layers
    per_layer = (D * config.n_heads * config.head_width * 2
                 + D * config.n_kv_heads * config.head_width * 2 + 3 * D * config.ffn_width)
    return 6 * (L * per_layer + D * config.vocab_size) + 6 * L * D * seq_len


def measured_matmul_peak(dtype, n=2048, repeats=5):
    """FLOP/s of one large square matmul: what this device can do at best."""
    a = jnp.ones((n, n), dtype)
    return 2 * n ** 3 * repeats / matmul_seconds(a, a, repeats)


def bench_state(config, tc, mesh):
    """What --bench's run_step takes: random tokens on every device, fresh
    weights and optimizer state split over the mesh, the key streams.
    -> (data, params, opt_state, keys)."""
    data = replicated(mesh, np.random.RandomState(0).randint(0, config.vocab_size, 1_000_000,
                                                             dtype=np.int32))
    params = sharded_init(jax.random.PRNGKey(1), config, mesh)
    return (data, params, sharded_optimizer_init(params, mesh, tc),
            replicated(mesh, run_keys(jax.random.PRNGKey(2))))


def bench_train(config, tc, n_steps, mesh=None):
    """-> dict with compile time, ms/step and tokens/s of run_step (in
    total, and per device of the mesh; default: every device)."""
    mesh = mesh or make_mesh()
    data, params, opt_state, key = bench_state(config, tc, mesh)
    t0 = time.perf_counter()
    params, opt_state, loss, _ = run_step(params, opt_state, data, key, config, tc, None, mesh)
    loss.block_until_ready()
    compile_s = time.perf_counter() - t0
    for _ in range(2):
        params, opt_state, loss, _ = run_step(params, opt_state, data, key, config, tc, None,
                                                mesh)
    loss.block_until_ready()
    t0 = time.perf_counter()
    for _ in range(n_steps):
        params, opt_state, loss, _ = run_step(params, opt_state, data, key, config, tc, None,
                                                mesh)
    loss.block_until_ready()
    per_step = (time.perf_counter() - t0) / n_steps
    tokens_per_s = tc.batch_size * tc.seq_len / per_step
    stats = jax.local_devices()[0].memory_stats() or {}  # None on some backends
    compiled = run_step.lower(params, opt_state, data, key, config, tc, None, mesh).compile()
    return {"compile_s": compile_s, "ms_per_step": per_step * 1e3,
            "attention": attention_kernel(compiled.as_text()),
            "train_tokens_per_s": tokens_per_s, "devices": mesh.size,
            "train_tokens_per_s_per_device": tokens_per_s / mesh.size,
            "peak_memory_bytes": stats.get("peak_bytes_in_use"),
            "recompiled": run_step._cache_size() > 1}, params


def attention_kernel(hlo_text):
    """Which attention a compiled program runs, read from the program, not
    from what was asked for (fused_attend falls back to XLA's where cuDNN
    refuses at trace time): "cuDNN" where it calls cuDNN's fused kernels (the
    custom calls __cudnn$fmha...), else "XLA" (the scores written out)."""
    return "cuDNN" if "__cudnn$fmha" in hlo_text else "XLA"


def naive_generate(params, tokens, n_new, config):
    """Greedy decoding without a cache, the way a first implementation does it:
    run the whole model over the whole sequence for every new token. The input
    grows by one token each step, so jax.jit compiles a new program every time.
    The baseline of --bench (its second call timed: the first compiles).
    tokens: int32[B, T] -> int32[B, T + n_new]."""
    forward = jax.jit(model_forward, static_argnames=("config",))
    tokens = jnp.asarray(tokens)
    for _ in range(n_new):
        logits, _ = forward(params, tokens, config)
        tokens = jnp.concatenate([tokens, jnp.argmax(logits[:, -1:], axis=-1)], axis=1)
    return tokens


def bench_prompts(config, batch):
    """`batch` fixed 16-token prompts for the decoding benchmarks."""
    return [[(7 * i + 3 * b) % config.vocab_size for i in range(16)] for b in range(batch)]


def decode_speed(params, config, batch, n_new, seed=1):
    """Tokens/s of generate for `batch` 16-token prompts (compiled beforehand)."""
    prompt = bench_prompts(config, batch)
    generate(params, prompt, n_new, config, jax.random.PRNGKey(0),
             **FAST_DECODING)  # compile
    t0 = time.perf_counter()
    generate(params, prompt, n_new, config, jax.random.PRNGKey(seed), **FAST_DECODING)
    return batch * n_new / (time.perf_counter() - t0)


def bench_long_context(params, config, n_new, rounds=5):
    """Decoding at batch 1 with the model's context set to Llama 3.x's 131,072
    positions and to 256, alternating rounds, best of each: with the cache
    sized to the request the two should run at the same speed."""
    configs = {131072: dataclasses.replace(config, max_seq_len=131072),
               256: dataclasses.replace(config, max_seq_len=256)}
    best = {n: 0.0 for n in configs}
    for r in range(rounds):
        for n, c in configs.items():
            best[n] = max(best[n], decode_speed(params, c, 1, n_new, seed=r + 1))
    return {"long_tokens_per_s": best[131072], "short_tokens_per_s": best[256],
            "ratio": best[131072] / best[256]}


def decode_bytes_per_token(params, config, batch, cache_len):
    """Bytes one decoding step reads from memory, per token, at `batch` rows:
    every matrix once (in the compute dtype: decoding_weights), shared by the
    rows; each row's whole KV cache (the mask, not the loop, skips the empty
    slots); one embedding row (the whole table when it is also the output)."""
    itemsize = jnp.dtype(config.dtype).itemsize
    weights = sum(w.size * (itemsize if w.ndim > 1 else w.dtype.itemsize)
                  for k, w in flatten_tree(params).items() if k != "tok_embeddings")
    embedding = params["tok_embeddings"]
    weights += embedding.size * itemsize if config.tie_embeddings else 0
    cache = 2 * config.n_layers * cache_len * config.n_kv_heads * config.head_width * itemsize
    return weights / batch + cache + embedding.shape[1] * itemsize


def bench_decode(params, config, batch, n_new, n_naive):
    """Cached decoding against naive_generate at `batch` rows: tokens/s of
    each, and the bytes the cached loop reads per token."""
    cached = decode_speed(params, config, batch, n_new)
    naive = None
    if n_naive:  # 0: not timed (each of its lengths compiles: minutes on a GPU)
        prompts = np.array(bench_prompts(config, batch))
        naive_generate(params, prompts, n_naive, config).block_until_ready()  # compiles
        t0 = time.perf_counter()  # then timed compiled, as the cached loop is
        naive_generate(params, prompts, n_naive, config).block_until_ready()
        naive = batch * n_naive / (time.perf_counter() - t0)
    cache_len = decoding_shapes(16, n_new, config)[2]  # bench_prompts: 16 tokens
    return {"batch": batch, "new_tokens": n_new, "decode_tokens_per_s": cached,
            "naive_tokens_per_s": naive, "speedup": naive and cached / naive,
            "bytes_per_token": decode_bytes_per_token(params, config, batch, cache_len)}


def bench_loaded_model(args):
    """--bench with --gguf or --hf-checkpoint: that model's decoding at batch
    1 and 8. Its training step is not timed (--bench trains the preset's
    random model; tools/bench_finetune.py times fine-tuning), and it says so."""
    model = load_model(args)
    config, params = decoding_config(model.config), model.params
    name = getattr(jax.devices()[0], "device_kind", jax.default_backend())
    n_new = min(64, config.max_seq_len - 16)

    def emit(record, text):
        print(json.dumps({"device": name, "model": model.source, **record}) if args.json
              else text, flush=True)

    emit({"kind": "train", "skipped": "a loaded model's training step is not timed"},
         f"model  {model.source}: {count_params(params) / 1e6:.1f}M params, "
         f"{config.compute_dtype}; training not timed (--bench trains the preset's random "
         "model; for fine-tuning speed: python tools/bench_finetune.py)")
    for batch in (1, 8):
        d = bench_decode(params, config, batch, n_new, n_naive=2)
        emit({"kind": "decode", **d},
             f"decode batch {batch}: cached {d['decode_tokens_per_s']:,.1f} tok/s, naive full "
             f"recompute {d['naive_tokens_per_s']:,.2f} tok/s ({d['speedup']:,.0f}x)")
    return 0


def bench_decoding(params, config, on_gpu, emit):
    """--bench's decoding: batch 1 and 8 against the naive loop, then batch 1
    with the context at 131,072 positions against 256, each emitted.
    -> the two bench_decode records."""
    n_new = min(128, config.max_seq_len - 16)
    # On a GPU the naive loop's compiles (one per length) would take minutes.
    decode = [bench_decode(params, decoding_config(config), b, n_new, n_naive=0 if on_gpu else 6)
              for b in (1, 8)]
    device = jax.devices()[0]
    name = getattr(device, "device_kind", device.platform)
    bandwidth = next((v for k, v in HBM_BYTES_PER_S.items() if k in name), None)
    for d in decode:
        read = d["bytes_per_token"] * d["decode_tokens_per_s"]  # bytes/s the loop reads
        d["hbm_fraction"] = None if bandwidth is None else read / bandwidth
        emit({"kind": "decode", **d},
             f"decode batch {d['batch']}: cached {d['decode_tokens_per_s']:,.1f} tok/s"
             + (f", naive full recompute {d['naive_tokens_per_s']:,.2f} tok/s "
                f"({d['speedup']:,.0f}x)" if d["naive_tokens_per_s"] else "")
             + f"; reads {d['bytes_per_token'] / 1e6:,.1f} MB per token, "
             f"{read / 1e9:,.0f} GB/s"
             + (f" ({d['hbm_fraction']:.1%} of {name}'s {bandwidth / 1e12:.2f} TB/s)"
                if bandwidth else ""))
    long = bench_long_context(params, decoding_config(config), min(n_new, 64), rounds=3)
    emit({"kind": "decode_long_context", **long},
         f"decode batch 1, the model's context at 131,072 positions: "
         f"{long['long_tokens_per_s']:,.1f} tok/s; at 256: {long['short_tokens_per_s']:,.1f} "
         f"({long['ratio']:.2f}x; the cache is sized to the request)")
    return decode


def device_peak(config):
    """The FLOP/s that MFU is measured against: the datasheet's for a card in
    PEAK_BF16_FLOPS, else one large matmul's in config's dtype.
    -> (device name, FLOP/s, where the figure comes from)."""
    device = jax.devices()[0]
    name = getattr(device, "device_kind", device.platform)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    if peak is not None:
        return name, peak, f"{name} datasheet dense bf16"
    return (name, measured_matmul_peak(config.dtype),
            f"measured 2048^3 {config.compute_dtype} matmul on {name}")


def run_bench(args):
    """Times the training step and decoding for the preset (or flags), or the
    decoding of --gguf / --hf-checkpoint's model (bench_loaded_model)."""
    if args.gguf or args.hf_checkpoint:
        return bench_loaded_model(args)
    on_gpu = jax.default_backend() == "gpu"
    if args.batch_size is None:
        args.batch_size = 16 if on_gpu else 8
    if args.seq_len is None:
        args.seq_len = 1024 if on_gpu else 256
    config, tc = resolve_configs(args)
    mesh = make_mesh(args.fsdp)
    check_batch_split(tc, mesh)
    name, peak, peak_source = device_peak(config)

    def emit(record, text):
        print(json.dumps({"device": name, **record}) if args.json else text, flush=True)

    train_result, params = bench_train(config, tc, n_steps=30 if on_gpu else 8, mesh=mesh)
    fpt = flops_per_token(config, tc.seq_len)
    mfu = fpt * train_result["train_tokens_per_s_per_device"] / peak  # per device
    emit({"kind": "train", "dim": config.dim, "n_layers": config.n_layers,
          "params": count_params(params), "batch_size": tc.batch_size, "seq_len": tc.seq_len,
          "dtype": config.compute_dtype, **train_result, "mfu": mfu, "peak_flops": peak,
          "peak_source": peak_source},
         f"train  {name}, {count_params(params) / 1e6:.1f}M params, {tc.batch_size} x "
         f"{tc.seq_len} tokens, {config.compute_dtype}: "
         f"{train_result['train_tokens_per_s']:,.0f} tok/s"
         + (f" ({train_result['train_tokens_per_s_per_device']:,.0f} per device on "
            f"{describe_mesh(mesh)})" if mesh.size > 1 else "")
         + f", {train_result['ms_per_step']:.0f} ms/step, MFU {mfu:.1%} (per device, of "
         f"{peak / 1e12:.3g} TFLOP/s, {peak_source}; "
         f"{fpt / 1e6:.0f} MFLOP/token), attention {train_result['attention']}'s "
         f"(asked: {config.attention}), compile {train_result['compile_s']:.1f}s"
         + (f", peak memory {gb(train_result['peak_memory_bytes'])}"
            if train_result["peak_memory_bytes"] else ""))
    n_tokens = tc.batch_size * tc.seq_len
    loss_bytes = loss_buffer_bytes(config, n_tokens)
    chosen = "blockwise" if use_blockwise(config, n_tokens) else "plain"
    block = loss_block_size(config, n_tokens)
    emit({"kind": "loss_memory", "loss_impl": chosen, "loss_block": block,
          "temp_bytes": loss_bytes},
         f"loss   {chosen} ({config.loss_impl}) cross-entropy; temporary buffers of the loss "
         f"and its gradient: plain {loss_bytes['plain'] / 2**20:,.0f} MiB, blockwise "
         f"({block} tokens per block) {loss_bytes['blockwise'] / 2**20:,.0f} MiB")
    # --max-new-tokens 0: training only
    decode = [] if args.max_new_tokens == 0 else bench_decoding(params, config, on_gpu, emit)
    if args.json:
        emit({"kind": "summary", "train_tokens_per_s": train_result["train_tokens_per_s"],
              "mfu": mfu, "decode_tokens_per_s": decode[0]["decode_tokens_per_s"] if decode else None,
              "decode_tokens_per_s_batch8": decode[1]["decode_tokens_per_s"] if decode else None},
             "")
    return 0


def hlo_computations(hlo_text):
    """An HLO module's text as {computation name: its instruction lines}."""
    computations, name = {}, None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            name = head.group(1)
            computations[name] = []
        elif name is not None and line.startswith(" ") and "=" in line:
            computations[name].append(line.strip())
    return computations


def decode_loop_counts(params, config, batch=1, decoding=None, n_new=32):
    """What one token costs in generate's compiled program: the decoding
    loop's body (the while loop's, with the computations it calls), as counts
    of its top-level instructions (each a kernel on a GPU, roughly), and, in
    everything it runs, matrix products (dot), scatters and copies.
    decoding: generate's sample, prepare and block (default Part I's).
    -> {"instructions", "dots", "scatters", "copies", "scatters_lowered"}."""
    prompt = np.zeros((batch, 16), np.int32)
    width, n_slots, cache_len = decoding_shapes(16, n_new, config)
    kwargs = dict(config=config, top_k=None, top_p=1.0, n_slots=n_slots, cache_len=cache_len,
                  sample=fast_sample_token, prepare=decoding_weights, block=transformer_block)
    kwargs.update(decoding or {})
    lowered = _generate.lower(params, prompt[:, :width], np.full(batch, 16, np.int32),
                              jax.random.PRNGKey(0), jnp.float32(1.0), jnp.int32(n_new),
                              jnp.int32(-1), **kwargs)
    text = lowered.compile().as_text()
    comps = hlo_computations(text)

    def reachable(body):  # the body and every computation it calls
        seen, todo = set(), [body]
        while todo:
            name = todo.pop()
            if name in seen or name not in comps:
                continue
            seen.add(name)
            for line in comps[name]:
                todo += re.findall(r"(?:calls|to_apply|body|condition|branch_computations)="
                                   r"\{?%?([\w.\-]+)", line)
        return seen

    bodies = [re.search(r"body=%?([\w.\-]+)", line).group(1)
              for lines in comps.values() for line in lines if " while(" in line]
    # The decoding loop is the largest; the others are the random-number generator's.
    body, seen = max(((b, reachable(b)) for b in bodies),
                     key=lambda bs: sum(len(comps[n]) for n in bs[1]))
    lines = [line for name in seen for line in comps[name]]
    op = lambda kind: sum(1 for line in lines if re.search(rf"\b{kind}\(", line))  # noqa: E731
    return {"instructions": len(comps[body]), "dots": op("dot"), "scatters": op("scatter"),
            "copies": op("copy"),
            # What the program asks for before XLA's CPU passes, which may
            # already turn a one-row scatter into an update in place.
            "scatters_lowered": lowered.as_text().count("stablehlo.scatter")}
