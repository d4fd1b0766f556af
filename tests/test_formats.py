"""The sequence formats of method.md, and the vectorised merge path agreeing with the list path."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from megatron_bolt.data import formats
from megatron_bolt.data.formats import POSTERIOR, PRIOR, RAW


@dataclass(frozen=True)
class Ids:  # same fields as megatron_bolt.tokenizer.LatentTokenIds
    sol: int
    eol: int
    prior: int
    posterior: int


IDS = Ids(sol=901, eol=902, prior=903, posterior=904)
BOS, EOS = 1, 2


def test_prior_and_posterior_forms_match_method_md():
    z, x = [10, 11], [20, 21, 22]
    assert formats.prior_form(z, x, IDS) == [901, 903, 10, 11, 902, 20, 21, 22]
    assert formats.posterior_form(z, x, IDS) == [901, 902, 20, 21, 22, 901, 904, 10, 11, 902]
    assert formats.raw_form(x) == x
    assert formats.prior_form([], x, IDS) == [901, 903, 902, 20, 21, 22]


def test_estep_prompt_and_scoring_sequence():
    prefix, z, x = [5, 6], [10], [20, 21]
    assert formats.posterior_sampling_prompt(prefix, x, IDS) == [5, 6, 901, 902, 20, 21, 901, 904]
    tokens, start = formats.prior_scoring_sequence(prefix, z, x, IDS)
    assert tokens == [5, 6, 901, 903, 10, 902, 20, 21]
    assert start == 2 and tokens[start:] == formats.prior_form(z, x, IDS)
    # sampled Z followed by its stop token EoL gives back the posterior form after the prefix
    assert formats.posterior_sampling_prompt(prefix, x, IDS) + z + [IDS.eol] == prefix + formats.posterior_form(z, x, IDS)


def test_chunk_form_needs_latent_for_latent_forms():
    with pytest.raises(ValueError):
        formats.chunk_form(PRIOR, None, [1], IDS)
    assert formats.chunk_form(RAW, None, [1, 2], IDS) == [1, 2]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_assemble_documents_equals_list_path(dtype):
    rng = np.random.default_rng(0)
    doc_counts = rng.integers(1, 6, size=40)
    n = int(doc_counts.sum())
    xs = [list(rng.integers(3, 900, size=rng.integers(0, 9))) for _ in range(n)]
    forms = rng.integers(0, 3, size=n)
    zs = [list(rng.integers(3, 900, size=rng.integers(0, 7))) if f != RAW else [] for f in forms]
    tokens, doc_lengths = formats.assemble_documents(
        np.array([t for x in xs for t in x], dtype=np.int64),
        np.array([len(x) for x in xs]),
        np.array([t for z in zs for t in z], dtype=np.int64),
        np.array([len(z) for z in zs]),
        forms,
        doc_counts,
        IDS,
        BOS,
        EOS,
        dtype=dtype,
    )
    expected, lengths, c = [], [], 0
    for k in doc_counts:
        doc = formats.document(
            [formats.chunk_form(int(forms[i]), zs[i], xs[i], IDS) for i in range(c, c + k)], BOS, EOS
        )
        expected.extend(doc)
        lengths.append(len(doc))
        c += k
    assert tokens.dtype == dtype
    assert tokens.tolist() == expected
    assert doc_lengths.tolist() == lengths
    assert {POSTERIOR, PRIOR, RAW} <= set(forms.tolist())


def test_assemble_documents_rejects_inconsistent_inputs():
    with pytest.raises(ValueError):
        formats.assemble_documents(
            np.array([1, 2]), np.array([2]), np.array([], dtype=np.int64), np.array([0]),
            np.array([RAW]), np.array([2]), IDS, BOS, EOS,
        )
