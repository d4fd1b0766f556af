"""The latent-thought sequence formats of method.md, built here and nowhere else.

Per chunk X with latent Z (SoL, EoL, PRIOR, POST are the four added special tokens):

    prior form:      SoL PRIOR Z EoL X
    posterior form:  SoL EoL X SoL POST Z EoL      (the empty `SoL EoL` marks the chunk boundary)
    raw form:        X

Merge, E-step prompts, evaluation and tests all call these functions, so a change to a format is a
change in one place. Two flavours:

- list functions (`prior_form`, `posterior_form`, ...): lists of ints in and out, for prompts and
  anything per-sequence;
- `assemble_documents`: the same forms for many chunks at once as one numpy gather, for merge,
  which must run at disk speed. `tests/test_formats.py` checks that both flavours agree.

Evaluation prompts (`latent_eval_prompt` and friends) belong here too, next to these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megatron_bolt.tokenizer import LatentTokenIds

# Chunk forms as stored in merge's per-chunk form arrays.
RAW, PRIOR, POSTERIOR = 0, 1, 2
FORM_NAMES = {RAW: "raw", PRIOR: "prior", POSTERIOR: "posterior"}


def prior_form(z: Sequence[int], x: Sequence[int], ids: LatentTokenIds) -> list[int]:
    """`SoL PRIOR Z EoL X`: the model first thinks Z, then writes X."""
    return [ids.sol, ids.prior, *z, ids.eol, *x]


def posterior_form(z: Sequence[int], x: Sequence[int], ids: LatentTokenIds) -> list[int]:
    """`SoL EoL X SoL POST Z EoL`: the model reads X, then infers the latent Z behind it."""
    return [ids.sol, ids.eol, *x, ids.sol, ids.posterior, *z, ids.eol]


def raw_form(x: Sequence[int]) -> list[int]:
    """A chunk without latent: just its tokens."""
    return list(x)


def posterior_sampling_prompt(prefix: Sequence[int], x: Sequence[int], ids: LatentTokenIds) -> list[int]:
    """The E-step's q prompt `C SoL EoL X SoL POST`; the sampled continuation is Z, stopped at EoL."""
    return [*prefix, ids.sol, ids.eol, *x, ids.sol, ids.posterior]


def prior_scoring_sequence(
    prefix: Sequence[int], z: Sequence[int], x: Sequence[int], ids: LatentTokenIds
) -> tuple[list[int], int]:
    """`C SoL PRIOR Z EoL X` and the index where scoring starts: log p(Z, X | C) sums only the
    log-probs of tokens at positions >= score_start (= len(prefix)), i.e. everything after C."""
    return [*prefix, *prior_form(z, x, ids)], len(prefix)


def chunk_form(form: int, z: Sequence[int] | None, x: Sequence[int], ids: LatentTokenIds) -> list[int]:
    """One chunk in the given form (RAW, PRIOR or POSTERIOR)."""
    if form == RAW:
        return raw_form(x)
    if z is None:
        raise ValueError(f"{FORM_NAMES[form]} form needs a latent")
    return prior_form(z, x, ids) if form == PRIOR else posterior_form(z, x, ids)


def document(chunks: Sequence[Sequence[int]], bos: int, eos: int) -> list[int]:
    """A training document: BOS, its chunks (already in their forms), EOS."""
    out = [bos]
    for c in chunks:
        out.extend(c)
    out.append(eos)
    return out


# ---------------------------------------------------------------- vectorised (merge) ----------------

# Slots per chunk in the gather table: [BOS?] + up to 7 pieces of the chunk form + [EOS?].
_SLOTS = 9
# Indices of the special constants appended after the X and Z tokens in the gather source.
_BOS, _EOS, _SOL, _EOL, _PRI, _POS = range(6)


