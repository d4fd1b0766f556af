"""`bolt <command>`: one table of subcommands, each a thin layer over a library function.

Every command module exposes `add_arguments(parser)` and `run(args) -> int`; modules are imported
lazily so `bolt --help` stays fast and a command's heavy imports (torch, megatron) load only when used.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from megatron_bolt.errors import UserError

# name -> (module, one-line help). Nested groups use "group name".
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("megatron_bolt.cli.train", "train a model with Megatron-Core (torchrun / srun / local launch)"),
    "score": ("megatron_bolt.cli.score", "summed log-probabilities of token sequences under a Megatron checkpoint"),
    "eval": ("megatron_bolt.cli.eval", "few-shot greedy evaluation (toy, GSM8K, MATH) of an HF export, in latent space or raw"),
    "generate": ("megatron_bolt.cli.generate", "KV-cached continuation of token prompts under a gpt or ponder checkpoint"),
    "merge": ("megatron_bolt.cli.merge", "merge chosen latents into a Megatron .bin/.idx (prior/posterior forms)"),
    "latents status": ("megatron_bolt.cli.latents_status", "how many blocks of a latent store are done"),
    "em": ("megatron_bolt.cli.em", "the BoLT EM loop: warm start, then E-step / merge / train / evaluate per iteration"),
    "demo": ("megatron_bolt.cli.demo", "run the embedded default end to end on this machine"),
    "preprocess": ("megatron_bolt.cli.preprocess", "tokenize JSONL/Parquet into Megatron .bin/.idx and a BoLT chunk store"),
    "tokenizer train": ("megatron_bolt.cli.tokenizer_train", "train a small byte-level BPE that includes the latent special tokens"),
    "estep": ("megatron_bolt.cli.estep", "E-step: sample K latents per chunk, importance-weight, resample, write a latent store"),
    "warmstart": ("megatron_bolt.cli.warmstart", "warm start: one latent per chunk from a teacher (toy or OpenAI-compatible) into a latent store"),
    "iwae": ("megatron_bolt.cli.iwae", "IWAE bound logsumexp(log w_1..n) - log n on validation chunks"),
    "serve": ("megatron_bolt.cli.serve", "serve an HF export over SGLang's native /generate API (CPU fleet / tests)"),
    "convert hf-to-mcore": ("megatron_bolt.cli.convert", "HF Llama 2/3/3.1+, Qwen2/2.5 or Mistral directory -> Megatron-Core distributed checkpoint"),
    "convert mcore-to-hf": ("megatron_bolt.cli.convert", "Megatron-Core checkpoint -> HF directory (safetensors; ponder models with their own modeling code)"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The `bolt` parser; only the command that `argv` names gets its arguments (its module imported)."""
    parser = argparse.ArgumentParser(prog="bolt", description="megatron-bolt: latent-thought pretraining on Megatron-Core")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (module_name, help_text) in COMMANDS.items():
        parts = name.split()
        target = sub
        if len(parts) == 2:
            if parts[0] not in groups:
                group_parser = sub.add_parser(parts[0], help=f"{parts[0]} subcommands")
                groups[parts[0]] = group_parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
            target = groups[parts[0]]
        p = target.add_parser(parts[-1], help=help_text, description=help_text)
        p.set_defaults(_module=module_name, _argv_name=name)
        if _wants_arguments(name, argv):
            # add_arguments may read its command's full name: p.get_default("_argv_name")
            importlib.import_module(module_name).add_arguments(p)
    return parser


def _wants_arguments(name: str, argv: list[str]) -> bool:
    """Only the chosen command's module is imported to add its arguments."""
    words = [a for a in argv if not a.startswith("-")]
    return words[: len(name.split())] == name.split()


def main(argv: list[str] | None = None) -> int:
    """`bolt ARGV...`; `argv` defaults to this process's command line. Returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    process_defaults()
    with warnings.catch_warnings():
        quiet_missing_accelerator_libraries()
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        if not getattr(args, "_module", None):
            parser.print_help()
            return 2
        args._argv = argv  # the full command line, for commands that relaunch themselves under torchrun
        try:
            return int(importlib.import_module(args._module).run(args) or 0)
        except UserError as exc:
            print(f"bolt {args._argv_name}: error: {exc}", file=sys.stderr)
            return 2


# Megatron-Core warns at import, once per module, that Transformer Engine and Apex are missing and
# it falls back to its own implementations. Without them (CPU machines, plain pip installs) that is
# the expected configuration, not news, and it opened every command with a wall of warnings.
_MISSING_ACCELERATOR_LIBRARIES = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"Transformer Engine is not installed",
)


def quiet_missing_accelerator_libraries() -> None:
    """For the command being run (main's catch_warnings scope): drop exactly those warnings."""
    for message in _MISSING_ACCELERATOR_LIBRARIES:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)


def process_defaults() -> None:
    """Settings of this process that libraries read from its environment, set by the entry point
    (never by library code), and only where the user has not set them.

    VLLM_ENABLE_V1_MULTIPROCESSING=0: an in-process vLLM engine (`--engine vllm`) runs its engine
    core in this process instead of a child: it loads in seconds, and nothing outlives a killed run.
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def set_torch_threads(threads: int | None) -> None:
    """torch's CPU threads for this process (None: torch's default), a command's own choice."""
    if threads:
        import torch

        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
