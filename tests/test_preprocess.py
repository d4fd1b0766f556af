"""`bolt preprocess`: round trips through Megatron-Core's IndexedDataset / GPTDataset, chunk stores,
bad input, multi-worker determinism and atomic outputs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from megatron_bolt.cli import main as bolt_main
from megatron_bolt.data import preprocess as pp
from megatron_bolt.data.preprocess import PreprocessConfig, preprocess
from megatron_bolt.errors import UserError
from megatron_bolt.stores.chunk_store import ChunkStore
from megatron_bolt.tokenizer import load_tokenizer, train_bpe_tokenizer


def make_texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["the", "sum", "of", "x", "and", "y", "is", "prime", "café", "Dr.", "2.5", "日本", "proof"]
    texts = []
    for _ in range(n):
        paras = []
        for _ in range(int(rng.integers(1, 4))):
            sents = [" ".join(rng.choice(words, size=int(rng.integers(2, 10)))).capitalize() + "."
                     for _ in range(int(rng.integers(1, 20)))]
            paras.append(" ".join(sents))
        texts.append("\n\n".join(paras))
    return texts


def write_jsonl(path, texts, key="text"):
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({key: t, "id": 0}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("tok")
    texts = make_texts(50, seed=99)
    (d / "c.txt").write_text("\n".join(texts))
    spm.SentencePieceTrainer.train(input=str(d / "c.txt"), model_prefix=str(d / "sp"), vocab_size=300,
                                   model_type="bpe", character_coverage=1.0, byte_fallback=True, minloglevel=2)
    train_bpe_tokenizer([write_jsonl(d / "c.jsonl", texts)], 400, str(d / "bpe"))
    return {"HuggingFaceTokenizer": str(d / "bpe"), "SentencePieceTokenizer": str(d / "sp.model")}


def read_indexed(prefix: str):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return ds, [ds[i].tolist() for i in range(len(ds))]


@pytest.mark.parametrize("tokenizer_type", ["HuggingFaceTokenizer", "SentencePieceTokenizer"])
def test_round_trip_through_megatron_indexed_dataset(tmp_path, toks, tokenizer_type):
    texts = make_texts(40)
    data = write_jsonl(tmp_path / "in.jsonl", texts)
    prefix = str(tmp_path / "out" / "corpus")
    rc = bolt_main(["preprocess", "--input", data, "--output-prefix", prefix, "--tokenizer-type", tokenizer_type,
                    "--tokenizer-model", toks[tokenizer_type], "--append-eod", "--no-progress"])
    assert rc == 0
    tok = load_tokenizer(toks[tokenizer_type])
    ds, docs = read_indexed(prefix + "_text_document")
    assert ds.index.dtype == np.uint16
    assert docs == [tok.encode(t) + [tok.eos_id] for t in texts]
    assert ds.document_indices.tolist() == list(range(len(texts) + 1))


def test_large_vocabulary_uses_int32_and_no_eod_without_flag(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(70_000)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "tokenizer.json"))
    texts = ["w1 w69999 w5", "w70000 w42"]
    data = write_jsonl(tmp_path / "in.jsonl", texts)
    prefix = str(tmp_path / "big")
    preprocess(PreprocessConfig([data], prefix, str(tmp_path / "tokenizer.json"), progress=False))
    ds, docs = read_indexed(prefix + "_text_document")
    assert ds.index.dtype == np.int32
    assert docs == [[4, 70002, 8], [0, 45]]  # w70000 is unknown


def test_bad_records_are_skipped_and_counted(tmp_path, toks, capsys):
    good = ["A short document.", "Another one. With two sentences.", "Third!"]
    lines = [json.dumps({"text": good[0]}), "{not json", json.dumps({"other": "x"}), json.dumps({"text": 7}),
             json.dumps({"text": "   \n"}), json.dumps({"text": good[1]}), json.dumps(["a list"]),
             json.dumps({"text": "x" * 500}), json.dumps({"text": "lone \ud800 surrogate"}), json.dumps({"text": good[2]})]
    path = tmp_path / "bad.jsonl"
    with open(path, "wb") as f:
        for line in lines:
            f.write(line.encode() + b"\n")
        f.write(b'{"text": "bad \xff byte"}\n\n')
    prefix = str(tmp_path / "o")
    args = ["preprocess", "--input", str(path), "--output-prefix", prefix, "--tokenizer-model",
            toks["HuggingFaceTokenizer"], "--max-doc-chars", "400", "--no-progress"]
    assert bolt_main(args) == 0
    err = capsys.readouterr().err
    assert "3 documents" in err and "skipped 8" in err
    assert f"invalid JSON (invalid_json); first at {path}:2" in err
    assert f"{path}:3" in err and f"{path}:11" in err
    res = preprocess(PreprocessConfig([str(path)], prefix, toks["HuggingFaceTokenizer"], max_doc_chars=400,
                                      progress=False))
    assert res.skipped == {"invalid_json": 1, "missing_key": 1, "non_string": 1, "empty_text": 1,
                           "not_an_object": 1, "too_large": 1, "invalid_utf8": 2}
    _, docs = read_indexed(prefix + "_text_document")
    tok = load_tokenizer(toks["HuggingFaceTokenizer"])
    assert docs == [tok.encode(t) for t in good[:3]]
    # --strict: the first bad record is fatal, one line naming file:line, exit 2, no outputs.
    strict_prefix = str(tmp_path / "strict")
    assert bolt_main(["preprocess", "--input", str(path), "--output-prefix", strict_prefix, "--tokenizer-model",
                      toks["HuggingFaceTokenizer"], "--strict", "--no-progress"]) == 2
    assert f"{path}:2: invalid JSON" in capsys.readouterr().err
    assert not [p for p in os.listdir(tmp_path) if p.startswith("strict")]


def test_parquet_and_globs_in_sorted_order(tmp_path, toks):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = make_texts(30, seed=3)
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"text": texts[:10], "score": list(range(10))}), tmp_path / "in" / "b.parquet",
                   row_group_size=3)
    write_jsonl(tmp_path / "in" / "a.jsonl", texts[10:20])
    pq.write_table(pa.table({"text": texts[20:] + [None]}), tmp_path / "in" / "c.parquet")
    prefix = str(tmp_path / "p")
    res = preprocess(PreprocessConfig([str(tmp_path / "in" / "*")], prefix, toks["HuggingFaceTokenizer"],
                                      append_eod=True, batch_docs=4, progress=False))
    assert res.skipped == {"non_string": 1} and res.first_bad["non_string"] == [f"{tmp_path}/in/c.parquet:11"]
    tok = load_tokenizer(toks["HuggingFaceTokenizer"])
    _, docs = read_indexed(prefix + "_text_document")
    ordered = texts[10:20] + texts[:10] + texts[20:]  # a.jsonl, b.parquet, c.parquet
    assert docs == [tok.encode(t) + [tok.eos_id] for t in ordered]
    with pytest.raises(UserError, match="no file matches"):
        preprocess(PreprocessConfig([str(tmp_path / "none*.jsonl")], prefix, toks["HuggingFaceTokenizer"]))


@pytest.mark.parametrize("tokenizer_type", ["HuggingFaceTokenizer", "SentencePieceTokenizer"])
def test_chunk_store_and_workers_give_identical_output(tmp_path, toks, tokenizer_type):
    texts = make_texts(120, seed=5)
    data = write_jsonl(tmp_path / "in.jsonl", texts)
    outs = {}
    tokenizer_vars = ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")
    env = {k: os.environ.get(k) for k in tokenizer_vars}
    for workers, threads in ((1, 1), (2, 1), (1, 2)):
        prefix = str(tmp_path / f"w{workers}t{threads}")
        preprocess(PreprocessConfig([data], prefix, toks[tokenizer_type], tokenizer_type=tokenizer_type,
                                    append_eod=True, workers=workers, batch_docs=16, tokenizer_threads=threads,
                                    chunk_store=prefix + ".zarr" if threads == 1 else None, progress=False))
        with open(prefix + "_text_document.bin", "rb") as f1, open(prefix + "_text_document.idx", "rb") as f2:
            outs[workers, threads] = (f1.read(), f2.read())
    assert outs[1, 1] == outs[2, 1] == outs[1, 2]
    # Thread settings reach the worker processes only, never this process's environment.
    assert {k: os.environ.get(k) for k in tokenizer_vars} == env
    for a, b in (("w1t1", "w1"), ("w2t1", "w2")):
        os.rename(tmp_path / f"{a}.zarr", tmp_path / f"{b}.zarr")
    tok = load_tokenizer(toks[tokenizer_type])
    s1, s2 = ChunkStore.open(str(tmp_path / "w1.zarr")), ChunkStore.open(str(tmp_path / "w2.zarr"))
    assert s1.num_docs == len(texts) and s1.num_chunks > 2 * len(texts)
    for name in ("chunk_offsets", "chunk_doc", "chunk_index", "doc_chunk_offsets"):
        assert np.array_equal(getattr(s1, name), getattr(s2, name))
    assert s1.special_tokens["sol"] == tok.latent.sol and s1.vocab_size == tok.vocab_size
    for d, text in enumerate(texts):
        assert s1.doc_tokens(d).tolist() == tok.encode(text)  # chunks carry no EOD
        a, b = s1.doc_chunk_range(d)
        assert [s2.chunk_tokens(i).tolist() for i in range(a, b)] == [s1.chunk_tokens(i).tolist() for i in range(a, b)]


def test_chunk_poisson_mean_flag(tmp_path, toks):
    texts = make_texts(30, seed=6)
    data = write_jsonl(tmp_path / "in.jsonl", texts)
    stores = {}
    for mean in ("7", "0"):
        prefix = str(tmp_path / f"m{mean}")
        assert bolt_main(["preprocess", "--input", data, "--output-prefix", prefix, "--tokenizer-model",
                          toks["HuggingFaceTokenizer"], "--chunk-store", prefix + ".zarr",
                          "--chunk-poisson-mean", mean, "--no-progress"]) == 0
        stores[mean] = ChunkStore.open(prefix + ".zarr")
        assert stores[mean].attrs["chunk_poisson_mean"] == float(mean)
    assert stores["0"].num_chunks > 2 * stores["7"].num_chunks  # one sentence per chunk
    assert stores["0"].num_tokens == stores["7"].num_tokens
    with pytest.raises(UserError, match="--chunk-poisson-mean"):
        preprocess(PreprocessConfig([data], str(tmp_path / "bad"), toks["HuggingFaceTokenizer"],
                                    chunk_store=str(tmp_path / "bad.zarr"), chunk_poisson_mean=-1))
    # --chunking uniform: the reference's validation chunks, ceil(units / 8) of them per document
    prefix = str(tmp_path / "uniform")
    assert bolt_main(["preprocess", "--input", data, "--output-prefix", prefix, "--tokenizer-model",
                      toks["HuggingFaceTokenizer"], "--chunk-store", prefix + ".zarr", "--chunking", "uniform",
                      "--no-progress"]) == 0
    uniform = ChunkStore.open(prefix + ".zarr")
    assert uniform.attrs["chunking"] == "uniform" and uniform.num_tokens == stores["7"].num_tokens
    from megatron_bolt.data.chunking import sentence_boundaries

    want = [-(-(len(sentence_boundaries(t)) + 1) // 8) for t in texts]
    assert [b - a for a, b in (uniform.doc_chunk_range(d) for d in range(len(texts)))] == want


def test_preprocess_never_sets_tokenizer_variables_in_this_process(tmp_path, toks, monkeypatch):
    # Thread settings go to the worker processes: other threads of the caller's process (a data
    # loader, say) must not see TOKENIZERS_PARALLELISM change while preprocessing runs.
    names = ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")
    for name in names:
        monkeypatch.delenv(name, raising=False)
    seen, real = [], pp._Progress.update

    def spy(self, docs, tokens):  # runs in this process once per batch
        seen.append({k: os.environ.get(k) for k in names})
        return real(self, docs, tokens)

    monkeypatch.setattr(pp._Progress, "update", spy)
    data = write_jsonl(tmp_path / "in.jsonl", make_texts(20))
    preprocess(PreprocessConfig([data], str(tmp_path / "x"), toks["HuggingFaceTokenizer"], batch_docs=8,
                                chunk_store=str(tmp_path / "x.zarr"), progress=False))
    assert len(seen) == 3 and all(v == dict.fromkeys(names) for v in seen)


def test_interrupted_run_leaves_no_output_pair(tmp_path, toks, monkeypatch):
    data = write_jsonl(tmp_path / "in.jsonl", make_texts(50))
    prefix = str(tmp_path / "x")
    preprocess(PreprocessConfig([data], prefix, toks["HuggingFaceTokenizer"], progress=False))
    before = open(prefix + "_text_document.idx", "rb").read()
    real, calls = pp._Progress.update, []

    def dies_on_third_batch(self, docs, tokens):  # in this process, after the third batch is written
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, docs, tokens)

    monkeypatch.setattr(pp._Progress, "update", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        preprocess(PreprocessConfig([data], prefix, toks["HuggingFaceTokenizer"], batch_docs=8,
                                    chunk_store=prefix + ".zarr", append_eod=True, progress=False))
    # The previous complete pair is untouched; no temporary file or half-written store is left.
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "x_text_document.bin", "x_text_document.idx"]
    assert open(prefix + "_text_document.idx", "rb").read() == before


def test_gpt_dataset_builds_over_the_output(tmp_path, toks):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    tok = load_tokenizer(toks["HuggingFaceTokenizer"])
    texts = make_texts(60, seed=7)
    prefix = str(tmp_path / "g")
    preprocess(PreprocessConfig([write_jsonl(tmp_path / "in.jsonl", texts)], prefix,
                                toks["HuggingFaceTokenizer"], append_eod=True, progress=False))

    class MegatronTok:  # the attributes GPTDataset reads (no pad: Megatron then pads with -1)
        eod = tok.eos_id
        vocab_size = tok.vocab_size
        unique_identifiers = {"class": "BoltTokenizer", "path": toks["HuggingFaceTokenizer"]}

    config = GPTDatasetConfig(random_seed=1, sequence_length=32, blend=([prefix + "_text_document"], None),
                              split="1,0,0", tokenizer=MegatronTok(), reset_position_ids=False,
                              reset_attention_mask=False, eod_mask_loss=False,
                              path_to_cache=str(tmp_path / "cache"))
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [20, None, None], lambda: True, config).build()
    docs = [tok.encode(t) + [tok.eos_id] for t in texts]
    assert isinstance(train, GPTDataset) and len(train) >= 20
    # Each sample is a window of the documents concatenated in the dataset's (shuffled) document order.
    stream = np.concatenate([docs[i] for i in train.document_index]).astype(np.int64).tobytes()
    for i in range(len(train)):
        sample = train[i]
        window = np.concatenate([sample["tokens"].numpy(), sample["labels"].numpy()[-1:]]).astype(np.int64)
        assert len(window) == 33
        assert window.tobytes() in stream
        assert sample["labels"].numpy()[:-1].tolist() == sample["tokens"].numpy()[1:].tolist()
