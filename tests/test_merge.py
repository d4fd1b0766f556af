"""`bolt merge`: read back with Megatron-Core's IndexedDataset and check every document's structure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_bolt.cli import main as bolt_main
from megatron_bolt.data.indexed import document_paths
from megatron_bolt.data.merge import (
    epochs_for,
    merge_latents,
    planned_train_tokens,
    read_summary,
)
from megatron_bolt.errors import UserError
from megatron_bolt.stores.chunk_store import ChunkStore, write_chunk_store
from megatron_bolt.stores.latent_store import LatentStore

REPO = Path(__file__).resolve().parents[1]


def specials(vocab: int) -> dict[str, int]:
    return {"bos": 1, "eos": 2, "sol": vocab - 4, "eol": vocab - 3, "prior": vocab - 2, "posterior": vocab - 1}


def make_stores(tmp: Path, vocab: int = 1000, docs: int = 60, samples: int = 2, block_size: int = 16,
                skip_blocks: tuple[int, ...] = (), seed: int = 0) -> tuple[str, str]:
    """A chunk store (one empty document included) and a latent store with every block but
    `skip_blocks` written. Plain tokens are in [10, vocab - 10), never a special."""
    rng = np.random.default_rng(seed)
    all_docs = []
    for d in range(docs):
        n = 0 if d == 7 else int(rng.integers(1, 8))
        all_docs.append([rng.integers(10, vocab - 10, size=int(rng.integers(1, 12))).astype(np.int32) for _ in range(n)])
    chunks_path = str(tmp / "chunks.zarr")
    write_chunk_store(chunks_path, all_docs, {"tokenizer": "test", "vocab_size": vocab, "special_tokens": specials(vocab)})
    num_chunks = ChunkStore.open(chunks_path).num_chunks
    latents_path = str(tmp / "latents.zarr")
    store = LatentStore.create(latents_path, num_chunks, samples, block_size, meta={"engine": "test", "iteration": 1})
    for b in range(store.num_blocks):
        if b in skip_blocks:
            continue
        r = store.block_range(b)
        lat = [[rng.integers(10, vocab - 10, size=int(rng.integers(0, 9))).tolist() for _ in range(samples)] for _ in r]
        logs = -rng.random((len(r), samples))
        store.write_block(b, lat, logs, logs, logs, rng.integers(0, samples, size=len(r)))
    return chunks_path, latents_path


def parse_document(doc: list[int], sp: dict[str, int]) -> list[tuple[str, list[int], list[int]]]:
    """Split a merged document into (form, z, x) per chunk, checking every special's place."""
    assert doc[0] == sp["bos"] and doc[-1] == sp["eos"], "BOS/EOS"
    body, out, p = doc[1:-1], [], 0
    assert sp["bos"] not in body and sp["eos"] not in body

    def read_plain(p: int, stop: set[int]) -> tuple[list[int], int]:
        q = p
        while q < len(body) and body[q] not in stop:
            q += 1
        return body[p:q], q

    lat = {sp["sol"], sp["eol"], sp["prior"], sp["posterior"]}
    while p < len(body):
        if body[p] != sp["sol"]:  # raw chunk: plain tokens up to the next SoL
            x, p = read_plain(p, lat)
            out.append(("raw", [], x))
            continue
        if body[p + 1] == sp["prior"]:  # SoL PRIOR Z EoL X
            z, p = read_plain(p + 2, lat)
            assert body[p] == sp["eol"]
            x, p = read_plain(p + 1, lat)
            out.append(("prior", z, x))
        else:  # SoL EoL X SoL POST Z EoL
            assert body[p + 1] == sp["eol"]
            x, p = read_plain(p + 2, lat)
            assert body[p] == sp["sol"] and body[p + 1] == sp["posterior"]
            z, p = read_plain(p + 2, lat)
            assert body[p] == sp["eol"]
            p += 1
            out.append(("posterior", z, x))
    return out


