"""BoLT chunking as the reference code does it: paragraphs, sentences, then Poisson-sized chunks.

Followed: `get_text_splitter("sentence")` and the random chunking of `chunked_generation_wrapper`
in ryoungj/BoLT `apps/main/gen_utils/chunk_gen.py`. In this project's terms:

1. Paragraphs are the matches of `[^\\n\\r].*?(?:\\n\\s*\\n|\\s*$)` (DOTALL): a paragraph starts at
   a character that is not a line break and runs, lazily, to the first blank line (which it keeps:
   the blank line ends its paragraph) or to the end of the text.
2. Each paragraph is split into sentences by NLTK's *untrained* `PunktSentenceTokenizer()` (no
   model download). A unit runs from the end of the previous sentence to the end of its own, so the
   whitespace between two sentences starts the next unit, and whatever follows a paragraph's last
   sentence (its blank line) stays with that sentence.
3. The units of a document are grouped into chunks of min(Poisson(7) + 1, 20) units, the last one
   cut to what remains, drawn from `numpy.random.default_rng((md5(text) + 42) & 0xFFFFFFFF)` (md5 of
   the UTF-8 text read as one big integer), so a document is chunked the same way whatever the
   worker count, shard or run. `poisson_mean` replaces the 7 (the reference writes it as
   `units_per_chunk - min_units_per_chunk` = 8 - 1).

For validation the reference chunks uniformly instead (`uniform_sentences_per_chunk`): ceil(n / 8)
chunks of as equal a number of units as possible (`bolt preprocess --chunking uniform`). The 8 is
the same knob as the Poisson draw's mean + 1 (the reference's `units_per_chunk`), so a
`poisson_mean` other than 7 sets it too, rounded to whole units (`uniform_units_per_chunk`).

Where this differs from the reference, on purpose:

- The reference's units drop the characters its paragraph regex skips (line breaks before the
  first paragraph; a lone `\\r` after a blank line). Here a chunk is a span of the text, so those
  characters stay in the chunk they sit in, and the chunks always tile the document.
- A whitespace-only paragraph (only possible at the very start of a text) makes the reference fail;
  here it joins the following unit.
- `poisson_mean` 0 (one unit per chunk) is allowed; the reference asserts a mean of at least 1.

Chunks are cut in *token* space: the document is tokenized once and each chunk boundary (a character
position) becomes the number of tokens that end at or before it. Concatenating a document's chunks
therefore gives exactly the tokenization of the whole document. A chunk that would get no token of
its own is merged into the next one.
"""

from __future__ import annotations

import hashlib
import math
import re
import string
from functools import lru_cache

import numpy as np

MEAN_EXTRA_SENTENCES = 7  # Poisson rate; a chunk has Poisson(7) + 1 units ...
MAX_SENTENCES_PER_CHUNK = 20  # ... capped at 20
SEED_OFFSET = 42

PARAGRAPH = re.compile(r"[^\n\r].*?(?:\n\s*\n|\s*$)", re.DOTALL)  # the reference's; see paragraph_spans
_PARAGRAPH_START = re.compile(r"[^\n\r]")
_BLANK_LINE = re.compile(r"\n\s*\n")
# Punkt only ever considers a break after one of its sentence-end characters; a paragraph without
# any is one sentence (or none, if it is only whitespace), so Punkt need not run on it.
_SENTENCE_END = re.compile(r"[.?!]")
_SENTENCE_END_CHARS = (".", "?", "!")  # Punkt's sentence-end characters
_PUNKT_PUNCTUATION = tuple(";:,.!?")  # what Punkt's orthographic heuristic calls punctuation
_WHITESPACE = string.whitespace  # what Punkt counts as whitespace before a candidate's word


@lru_cache(maxsize=1)
def _punkt() -> _Punkt:
    # One per process, built on first use (importing nltk takes seconds); a process-wide cache
    # keyed by nothing, because the untrained splitter has no settings.
    return _Punkt()


