"""What the EM loop trains: for every stage, its data, its start, its length, and the baselines' budgets.

Pure functions of the EM config and the stage's training config, so the driver, `bolt em --plan`
and the tests read the same plan. The protocol follows the BoLT reference's bootstrap setup
(`bin/exp_setups/bootstrap_fixed_data.sh` and `bin/run_train_bootstrap.sh` of ryoungj/BoLT):

- every bootstrap iteration trains from the base model (`restart: base`), on the latents its own
  E-step inferred for the bootstrap split (`iteration_data: new`); the warm-start latents are not
  reused;
- the raw baselines train from the base model on the same documents without latents:
  token-matched reads as many raw tokens as the latent run's data holds (there: 2 epochs of the
  1.92B-token split, 3.84B tokens), FLOPs-matched gets the latent run's training FLOPs (there:
  the same 13B training tokens; the reference labels it "Train-FLOP-Match", and E-step compute is
  not counted);
- the latent data is redrawn in prior/posterior form each time a document is read, which the
  merge's epochs reproduce (`merge.epochs: null` derives them from the training length).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_bolt.config import EMConfig, ModelConfig, RunConfig


@dataclass(frozen=True)
class Training:
    """One training run of the loop."""

    stage: str  # its directory under output_dir: warmstart, iter1, iter3_k1, raw_tokens, raw_flops
    data: tuple[str, ...]  # merged datasets it blends, "stage/name" (warmstart/merged, iter1/merged, raw/rest)
    start: str | None  # None: train_config's start (the base model); else the stage whose weights it loads
    steps: int
    global_batch: int
    seq_len: int

    @property
    def tokens(self) -> int:
        return self.steps * self.global_batch * self.seq_len


def iteration_stages(cfg: EMConfig) -> list[tuple[str, int, int]]:
    """(stage, iteration n, samples K) of every E-step stage, in run order (ablations last)."""
    out = [(f"iter{n}", n, cfg.estep.samples) for n in range(1, cfg.iterations + 1)]
    if cfg.iterations:
        out += [(f"iter{cfg.iterations}_k{k}", cfg.iterations, k) for k in cfg.ablation_samples]
    return out


def latent_trainings(cfg: EMConfig, base: RunConfig, warm: RunConfig) -> list[Training]:
    """The warm start and every iteration (and ablation), with their data and starts. `base` is the
    iterations' training config, `warm` the warm start's (base + warmstart.train_overrides)."""
    out = [Training("warmstart", ("warmstart/merged",), None, warm.train.steps, warm.train.global_batch,
                    warm.model.seq_len)]
    for stage, n, _ in iteration_stages(cfg):
        data = (f"{stage}/merged",)
        if cfg.iteration_data == "warm+new":
            data = (f"{stage}/warm", *data)
        previous = "warmstart" if n == 1 else f"iter{n - 1}"
        start = previous if cfg.restart == "continue" else None
        out.append(Training(stage, data, start, base.train.steps, base.train.global_batch, base.model.seq_len))
    return out


def matched_run(cfg: EMConfig, trainings: list[Training]) -> list[Training]:
    """The trainings behind the model the raw baselines are compared with: the last iteration
    alone when every stage restarts from the base model, its whole chain with `restart: continue`
    (warm start, then every iteration); the warm start when there are no iterations."""
    main = [t for t in trainings if "_k" not in t.stage]
    if cfg.restart == "base":
        return main[-1:]
    return main


def corpus_of(dataset: str) -> str:
    """Which documents a merged dataset holds: "warm" (warmstart/merged, iterN/warm) or "rest"."""
    stage, name = dataset.split("/")
    return "warm" if stage == "warmstart" or name == "warm" else "rest"


def raw_data(matched: list[Training]) -> tuple[str, ...]:
    """The raw baselines' data: the documents the matched run trained on, without latents."""
    corpora = {corpus_of(d) for t in matched for d in t.data}
    return tuple(f"raw/{c}" for c in ("warm", "rest") if c in corpora)


def train_flops(model: ModelConfig, tokens: int) -> float:
    """Training FLOPs of `tokens` tokens: 3x the forward's matmuls (forward + backward), the
    forward being 2 FLOPs per weight of the dense layers and the output layer plus causal
    attention's scores and values (2 * seq_len * hidden per layer and token, half of the square).
    The estimate of Kaplan et al. (6N per token) with the attention term of Megatron-LM's
    `num_floating_point_operations`. Embedding lookups cost nothing."""
    d, kv = model.hidden_size, model.kv_heads * (model.hidden_size // model.num_attention_heads)
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * model.ffn  # q, o; k, v; SwiGLU up, gate, down
    weights = model.num_layers * per_layer + d * model.vocab_size
    forward = 2 * weights + 2 * model.num_layers * model.seq_len * d
    return 3.0 * forward * tokens


def flops_matched_steps(matched: list[Training], models: dict[str, ModelConfig], raw: RunConfig) -> int:
    """Steps of `raw`'s config whose training FLOPs reach those of the `matched` trainings."""
    target = sum(train_flops(models[t.stage], t.tokens) for t in matched)
    per_step = train_flops(raw.model, raw.train.global_batch * raw.model.seq_len)
    return max(1, math.ceil(target / per_step - 1e-9))


def token_matched_steps(matched: list[Training], raw_shares: dict[str, float], raw: RunConfig) -> int:
    """Steps of `raw`'s config that read as many raw tokens as the `matched` trainings read inside
    their latent data. `raw_shares[stage]` is the share of raw-text tokens (chunk text, BOS, EOS)
    in that stage's training data (see `raw_share`)."""
    target = sum(t.tokens * raw_shares[t.stage] for t in matched)
    return max(1, math.ceil(target / (raw.train.global_batch * raw.model.seq_len) - 1e-9))


def raw_share(summaries: list) -> float:
    """Share of raw-text tokens in a blend of merged datasets (MergeSummary each) whose weights are
    their tokens per epoch: everything but the latents and their special tokens."""
    total = sum(s.tokens / s.epochs for s in summaries)
    raw = sum((s.tokens - s.latent_tokens - s.special_tokens) / s.epochs for s in summaries)
    return raw / total if total else 1.0


def raw_trainings(cfg: EMConfig, matched: list[Training], models: dict[str, ModelConfig], raw: RunConfig,
                  raw_shares: dict[str, float] | None) -> list[Training]:
    """The raw baselines of `cfg.raw_baselines`, from the base model. The token-matched one needs
    `raw_shares` (after the latent data is merged); without it only the FLOPs-matched is planned."""
    out = []
    for kind in cfg.raw_baselines:
        if kind == "flops":
            steps = flops_matched_steps(matched, models, raw)
        elif raw_shares is None:
            continue
        else:
            steps = token_matched_steps(matched, raw_shares, raw)
        out.append(Training(f"raw_{kind}", raw_data(matched), None, steps, raw.train.global_batch, raw.model.seq_len))
    return out


def format_plan(trainings: list[Training], flops: dict[str, float]) -> str:
    """The plan as a table: stage, start, steps x batch x seq = tokens, training FLOPs, data."""
    head = f"{'stage':<12} {'from':<10} {'steps':>8} {'batch':>6} {'seq':>6} {'tokens':>14} {'FLOPs':>10}  data"
    lines = [head, "-" * len(head)]
    for t in trainings:
        lines.append(f"{t.stage:<12} {t.start or 'base':<10} {t.steps:>8} {t.global_batch:>6} {t.seq_len:>6} "
                     f"{t.tokens:>14,} {flops[t.stage]:>10.3g}  {' + '.join(t.data)}")
    return "\n".join(lines)
