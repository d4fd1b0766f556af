"""Tokenizers for megatron-bolt: HF `tokenizers` files or SentencePiece models, plus BoLT's latent tokens.

One class, `BoltTokenizer`, hides the two backends so that preprocessing, the E-step and evaluation
all see the same ids:

- HF backend: a `tokenizer.json` (alone or in an HF directory) run by the Rust `tokenizers` library.
  Special-token strings that appear in text are recognised as specials, as `transformers` does.
- SentencePiece backend: a `.model` run by `sentencepiece` itself, exactly as Megatron-LM's
  `SentencePieceTokenizer` encodes. Tokens that the model lacks (the latent tokens, and BOS/EOS when
  the model was trained without them) get ids after the model's own pieces; they are never produced
  by `encode`, only used by id.

`.save(dir)` writes a directory that `transformers.AutoTokenizer.from_pretrained` loads and that
`load_tokenizer` loads back with identical ids. For a SentencePiece model the directory holds the
`.model`; transformers converts it to its own BPE on load, which can split rare whitespace runs
differently from sentencepiece, so code that needs exact ids should use `load_tokenizer`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path

import numpy as np

from megatron_bolt.atomic import atomic_path
from megatron_bolt.errors import UserError

LATENT_TOKENS = ("<|START_OF_LATENT|>", "<|END_OF_LATENT|>", "<|PRIOR_PREFIX|>", "<|POSTERIOR_PREFIX|>")

# Names tried, in order, when a tokenizer file does not say which token is BOS / EOS.
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>", "[CLS]")
_EOS_CANDIDATES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|im_end|>", "[SEP]")
_META_FILE = "bolt_tokenizer.json"


@dataclass(frozen=True)
class LatentTokenIds:
    """The ids of the four latent special tokens (the one type for them: tokenizers, chunk stores,
    data formats, the E-step and merge all use it)."""

    sol: int
    eol: int
    prior: int
    posterior: int

    @classmethod
    def from_special_tokens(cls, special_tokens: dict, where: str) -> LatentTokenIds:
        """From a store's `special_tokens` attribute; `where` (its path) names it in the error."""
        missing = [k for k in ("sol", "eol", "prior", "posterior") if k not in special_tokens]
        if missing:
            raise UserError(f"{where}: attribute special_tokens lacks {', '.join(missing)} "
                            f"(has {sorted(special_tokens)})")
        return cls(*(int(special_tokens[k]) for k in ("sol", "eol", "prior", "posterior")))


