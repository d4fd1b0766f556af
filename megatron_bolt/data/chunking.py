"""BoLT chunking (method.md): paragraphs, then sentences, then chunks of min(Poisson(7) + 1, 20) sentences.

A document is split into paragraphs on blank lines and each paragraph into sentences; the text
between two sentences (spaces, newlines, blank lines) belongs to the *next* sentence, so the units
tile the document. The number of sentences per chunk is drawn from a generator seeded by the md5 of
the document text plus 42, so a document is always chunked the same way, whatever the worker count,
shard or run.

Chunks are cut in *token* space: the document is tokenized once and each chunk boundary (a character
position) becomes the number of tokens that end at or before it. Concatenating a document's chunks
therefore gives exactly the tokenization of the whole document. A chunk that would get no token of
its own is merged into the next one.

Sentence splitting is offline: pysbd (rule-based, no downloads), with a simple regex splitter for
paragraphs too long for pysbd to handle quickly.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache

import numpy as np

MEAN_EXTRA_SENTENCES = 7  # Poisson rate; a chunk has Poisson(7) + 1 sentences ...
MAX_SENTENCES_PER_CHUNK = 20  # ... capped at 20
SEED_OFFSET = 42
# pysbd's regexes get slow on very long paragraphs (tables, code dumps); those use the regex splitter.
PYSBD_MAX_PARAGRAPH_CHARS = 20_000

_PARAGRAPH_BREAK = re.compile(r"\n[^\S\n]*\n\s*")
# Fallback splitter: end punctuation (optionally closing quotes/brackets), whitespace, then a capital,
# digit, quote or bracket.
_SIMPLE_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s+[\"'(\[A-Z0-9])")


@lru_cache(maxsize=1)
def _segmenter():
    import pysbd

    # pysbd builds thousands of regex patterns on the fly; with the stdlib's default cache of 512
    # compiled patterns it recompiles most of them for every paragraph (measured: ~4x slower).
    if getattr(re, "_MAXCACHE", 0) < 16384:
        re._MAXCACHE = 16384
    return pysbd.Segmenter(language="en", clean=False)


def _paragraph_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each paragraph's content; the blank-line gaps between them are excluded."""
    spans, pos = [], 0
    for m in _PARAGRAPH_BREAK.finditer(text):
        if text[pos : m.start()].strip():
            spans.append((pos, m.start()))
        pos = m.end()
    if text[pos:].strip():
        spans.append((pos, len(text)))
    return spans


def _sentence_ends(paragraph: str) -> list[int]:
    """End offsets (exclusive, trailing whitespace excluded) of the sentences of one paragraph."""
    if len(paragraph) > PYSBD_MAX_PARAGRAPH_CHARS:
        ends = [m.end() for m in _SIMPLE_SENTENCE_END.finditer(paragraph)]
    else:
        ends, pos = [], 0
        # pysbd returns sentence strings; locate each one in order rather than trusting it to keep
        # every character (it can drop or normalise whitespace).
        for sentence in _segmenter().segment(paragraph):
            s = sentence.strip()
            if not s:
                continue
            at = paragraph.find(s, pos)
            if at < 0:
                continue
            pos = at + len(s)
            ends.append(pos)
    content_end = len(paragraph.rstrip())
    ends = [e for e in ends if 0 < e < content_end]
    return [*ends, content_end]


def sentence_boundaries(text: str) -> list[int]:
    """Character positions where a sentence ends and the next begins (the document's end excluded)."""
    bounds: list[int] = []
    for start, end in _paragraph_spans(text):
        bounds.extend(start + e for e in _sentence_ends(text[start:end]))
    bounds = sorted(set(b for b in bounds if 0 < b < len(text.rstrip())))
    return bounds


def document_rng(text: str) -> np.random.Generator:
    seed = (int(hashlib.md5(text.encode("utf-8")).hexdigest(), 16) + SEED_OFFSET) & 0xFFFFFFFF
    return np.random.default_rng(seed)


def sentences_per_chunk(text: str, n_sentences: int, poisson_mean: float = MEAN_EXTRA_SENTENCES) -> list[int]:
    """Sentence counts of the chunks: min(Poisson(7) + 1, 20), the last one cut to what remains.

    `poisson_mean` replaces the 7 for corpora whose sentences are much shorter or longer than web
    text's (0: one sentence per chunk, e.g. for one-line statements that each need their own thought)."""
    rng = document_rng(text)
    counts, remaining = [], n_sentences
    while remaining > 0:
        n = min(int(rng.poisson(poisson_mean)) + 1, MAX_SENTENCES_PER_CHUNK, remaining)
        counts.append(n)
        remaining -= n
    return counts


def chunk_char_boundaries(text: str, poisson_mean: float = MEAN_EXTRA_SENTENCES) -> list[int]:
    """Character positions where each chunk after the first begins."""
    bounds = sentence_boundaries(text)
    counts = sentences_per_chunk(text, len(bounds) + 1, poisson_mean)
    # Sentence k ends at bounds[k]; a chunk of counts[j] sentences ends after its last sentence.
    ends = np.cumsum(counts)[:-1] - 1
    return [bounds[k] for k in ends]


def chunk_token_lengths(text: str, token_ends: np.ndarray, poisson_mean: float = MEAN_EXTRA_SENTENCES) -> np.ndarray:
    """Token counts of each chunk of `text`, given where (in characters) each of its tokens ends.

    The counts sum to len(token_ends); none is zero (empty chunks merge into the next one).
    """
    n_tokens = len(token_ends)
    if n_tokens == 0:
        return np.zeros(0, dtype=np.int64)
    bounds = chunk_char_boundaries(text, poisson_mean)
    # Offsets are non-decreasing in every tokenizer we use; enforce it so searchsorted is valid.
    ends = np.maximum.accumulate(np.asarray(token_ends, dtype=np.int64))
    cuts = np.searchsorted(ends, np.asarray(bounds, dtype=np.int64), side="right")
    edges = np.unique(np.concatenate([[0], cuts, [n_tokens]]))
    edges = edges[(edges >= 0) & (edges <= n_tokens)]
    return np.diff(edges)


def split_chunks(tokens: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """The chunks as separate arrays."""
    return np.split(np.asarray(tokens), np.cumsum(lengths)[:-1])
