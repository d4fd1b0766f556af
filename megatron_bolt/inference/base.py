"""The engine interface the E-step talks to: sample latents with their log-probs, score sequences.

Log-probs are always untempered (temperature 1, top_p 1, no top_k, no min_p): importance weights
log w = log p - log q are only right if q's log-probs are those of the distribution actually sampled.

Seeds: every (prompt, sample) pair gets its own 64-bit seed, derived from the prompt's seed and
the sample index. What that guarantees, precisely:
- the random numbers a sample draws are a function of its seed (and step) only, never of the other
  rows in its batch;
- the same call (same prompts, seeds, engine settings, device, dtype and thread count) returns
  bit-identical samples;
- a different batch composition (other prompts alongside, another batch size or padding width)
  can change a sample: the logits then differ in the last bits of floating point (matmul blocking,
  padding), and a draw whose uniform lies within that rounding of a CDF boundary picks the
  neighbouring token (issue 16 measured 9 of 128 rows of an 8-layer d512 fp32 model differing
  between batches of 64 and 128; once one token differs, the rest of the row follows it). Every
  sample is still an exact draw from the model's distribution, and its log-probs are those of the
  tokens it holds; only bit-reproducibility across batch layouts is not promised.
Servers add their own conditions (SGLang honours seeds only with --enable-deterministic-inference).

Context: `context_length` is the longest token sequence an engine takes (prompt plus new tokens
when sampling, the whole sequence when scoring); callers truncate to it (the E-step does).
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

    @property
    def context_length(self) -> int | None:
        """The longest sequence (prompt + new tokens, or a scored prompt + continuation) this engine
        accepts; None when it has no limit of its own."""
        return None

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
