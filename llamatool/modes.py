"""What each mode runs: train, prepare, plan, sample, eval, chat and the exports (cli.MODES names them)."""

import functools
import itertools
import json
import os
import sys
from pathlib import Path

import jax

from llama_jax import DEFAULT_DATA, InputError, get_tokenizer, load_text
from llamatool.token_files import prepare_tokens
from llamatool.devices import check_batch_split, gather, make_mesh
from llamatool.plan import plan_report
from llamatool.hosts import lost_processes
from llamatool.checkpoints import run_files
from llamatool.checkpoint_formats import (check_format_installed, checkpoint_format,
                                          checkpoint_names, checkpoint_plan, saved_checkpoint)
from llamatool.gguf_file import check_gguf_export, save_gguf
from llamatool.chat import chat_prompt, chat_turn
from llamatool.sources import export_hf, load_source
from llamatool.training import train
from llamatool.evaluation import evaluate_text
from llamatool.flags import PROMPT_DEFAULT
from llamatool.configs import (decoding_config, print_sample, sampling_from,
    training_configs)


def run_train(args):
    log = functools.partial(print, flush=True) if jax.process_index() == 0 else lambda *a: None
    if args.time_budget is not None and not 0 < args.time_budget < float("inf"):
        raise InputError(f"--time-budget must be a positive number of minutes, got "
                         f"{args.time_budget}: leave it out to run every --steps")
    config, tc, init = training_configs(args)
    mesh = make_mesh(args.fsdp)
    result = train(config, tc, args.data or DEFAULT_DATA, args.out_dir, resume=args.resume,
                   log=log, time_budget=args.time_budget, init=init, mesh=mesh)
    if result["stopped"] == "non-finite":
        return 1
    if result["stopped"] == "interrupted":
        return 130
    files = run_files(args.out_dir)
    log(f"wrote {result['checkpoint']}, {files.loss_plot}, {files.health_plot} and "
        f"{files.metrics}; peak host memory {peak_rss_gb():.2f} GB")
    weights = result["weights"]
    if jax.process_count() > 1:  # process 0 samples alone, on its own device, from a copy
        weights = jax.tree_util.tree_map(gather, weights)
        if jax.process_index() != 0:
            return 0
    key = jax.random.PRNGKey(tc.seed)
    if init is None:
        print_sample(weights, decoding_config(config), get_tokenizer(), args, key, log)
    else:
        sample_model(init._replace(params=weights, config=config), args, key, log,
                     result["question"])
    return 0


def run_prepare(args):
    """--prepare INPUT... --data NAME: tokenize once into a data set on disk."""
    if not args.data:
        raise InputError("--prepare needs --data NAME: the data set to write "
                         "(NAME.json, NAME.train.bin, NAME.val.bin)")
    enc = load_source(args.init_from).tokenizer if args.init_from else None
    if args.init_from and enc is None:
        raise InputError(f"--init-from {args.init_from} has no tokenizer llama_jax can "
                         "read, so --prepare cannot tokenize for it")
    prepare_tokens(args.prepare, args.data, log=functools.partial(print, flush=True), enc=enc)
    return 0


def run_training(args):
    """Training, the default mode: run_train on one process, or as one of
    several (run_on_many_processes)."""
    return run_on_many_processes(args) if jax.process_count() > 1 else run_train(args)


def run_on_many_processes(args):
    """run_train as one of several processes. When a process dies, the
    others' next collective fails: they say so, name the lost process, and
    stop, instead of waiting for it."""
    try:
        return run_train(args)
    except jax.errors.JaxRuntimeError as err:
        me = jax.process_index()
        print(f"error: process {me}: a collective failed ({str(err).splitlines()[0][:200]}); "
              "asking the coordinator which process was lost", file=sys.stderr, flush=True)
        print(f"error: process {me}: lost contact with process {lost_processes()}; stopping. "
              "Restart every process with --resume to continue from the last checkpoint",
              file=sys.stderr, flush=True)
        os._exit(3)  # not sys.exit: JAX's shutdown would wait for the lost process


def run_plan(args):
    """--plan: the memory and communication of a training run, then exit."""
    config, tc, _ = training_configs(args)
    check_format_installed(checkpoint_format(tc, config)[0])  # plan only a save the run makes
    mesh = make_mesh(args.fsdp)
    check_batch_split(tc, mesh)
    for line in plan_report(config, tc, mesh) + checkpoint_plan(config, tc, mesh):
        if jax.process_index() == 0:
            print(line, flush=True)
    return 0


def peak_rss_gb():
    """This process's peak resident memory so far, in GB (ru_maxrss is in KiB
    on Linux, in bytes on macOS)."""
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2 ** 30 if sys.platform == "darwin" else 2 ** 20)


FINE_TUNED_CHAT_PROMPT = "Write a few lines of a play."


def sample_model(model, args, key, log=print, question=None):
    """A sample from a model (load_source's Model): a chat reply to --prompt
    when the model has a chat format, else a continuation of it. question: a
    conversation to reply to instead (chat data's first held-out question)."""
    config, tokenizer = decoding_config(model.config), model.tokenizer
    try:
        chat_prompt([{"role": "user", "content": "hi"}], tokenizer, model.chat_template)
    except (InputError, AttributeError):  # no chat format (or no tokenizer)
        return print_sample(model.params, config, tokenizer, args, key, log)
    text = FINE_TUNED_CHAT_PROMPT if args.prompt == PROMPT_DEFAULT else args.prompt
    held_out = bool(question) and args.prompt == PROMPT_DEFAULT
    messages = ([dict(m) for m in question] if held_out
                else [{"role": "user", "content": text}])
    log(f"--- chat sample (temperature {args.temperature}, top-k {args.top_k or 'off'})"
        f"{', a held-out question' if held_out else ''} ---")
    for m in messages:
        log(f"{m['role']}> {m['content']}")
    print("model> ", end="", flush=True)
    chat_turn(model.params, config, tokenizer, messages, sampling_from(args), key,
              model.chat_template)