def read_documents(prefix: str) -> list[list[int]]:
    ds = IndexedDataset(f"{prefix}_text_document")
    # one sequence per document
    assert list(ds.document_indices) == list(range(len(ds) + 1))
    return [ds[i].tolist() for i in range(len(ds))]


def expected(chunks_path: str, latents_path: str):
    chunks, lat = ChunkStore.open(chunks_path), LatentStore.open(latents_path, mode="r")
    docs = []
    for d in range(chunks.num_docs):
        a, b = chunks.doc_chunk_range(d)
        if b > a:
            docs.append([(chunks.chunk_tokens(i).tolist(), lat.chosen_latent(i)) for i in range(a, b)])
    return docs


def test_merge_structure_order_share_and_determinism(tmp_path):
    chunks_path, latents_path = make_stores(tmp_path)
    sp = specials(1000)
    epochs = 3
    summary = merge_latents(chunks_path, latents_path, tmp_path / "out" / "ltm", epochs=epochs, seed=5, progress=False)
    docs = read_documents(str(tmp_path / "out" / "ltm"))
    want = expected(chunks_path, latents_path)
    assert len(want) == 59 and summary.empty_documents_skipped == 1
    assert len(docs) == summary.documents == epochs * len(want) and summary.raw_documents == 0

    forms_per_epoch = []
    for e in range(epochs):
        forms = []
        for doc, ref in zip(docs[e * len(want) : (e + 1) * len(want)], want):
            parsed = parse_document(doc, sp)
            assert [x for _, _, x in parsed] == [x for x, _ in ref]  # every X once, in document order
            assert [z for _, z, _ in parsed] == [z.tolist() for _, z in ref]  # the chosen latent
            forms += [f for f, _, _ in parsed]
        assert set(forms) == {"prior", "posterior"}
        forms_per_epoch.append(forms)
    assert forms_per_epoch[0] != forms_per_epoch[1]  # redrawn per epoch

    n = sum(len(f) for f in forms_per_epoch)
    prior = sum(f.count("prior") for f in forms_per_epoch)
    assert abs(prior - 0.5 * n) <= 3 * np.sqrt(0.25 * n)
    assert summary.chunks["prior"] == prior and summary.chunks["posterior"] == n - prior
    assert summary.tokens == sum(len(d) for d in docs)
    assert summary.latent_tokens == epochs * sum(len(z) for ref in want for _, z in ref)
    assert summary.special_tokens == 3 * prior + 5 * (n - prior)
    assert IndexedDataset(str(tmp_path / "out" / "ltm_text_document")).index.dtype == np.uint16

    # byte-identical for a fixed seed, whatever the window size; different for another seed
    merge_latents(chunks_path, latents_path, tmp_path / "again", epochs=epochs, seed=5, window_tokens=37, progress=False)
    merge_latents(chunks_path, latents_path, tmp_path / "other", epochs=epochs, seed=6, progress=False)
    for a, b in zip(document_paths(tmp_path / "out" / "ltm"), document_paths(tmp_path / "again")):
        assert Path(a).read_bytes() == Path(b).read_bytes()
    assert Path(document_paths(tmp_path / "other")[0]).read_bytes() != Path(document_paths(tmp_path / "again")[0]).read_bytes()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "ltm_text_document.bin", "ltm_text_document.idx", "ltm_text_document.merge.json"]
    assert read_summary(tmp_path / "out" / "ltm") == summary


def test_posterior_prob_extremes(tmp_path):
    chunks_path, latents_path = make_stores(tmp_path, docs=10)
    for prob, form in ((0.0, "prior"), (1.0, "posterior")):
        merge_latents(chunks_path, latents_path, tmp_path / form, posterior_prob=prob, progress=False)
        forms = {f for d in read_documents(str(tmp_path / form)) for f, _, _ in parse_document(d, specials(1000))}
        assert forms == {form}


