"""Token files: your own text, tokenized once to disk by --prepare, read a batch at a time."""

import codecs
import glob
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from llama_jax import (DEFAULT_DATA, InputError, format_duration, get_tokenizer, load_dataset, read_windows,
    step_keys, window_starts)
from llamatool.settings import replace_durably
from llamatool.speed import IGNORE


# `--prepare INPUT... --data NAME` tokenizes text once into NAME.train.bin and
# NAME.val.bin (raw token ids, uint16 when the vocabulary fits) plus a JSON
# header NAME.json; `--data NAME.json` then trains from the files without
# tokenizing or loading them: each step reads only its batch's windows.

TEXT_SUFFIXES = (".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".org")
TOKEN_FORMAT = "llama_jax tokens"
VAL_FRACTION = 0.1  # of the documents, chosen by a hash of their path


def tokenizer_fingerprint(enc):
    """sha256 of every token's bytes in id order (special tokens included):
    two tokenizers with the same fingerprint map text to the same ids."""
    h = hashlib.sha256()
    for i in range(enc.n_vocab):
        try:
            piece = enc.decode_single_token_bytes(i)
        except KeyError:  # an unused id
            piece = b""
        h.update(len(piece).to_bytes(4, "little") + piece)
    return h.hexdigest()


def find_documents(inputs):
    """Text files, folders (read recursively for TEXT_SUFFIXES) and globs ->
    [(path, name)], where name is the path relative to the folder or glob it
    came from (what the validation split hashes, so it does not depend on
    where the folder lives). Sorted within each input; duplicates dropped."""
    found = {}
    for item in inputs:
        root = Path(item)
        if root.is_dir():
            files = [(f, f.relative_to(root).as_posix()) for f in sorted(root.rglob("*"))
                     if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES]
        elif root.is_file():
            files = [(root, root.name)]
        elif any(c in item for c in "*?["):
            files = [(Path(f), Path(f).as_posix()) for f in sorted(glob.glob(item, recursive=True))
                     if Path(f).is_file()]
            if not files:
                raise InputError(f"--prepare: the pattern {item} matches no file")
        else:
            raise InputError(f"--prepare: {item} is not a file, a folder, or a glob that matches "
                             "anything")
        if not files:
            raise InputError(f"--prepare: no text files in {item} (looked for "
                             f"{', '.join(TEXT_SUFFIXES)}; name files directly to take others)")
        for path, name in files:
            found.setdefault(path.resolve(), (path, name))
    return list(found.values())


def in_validation(name):
    """The document-level split: a document is validation if the hash of its
    name falls in the first VAL_FRACTION of the hash range. Deterministic, and
    a document never straddles the two files."""
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return h / 2 ** 64 < VAL_FRACTION


def check_document(path, block=1 << 22):
    """Reads a file once in blocks: -> None if it is UTF-8 with some
    non-whitespace text, else the reason to skip it."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    has_text, offset = False, 0
    with open(path, "rb") as f:
        while True:
            data = f.read(block)
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the last block
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as err:  # err.start counts from the pending bytes
                return f"not UTF-8 (byte {offset - pending + err.start})"
            if not data:
                return None if has_text else "empty"
            has_text = has_text or bool(data.strip())
            offset += len(data)


def safe_cut(buf):
    """Where a chunk of text can end without changing its tokens: just after a
    newline that sits between two visible ASCII characters. GPT-2's and Llama
    3's pre-tokenizers never join such a newline to its neighbours, so
    tokenizing the two sides apart gives the same ids. -> index or None."""
    i = len(buf) - 2
    while True:
        i = buf.rfind(b"\n", 1, i + 1)
        if i < 1:
            return None
        if 0x21 <= buf[i - 1] <= 0x7E and 0x21 <= buf[i + 1] <= 0x7E:
            return i + 1
        i -= 1


def document_chunks(path, chunk_bytes):
    """A file's text in pieces of about chunk_bytes, cut only where safe_cut
    allows, so memory stays bounded however large the file is.
    -> (text, its size in bytes) pairs."""
    carry = b""
    with open(path, "rb") as f:
        while True:
            data = f.read(chunk_bytes)
            if not data:
                if carry:
                    yield carry.decode("utf-8"), len(carry)
                return
            buf = carry + data
            cut = safe_cut(buf)
            if cut is None:
                carry = buf
                continue
            yield buf[:cut].decode("utf-8"), cut
            carry = buf[cut:]


def usable_documents(inputs, log):
    """The documents of --prepare's inputs that hold UTF-8 text, each marked
    for validation by a hash of its name (in_validation; with too few for the
    hash to split, the last one is). -> ([(path, name, is_validation)],
    [{"path", "reason"} of each file skipped])."""
    docs, skipped = [], []
    for path, doc_name in find_documents(inputs):
        reason = check_document(path)
        if reason:
            skipped.append({"path": str(path), "reason": reason})
            log(f"prepare: skipping {path}: {reason}")
        else:
            docs.append((path, doc_name, in_validation(doc_name)))
    if len(docs) < 2:
        raise InputError(f"--prepare: {len(docs)} usable document(s); the validation split is "
                         "by document, so it needs at least two files (or train on one text "
                         "file directly with --data FILE)")
    if all(val for _, _, val in docs) or not any(val for _, _, val in docs):
        # Too few documents for the hash to split them: the last one is validation.
        docs = [(p, n, i == len(docs) - 1) for i, (p, n, _) in enumerate(docs)]
    return docs, skipped


def write_token_files(docs, total, files, enc, dtype, chunk_bytes, chunks_per_batch, log):
    """Tokenizes each document (chunk by chunk, chunks_per_batch at a time on
    every core) into files["train"] or files["val"], each document followed by
    <|endoftext|>; each file is written beside its name and renamed over it once
    complete. total: the documents' bytes, for the progress line.
    -> {"train": tokens, "val": tokens}."""
    eot = np.array([enc.eot_token], dtype)
    tmp = {k: f.with_name(f".{f.name}.tmp{os.getpid()}") for k, f in files.items()}
    outs = {k: open(p, "wb") for k, p in tmp.items()}
    counts = {"train": 0, "val": 0}
    done_bytes, t0 = 0, time.perf_counter()
    t_print = t0
    threads = os.cpu_count() or 1

    def flush(batch):
        ids = enc.encode_ordinary_batch([text for _, text in batch if text is not None],
                                        num_threads=threads)
        ids = iter(ids)
        for split, text in batch:
            tokens = eot if text is None else np.asarray(next(ids), dtype)
            outs[split].write(tokens.tobytes())
            counts[split] += len(tokens)

    try:
        batch = []
        for path, _, val in docs:
            split = "val" if val else "train"
            for text, size in document_chunks(path, chunk_bytes):
                batch.append((split, text))
                done_bytes += size
                if len(batch) >= chunks_per_batch:
                    flush(batch)
                    batch = []
                now = time.perf_counter()
                if now - t_print > 5:
                    t_print = now
                    rate = done_bytes / max(now - t0, 1e-9)
                    log(f"prepare: {done_bytes / 1e6:,.1f}/{total / 1e6:,.1f} MB | "
                        f"{rate / 1e6:.1f} MB/s | {sum(counts.values()):,} tokens | "
                        f"ETA {format_duration((total - done_bytes) / max(rate, 1))}")
            batch.append((split, None))  # None: the end-of-text token
        flush(batch)
        for k in outs:
            outs[k].flush()
            os.fsync(outs[k].fileno())
            outs[k].close()
            replace_durably(tmp[k], files[k])
    finally:
        for k in outs:
            outs[k].close()
            if tmp[k].exists():
                tmp[k].unlink()
    return counts


def prepare_tokens(inputs, name, log=print, chunk_bytes=1 << 20, chunks_per_batch=8,
                   enc=None):
    """Tokenizes text files into NAME.train.bin, NAME.val.bin and NAME.json.
    Each document (file) ends with <|endoftext|>. Memory stays bounded: text
    is read in chunks of about chunk_bytes and tokenized chunks_per_batch at a
    time on every core (tiktoken's batch encoder runs threads). Files that are
    not UTF-8 or hold no text are skipped and listed. -> the header dict."""
    enc = enc or get_tokenizer()
    name = Path(str(name)[:-5] if str(name).endswith(".json") else name)
    docs, skipped = usable_documents(inputs, log)
    dtype = np.dtype(np.uint16 if enc.n_vocab <= 2 ** 16 else np.uint32)
    files = {"train": name.with_name(name.name + ".train.bin"),
             "val": name.with_name(name.name + ".val.bin")}
    name.parent.mkdir(parents=True, exist_ok=True)
    total = sum(p.stat().st_size for p, _, _ in docs)
    t0 = time.perf_counter()
    counts = write_token_files(docs, total, files, enc, dtype, chunk_bytes, chunks_per_batch,
                               log)
    seconds = time.perf_counter() - t0
    header = {"format": TOKEN_FORMAT, "version": 1, "tokenizer": enc.name,
              "tokenizer_sha256": tokenizer_fingerprint(enc), "vocab_size": enc.n_vocab,
              "end_of_text": int(enc.eot_token), "dtype": dtype.name,
              "train_file": files["train"].name, "val_file": files["val"].name,
              "train_tokens": counts["train"], "val_tokens": counts["val"],
              "documents": {"train": sum(not v for _, _, v in docs),
                            "val": sum(v for _, _, v in docs)},
              "text_bytes": total, "sources": [str(i) for i in inputs], "skipped": skipped,
              "split": f"by document: sha256(path relative to its input) in the first "
                       f"{VAL_FRACTION:.0%} of the hash range is validation",
              "seconds": round(seconds, 2)}
    header_path = name.with_name(name.name + ".json")
    header_tmp = header_path.with_name(f".{header_path.name}.tmp{os.getpid()}")
    header_tmp.write_text(json.dumps(header, indent=1) + "\n")
    replace_durably(header_tmp, header_path)
    log(f"prepare: {len(docs)} documents, {total / 1e6:,.1f} MB -> {counts['train']:,} training "
        f"and {counts['val']:,} validation tokens ({dtype.name}) in {seconds:.1f}s "
        f"({total / 1e6 / max(seconds, 1e-9):.1f} MB/s); wrote {header_path}")
    return header


@dataclass(frozen=True)
class TokenFile:
    """A file of raw token ids, read a batch at a time. Each read maps the file
    afresh and drops the mapping after copying the windows out, so the pages
    a long run touches are not kept counted in its memory (nanoGPT #287)."""

    path: Path
    dtype: str
    n_tokens: int

    def __len__(self):
        return self.n_tokens

    def __getitem__(self, index):
        """The tokens at int positions (an array of any shape), so that Part
        I's read_windows reads a TokenFile as it reads an array."""
        data = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))
        out = np.asarray(data[index])
        del data
        return out

    def windows(self, starts, length):
        """int[B] start positions -> int32[B, length] token windows."""
        return read_windows(self, starts, length)


def token_files_header(path):
    """Where --data names a prepared data set (NAME.json or NAME), its header
    path; else None (a text file)."""
    path = Path(path)
    if path.suffix == ".json":
        return path
    named = path.with_name(path.name + ".json")
    return named if named.is_file() and not path.is_file() else None


def open_token_files(header_path, enc=None):
    """NAME.json -> (train TokenFile, val TokenFile, header), refusing with a
    message that says what to do: a missing or unreadable header, a tokenizer
    other than the model's, a file that is missing or not a whole number of
    the header's tokens."""
    header_path = Path(header_path)
    redo = f"run `python llama_jax.py --prepare INPUT... --data {header_path.with_suffix('')}` again"
    if not header_path.is_file():
        raise InputError(f"data set {header_path} not found: make it with --prepare INPUT... "
                         f"--data {header_path.with_suffix('')}")
    try:
        header = json.loads(header_path.read_text())
        assert header.get("format") == TOKEN_FORMAT
        fields = [header[k] for k in ("tokenizer_sha256", "dtype", "train_file", "val_file",
                                      "train_tokens", "val_tokens")]
    except (ValueError, AssertionError, KeyError, TypeError) as err:
        raise InputError(f"{header_path} is not a llama_jax token-file header "
                         f"({type(err).__name__}): {redo}") from err
    enc = enc or get_tokenizer()
    if fields[0] != tokenizer_fingerprint(enc):
        raise InputError(f"{header_path} was tokenized with {header.get('tokenizer')!r} "
                         f"(sha256 {fields[0][:12]}...), not this model's tokenizer {enc.name!r}: "
                         f"{redo} with the model's tokenizer")
    files = []
    for split, name, count in (("train", fields[2], fields[4]), ("val", fields[3], fields[5])):
        path = header_path.with_name(name)
        itemsize = np.dtype(fields[1]).itemsize
        if not path.is_file():
            raise InputError(f"{path} ({split} tokens of {header_path}) is missing: {redo}")
        size = path.stat().st_size
        if size % itemsize or size // itemsize != count:
            raise InputError(f"{path} has {size:,} bytes, but {header_path} says {count:,} "
                             f"{fields[1]} tokens ({count * itemsize:,} bytes): the file is "
                             f"truncated or was overwritten; {redo}")
        files.append(TokenFile(path, fields[1], count))
    return files[0], files[1], header


_step_window_starts = jax.jit(
    lambda keys, step, n_tokens, batch_size, seq_len: window_starts(
        step_keys(keys, step)[0], n_tokens, batch_size, seq_len),
    static_argnames=("batch_size", "seq_len"))


@dataclass(frozen=True)
class ChatWindows:
    """Rendered conversations, one a row: inputs int32[N, T] and targets
    int32[N, T] (IGNORE where no loss). Batches are drawn on the host by the
    run's keys (host_batch), as token files' are."""

    inputs: np.ndarray
    targets: np.ndarray

    def __len__(self):
        return len(self.inputs)

    def rows(self, rows):
        """int[B] row numbers -> (inputs, targets) int32[B, T]."""
        return self.inputs[rows], self.targets[rows]

    def batches(self, batch_size):
        """Every row once, in batches of batch_size (the last one padded with
        rows that are all IGNORE). -> [(inputs, targets)]."""
        out = []
        for i in range(0, len(self), batch_size):
            x, y = self.inputs[i:i + batch_size], self.targets[i:i + batch_size]
            pad = batch_size - len(x)
            out.append((np.pad(x, ((0, pad), (0, 0))),
                        np.pad(y, ((0, pad), (0, 0)), constant_values=IGNORE)))
        return out


def host_batch(token_file, keys, step, batch_size, seq_len):
    """The batch run_step would draw from the same tokens on the device, read
    from a token file: the same start positions (computed by jax.random on the
    CPU, so that a GPU's queue is never waited on), then this process reads
    its own rows only and jax.make_array_from_process_local_data assembles the
    global batch. Chat data (ChatWindows, above) is read the same way:
    the draw picks conversations, uniform over its N rows.
    -> (inputs, targets) int32[B, T]."""
    chats = isinstance(token_file, ChatWindows)
    # window_starts draws in [0, n - seq_len): n = N + seq_len draws a row in [0, N)
    n = len(token_file) + seq_len if chats else len(token_file)
    cpu_keys = jax.device_put(keys, jax.devices("cpu")[0])
    starts = np.asarray(_step_window_starts(cpu_keys, step, n, batch_size, seq_len))
    rows = batch_size // jax.process_count()
    mine = starts[jax.process_index() * rows:(jax.process_index() + 1) * rows]
    if chats:
        inputs, targets = token_file.rows(mine)
    else:
        windows = token_file.windows(mine, seq_len + 1)
        inputs, targets = windows[:, :-1], windows[:, 1:]
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return (jax.make_array_from_process_local_data(sharding, inputs),
            jax.make_array_from_process_local_data(sharding, targets))


def load_training_data(path, seq_len, enc=None):
    """--data: a text file (tokenized in memory by enc, default GPT-2's: int32
    arrays) or a prepared data set (TokenFiles, nothing read yet; refused if
    another tokenizer made it). -> (train, val, how)."""
    header = token_files_header(path)
    if header is None:
        if not Path(path).is_file():
            raise InputError(f"--data {path} not found: pass --data PATH to a UTF-8 text file "
                             f"(the repository ships {DEFAULT_DATA.name}) or to a data set made by "
                             "--prepare (NAME.json)")
        train, val = load_dataset(path, seq_len, enc)
        return train, val, "tokenized in memory"
    train, val, _ = open_token_files(header, enc)
    for split, f in (("training", train), ("validation", val)):
        if len(f) >= 2 ** 31:  # window starts are drawn as int32, as on the device
            raise InputError(f"{f.path} holds {len(f):,} {split} tokens; llama_jax reads at "
                             f"most 2^31 - 1 per file: --prepare the text in parts")
        if len(f) < seq_len + 1:
            raise InputError(f"{f.path} holds {len(f):,} {split} tokens; --seq-len {seq_len} "
                             f"needs at least {seq_len + 1}: prepare more text or lower --seq-len")
    return train, val, "token files, memory-mapped"