class _Punkt:
    """NLTK's untrained `PunktSentenceTokenizer().span_tokenize`, restated for speed.

    Followed: `_match_potential_end_contexts`, `_slices_from_text` and `_realign_boundaries` of
    nltk 3.9.1's `PunktSentenceTokenizer`. The decisions are Punkt's own (its regexes and its
    `text_contains_sentbreak`, memoised: a pure function of a short context string such as
    "it. The", which recurs throughout a corpus); only the generator plumbing around them is
    replaced by one loop. Same ends, character for character (checked against nltk in the tests).
    """

    def __init__(self):
        from nltk.tokenize.punkt import PunktSentenceTokenizer

        punkt = PunktSentenceTokenizer()
        self._candidates = punkt._lang_vars.period_context_re().finditer
        self._realignment = punkt._lang_vars.re_boundary_realignment.match
        self._words = punkt._lang_vars.word_tokenize
        token = punkt._Token
        self._numeric, self._initial = token._RE_NUMERIC, token._RE_INITIAL
        self._breaks = lru_cache(maxsize=1 << 16)(self._contains_break)

    def sentence_ends(self, text: str) -> list[int]:
        """The `end` of each (start, end) span that Punkt's `span_tokenize(text)` yields."""
        # Candidate breaks with their context: the word before (from after the last whitespace
        # since the previous candidate; Punkt reads whitespace at offset 0 of that stretch as none
        # and then reuses the previous word's start), the punctuation, and what follows. A
        # candidate whose word would overlap the next candidate's is dropped.
        slices: list[tuple[int, int]] = []  # Punkt's sentence slices before realignment
        last_break = 0
        prev, prev_start, prev_stop = None, 0, 0
        for match in self._candidates(text):
            at = match.start()
            ws = at - 1  # back over the word (short) to the last whitespace, as Punkt does
            while ws >= prev_stop and text[ws] not in _WHITESPACE:
                ws -= 1
            start = ws + 1 if ws > prev_stop else prev_start
            if prev is not None and prev_stop <= start:
                last_break = self._decide(text, prev, prev_start, prev_stop, last_break, slices)
            prev, prev_start, prev_stop = match, start, at
        if prev is not None:
            last_break = self._decide(text, prev, prev_start, prev_stop, last_break, slices)
        slices.append((last_break, len(text.rstrip())))  # the last sentence loses trailing whitespace

        # Closing quotes and brackets right after a break move into the sentence before it.
        ends: list[int] = []
        shift = 0
        for k, (start, stop) in enumerate(slices):
            start += shift
            if k + 1 < len(slices):
                nxt_start, nxt_stop = slices[k + 1]
                m = self._realignment(text, nxt_start, nxt_stop)
                if m:
                    ends.append(nxt_start + len(m.group().rstrip()))
                    shift = m.end() - nxt_start
                    continue
                shift = 0
            if start < stop:  # Punkt drops empty sentences
                ends.append(stop)
        return ends

    def _contains_break(self, context: str) -> bool:
        """Punkt's `text_contains_sentbreak` for the untrained parameters (no abbreviations,
        collocations, sentence starters or orthographic statistics), which leave these rules:

        - a word token that is `.`, `?` or `!`, or ends in a single `.`, is a break;
        - except a period-final initial ("J.") or number ("3.") before a punctuation mark or a
          lower-case word, and an initial before an upper-case word;
        - ellipses are never breaks; a break counts only if some token follows it.
        Same tokens (Punkt's word regex, line by line) and the same type rules as
        `_first_pass_annotation`, `_second_pass_annotation` and `_ortho_heuristic`.
        """
        toks = [t for line in context.split("\n") if line.strip() for t in self._words(line)]
        for tok, nxt in zip(toks, toks[1:]):
            if tok in _SENTENCE_END_CHARS:
                return True
            if not tok.endswith(".") or tok.endswith(".."):  # ".." ends ellipses too
                continue
            kind = self._numeric.sub("##number##", tok.lower())
            if len(kind) > 1 and kind[-1] == ".":
                kind = kind[:-1]
            initial = self._initial.match(tok) is not None
            if initial or kind == "##number##":
                if nxt in _PUNKT_PUNCTUATION or nxt[0].islower() or (initial and nxt[0].isupper()):
                    continue
            return True
        return False

    def _decide(self, text, match, word_start, word_stop, last_break, slices) -> int:
        context = text[word_start:word_stop] + match.group() + match.group("after_tok")
        if not self._breaks(context):
            return last_break
        slices.append((last_break, match.end()))
        # The next sentence starts at the following token, or at the punctuation right after.
        return match.start("next_tok") if match.group("next_tok") is not None else match.end()


def load_sentence_splitter() -> None:
    """Import and build the sentence splitter now (before timed work, and before worker processes
    fork, so that they inherit it)."""
    _punkt()


def _sentence_ends(paragraph: str) -> list[int]:
    """End offsets of the sentences of one paragraph, as Punkt's `span_tokenize` gives them."""
    if not _SENTENCE_END.search(paragraph):
        end = len(paragraph.rstrip())
        return [end] if end else []
    return _punkt().sentence_ends(paragraph)


def paragraph_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each match of `PARAGRAPH` in `text`, found without running it.

    The lazy regex tries its two endings at every character; this finds the same ends by
    searching for blank lines only: a paragraph starts at the next character that is not a line
    break and ends after the first blank line (`\\n\\s*\\n`, greedy as in the regex) that starts
    after its first character, unless the text's trailing whitespace starts before that blank line
    (then it runs to the end). `str.rstrip` and the regex's `\\s` agree on what whitespace is.
    """
    spans: list[tuple[int, int]] = []
    n, tail = len(text), len(text.rstrip())
    pos = 0
    while (start := _PARAGRAPH_START.search(text, pos)) is not None:
        start = start.start()
        blank = _BLANK_LINE.search(text, start + 1)
        end = blank.end() if blank is not None and blank.start() <= max(tail, start + 1) else n
        spans.append((start, end))
        pos = end
    return spans


def sentence_boundaries(text: str) -> list[int]:
    """Character positions where a unit (a sentence with its leading whitespace) ends and the next
    begins: the reference's sentence units, as offsets into `text`."""
    bounds: list[int] = []
    have_unit = False  # a unit has been opened, so the next paragraph starts a new one
    for start, end in paragraph_spans(text):
        ends = _sentence_ends(text[start:end])
        if not ends:
            continue  # whitespace only: its text goes with the next unit
        if have_unit:
            bounds.append(start)
        bounds.extend(start + e for e in ends[:-1])
        have_unit = True
    return bounds


