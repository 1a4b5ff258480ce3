"""Tests of llamatool/token_files.py."""

import dataclasses
import json

import numpy as np
import pytest

import llama_jax as L
import llamatool as lt

from conftest import TRAIN_TINY, independent_split, make_corpus_folder, quick_tc, write_token_files


def test_prepare_writes_tiktokens_ids_split_by_document_with_a_header(tmp_path):
    docs = make_corpus_folder(tmp_path / "in")
    lines = []
    # Chunks of 64 bytes: many cuts inside each document, which must not change its ids.
    header = lt.token_files.prepare_tokens([str(tmp_path / "in")], tmp_path / "ds", log=lines.append,
                              chunk_bytes=64, chunks_per_batch=3)
    enc = L.get_tokenizer()
    expected = {"train": [], "val": []}
    for name in sorted(docs, key=lambda n: str(tmp_path / "in" / n)):
        split = "val" if independent_split(name) else "train"
        expected[split] += enc.encode_ordinary(docs[name]) + [50256]
    assert expected["val"] and expected["train"]  # the names hash into both splits
    for split in ("train", "val"):
        got = np.fromfile(tmp_path / f"ds.{split}.bin", dtype=np.uint16)
        assert got.tolist() == expected[split]
        assert header[f"{split}_tokens"] == len(expected[split])
    on_disk = json.loads((tmp_path / "ds.json").read_text())
    assert on_disk == header and header["dtype"] == "uint16" and header["tokenizer"] == "gpt2"
    assert header["tokenizer_sha256"] == lt.token_files.tokenizer_fingerprint(enc)
    assert header["documents"] == {"train": 20 - sum(map(independent_split, docs)),
                                   "val": sum(map(independent_split, docs))}
    assert sorted(s["reason"].split(" (")[0] for s in header["skipped"]) == ["empty", "not UTF-8"]
    assert any("latin1.txt: not UTF-8 (byte 3)" in line for line in lines)
    assert "image.png" not in json.dumps(header)  # not a text suffix: never read


@pytest.mark.slow
def test_token_files_train_and_resume_exactly_like_the_same_tokens_in_memory(corpus, tmp_path):
    config = dataclasses.replace(TRAIN_TINY, dropout_rate=0.1)  # dropout keys must agree too
    tc = quick_tc(steps=8, eval_every=4)
    in_memory = lt.training.train(config, tc, corpus, tmp_path / "a", log=lambda s: None)
    dataset = write_token_files(tmp_path, *L.load_dataset(corpus, tc.seq_len))

    def interrupt_at_step_5(line):
        if line.startswith("step     5/"):
            raise KeyboardInterrupt

    first = lt.training.train(config, tc, dataset, tmp_path / "b", log=interrupt_at_step_5)
    assert first["stopped"] == "interrupted"
    resumed = lt.training.train(config, tc, dataset, tmp_path / "b", resume=True, log=lambda s: None)
    np.testing.assert_allclose(np.array(in_memory["history"]["train"]),
                               np.array(resumed["history"]["train"]), atol=1e-6)
    np.testing.assert_allclose(np.array(in_memory["history"]["eval"]),
                               np.array(resumed["history"]["eval"]), atol=1e-6)


def test_bad_token_files_and_inputs_get_clear_errors(corpus, tmp_path):
    dataset = write_token_files(tmp_path, *L.load_dataset(corpus, 16))
    train_bin = tmp_path / "mem.train.bin"
    good = train_bin.read_bytes()
    train_bin.write_bytes(good[:-1])
    with pytest.raises(L.InputError, match=r"mem.train.bin has .* the file is truncated .*--prepare"):
        lt.token_files.open_token_files(dataset)
    train_bin.write_bytes(good)
    header = json.loads(dataset.read_text())
    dataset.write_text(json.dumps({**header, "tokenizer": "llama3", "tokenizer_sha256": "ab" * 32}))
    with pytest.raises(L.InputError, match="tokenized with 'llama3'.*not this model's tokenizer"):
        lt.training.train(TRAIN_TINY, quick_tc(), dataset, tmp_path / "out", log=lambda s: None)
    dataset.write_text("{not json")
    with pytest.raises(L.InputError, match="not a llama_jax token-file header"):
        lt.token_files.open_token_files(dataset)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(L.InputError, match="no text files in .*nothing"):
        lt.token_files.prepare_tokens([str(tmp_path / "nothing")], tmp_path / "x")
    with pytest.raises(L.InputError, match="not a file, a folder, or a glob"):
        lt.token_files.prepare_tokens([str(tmp_path / "missing")], tmp_path / "x")
    with pytest.raises(L.InputError, match="needs at least two files"):
        lt.token_files.prepare_tokens([str(corpus)], tmp_path / "x")