def assemble_documents(
    x_tokens: np.ndarray,
    x_lengths: np.ndarray,
    z_tokens: np.ndarray,
    z_lengths: np.ndarray,
    forms: np.ndarray,
    doc_chunk_counts: np.ndarray,
    ids: LatentTokenIds,
    bos: int,
    eos: int,
    dtype: np.dtype | type = np.int32,
) -> tuple[np.ndarray, np.ndarray]:
    """Many documents at once: returns (tokens, per-document lengths).

    x_tokens/x_lengths: the chunks' tokens, flat, in document order; z_tokens/z_lengths: one latent
    per chunk, flat (length 0 where the form is RAW); forms: RAW/PRIOR/POSTERIOR per chunk;
    doc_chunk_counts: chunks per document (each >= 1), summing to the number of chunks.
    Equivalent to `document([chunk_form(...) for each chunk], bos, eos)` for every document,
    concatenated, but built as one gather so its cost is a memory copy, not a Python loop per chunk.
    """
    n = len(forms)
    x_lengths = np.asarray(x_lengths, dtype=np.int64)
    z_lengths = np.asarray(z_lengths, dtype=np.int64)
    doc_chunk_counts = np.asarray(doc_chunk_counts, dtype=np.int64)
    if len(x_lengths) != n or len(z_lengths) != n or int(doc_chunk_counts.sum()) != n:
        raise ValueError("assemble_documents: forms, lengths and document chunk counts disagree")
    if n and int(doc_chunk_counts.min()) < 1:
        raise ValueError("assemble_documents: every document needs at least one chunk")
    nx, nz = int(x_lengths.sum()), int(z_lengths.sum())
    if len(x_tokens) != nx or len(z_tokens) != nz:
        raise ValueError("assemble_documents: token arrays do not match their lengths")
    specials = np.array([bos, eos, ids.sol, ids.eol, ids.prior, ids.posterior], dtype=dtype)
    source = np.concatenate([x_tokens.astype(dtype, copy=False), z_tokens.astype(dtype, copy=False), specials])
    sp = nx + nz  # where the specials start in `source`

    x_start = np.zeros(n, dtype=np.int64)
    np.cumsum(x_lengths[:-1], out=x_start[1:])
    z_start = np.full(n, nx, dtype=np.int64)
    np.cumsum(z_lengths[:-1], out=z_start[1:])
    z_start[1:] += nx

    doc_end = np.cumsum(doc_chunk_counts)
    first = np.zeros(n, dtype=bool)
    first[doc_end[:-1]] = True
    first[:1] = True
    last = np.zeros(n, dtype=bool)
    last[doc_end - 1] = True

    starts = np.zeros((n, _SLOTS), dtype=np.int64)
    lens = np.zeros((n, _SLOTS), dtype=np.int64)
    one = np.ones(n, dtype=np.int64)

    def put(mask: np.ndarray, slot: int, start: np.ndarray | int, length: np.ndarray) -> None:
        starts[mask, slot] = start[mask] if isinstance(start, np.ndarray) else start
        lens[mask, slot] = length[mask]

    put(first, 0, sp + _BOS, one)
    raw, pri, pos = forms == RAW, forms == PRIOR, forms == POSTERIOR
    # raw: X
    put(raw, 1, x_start, x_lengths)
    # prior: SoL PRIOR Z EoL X
    put(pri, 1, sp + _SOL, one)
    put(pri, 2, sp + _PRI, one)
    put(pri, 3, z_start, z_lengths)
    put(pri, 4, sp + _EOL, one)
    put(pri, 5, x_start, x_lengths)
    # posterior: SoL EoL X SoL POST Z EoL
    put(pos, 1, sp + _SOL, one)
    put(pos, 2, sp + _EOL, one)
    put(pos, 3, x_start, x_lengths)
    put(pos, 4, sp + _SOL, one)
    put(pos, 5, sp + _POS, one)
    put(pos, 6, z_start, z_lengths)
    put(pos, 7, sp + _EOL, one)
    put(last, 8, sp + _EOS, one)

    flat_starts, flat_lens = starts.ravel(), lens.ravel()
    total = int(flat_lens.sum())
    out_offsets = np.cumsum(flat_lens) - flat_lens
    index = np.repeat(flat_starts - out_offsets, flat_lens)
    index += np.arange(total, dtype=np.int64)
    tokens = source[index]

    chunk_out = lens.sum(axis=1)
    doc_lengths = np.add.reduceat(chunk_out, doc_end - doc_chunk_counts) if n else np.zeros(0, np.int64)
    return tokens, doc_lengths