class BoltTokenizer:
    """Common interface over the HF and SentencePiece backends (see the module docstring)."""

    backend: str  # "hf" or "sentencepiece"
    name: str  # where it was loaded from, recorded in outputs
    bos_id: int
    eos_id: int
    latent: LatentTokenIds | None

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def eod(self) -> int:
        """Megatron's name for the end-of-document token: our EOS."""
        return self.eos_id

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no BOS/EOS added."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each text (int32 arrays), with no BOS/EOS. Threads: TOKENIZERS_PARALLELISM /
        RAYON_NUM_THREADS for the HF backend, `num_threads` for SentencePiece (1 by default)."""
        raise NotImplementedError

    def encode_batch_with_ends(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Token ids and, for each token, the character offset in its text where the token ends."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def save(self, out_dir: str | os.PathLike) -> None:
        raise NotImplementedError

    def info(self) -> dict:
        """What outputs record about the tokenizer (chunk-store attrs, run metadata)."""
        special = {"bos": self.bos_id, "eos": self.eos_id}
        if self.latent is not None:
            special.update(
                sol=self.latent.sol, eol=self.latent.eol, prior=self.latent.prior, posterior=self.latent.posterior
            )
        return {"tokenizer": self.name, "vocab_size": self.vocab_size, "special_tokens": special}

    def _latent_from(self, lookup) -> LatentTokenIds | None:
        ids = [lookup(t) for t in LATENT_TOKENS]
        if any(i is None for i in ids):
            return None
        return LatentTokenIds(*ids)

    def _write_meta(self, out: Path, extra: dict) -> None:
        meta = {"backend": self.backend, "source": self.name, **self.info(), **extra}
        (out / _META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------
# HF `tokenizers` backend
# --------------------------------------------------------------------------------------------------


class HFTokenizer(BoltTokenizer):
    backend = "hf"

    def __init__(self, tokenizer_json: Path, config: dict, add_latent_tokens: bool, name: str):
        from tokenizers import AddedToken, Tokenizer

        self.name = name
        self._tok = Tokenizer.from_file(str(tokenizer_json))
        self._config = {k: v for k, v in config.items() if k in ("model_max_length", "chat_template")}
        vocab = self._tok.get_vocab(with_added_tokens=True)
        bos = _token_name(config.get("bos_token")) or next((t for t in _BOS_CANDIDATES if t in vocab), None)
        eos = _token_name(config.get("eos_token")) or next((t for t in _EOS_CANDIDATES if t in vocab), None)
        missing = [t for t in (bos or "<s>", eos or "</s>") if t not in vocab]
        if add_latent_tokens:
            missing += [t for t in LATENT_TOKENS if t not in vocab]
        if missing:
            self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        self.bos_token, self.eos_token = bos or "<s>", eos or "</s>"
        self.bos_id = self._tok.token_to_id(self.bos_token)
        self.eos_id = self._tok.token_to_id(self.eos_token)
        self.latent = self._latent_from(self._tok.token_to_id)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        # Some vocabularies have holes; the embedding table needs max id + 1 rows.
        self._vocab_size = max(len(vocab), max(vocab.values()) + 1)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        fast = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [np.asarray(e.ids, dtype=np.int32) for e in fast(list(texts), add_special_tokens=False)]

    def encode_batch_with_ends(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        end = itemgetter(1)
        return [
            (np.asarray(e.ids, dtype=np.int32), np.fromiter(map(end, e.offsets), dtype=np.int64, count=len(e)))
            for e in self._tok.encode_batch(list(texts), add_special_tokens=False)
        ]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def save(self, out_dir: str | os.PathLike) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(out / "tokenizer.json"))
        specials = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        extra = list(LATENT_TOKENS) if self.latent is not None else []
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **specials,
            "add_bos_token": False,
            "add_eos_token": False,
            "model_max_length": 1_000_000_000,
            **self._config,
            "extra_special_tokens": extra,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (out / "special_tokens_map.json").write_text(
            json.dumps({**specials, "additional_special_tokens": extra}, indent=2) + "\n"
        )
        self._write_meta(out, {})


# --------------------------------------------------------------------------------------------------
# SentencePiece backend
# --------------------------------------------------------------------------------------------------


class SentencePieceTokenizer(BoltTokenizer):
    backend = "sentencepiece"
    num_threads = 1  # threads of a batch encode; preprocessing parallelises with processes instead

    def __init__(self, model_file: Path, add_latent_tokens: bool, name: str, extra_tokens: Sequence[str] = ()):
        import sentencepiece as spm

        self.name = name
        self._model_file = Path(model_file)
        self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self._base = self._sp.get_piece_size()
        # Tokens the model lacks get ids after its own pieces, in a fixed order, so that a saved and
        # reloaded tokenizer (and transformers, which appends added tokens the same way) agree.
        self._extra: list[str] = []
        wanted = list(extra_tokens)
        if self._sp.bos_id() < 0:
            wanted.append("<s>")
        if self._sp.eos_id() < 0:
            wanted.append("</s>")
        if add_latent_tokens:
            wanted += LATENT_TOKENS
        for t in wanted:
            if t not in self._extra and self._sp_piece_id(t) is None:
                self._extra.append(t)
        self._extra_ids = {t: self._base + i for i, t in enumerate(self._extra)}
        self.bos_token = "<s>" if self._sp.bos_id() < 0 else self._sp.id_to_piece(self._sp.bos_id())
        self.eos_token = "</s>" if self._sp.eos_id() < 0 else self._sp.id_to_piece(self._sp.eos_id())
        self.bos_id = self.token_to_id(self.bos_token)
        self.eos_id = self.token_to_id(self.eos_token)
        self.latent = self._latent_from(self.token_to_id)

    @property
    def vocab_size(self) -> int:
        return self._base + len(self._extra)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int32) for ids in self._sp.encode(list(texts), num_threads=self.num_threads)]

    def encode_batch_with_ends(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for text in texts:
            proto = self._sp.encode(text, return_type="proto")
            ids = np.asarray([p.id for p in proto.pieces], dtype=np.int32)
            byte_ends = np.asarray([p.end for p in proto.pieces], dtype=np.int64)
            out.append((ids, _byte_to_char_offsets(text, byte_ends)))
        return out

    def decode(self, ids: Iterable[int]) -> str:
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i < self._base:
                run.append(i)
                continue
            if run:
                parts.append(self._sp.decode(run))
                run = []
            parts.append(self._extra[i - self._base])
        if run:
            parts.append(self._sp.decode(run))
        return "".join(parts)

    def token_to_id(self, token: str) -> int | None:
        if token in self._extra_ids:
            return self._extra_ids[token]
        return self._sp_piece_id(token)

    def _sp_piece_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        if i < 0 or (i == self._sp.unk_id() and token != self._sp.id_to_piece(i)):
            return None
        return i

    def save(self, out_dir: str | os.PathLike) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._model_file, out / "tokenizer.model")
        unk = self._sp.id_to_piece(self._sp.unk_id()) if self._sp.unk_id() >= 0 else None
        added = {
            str(self._base + i): {"content": t, "special": True, "normalized": False, "lstrip": False,
                                  "rstrip": False, "single_word": False}
            for i, t in enumerate(self._extra)
        }
        latent = [t for t in self._extra if t in LATENT_TOKENS]
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": unk,
            "add_bos_token": False,
            "add_eos_token": False,
            "legacy": True,
            "model_max_length": 1_000_000_000,
            "added_tokens_decoder": added,
            "extra_special_tokens": latent,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (out / "special_tokens_map.json").write_text(
            json.dumps({"bos_token": self.bos_token, "eos_token": self.eos_token, "unk_token": unk,
                        "additional_special_tokens": latent}, indent=2) + "\n"
        )
        self._write_meta(out, {"extra_tokens": self._extra})


def _byte_to_char_offsets(text: str, byte_offsets: np.ndarray) -> np.ndarray:
    """Convert UTF-8 byte offsets into `text` to character offsets (a byte inside a character maps
    to the end of that character, so a token ending mid-character covers the whole character)."""
    if text.isascii():
        return byte_offsets
    raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    is_start = (raw & 0xC0) != 0x80
    # chars_before[b] = number of characters that start before byte b.
    chars_before = np.concatenate([[0], np.cumsum(is_start)])
    # A token ending at byte b inside a character (next byte is a continuation) rounds up.
    b = np.clip(byte_offsets, 0, len(raw))
    inside = np.zeros(len(b), dtype=bool)
    mid = b < len(raw)
    inside[mid] = ~is_start[b[mid]]
    return chars_before[b] + inside


def _token_name(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


# --------------------------------------------------------------------------------------------------
# Loading and training
# --------------------------------------------------------------------------------------------------


def load_tokenizer(path: str, add_latent_tokens: bool = True, kind: str | None = None) -> BoltTokenizer:
    """Load an HF directory, a `tokenizer.json`, or a SentencePiece `.model`.

    `kind` ("hf" / "sentencepiece") forces a backend where a directory holds both files; by default a
    directory saved by `BoltTokenizer.save` reloads with the backend it was saved from, and any other
    directory prefers `tokenizer.json`.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"tokenizer not found: {path}")
    if p.is_dir():
        meta = _read_json(p / _META_FILE)
        config = _read_json(p / "tokenizer_config.json")
        has_json, has_model = (p / "tokenizer.json").exists(), (p / "tokenizer.model").exists()
        backend = kind or meta.get("backend") or ("hf" if has_json else "sentencepiece" if has_model else None)
        if backend == "hf" and has_json:
            return HFTokenizer(p / "tokenizer.json", config, add_latent_tokens, name=str(path))
        if backend == "sentencepiece" and has_model:
            return SentencePieceTokenizer(
                p / "tokenizer.model", add_latent_tokens, name=str(path), extra_tokens=meta.get("extra_tokens", ())
            )
        raise UserError(f"{path}: no tokenizer.json or tokenizer.model for the {backend or 'any'} backend")
    if p.suffix == ".json":
        if kind == "sentencepiece":
            raise UserError(f"{path}: a SentencePiece tokenizer needs a .model file")
        return HFTokenizer(p, _read_json(p.parent / "tokenizer_config.json"), add_latent_tokens, name=str(path))
    if kind == "hf":
        raise UserError(f"{path}: an HF tokenizer needs a directory or a tokenizer.json")
    try:
        return SentencePieceTokenizer(p, add_latent_tokens, name=str(path))
    except (RuntimeError, OSError) as exc:
        raise UserError(f"{path}: not a SentencePiece model ({exc})") from exc


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}