def test_raw_mix(tmp_path):
    chunks_path, latents_path = make_stores(tmp_path, docs=40)
    want = expected(chunks_path, latents_path)
    raw_docs = [[1, *[t for x, _ in ref for t in x], 2] for ref in want]
    # R = 0.5 with 2 epochs = one full raw pass
    s = merge_latents(chunks_path, latents_path, tmp_path / "full", epochs=2, raw_mix=0.5, progress=False)
    docs = read_documents(str(tmp_path / "full"))
    assert s.raw_documents == len(want) and docs[2 * len(want) :] == raw_docs
    assert s.chunks["raw_copy"] == sum(len(ref) for ref in want)
    # R = 0.3: a random subset of documents, in document order, no repeats
    s = merge_latents(chunks_path, latents_path, tmp_path / "part", raw_mix=0.3, seed=1, progress=False)
    tail = read_documents(str(tmp_path / "part"))[len(want) :]
    assert len(tail) == s.raw_documents == round(0.3 * len(want))
    positions = [raw_docs.index(d) for d in tail]
    assert positions == sorted(set(positions))
    assert s.chunks["raw_copy"] == sum(len(want[i]) for i in positions)


def test_missing_blocks_error_or_raw(tmp_path):
    chunks_path, latents_path = make_stores(tmp_path, docs=30, block_size=8, skip_blocks=(2,))
    with pytest.raises(UserError, match="blocks done.*--allow-missing"):
        merge_latents(chunks_path, latents_path, tmp_path / "x", progress=False)
    assert not any(p.name.startswith("x_") for p in tmp_path.iterdir())
    s = merge_latents(chunks_path, latents_path, tmp_path / "m", epochs=2, allow_missing=True, progress=False)
    assert s.chunks["missing_raw"] == 2 * 8
    # Chunks 16..23 (block 2) are raw in both epochs; adjacent raw chunks read as one plain run.
    chunks, lat = ChunkStore.open(chunks_path), LatentStore.open(latents_path, mode="r")
    want = []
    for d in range(chunks.num_docs):
        a, b = chunks.doc_chunk_range(d)
        seq = []
        for i in range(a, b):
            x = chunks.chunk_tokens(i).tolist()
            if 16 <= i < 24:
                if seq and seq[-1][0] == "raw":
                    seq[-1] = ("raw", [], seq[-1][2] + x)
                else:
                    seq.append(("raw", [], x))
            else:
                seq.append(("latent", lat.chosen_latent(i).tolist(), x))
        if seq:
            want.append(seq)
    docs = read_documents(str(tmp_path / "m"))
    got = [[("raw" if f == "raw" else "latent", z, x) for f, z, x in parse_document(d, specials(1000))] for d in docs]
    assert got == want + want
    assert any(f == "raw" for doc in got for f, _, _ in doc)


def test_int32_for_large_vocab_and_bad_ids(tmp_path):
    chunks_path, latents_path = make_stores(tmp_path, vocab=70000, docs=5)
    merge_latents(chunks_path, latents_path, tmp_path / "big", progress=False)
    assert IndexedDataset(str(tmp_path / "big_text_document")).index.dtype == np.int32
    docs = read_documents(str(tmp_path / "big"))
    assert max(max(d) for d in docs) >= 65536  # the specials sit above uint16

    # a latent id outside the vocabulary: one clear error, no output, no temporary files
    bad = tmp_path / "bad"
    bad.mkdir()
    c2, l2 = make_stores(bad, docs=5)
    store = LatentStore.open(l2)
    r = store.block_range(0)
    store.write_block(0, [[[5000]] * store.samples for _ in r], *([np.zeros((len(r), store.samples))] * 3), [0] * len(r))
    with pytest.raises(UserError, match="latent token id 5000 outside the vocabulary"):
        merge_latents(c2, l2, bad / "out", progress=False)
    assert sorted(p.name for p in bad.iterdir()) == ["chunks.zarr", "latents.zarr"]


