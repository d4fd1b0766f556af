"""Tokenizers: HF and SentencePiece backends, latent special tokens, BPE training, HF-loadable saves."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_bolt.cli import main as bolt_main
from megatron_bolt.tokenizer import LATENT_TOKENS, LatentTokenIds, load_tokenizer, train_bpe_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It was 3.14 degrees!",
    "Héllo wörld, naïve café ✓ 日本語のテキスト.\n\nA second paragraph, with numbers 12345.",
    "Let x = 2. Then x^2 + 1 = 5, so the answer is 5.\n  Indented line\tand a tab.",
]
SAMPLES = ["Hello world. The answer is 42.", "Héllo wörld ✓ 日本.\n\nNew paragraph here.", "x", "a  b\tc\n"]


def train_sentencepiece(tmp_path, vocab_size: int = 400) -> str:
    import sentencepiece as spm

    text = tmp_path / "sp_corpus.txt"
    text.write_text("\n".join(CORPUS * 20))
    prefix = tmp_path / "sp"
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, normalization_rule_name="identity", minloglevel=2,
    )
    return f"{prefix}.model"


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def test_sentencepiece_model_gets_latent_tokens_after_its_pieces(tmp_path):
    import sentencepiece as spm

    model = train_sentencepiece(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=model)
    tok = load_tokenizer(model)
    base = sp.get_piece_size()
    assert tok.backend == "sentencepiece"
    assert tok.vocab_size == base + 4
    assert tok.latent == LatentTokenIds(base, base + 1, base + 2, base + 3)
    assert (tok.bos_id, tok.eos_id) == (sp.bos_id(), sp.eos_id())
    for s in SAMPLES:
        assert tok.encode(s) == sp.encode(s)  # exactly what Megatron's SentencePieceTokenizer produces
        assert [a.tolist() for a in tok.encode_batch([s])] == [sp.encode(s)]
    ids = tok.encode("Hello world.") + [tok.latent.sol]
    assert tok.decode(ids) == "Hello world." + LATENT_TOKENS[0]
    assert load_tokenizer(model, add_latent_tokens=False).vocab_size == base


def test_sentencepiece_save_loads_in_transformers_and_back(tmp_path):
    from transformers import AutoTokenizer

    tok = load_tokenizer(train_sentencepiece(tmp_path))
    tok.save(tmp_path / "saved")
    again = load_tokenizer(str(tmp_path / "saved"))
    assert again.backend == "sentencepiece" and again.latent == tok.latent and again.vocab_size == tok.vocab_size
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert [hf.convert_tokens_to_ids(t) for t in LATENT_TOKENS] == [
        tok.latent.sol, tok.latent.eol, tok.latent.prior, tok.latent.posterior
    ]
    assert hf.eos_token_id == tok.eos_id and hf.bos_token_id == tok.bos_id
    assert hf.encode("Hello world. The answer is 42.", add_special_tokens=False) == tok.encode(
        "Hello world. The answer is 42."
    )


def test_tokenizer_train_cli_builds_bpe_with_latent_tokens(tmp_path):
    from transformers import AutoTokenizer

    data = write_jsonl(tmp_path / "train.jsonl", CORPUS * 10)
    out = tmp_path / "bpe"
    assert bolt_main(["tokenizer", "train", "--input", data, "--vocab-size", "320", "--out", str(out)]) == 0
    tok = load_tokenizer(str(out))
    assert tok.backend == "hf" and tok.vocab_size == 320
    assert tok.latent is not None and len({tok.bos_id, tok.eos_id, *vars(tok.latent).values()}) == 6
    hf = AutoTokenizer.from_pretrained(str(out))
    for s in SAMPLES:
        assert tok.encode(s) == hf.encode(s, add_special_tokens=False)
        assert tok.decode(tok.encode(s)) == s  # byte-level: lossless
    # Each special is one token for transformers too, with our ids.
    assert hf.encode(LATENT_TOKENS[2], add_special_tokens=False) == [tok.latent.prior]
    assert hf.eos_token_id == tok.eos_id
    # A loaded-and-saved copy is identical.
    tok.save(tmp_path / "copy")
    assert load_tokenizer(str(tmp_path / "copy")).encode(SAMPLES[1]) == tok.encode(SAMPLES[1])


def test_plain_tokenizer_json_gets_latent_tokens_appended(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    raw.save(str(tmp_path / "tokenizer.json"))
    n = raw.get_vocab_size()
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert tok.eos_id == raw.token_to_id("<|endoftext|>")  # found by name
    assert [tok.latent.sol, tok.latent.eol, tok.latent.prior, tok.latent.posterior] == [n, n + 1, n + 2, n + 3]
    assert tok.vocab_size == n + 4
    assert load_tokenizer(str(tmp_path / "tokenizer.json"), add_latent_tokens=False).latent is None
    assert tok.info()["special_tokens"]["prior"] == n + 2


@pytest.mark.parametrize("backend", ["hf", "sentencepiece"])
def test_token_end_offsets_are_character_positions(tmp_path, backend):
    if backend == "hf":
        tok = train_bpe_tokenizer([write_jsonl(tmp_path / "t.jsonl", CORPUS)], 300, str(tmp_path / "bpe"))
    else:
        tok = load_tokenizer(train_sentencepiece(tmp_path))
    for s in SAMPLES + ["Ünïcödé 𝔘𝔫𝔦 and emoji 😀 end."]:
        (ids, ends), = tok.encode_batch_with_ends([s])
        assert ids.tolist() == tok.encode(s)
        assert len(ends) == len(ids)
        assert np.all(np.diff(ends) >= 0) and ends[-1] <= len(s)
        assert ends[-1] == len(s.rstrip()) or ends[-1] == len(s)


def test_missing_tokenizer_is_a_user_error(tmp_path):
    from megatron_bolt.errors import UserError

    with pytest.raises(UserError):
        load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(UserError):
        load_tokenizer(str(tmp_path / "bad.model"))
