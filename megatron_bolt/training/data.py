"""Training data: Megatron `GPTDataset`s built by `BlendedMegatronDatasetBuilder`, and a sampler.

Packing is Megatron's: documents (BOS ... EOS) are concatenated and cut into seq_len windows with
plain causal attention (method.md). Batches are addressed by global sample index, so the same
global batch is seen at any data-parallel size and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from megatron_bolt.config import RunConfig
from megatron_bolt.errors import UserError


@dataclass
class _DatasetTokenizer:
    """The little of a tokenizer GPTDataset needs: the EOD id and the vocabulary size."""

    eod: int
    vocab_size: int

    @property
    def unique_identifiers(self) -> dict:
        return {"class": "megatron_bolt", "eod": self.eod, "vocab_size": self.vocab_size}


def parse_blend(prefixes: list, key: str = "data.prefixes") -> tuple[list[str], list[float] | None]:
    """`[p]`, `[p1, p2]` or Megatron's `[w1, p1, w2, p2]` -> (paths, weights)."""
    if not prefixes:
        raise UserError(f"{key} is empty: give at least one Megatron dataset prefix")
    if all(isinstance(p, str) for p in prefixes):
        paths, weights = [str(p) for p in prefixes], None
    elif len(prefixes) % 2 == 0 and all(isinstance(w, (int, float)) for w in prefixes[0::2]):
        weights = [float(w) for w in prefixes[0::2]]
        paths = [str(p) for p in prefixes[1::2]]
    else:
        raise UserError(f"{key}: expected [prefix, ...] or [weight, prefix, weight, prefix, ...]")
    for path in paths:
        for ext in (".bin", ".idx"):
            if not Path(path + ext).is_file():
                raise UserError(f"{key}: missing dataset file {path}{ext}")
    return paths, weights


def build_datasets(cfg: RunConfig, num_samples: tuple[int, int, int]):
    """(train, valid, test) GPTDatasets with at least the given numbers of samples (None where a
    split is empty). Validation data are a share of data.prefixes (data.split, Megatron's --split)
    or, with data.valid_prefixes, a blend of their own (Megatron's --valid-data-path). With
    data.mock and no prefixes: Megatron's MockGPTDataset sequences, no files."""
    mock = cfg.data.uses_mock
    if mock:
        splits = {"blend": None, "split": cfg.data.split}
    elif cfg.data.valid_prefixes:
        splits = {"blend_per_split": [parse_blend(cfg.data.prefixes),
                                      parse_blend(cfg.data.valid_prefixes, "data.valid_prefixes"), None]}
    else:
        splits = {"blend": parse_blend(cfg.data.prefixes), "split": cfg.data.split}
    dataset_config = GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.model.seq_len,
        **splits,
        path_to_cache=cfg.data.cache_dir or str(Path(cfg.output_dir) / "data_cache"),
        tokenizer=_DatasetTokenizer(eod=cfg.data.eod_id, vocab_size=cfg.model.vocab_size),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    builder = BlendedMegatronDatasetBuilder(
        MockGPTDataset if mock else GPTDataset, list(num_samples), lambda: True, dataset_config
    )
    return builder.build()


class GlobalBatchSampler:
    """Micro-batches of this data-parallel rank for a given step, by global sample index.

    Step s uses global samples [s*G, (s+1)*G); micro-batch m of DP rank r takes the slice starting
    at (m*dp + r)*mbs. The union over ranks and micro-batches is the same for every dp.
    """

    def __init__(self, dataset, global_batch: int, micro_batch: int):
        self.dataset = dataset
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.num_microbatches = global_batch // (micro_batch * self.dp)

    def microbatches(self, step: int):
        base = step * self.global_batch
        for m in range(self.num_microbatches):
            start = base + (m * self.dp + self.dp_rank) * self.micro_batch
            samples = [self.dataset[(start + i) % len(self.dataset)] for i in range(self.micro_batch)]
            yield {
                "tokens": torch.stack([s["tokens"] for s in samples]),
                "labels": torch.stack([s["labels"] for s in samples]),
                "loss_mask": torch.stack([s["loss_mask"] for s in samples]),
                "position_ids": torch.stack([s["position_ids"] for s in samples]),
            }