# ---------------------------------------------------------------- evaluation prompts ----------------
# A few-shot prompt is laid out as pieces: document text (str), latent text (`Latent`) and special
# token ids (int). `encode_eval_prompt` encodes it the way merge writes a training sequence: all the
# document text is tokenized as *one* document and cut in token space where the latents go (as
# `bolt preprocess` cuts chunks), and every latent text is encoded on its own (as the warm start
# encodes a teacher's latent). So the prompt shows the model no token boundary that training never
# shows it, e.g. a SentencePiece dummy-prefix `▁` at the start of the text after EoL, which
# encoding each piece separately would produce.


@dataclass(frozen=True)
class Latent:
    """The text of a latent thought inside a prompt (encoded on its own, like a stored latent)."""

    text: str


Piece = str | Latent | int


def latent_eval_pieces(query_head: str, exemplars: Sequence[tuple[str, str, str]], ids: LatentTokenIds,
                       separator: str) -> list[Piece]:
    """`{head} SoL PRIOR {latent} EoL {tail}` per exemplar (head, latent, tail), joined by
    `separator`, then `{query_head} SoL PRIOR`: the model continues with its own latent."""
    pieces: list[Piece] = []
    for head, latent, tail in exemplars:
        pieces += [head, ids.sol, ids.prior, Latent(latent), ids.eol, tail + separator]
    return [*pieces, query_head, ids.sol, ids.prior]


def raw_eval_pieces(query_head: str, exemplars: Sequence[tuple[str, str, str]], separator: str) -> list[Piece]:
    """Plain-text few-shot prompt for models trained without latents: each exemplar's head, its
    reasoning and its tail as one text, joined by `separator`, then the query's head."""
    return ["".join(f"{head}{body}{tail}{separator}" for head, body, tail in exemplars) + query_head]


def encode_eval_prompt(pieces: Sequence[Piece], tokenizer, bos: int | None = None, continuation: str = "") -> list[int]:
    """Token ids of a piece list (see above); `bos` (if given) goes first.

    `continuation` is text that would follow the prompt in a training document (an exemplar's
    tail, say): it is tokenized after the prompt's last text and then dropped, so that the
    prompt's last tokens are the ones a document has there rather than end-of-text tokens (a
    byte-level BPE merges a trailing "\n\n" that it splits before a word)."""
    from megatron_bolt.data.chunking import token_cuts

    doc = "".join(p for p in pieces if isinstance(p, str))
    out: list[int] = [] if bos is None else [bos]
    if doc:
        ((ids, ends),) = tokenizer.encode_batch_with_ends([doc + continuation])
    else:
        ids, ends = np.zeros(0, np.int64), np.zeros(0, np.int64)
    positions, pos = [], 0
    for p in pieces:
        if isinstance(p, str):
            pos += len(p)
        else:
            positions.append(pos)
    cuts = token_cuts(ends, [*positions, len(doc)]).tolist() if len(ends) else [0] * (len(positions) + 1)
    done, k = 0, 0
    for p in pieces:
        if isinstance(p, str):
            continue
        out.extend(int(t) for t in ids[done : cuts[k]])
        done = max(done, cuts[k])
        k += 1
        if isinstance(p, Latent):
            out.extend(int(t) for t in tokenizer.encode(p.text))
        else:
            out.append(int(p))
    out.extend(int(t) for t in ids[done : cuts[-1]])
    return out
