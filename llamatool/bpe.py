"""Other models' tokenizers: Llama 3's tiktoken file, and byte-level BPE from a tokenizer.json."""

from pathlib import Path

from llama_jax import GPT2_SPLIT_PATTERN, InputError, read_bpe_ranks
from llamatool.checkpoints import CheckpointError
from llamatool.hugging_face import read_json


def special_token(tokenizer, *names):
    """The id of the first of these special tokens the tokenizer has, or None.
    (An id can be 0, as SmolLM's <|endoftext|> is: test it against None.)"""
    return next((tokenizer.encode_single_token(n) for n in names
                 if n in tokenizer.special_tokens_set), None)


def llama3_tokenizer(path):
    """A tiktoken Encoding for Llama 3's tokenizer.model (tiktoken format, 128,000
    ranks) with Llama 3's split pattern and its 256 special tokens, numbered
    after the ranks, named as in Llama 3.1 and later (Meta's tokenizer.py).
    Llama 3.0 named a few unused slots differently; the ids of
    <|begin_of_text|>, <|end_of_text|>, the header tokens and <|eot_id|> agree."""
    import tiktoken

    ranks = read_bpe_ranks(path)
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
             "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
             "<|python_tag|>"]
    names += [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(names))]
    return tiktoken.Encoding(name="llama3", pat_str=PRE_TOKENIZERS["llama-bpe"],
                             mergeable_ranks=ranks,
                             special_tokens={n: len(ranks) + i for i, n in enumerate(names)})


# Pre-tokenizers by the names llama.cpp writes to GGUF (tokenizer.ggml.pre): how
# text is split into pieces before BPE merges run inside each piece.
PRE_TOKENIZERS = {
    "gpt2": GPT2_SPLIT_PATTERN,
    "llama-bpe": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),  # Llama 3
    # SmolLM, StarCoder and others: every digit alone, then GPT-2's rules.
    # llama.cpp splits in two passes (digits, then GPT-2's pattern inside the
    # rest); in one pattern, whitespace before a digit must count as the end
    # of a piece, hence (?![^\s\p{N}]) where GPT-2 has (?!\S).
    "smollm": (r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|"
               r"\s+(?![^\s\p{N}])|\s+"),
}
for _name in ("starcoder", "refact", "codeshell"):
    PRE_TOKENIZERS[_name] = PRE_TOKENIZERS["smollm"]
PRE_TOKENIZERS["default"] = PRE_TOKENIZERS["gpt-2"] = PRE_TOKENIZERS["gpt2"]  # llama.cpp: gpt-2


def byte_level_alphabet():
    """GPT-2's byte-level BPE writes each byte as a printable character (its
    encoder.py, bytes_to_unicode): printable Latin-1 bytes as themselves, the
    other 68 as chr(256 + n) in byte order. -> {character: byte}."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(others)})
    return table


def bpe_tokenizer(tokens, merges, special, pre, name="bpe", pattern=None):
    """A byte-level BPE given as a token list (id = position, in byte-level
    characters), its merges ("a b", in priority order) and the ids of its
    special tokens, as a tiktoken Encoding. tiktoken merges the pair whose
    result has the lowest rank and uses ranks as ids; that is the same BPE when
    each merge's result has a larger id than every earlier merge's, which
    trained BPE vocabularies satisfy (checked here). pre: the pre-tokenizer's
    name (PRE_TOKENIZERS), or pattern: its regular expression."""
    import tiktoken

    if pattern is None and pre not in PRE_TOKENIZERS:
        raise InputError(f"pre-tokenizer {pre!r} is not supported (llama_jax knows "
                         f"{', '.join(sorted(PRE_TOKENIZERS))})")
    alphabet = byte_level_alphabet()
    special = set(special)
    ranks = {}
    for i, token in enumerate(tokens):
        if i in special:
            continue
        try:
            ranks[bytes(alphabet[c] for c in token)] = i
        except KeyError as err:
            raise InputError(f"token {i} ({token!r}) is not written in byte-level characters: "
                             "this is not a byte-level BPE vocabulary") from err
    previous = -1
    for merge in merges:
        left, _, right = merge.partition(" ")
        merged = ranks.get(bytes(alphabet[c] for c in left + right))
        if merged is None or merged <= previous:
            raise InputError(f"merge {merge!r} does not produce a token whose id follows the "
                             "previous merge's: tiktoken cannot reproduce this BPE")
        previous = merged
    return tiktoken.Encoding(name=name, pat_str=pattern or PRE_TOKENIZERS[pre],
                             mergeable_ranks=ranks,
                             special_tokens={tokens[i]: i for i in sorted(special)})


def hf_bpe_tokenizer(path):
    """A Hugging Face tokenizer.json holding a byte-level BPE (model "BPE" with
    vocab and merges; pre-tokenizer ByteLevel, Digits then ByteLevel, or a
    Split regex then ByteLevel, as in Llama 3) -> a tiktoken Encoding."""
    spec = read_json(path)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise CheckpointError(f"{path}: model type {model.get('type')!r}; llama_jax reads "
                              "byte-level BPE tokenizers (model type 'BPE')")
    tokens = [None] * (max(model["vocab"].values()) + 1)
    for token, i in model["vocab"].items():
        tokens[i] = token
    special = []
    for added in spec.get("added_tokens") or []:
        if added["id"] >= len(tokens):
            tokens += [None] * (added["id"] + 1 - len(tokens))
        tokens[added["id"]] = added["content"]
        special.append(added["id"])
    if None in tokens:
        raise CheckpointError(f"{path}: token id {tokens.index(None)} has no token")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    pattern = None
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        name = "gpt2"
    elif kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        name = "smollm"
    elif kinds == ["Split", "ByteLevel"] and "Regex" in (steps[0].get("pattern") or {}):
        name, pattern = "split", steps[0]["pattern"]["Regex"]
    else:
        raise CheckpointError(f"{path}: pre-tokenizer {' then '.join(map(str, kinds))} is not "
                              "supported (ByteLevel; Digits then ByteLevel; Split then ByteLevel)")
    try:
        return bpe_tokenizer(tokens, merges, special, name, name=Path(path).parent.name,
                             pattern=pattern)
    except InputError as err:
        raise CheckpointError(f"{path}: {err}") from err