def load_model(args):
    """The model that --sample, --eval, --chat and --export-hf use: --gguf FILE,
    --hf-checkpoint DIR, or else the run in --out-dir (load_source)."""
    if args.gguf:
        return load_source(args.gguf, "gguf", "bfloat16" if args.dtype == "bfloat16"
                           else "float32")
    if args.hf_checkpoint:
        return load_source(args.hf_checkpoint, "hf", gpt2_tokenizer=args.tokenizer == "gpt2")
    path = saved_checkpoint(args.out_dir)
    if path is None:
        raise InputError(f"no checkpoint in {args.out_dir} ({checkpoint_names()}): train "
                         "first (python llama_jax.py), point --out-dir at a run, or pass "
                         "--hf-checkpoint DIR or --gguf FILE")
    return load_source(path, "ckpt")


def run_sample(args):
    key = jax.random.PRNGKey(args.seed or 0)
    model = load_model(args)
    print_sample(model.params, decoding_config(model.config), model.tokenizer, args, key,
                 functools.partial(print, flush=True))
    return 0


def run_export(args):
    """--export-hf DIR: the run in --out-dir (LoRA merged), or --gguf /
    --hf-checkpoint, as a Hugging Face folder."""
    export_hf(load_model(args), args.export_hf, functools.partial(print, flush=True))
    return 0


def run_export_gguf(args):
    """--export-gguf FILE: the run in --out-dir (LoRA merged), or --gguf /
    --hf-checkpoint, as a GGUF file of --gguf-type."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise InputError("--export-gguf needs the gguf package (llama.cpp's writer): "
                         "pip install gguf")
    kind = args.gguf_type or "f16"
    model = load_model(args)
    check_gguf_export(args.export_gguf, model.config, model.tokenizer, kind)  # before work
    save_gguf(args.export_gguf, model.params, model.config, model.tokenizer, kind,
              model.chat_template, model.special, name=Path(model.source).stem,
              log=functools.partial(print, flush=True))
    return 0


def run_eval(args):
    """--eval FILE: loss, perplexity and bits per byte of the model on a text."""
    if args.seq_len is not None and args.seq_len <= 0:
        raise InputError(f"--seq-len {args.seq_len}: the window must hold at least one token; "
                         "leave it out to use the length the model was trained at")
    model = load_model(args)
    if model.tokenizer is None:
        raise InputError("--eval needs the model's tokenizer to read the text, and none was "
                         "found in the model folder (pass --tokenizer gpt2 if it uses GPT-2's)")
    text = load_text(args.eval)
    # Our checkpoints are evaluated at the length they were trained at: RoPE
    # positions past it were never seen in training.
    seq_len = args.seq_len or model.seq_len
    # With --json, standard output is the one JSON line; progress goes to stderr.
    r = evaluate_text(model.params, model.config, model.tokenizer, text,
                      seq_len=seq_len, log=functools.partial(
                          print, flush=True, file=sys.stderr if args.json else sys.stdout))
    if args.json:
        print(json.dumps({"file": str(args.eval), "model": model.source, **r}))
    else:
        print(f"{args.eval}: {r['tokens']:,} tokens, {r['bytes']:,} bytes | loss "
              f"{r['nats_per_token']:.4f} nats/token | perplexity {r['perplexity']:.2f} | "
              f"{r['bits_per_byte']:.4f} bits/byte ({model.source})")
    return 0


def run_chat(args):
    """--chat: a terminal chat with an instruction-tuned model, or one reply to
    --prompt for scripts."""
    model = load_model(args)
    tokenizer, template = model.tokenizer, model.chat_template
    if tokenizer is None:
        raise InputError("--chat needs the model's tokenizer, and none was found")
    chat_prompt([{"role": "user", "content": "hi"}], tokenizer, template)  # has a chat format?
    config = decoding_config(model.config)
    key = jax.random.PRNGKey(args.seed or 0)
    messages = []
    if args.prompt != PROMPT_DEFAULT:  # one reply, for scripts
        messages.append({"role": "user", "content": args.prompt})
        _, n, seconds, after_first = chat_turn(model.params, config, tokenizer, messages,
                                               sampling_from(args), key, template)
        rate = f", then {(n - 1) / after_first:.1f} tokens/s" if n > 1 and after_first > 0 else ""
        print(f"({n} tokens in {seconds:.1f}s, the first with compilation{rate})",
              file=sys.stderr)
        return 0
    print(f"chatting with {model.source} (context {config.max_seq_len} tokens). An empty "
          "line or Ctrl-D ends; /reset forgets the conversation.", flush=True)
    for turn in itertools.count():
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        if not line.strip():
            return 0
        if line.strip() == "/reset":
            messages.clear()
            continue
        messages.append({"role": "user", "content": line})
        print("model> ", end="", flush=True)
        try:
            chat_turn(model.params, config, tokenizer, messages, sampling_from(args),
                      jax.random.fold_in(key, turn), template)
        except InputError as err:
            print(f"error: {err}", flush=True)
            messages.pop()