def test_chunk_count_mismatch(tmp_path):
    chunks_path, _ = make_stores(tmp_path, docs=5)
    LatentStore.create(tmp_path / "small.zarr", 3, 1, 2)
    with pytest.raises(UserError, match="latent store has 3 chunks"):
        merge_latents(chunks_path, tmp_path / "small.zarr", tmp_path / "o", progress=False)
    with pytest.raises(UserError, match="not a readable chunk store"):
        merge_latents(tmp_path / "nope.zarr", tmp_path / "small.zarr", tmp_path / "o", progress=False)
    with pytest.raises(UserError, match="no latent store"):
        merge_latents(chunks_path, tmp_path / "nope.zarr", tmp_path / "o", progress=False)


def test_cli_and_tool(tmp_path, capsys):
    chunks_path, latents_path = make_stores(tmp_path, docs=8)
    rc = bolt_main(["merge", "--chunks", chunks_path, "--latents", latents_path, "--output-prefix",
                    str(tmp_path / "cli"), "--epochs", "2", "--seed", "3", "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "documents: 14 with latents over 2 epoch(s)" in out and "tokens:" in out and "latent" in out
    rc = bolt_main(["merge", "--chunks", chunks_path, "--latents", latents_path, "--output-prefix",
                    str(tmp_path / "cli"), "--epochs", "0"])
    assert rc == 2 and "--epochs must be >= 1" in capsys.readouterr().err
    rc = bolt_main(["merge", "--chunks", chunks_path, "--latents", latents_path, "--output-prefix",
                    str(tmp_path / "cli"), "--min-tokens", "2000", "--quiet"])
    assert rc == 0 and read_summary(tmp_path / "cli").tokens >= 2000 and read_summary(tmp_path / "cli").epochs > 1
    help_text = subprocess.run([sys.executable, str(REPO / "tools" / "merge_latents.py"), "--help"],
                               capture_output=True, text=True, check=True).stdout
    assert "--posterior-prob" in help_text and "--allow-missing" in help_text


def test_empty_latents_written_raw_and_raw_baseline(tmp_path):
    """--empty-latents raw: a chunk whose chosen latent is empty gets no SoL/EoL at all; without a
    latent store every chunk is raw (BOS + chunks + EOS), the raw baseline's layout."""
    chunks_path, latents_path = make_stores(tmp_path, docs=30)
    sp = specials(1000)
    want = expected(chunks_path, latents_path)
    n_empty = sum(len(z) == 0 for ref in want for _, z in ref)
    assert n_empty > 0
    s = merge_latents(chunks_path, latents_path, tmp_path / "e", empty_latents="raw", progress=False)
    assert s.chunks["empty_raw"] == n_empty and s.chunks["missing_raw"] == 0
    for doc, ref in zip(read_documents(str(tmp_path / "e")), want):
        parsed = parse_document(doc, sp)
        # raw chunks next to each other read back as one plain run: compare the latent-bearing ones
        assert [z for f, z, _ in parsed if f != "raw"] == [z.tolist() for _, z in ref if len(z)]
        assert all(len(z) for f, z, _ in parsed if f != "raw")
        assert [t for _, _, x in parsed for t in x] == [t for x, _ in ref for t in x]
    with pytest.raises(UserError, match="--empty-latents"):
        merge_latents(chunks_path, latents_path, tmp_path / "bad", empty_latents="drop", progress=False)
    s = merge_latents(chunks_path, None, tmp_path / "raw", progress=False)
    raw_docs = [[sp["bos"], *[t for x, _ in ref for t in x], sp["eos"]] for ref in want]
    assert read_documents(str(tmp_path / "raw")) == raw_docs and s.latent_tokens == 0


def _epoch_tokens(prefix: Path, docs_per_epoch: int) -> list[int]:
    docs = read_documents(str(prefix))
    return [sum(len(d) for d in docs[e : e + docs_per_epoch]) for e in range(0, len(docs), docs_per_epoch)]


def test_epochs_derived_from_the_planned_training_tokens(tmp_path):
    """--min-tokens: the fewest epochs that hold a training run's tokens, each with its own forms."""
    chunks_path, latents_path = make_stores(tmp_path, docs=20)
    n_docs = len(expected(chunks_path, latents_path))
    one = merge_latents(chunks_path, latents_path, tmp_path / "one", epochs=1, seed=2, progress=False)
    # a run of 10 steps x 8 samples x 32 tokens, as Megatron reads it (+1 token, +0.5% in a blend)
    planned = planned_train_tokens(10, 8, 32)
    assert planned == 81 * 32 + 1
    s = merge_latents(chunks_path, latents_path, tmp_path / "auto", epochs=None, min_tokens=planned, seed=2,
                      progress=False)
    per_epoch = _epoch_tokens(tmp_path / "auto", n_docs)
    assert len(per_epoch) == s.epochs > 1 and per_epoch[0] == one.tokens
    assert s.tokens == sum(per_epoch) >= planned > sum(per_epoch[:-1])  # enough, and one epoch fewer is not
    assert s.epochs in (epochs_for(planned, one.tokens), epochs_for(planned, one.tokens) + 1)
    assert read_summary(tmp_path / "auto").epochs == s.epochs
    # the same file as asking for that many epochs
    merge_latents(chunks_path, latents_path, tmp_path / "fixed", epochs=s.epochs, seed=2, progress=False)
    assert Path(document_paths(tmp_path / "fixed")[0]).read_bytes() == Path(document_paths(tmp_path / "auto")[0]).read_bytes()
    # a run shorter than one epoch still gets the whole corpus once
    assert merge_latents(chunks_path, latents_path, tmp_path / "short", epochs=None, min_tokens=5,
                         progress=False).epochs == 1
    # raw copies count towards the tokens: with R = 1 about half the epochs are needed
    r = merge_latents(chunks_path, latents_path, tmp_path / "mix", epochs=None, min_tokens=planned, raw_mix=1.0,
                      seed=2, progress=False)
    assert r.tokens >= planned and r.epochs < s.epochs and r.raw_documents == r.epochs * n_docs
    with pytest.raises(UserError, match="either --epochs or --min-tokens"):
        merge_latents(chunks_path, latents_path, tmp_path / "x", epochs=2, min_tokens=planned, progress=False)


def test_megatron_reads_a_derived_merge_without_wrapping(tmp_path):
    """The point of the derived epochs: Megatron's GPTDataset needs a single pass over the file."""
    from megatron.core.datasets.gpt_dataset import GPTDataset

    chunks_path, latents_path = make_stores(tmp_path, docs=20)
    steps, global_batch, seq_len = 12, 8, 32
    merge_latents(chunks_path, latents_path, tmp_path / "auto", epochs=None,
                  min_tokens=planned_train_tokens(steps, global_batch, seq_len), progress=False)
    ds = GPTDataset.__new__(GPTDataset)  # only the epoch arithmetic, on the file's own token count
    ds.dataset = IndexedDataset(str(tmp_path / "auto_text_document"))
    ds.indices = np.arange(len(ds.dataset))
    ds.num_samples = int(np.ceil(steps * global_batch * 1.005))
    ds.config = type("C", (), {"sequence_length": seq_len, "add_extra_token_to_sequence": True})()
    assert ds._get_num_epochs(ds._get_num_tokens_per_epoch()) == 1
    merge_latents(chunks_path, latents_path, tmp_path / "one", epochs=1, progress=False)
    ds.dataset = IndexedDataset(str(tmp_path / "one_text_document"))
    ds.indices = np.arange(len(ds.dataset))
    assert ds._get_num_epochs(ds._get_num_tokens_per_epoch()) > 1  # a single epoch would be re-read
