"""Benchmark: do our chunk stores hold the chunks the BoLT reference code makes?

The reference chunker (ryoungj/BoLT `apps/main/gen_utils/chunk_gen.py`, `chunked_generation_wrapper`
with the warm-start settings: sentence units, 8 units per chunk on average, 1 to 20, seed 42) runs
from a checkout *outside this repository*, loaded from its file as it is; the two project modules it
imports for a logger and the latent-token names are stood in for. Its chunks are compared with

- `text`: `megatron_bolt.data.chunking.chunk_texts` on the same document (the chunker alone), and
- `store`: the chunks of the chunk store that `bolt preprocess --chunk-store` writes for the same
  documents, turned back into text through the tokenizer's character offsets (the chunker plus the
  cut in token space),

and reported as the share of documents whose chunks are identical, string for string.

Documents are the worked solutions of the JSONL files given (GSM8K `answer`, MATH-500 `answer` /
`solution`, or any `--field`). To get the reference:

  git clone https://github.com/ryoungj/BoLT /tmp/bolt-ref      # anywhere outside this repository
  .venv/bin/python bench/chunking_agreement.py --reference /tmp/bolt-ref \\
      --tokenizer /path/to/tokenizer.model data/gsm8k_train.jsonl data/math500_test.jsonl
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("answer", "solution", "text")


def load_reference(checkout: Path):
    """The reference's `chunked_generation_wrapper`, loaded from its file (its package's
    `__init__` pulls in API clients), with stand-ins for the two project modules it imports only
    for a logger and the latent-token names."""
    import enum
    import importlib.util
    import logging

    misc = types.ModuleType("apps.main.gen_utils.misc_utils")
    misc.get_logger = logging.getLogger
    lingua = types.ModuleType("lingua.tokenizer")
    lingua.SpecialTokens = enum.Enum("SpecialTokens", {"START_OF_LATENT": "<SoL>", "END_OF_LATENT": "<EoL>"})
    sys.modules.setdefault("apps.main.gen_utils.misc_utils", misc)
    sys.modules.setdefault("lingua.tokenizer", lingua)
    path = checkout / "apps" / "main" / "gen_utils" / "chunk_gen.py"
    if not path.is_file():
        raise SystemExit(f"--reference {checkout}: no {path.relative_to(checkout)}")
    spec = importlib.util.spec_from_file_location("bolt_reference_chunk_gen", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.chunked_generation_wrapper


def reference_chunks(wrapper, texts: list[str]) -> list[list[str] | None]:
    """Chunk texts per document, as the reference's wrapper pairs them up for the teacher; None
    where the reference raises (it does on a whitespace-only first paragraph)."""

    def no_generation(samples, shard_idx, input_key, output_key, **kwargs):
        outs = [dict(s, **{output_key: ""}) for s in samples]
        return outs, {f"avg_{input_key}_length": 0, f"avg_{output_key}_length": 0}

    # The warm-start config of the reference (configs/gen/gpt_latent_thoughts.yaml).
    chunk = wrapper(no_generation, units_per_chunk=8, max_num_units_per_chunk=20, min_num_units_per_chunk=1,
                    split_mode="sentence", chunk_seed=42)
    import logging

    logging.disable(logging.WARNING)
    result: list[list[str] | None] = []
    for t in texts:
        try:
            (sample,), _ = chunk([{"text": t}], 0)
            result.append([c["suffix"] for c in sample["chunks"]])
        except (IndexError, AssertionError):
            result.append(None)
    return result


def read_documents(files: list[str], field: str | None) -> list[str]:
    docs = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                key = field or next((k for k in FIELDS if k in row), None)
                if key is None or not isinstance(row.get(key), str):
                    raise SystemExit(f"{path}:{n}: no string field {field or ' / '.join(FIELDS)}")
                if row[key].strip():
                    docs.append(row[key])
    return docs


def store_chunks(docs: list[str], tokenizer: str, tokenizer_type: str, work: Path) -> list[list[str]]:
    """Run `bolt preprocess --chunk-store` and read each document's chunks back as text."""
    from megatron_bolt.stores.chunk_store import ChunkStore
    from megatron_bolt.tokenizer import load_tokenizer

    corpus = work / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    subprocess.run([sys.executable, "-m", "megatron_bolt.cli", "preprocess", "--input", str(corpus),
                    "--output-prefix", str(work / "docs"), "--tokenizer-model", tokenizer,
                    "--tokenizer-type", tokenizer_type, "--chunk-store", str(work / "chunks.zarr"),
                    "--no-progress"], check=True, cwd=ROOT)
    store = ChunkStore.open(str(work / "chunks.zarr"))
    tok = load_tokenizer(tokenizer)
    if store.num_docs != len(docs):
        raise SystemExit(f"chunk store has {store.num_docs} documents, expected {len(docs)}")
    out = []
    for d, (text, (_, ends)) in enumerate(zip(docs, tok.encode_batch_with_ends(docs))):
        a, b = store.doc_chunk_range(d)
        lengths = np.diff(np.asarray(store.chunk_offsets[a : b + 1]))
        # A chunk of n tokens ends where its last token ends; the last chunk ends with the text.
        cut_chars = [int(ends[k - 1]) for k in np.cumsum(lengths)[:-1]]
        edges = [0, *cut_chars, len(text)]
        out.append([text[x:y] for x, y in zip(edges, edges[1:])])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="JSONL files; each row's --field is one document")
    ap.add_argument("--reference", type=Path, required=True, help="checkout of ryoungj/BoLT (outside this repo)")
    ap.add_argument("--field", default=None, help=f"JSON field of the document (default: first of {', '.join(FIELDS)})")
    ap.add_argument("--tokenizer", default=None, help="also compare the chunk store built with this tokenizer")
    ap.add_argument("--tokenizer-type", default=None,
                    help="SentencePieceTokenizer or HuggingFaceTokenizer (default: from the path)")
    ap.add_argument("--show", type=int, default=3, help="print this many differing documents")
    args = ap.parse_args()

    from megatron_bolt.data.chunking import chunk_texts

    docs = read_documents(args.files, args.field)
    ref = reference_chunks(load_reference(args.reference.resolve()), docs)
    ours = {"text": [chunk_texts(t) for t in docs]}
    if args.tokenizer:
        kind = args.tokenizer_type or ("SentencePieceTokenizer" if args.tokenizer.endswith(".model")
                                       else "HuggingFaceTokenizer")
        with tempfile.TemporaryDirectory(prefix="bolt-chunk-agree-") as work:
            ours["store"] = store_chunks(docs, args.tokenizer, kind, Path(work))
    failed = sum(r is None for r in ref)
    print(f"{len(docs)} documents from {', '.join(args.files)}; "
          f"{sum(len(r) for r in ref if r is not None)} reference chunks; the reference fails on {failed}")
    for name, got in ours.items():
        same = [r is not None and g == r for g, r in zip(got, ref)]
        print(f"{name:>5}: {sum(same)}/{len(docs) - failed} documents identical "
              f"({100 * sum(same) / max(len(docs) - failed, 1):.2f}% of those the reference chunks), "
              f"{sum(len(g) for g in got)} chunks")
        for d in [i for i, s in enumerate(same) if not s and ref[i] is not None][: args.show]:
            print(f"  doc {d}: reference {ref[d]!r}\n         ours      {got[d]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
