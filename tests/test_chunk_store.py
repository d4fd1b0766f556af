"""BoLT chunking (method.md) and the zarr chunk store."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from megatron_bolt.data.chunking import (
    MAX_SENTENCES_PER_CHUNK,
    PARAGRAPH,
    _punkt,
    chunk_char_boundaries,
    chunk_texts,
    chunk_token_lengths,
    document_rng,
    paragraph_spans,
    sentence_boundaries,
    sentences_per_chunk,
    split_chunks,
    uniform_sentences_per_chunk,
)
from megatron_bolt.stores import chunk_store as cs
from megatron_bolt.stores.chunk_store import ChunkStore, ChunkStoreWriter, write_chunk_store
from megatron_bolt.tokenizer import load_tokenizer, train_bpe_tokenizer

INFO = {"tokenizer": "test", "vocab_size": 1000, "special_tokens": {"bos": 1, "eos": 2, "sol": 3, "eol": 4,
                                                                      "prior": 5, "posterior": 6}}


def make_doc(rng: np.random.Generator, n_paragraphs: int) -> str:
    words = ["alpha", "beta", "gamma", "x", "equals", "Dr.", "sum", "café", "日本", "3.5", "prime"]
    paragraphs = []
    for _ in range(n_paragraphs):
        sentences = []
        for _ in range(int(rng.integers(1, 30))):
            body = " ".join(rng.choice(words, size=int(rng.integers(2, 9))))
            sentences.append(body.capitalize() + str(rng.choice([".", "!", "?"])))
        paragraphs.append(" ".join(sentences))
    return str(rng.choice(["\n\n", "\n \n", "\n\n\n"])).join(paragraphs)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("tok")
    rng = np.random.default_rng(0)
    texts = [make_doc(rng, 3) for _ in range(30)]
    (d / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (d / "c.txt").write_text("\n".join(texts))
    spm.SentencePieceTrainer.train(input=str(d / "c.txt"), model_prefix=str(d / "sp"), vocab_size=300,
                                   model_type="bpe", character_coverage=1.0, byte_fallback=True, minloglevel=2)
    return {
        "hf": train_bpe_tokenizer([str(d / "c.jsonl")], 400, str(d / "bpe")),
        "sentencepiece": load_tokenizer(str(d / "sp.model")),
    }


def units(text: str) -> list[str]:
    bounds = sentence_boundaries(text)
    return [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)])]


# Each document with its units as the reference's splitter (chunk_gen.py) makes them, derived by
# hand: paragraphs end with their blank line, Punkt (untrained: every `.`, `?`, `!` before a space
# and a word ends a sentence, abbreviations included) splits inside them, and the whitespace
# between two sentences starts the next unit.
REFERENCE_UNITS = [
    # untrained Punkt knows no abbreviations; a blank line with a space in it still ends a paragraph
    ("Dr. Smith went home. He slept!\n\nNew paragraph here? Yes.\n \nLast one",
     ["Dr.", " Smith went home.", " He slept!\n\n", "New paragraph here?", " Yes.\n \n", "Last one"]),
    # markdown: a heading and a list without sentence ends are one unit each
    ("# Title\n\nSome text. More text.\n\n- item one\n- item two\n\n",
     ["# Title\n\n", "Some text.", " More text.\n\n", "- item one\n- item two\n\n"]),
    # math: decimals and `$` do not end sentences; a single newline is whitespace before the next
    ("Let $x = 2.5$. Then $2x = 5$.\nSo the answer is $\\boxed{5}$.",
     ["Let $x = 2.5$.", " Then $2x = 5$.", "\nSo the answer is $\\boxed{5}$."]),
    # a run of blank lines and trailing spaces stay with the paragraph before
    ("A.\n\n\n\nB.  ", ["A.\n\n\n\n", "B.  "]),
    # CRLF blank lines end paragraphs too
    ("One. Two.\r\n\r\nThree.", ["One.", " Two.\r\n\r\n", "Three."]),
    # unicode; the ideographic full stop is not one of Punkt's sentence ends
    ("Café crème. Ça va? 日本語。Next.", ["Café crème.", " Ça va?", " 日本語。Next."]),
]


@pytest.mark.parametrize("text,expected", REFERENCE_UNITS)
def test_units_are_the_reference_splitters(text, expected):
    assert units(text) == expected


def test_characters_the_reference_drops_stay_in_their_chunk():
    # The reference's paragraph regex skips line breaks before the first paragraph and a lone
    # \r after a blank line; a chunk store must tile the text, so they stay where they are.
    assert units("\n\nHi. There.") == ["\n\nHi.", " There."]
    assert units("A.\n\n\rB.") == ["A.\n\n\r", "B."]
    # A whitespace-only first paragraph (the reference raises on it) joins the next unit.
    assert units(" \n\nText. More.") == [" \n\nText.", " More."]


def _fuzz_strings(seed: int, pieces: list[str], n: int, max_len: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(pieces, size=int(rng.integers(0, max_len)))) for _ in range(n)]


def test_paragraph_spans_are_the_reference_regex_matches():
    # paragraph_spans finds PARAGRAPH's matches without running it; they must agree exactly,
    # including on CR, unicode whitespace (\x85, \u2028, NBSP) and trailing whitespace.
    pieces = ["\n", "\r", " ", "\t", "\xa0", "\u2028", "\x1c", "\x85", "\x0b", "a", ".", "\n\n", "\r\n", "b "]
    for text in _fuzz_strings(0, pieces, 5000, 25) + [t for t, _ in REFERENCE_UNITS]:
        assert paragraph_spans(text) == [m.span() for m in PARAGRAPH.finditer(text)], repr(text)


def test_sentence_splitter_gives_nltk_punkts_spans():
    # The restated span_tokenize must end sentences exactly where nltk's untrained Punkt does:
    # candidate overlaps, closing quotes/brackets after a break, ellipses, initials, numbers.
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    nltk_punkt, ours = PunktSentenceTokenizer(), _punkt()
    pieces = list("aA. .!?\"')]}([-,;:\n\t\x0b\xa0") + ["Mr", "The", "e.g", "...", "--", "U.S", "3.5", "J.", " ", "x"]
    for text in _fuzz_strings(1, pieces, 4000, 40):
        assert ours.sentence_ends(text) == [e for _, e in nltk_punkt.span_tokenize(text)], repr(text)
    # Its break decision, restated for the untrained parameters, on short contexts.
    pieces += ["J.", "3.", "..", "Mr.", "the", "5", "$", "\n\n", "É"]
    for context in _fuzz_strings(2, pieces, 20000, 10):
        assert ours._contains_break(context) == nltk_punkt.text_contains_sentbreak(context), repr(context)


def test_chunk_texts_group_units_and_tile_the_document():
    text = "Dr. Smith went home. He slept!\n\nNew paragraph here? Yes.\n \nLast one"
    assert chunk_texts(text, poisson_mean=0) == units(text)
    # One draw for this text: its six units fit in the first chunk (Poisson(7) + 1 >= 6 here).
    assert chunk_texts(text) == [text]


def test_sentences_per_chunk_is_poisson_plus_one_capped_and_seeded_by_text():
    # The reference's seed: md5 of the UTF-8 text as one integer, + 42, low 32 bits
    # (md5("some document") = a38ef716...1934).
    a, b = document_rng("some document"), np.random.default_rng(3579844958)
    assert a.integers(0, 2**62, size=4).tolist() == b.integers(0, 2**62, size=4).tolist()
    assert sentences_per_chunk("some document", 60) == [7, 11, 6, 11, 2, 5, 11, 7]
    counts = sentences_per_chunk("some document", 100_000)
    assert sum(counts) == 100_000
    assert min(counts) >= 1 and max(counts) <= MAX_SENTENCES_PER_CHUNK
    assert 7.7 < np.mean(counts[:-1]) < 8.3  # E[min(Poisson(7) + 1, 20)] ~ 8.0
    assert sentences_per_chunk("another document", 500) != sentences_per_chunk("some document", 500)


def test_uniform_chunking_is_the_references_validation_chunking():
    # ceil(n / 8) chunks, boundaries int(linspace(0, n, chunks + 1))
    assert uniform_sentences_per_chunk(20) == [6, 7, 7]
    assert uniform_sentences_per_chunk(9) == [4, 5]
    assert uniform_sentences_per_chunk(8) == [8] and uniform_sentences_per_chunk(1) == [1]
    text = " ".join(f"Sentence number {i}." for i in range(9))
    assert [len(sentence_boundaries(c)) + 1 for c in chunk_texts(text, uniform=True)] == [4, 5]
    # The 8 is the reference's units_per_chunk, the Poisson mean + 1: one knob for both modes.
    assert [len(sentence_boundaries(c)) + 1 for c in chunk_texts(text, poisson_mean=2, uniform=True)] == [3, 3, 3]
    assert len(chunk_texts(text, poisson_mean=0, uniform=True)) == 9


def test_chunk_poisson_mean_sets_the_chunk_size():
    assert sentences_per_chunk("some document", 50, poisson_mean=0) == [1] * 50
    counts = sentences_per_chunk("some document", 100_000, poisson_mean=2)
    assert 2.8 < np.mean(counts[:-1]) < 3.2  # E[Poisson(2) + 1] = 3
    text = "One. Two! Three?\n\nFour. Five."
    bounds = sentence_boundaries(text)
    assert chunk_char_boundaries(text, poisson_mean=0) == bounds and len(bounds) == 4


@pytest.mark.parametrize("backend", ["hf", "sentencepiece"])
def test_chunks_concatenate_to_the_document_tokenization(tokenizers, backend):
    tok = tokenizers[backend]
    rng = np.random.default_rng(1)
    docs = [make_doc(rng, int(rng.integers(1, 6))) for _ in range(40)]
    docs += ["One sentence only.", "  leading space. And more.\n\n\n", "Ünïcödé 😀 text. Next 𝔘 one!\n\nPara."]
    n_multi = 0
    for text, (ids, ends) in zip(docs, tok.encode_batch_with_ends(docs)):
        lengths = chunk_token_lengths(text, ends)
        assert lengths.sum() == len(ids) and (lengths > 0).all()
        chunks = split_chunks(ids, lengths)
        assert np.concatenate(chunks).tolist() == tok.encode(text)
        # Deterministic: same text, same chunks.
        assert chunk_token_lengths(text, ends).tolist() == lengths.tolist()
        n_multi += len(lengths) > 1
        # Every chunk boundary is a sentence boundary and chunks hold at most 20 sentences.
        bounds = sentence_boundaries(text)
        cuts = chunk_char_boundaries(text)
        assert set(cuts) <= set(bounds)
        edges = [0, *[bounds.index(c) + 1 for c in cuts], len(bounds) + 1]
        assert max(np.diff(edges)) <= MAX_SENTENCES_PER_CHUNK
    assert n_multi > 20


def random_docs(rng, n_docs):
    return [[rng.integers(0, 1000, size=int(rng.integers(1, 40))).astype(np.int32)
             for _ in range(int(rng.integers(1, 9)))] for _ in range(n_docs)]


def test_chunk_store_round_trip_and_prefix_context(tmp_path, monkeypatch):
    monkeypatch.setattr(cs, "TOKENS_BLOCK", 64)  # many small zarr blocks: exercise cross-block reads
    rng = np.random.default_rng(2)
    docs = random_docs(rng, 60)
    path = str(tmp_path / "chunks.zarr")
    write_chunk_store(path, docs, INFO)
    store = ChunkStore.open(path, cache_blocks=3)
    assert store.num_docs == len(docs) and store.num_chunks == sum(len(d) for d in docs)
    assert store.vocab_size == 1000 and store.special_tokens == INFO["special_tokens"]
    i = 0
    for d, chunks in enumerate(docs):
        assert store.doc_chunk_range(d) == (i, i + len(chunks))
        assert store.doc_tokens(d).tolist() == np.concatenate(chunks).tolist()
        for j, chunk in enumerate(chunks):
            assert store.chunk_tokens(i).tolist() == chunk.tolist()
            assert store.chunk_doc[i] == d and store.chunk_index[i] == j
            for k in (0, 1, 3):
                want = np.concatenate([np.zeros(0, np.int32), *chunks[max(0, j - k) : j]])
                assert store.prefix_tokens(i, k).tolist() == want.tolist()
            i += 1
    assert store.prefix_tokens(store.doc_chunk_range(5)[0], 3).size == 0
    with pytest.raises(IndexError):
        store.chunk_tokens(store.num_chunks)


def test_chunk_store_layout_is_plain_zarr(tmp_path):
    import zarr

    path = str(tmp_path / "c.zarr")
    write_chunk_store(path, [[np.array([5, 6], np.int32), np.array([7], np.int32)], [np.array([8], np.int32)]], INFO)
    g = zarr.open_group(path, mode="r")
    assert g["tokens"][:].tolist() == [5, 6, 7, 8] and g["tokens"].dtype == np.int32
    assert g["chunk_offsets"][:].tolist() == [0, 2, 3, 4]
    assert g["chunk_doc"][:].tolist() == [0, 0, 1]
    assert g["chunk_index"][:].tolist() == [0, 1, 0] and g["chunk_index"].dtype == np.int32
    assert g["doc_chunk_offsets"][:].tolist() == [0, 2, 3]
    assert g.attrs["format_version"] == cs.FORMAT_VERSION and g.attrs["special_tokens"]["sol"] == 3


def test_failed_write_leaves_nothing_and_keeps_the_old_store(tmp_path):
    path = str(tmp_path / "c.zarr")
    write_chunk_store(path, [[np.array([1, 2], np.int32)]], INFO)

    def boom():
        yield [np.array([9], np.int32)]
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_chunk_store(path, boom(), INFO)
    assert ChunkStore.open(path).chunk_tokens(0).tolist() == [1, 2]
    assert sorted(os.listdir(tmp_path)) == ["c.zarr"]
    # A successful rewrite replaces it.
    write_chunk_store(path, [[np.array([3], np.int32)], [np.array([4], np.int32)]], INFO)
    assert ChunkStore.open(path).num_docs == 2 and sorted(os.listdir(tmp_path)) == ["c.zarr"]


def test_chunk_store_on_an_fsspec_url():
    url = "memory://bolt-test/chunks.zarr"
    with ChunkStoreWriter(url, INFO) as w:
        w.add_document_flat(np.arange(10, dtype=np.int32), np.array([4, 6]))
    store = ChunkStore.open(url)
    assert store.chunk_tokens(1).tolist() == list(range(4, 10))
    assert store.prefix_tokens(1, 1).tolist() == [0, 1, 2, 3]