def document_rng(text: str) -> np.random.Generator:
    """The reference's per-document generator: md5 of the UTF-8 text as an integer, + 42, low 32 bits."""
    seed = (int(hashlib.md5(text.encode("utf-8")).hexdigest(), 16) + SEED_OFFSET) & 0xFFFFFFFF
    return np.random.default_rng(seed)


def sentences_per_chunk(text: str, n_sentences: int, poisson_mean: float = MEAN_EXTRA_SENTENCES) -> list[int]:
    """Units per chunk: min(Poisson(mean) + 1, 20), and never more than remain.

    `poisson_mean` replaces the 7 for corpora whose sentences are much shorter or longer than web
    text's (0: one unit per chunk, e.g. for one-line statements that each need their own thought)."""
    rng = document_rng(text)
    counts, remaining = [], n_sentences
    while remaining > 0:
        n = min(int(rng.poisson(poisson_mean)) + 1, MAX_SENTENCES_PER_CHUNK, remaining)
        counts.append(n)
        remaining -= n
    return counts


UNIFORM_UNITS_PER_CHUNK = 8


def uniform_units_per_chunk(poisson_mean: float = MEAN_EXTRA_SENTENCES) -> int:
    """Units per uniform chunk for a Poisson mean: the reference's `units_per_chunk` (mean + 1,
    8 by default), rounded to whole units."""
    return max(1, round(poisson_mean) + 1)


def uniform_sentences_per_chunk(n_sentences: int, units_per_chunk: int = UNIFORM_UNITS_PER_CHUNK) -> list[int]:
    """The reference's validation chunking (`apply_random_chunking=False`): ceil(n / 8) chunks with
    boundaries at int(linspace(0, n, chunks + 1)), i.e. as even as whole units allow."""
    n_chunks = max(1, math.ceil(n_sentences / units_per_chunk))
    edges = np.linspace(0, n_sentences, n_chunks + 1).astype(int)
    return [int(c) for c in np.diff(edges) if c > 0]


def chunk_char_boundaries(text: str, poisson_mean: float = MEAN_EXTRA_SENTENCES, uniform: bool = False) -> list[int]:
    """Character positions where each chunk after the first begins (`uniform`: the reference's
    validation chunking instead of the Poisson draw)."""
    bounds = sentence_boundaries(text)
    if uniform:
        counts = uniform_sentences_per_chunk(len(bounds) + 1, uniform_units_per_chunk(poisson_mean))
    else:
        counts = sentences_per_chunk(text, len(bounds) + 1, poisson_mean)
    # Unit k ends at bounds[k]; a chunk of counts[j] units ends after its last unit.
    ends = np.cumsum(counts)[:-1] - 1
    return [bounds[k] for k in ends]


def chunk_texts(text: str, poisson_mean: float = MEAN_EXTRA_SENTENCES, uniform: bool = False) -> list[str]:
    """The chunks as strings (they concatenate to `text`)."""
    edges = [0, *chunk_char_boundaries(text, poisson_mean, uniform), len(text)]
    return [text[a:b] for a, b in zip(edges, edges[1:])]


def token_cuts(token_ends: np.ndarray, char_bounds) -> np.ndarray:
    """For each character boundary, the number of tokens that end at or before it."""
    # Offsets are non-decreasing in every tokenizer we use; enforce it so searchsorted is valid.
    ends = np.maximum.accumulate(np.asarray(token_ends, dtype=np.int64))
    return np.searchsorted(ends, np.asarray(char_bounds, dtype=np.int64), side="right")


def chunk_token_lengths(text: str, token_ends: np.ndarray, poisson_mean: float = MEAN_EXTRA_SENTENCES,
                        uniform: bool = False) -> np.ndarray:
    """Token counts of each chunk of `text`, given where (in characters) each of its tokens ends.

    The counts sum to len(token_ends); none is zero (empty chunks merge into the next one).
    """
    n_tokens = len(token_ends)
    if n_tokens == 0:
        return np.zeros(0, dtype=np.int64)
    cuts = token_cuts(token_ends, chunk_char_boundaries(text, poisson_mean, uniform))
    edges = np.unique(np.concatenate([[0], cuts, [n_tokens]]))
    return np.diff(edges)


def split_chunks(tokens: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """The chunks as separate arrays."""
    return np.split(np.asarray(tokens), np.cumsum(lengths)[:-1])
