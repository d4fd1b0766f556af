"""`bolt convert hf-to-mcore` and `bolt convert mcore-to-hf`: one module, dispatching on the name."""

from __future__ import annotations

import argparse

from megatron_bolt.errors import UserError

_EPILOG = {
    "convert hf-to-mcore": (
        "Reads an HF Llama (2, 3, 3.1+), Qwen2/2.5 or Mistral directory (config.json + safetensors + tokenizer\n"
        "files; unsupported options are refused naming the field; docs/conversion.md) and writes a\n"
        "megatron-bolt checkpoint at step 0 (dist_checkpointing; loads at any TP/PP that divides the shapes,\n"
        "with the vocabulary padded for --tp). Tokenizer files go to OUT/tokenizer/.\n"
        "example: bolt convert hf-to-mcore --hf TinyLlama-1.1B --out ckpt/base --tp 2 --add-latent-tokens"
    ),
    "convert mcore-to-hf": (
        "Writes the latest checkpoint step as an HF directory that transformers 4.x/5.x, vLLM and SGLang load:\n"
        "config.json (the imported family, else LlamaForCausalLM), safetensors (sharded above --max-shard-gb),\n"
        "tokenizer files. A ponder checkpoint exports as PonderForCausalLM with its modeling code\n"
        "(load with trust_remote_code=True).\n"
        "example: bolt convert mcore-to-hf --ckpt runs/iter1/checkpoints --out hf/iter1"
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    name = parser.get_default("_argv_name")  # set by the command table: "convert hf-to-mcore" or "convert mcore-to-hf"
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EPILOG.get(name)
    if name == "convert hf-to-mcore":
        parser.add_argument("--hf", required=True, help="HF model directory (config.json, *.safetensors)")
        parser.add_argument("--out", required=True, help="checkpoint directory to create (must not exist or be empty)")
        parser.add_argument("--tp", type=int, default=1, help="tensor parallel size to train with (checked, recorded)")
        parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size to train with (checked, recorded)")
        parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                            help="weights dtype; auto = bf16 if the HF model is bf16, else fp32")
        parser.add_argument("--add-latent-tokens", action="store_true",
                            help="add the four BoLT latent tokens to the tokenizer and vocabulary "
                                 "(new rows ~ N(0, d^-0.5) clamped at 3 sigma)")
        parser.add_argument("--seed", type=int, default=1234, help="seed for the new vocabulary rows")
    else:
        parser.add_argument("--ckpt", required=True, help="megatron-bolt checkpoint directory")
        parser.add_argument("--out", required=True, help="HF directory to create (must not exist or be empty)")
        parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
        parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                            help="dtype of the safetensors; auto = the checkpoint's")
        parser.add_argument("--tokenizer", default=None, help="tokenizer directory to copy (default: CKPT/tokenizer)")
        parser.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file, GiB")


def run(args: argparse.Namespace) -> int:
    from megatron_bolt.compat import cpu as cpu_compat

    cpu_compat.install()  # both directions build the Megatron-Core model in this process
    if args._argv_name == "convert hf-to-mcore":
        from megatron_bolt.convert.hf_to_mcore import convert_hf_to_mcore

        if args.tp < 1 or args.pp < 1:
            raise UserError("--tp and --pp must be >= 1")
        convert_hf_to_mcore(
            args.hf, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype,
            add_latent_tokens=args.add_latent_tokens, seed=args.seed,
        )
        return 0
    from megatron_bolt.convert.mcore_to_hf import convert_mcore_to_hf

    if args.max_shard_gb <= 0:
        raise UserError("--max-shard-gb must be positive")
    convert_mcore_to_hf(
        args.ckpt, args.out, dtype=args.dtype, tokenizer=args.tokenizer,
        max_shard_bytes=int(args.max_shard_gb * 2**30), step=args.step,
    )
    return 0
