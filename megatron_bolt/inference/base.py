"""The engine interface the E-step talks to: sample latents with their log-probs, score sequences.

Log-probs are always untempered (temperature 1, top_p 1, no top_k, no min_p): importance weights
log w = log p - log q are only right if q's log-probs are those of the distribution actually sampled.

Seeds: every (prompt, sample) pair gets its own 64-bit seed, derived from the prompt's seed and
the sample index, so a sample does not depend on which other prompts share its batch (the E-step
relies on this to make a block's result independent of shard layout and batch size).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

_MASK64 = (1 << 64) - 1


@dataclass
class Sample:
    """One sampled continuation.

    tokens: the generated ids, including the stop token when the sample stopped on one (as SGLang's
    `output_ids`); logprobs: the untempered log-prob of each of those tokens; finished: True when
    generation ended on a stop token, False when it ran into max_new_tokens.
    """

    tokens: list[int]
    logprobs: list[float]
    finished: bool
    stop_token: int | None = field(default=None)

    @property
    def logprob_sum(self) -> float:
        return float(sum(self.logprobs))

    def body(self) -> list[int]:
        """The tokens without the trailing stop token."""
        return self.tokens[:-1] if self.finished else list(self.tokens)


class Engine(ABC):
    """Samples continuations and scores sequences under one language model."""

    @abstractmethod
    def sample(
        self,
        prompts: list[list[int]],
        n: int,
        max_new_tokens: int,
        stop: list[int],
        seed: int | list[int] = 0,
    ) -> list[list[Sample]]:
        """n samples per prompt at temperature 1; result[i][j] is sample j of prompt i.

        seed: one int for all prompts, or one per prompt; sample j of prompt i uses
        `sample_seed(seed_i, j)`.
        """

    @abstractmethod
    def score(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[float]:
        """Summed log-probs of each continuation given its prompt (the prompt itself not counted)."""

    def close(self) -> None:  # noqa: B027 - optional hook, most engines hold nothing to release
        """Release resources (threads, sessions); the default has none."""


def mix64(x: int) -> int:
    """SplitMix64 finaliser: a well-mixed 64-bit hash of a 64-bit int."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of ints (e.g. run seed, block, chunk, sample); order matters."""
    h = 0x2545F4914F6CDD1D
    for p in parts:
        h = mix64(h ^ (int(p) & _MASK64))
    return h & ((1 << 63) - 1)


def sample_seed(prompt_seed: int, sample_index: int) -> int:
    return derive_seed(prompt_seed, sample_index)


def per_prompt_seeds(seed: int | list[int], num_prompts: int) -> list[int]:
    if isinstance(seed, (list, tuple)):
        if len(seed) != num_prompts:
            raise ValueError(f"got {len(seed)} seeds for {num_prompts} prompts")
        return [int(s) for s in seed]
    return [derive_seed(int(seed), i) for i in range(num_prompts)]


def step_uniforms(seeds: np.ndarray, step: int) -> np.ndarray:
    """One uniform in [0, 1) per row for decoding step `step`, a pure function of (seed, step).

    Counter-based (no generator state), so a row draws the same numbers whatever batch it is in.
    """
    with np.errstate(over="ignore"):
        x = seeds.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(step + 1)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)
