"""`bolt warmstart`: one latent per chunk from a teacher (toy or an OpenAI-compatible endpoint),
written as a K=1 latent store that `bolt merge` reads. Re-running the same command resumes."""

from __future__ import annotations

import argparse
import sys

from megatron_bolt.config import OpenAITeacherConfig
from megatron_bolt.errors import UserError
from megatron_bolt.latents.teachers import (
    DEFAULT_MODEL,
)

_T = OpenAITeacherConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Warm start (method.md): decode every chunk of CHUNKS.zarr and its prefix (the previous "
        "--prefix-chunks chunks of its document), ask a teacher for the missing background and "
        "step-by-step reasoning behind the chunk, and store the encoded answer as the chunk's one "
        "latent (K=1, log weights 0) in LATENTS.zarr, block by block. Finished blocks are skipped on "
        "a re-run; --shard i/N lets N jobs fill one store. The openai teacher talks to any "
        "OpenAI-compatible POST {base_url}/chat/completions; its key is read from an environment "
        "variable and never printed."
    )
    parser.add_argument("--chunks", required=True, metavar="CHUNKS.zarr", help="chunk store (from `bolt preprocess --chunk-store`)")
    parser.add_argument("--out", required=True, metavar="LATENTS.zarr", help="latent store to create or resume")
    parser.add_argument("--teacher", required=True, choices=["toy", "openai"],
                        help="toy: the toy math world's exact teacher; openai: a chat-completions endpoint")
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="corpus tokenizer (default: the path the chunk store records)")
    parser.add_argument("--prefix-chunks", type=int, default=1, help="previous chunks shown to the teacher as context (default 1)")
    parser.add_argument("--block-size", type=int, default=None,
                        help="chunks per block, the unit of resume (default: the existing store's, else 256)")
    parser.add_argument("--shard", default="0/1", help="i/N: this job fills blocks b with b %% N == i (default 0/1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    g = parser.add_argument_group("openai teacher")
    g.add_argument("--base-url", default=None, help="API base URL, e.g. http://host:8000/v1 (default $OPENAI_BASE_URL, "
                                                    "else https://api.openai.com/v1)")
    g.add_argument("--model", default=None,
                   help=f"model name (default $OPENAI_MODEL, else {DEFAULT_MODEL}, the reference's teacher)")
    g.add_argument("--api-key-env", default=_T.api_key_env, metavar="VAR",
                   help="environment variable holding the API key, sent as Authorization: Bearer (default OPENAI_API_KEY)")
    g.add_argument("--temperature", type=float, default=_T.temperature,
                   help=f"sampling temperature (default {_T.temperature}, as the reference's teacher)")
    g.add_argument("--max-tokens", type=int, default=_T.max_tokens,
                   help=f"max_tokens of each completion; 0 leaves it out (default {_T.max_tokens}, as the reference)")
    g.add_argument("--concurrency", type=int, default=_T.concurrency, help="requests in flight (default 8); keep --block-size well above it, since a block's "
                        "slowest requests hold up the next block")
    g.add_argument("--requests-per-minute", type=float, default=None, help="request starts per minute, spread evenly (default: no limit)")
    g.add_argument("--max-retries", type=int, default=_T.max_retries,
                   help="retries per chunk on connection errors, timeouts, 5xx and 429 (default 6)")
    g.add_argument("--retry-backoff", type=float, default=_T.retry_backoff, metavar="S",
                   help="first retry delay, doubled each retry up to 60 s; a Retry-After header takes precedence (default 1)")
    g.add_argument("--timeout", type=float, default=_T.timeout, metavar="S", help="per-request timeout (default 120)")
    g.add_argument("--prompt-file", default=None, metavar="F",
                   help="prompt template with {prefix} and {suffix} (default: the built-in warm-start prompt, the "
                        "reference's restated); an empty prefix is sent as N/A")
    g.add_argument("--system-prompt", default=None, metavar="TEXT",
                   help="system message sent before the prompt (default: the built-in one; '' sends none)")


def teacher_config(args: argparse.Namespace) -> OpenAITeacherConfig:
    return OpenAITeacherConfig(
        base_url=args.base_url, model=args.model, api_key_env=args.api_key_env, temperature=args.temperature,
        max_tokens=args.max_tokens or None, concurrency=args.concurrency,
        requests_per_minute=args.requests_per_minute, max_retries=args.max_retries,
        retry_backoff=args.retry_backoff, timeout=args.timeout, prompt_file=args.prompt_file,
        system_prompt=args.system_prompt,
    )


def run(args: argparse.Namespace) -> int:
    from megatron_bolt.latents.blocks import parse_shard
    from megatron_bolt.latents.teachers import make_teacher
    from megatron_bolt.latents.warmstart import run_warmstart
    from megatron_bolt.stores.latent_store import existing_block_size

    shard = parse_shard(args.shard)
    if args.block_size is not None and args.block_size < 1:
        raise UserError("--block-size must be >= 1")
    teacher = make_teacher(args.teacher, teacher_config(args))
    try:
        summary = run_warmstart(
            args.chunks, args.out, teacher, tokenizer_path=args.tokenizer, prefix_chunks=args.prefix_chunks,
            block_size=args.block_size or existing_block_size(args.out) or 256, shard=shard,
            progress=not args.quiet,
        )
    finally:
        teacher.close()
    print(f"bolt warmstart: {summary.line()}", file=sys.stderr)
    return 0