def iter_training_texts(files: Iterable[str], key: str = "text") -> Iterator[str]:
    """Texts for tokenizer training: the `key` field of JSONL files, or whole lines of other files."""
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                if f.endswith((".jsonl", ".json")):
                    try:
                        value = json.loads(line).get(key)
                    except (json.JSONDecodeError, AttributeError) as exc:
                        raise UserError(f"{f}:{n}: invalid JSON object ({exc})") from exc
                    if isinstance(value, str) and value:
                        yield value
                else:
                    yield line


def train_bpe_tokenizer(files: Sequence[str], vocab_size: int, out_dir: str, key: str = "text") -> BoltTokenizer:
    """Train a byte-level BPE (HF `tokenizers`) with <s>, </s> and the four latent tokens built in,
    save it as an HF directory at `out_dir`, and return it loaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<s>", "</s>", *LATENT_TOKENS]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise UserError(f"--vocab-size must be at least {len(alphabet) + len(specials)} (bytes + special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(iter_training_texts(files, key), trainer=trainer)
    out = Path(out_dir)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        tok.save(str(tmp / "tokenizer.json"))
        loaded = HFTokenizer(tmp / "tokenizer.json", {"bos_token": "<s>", "eos_token": "</s>"}, True, name=str(out))
        loaded.save(tmp)
    return load_tokenizer(str(out))
