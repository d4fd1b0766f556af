"""The settings a GPU run uses, run on CPU (issue 15): gloo process groups off, bf16 with the
plain and the distributed optimizer, weights-only loads, checkpoint formats, resume without
optimizer state, scheduler overrides, Transformer Engine `_extra_state` keys, and a spy checking
that what reaches Megatron-Core is what a CUDA run passes. Single process, in this process."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIG

from megatron_bolt.config import load_config
from megatron_bolt.errors import UserError

FAST = ["train.warmup=1", "train.log_interval=100", "model.seq_len=64", "train.micro_batch=2",
        "train.global_batch=4"]


@pytest.fixture
def rank_env(monkeypatch, megatron_cpu):
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)


def _cfg(tmp_path: Path, name: str, prefix: str, *overrides: str):
    return load_config(TINY_CONFIG, [f"output_dir={tmp_path / name}", f"data.prefixes=[{prefix}]",
                                     f"data.cache_dir={tmp_path / 'cache'}", *FAST, *overrides])


def _train(cfg) -> dict:
    from megatron_bolt import runtime
    from megatron_bolt.training.loop import train

    try:
        return train(cfg)
    finally:
        runtime.shutdown()


def _metrics(cfg) -> dict[int, dict]:
    lines = (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


def _rewind(cfg, step: int) -> None:
    """Make `step` the latest checkpoint, as if the run had been killed after saving it."""
    (Path(cfg.checkpoint_dir) / "latest_checkpointed_iteration.txt").write_text(f"{step}\n")


@pytest.mark.parametrize("distributed", [False, True], ids=["plain", "distopt"])
def test_optimizer_builds_without_gloo_groups(rank_env, tmp_path, synthetic_prefix, distributed):
    """Defect 1: the parallel state without gloo groups (what a CUDA run used) and the optimizer
    must be built with the same flag."""
    cfg = _cfg(tmp_path, "nogloo", synthetic_prefix, "train.steps=2", "parallel.gloo_process_groups=false",
               f"train.distributed_optimizer={str(distributed).lower()}", "train.bf16=true")
    last = _train(cfg)
    assert last["step"] == 2 and math.isfinite(last["loss"])


@pytest.mark.parametrize("distributed", [False, True], ids=["plain", "distopt"])
def test_bf16_weights_only_load_is_not_undone_by_the_first_step(rank_env, tmp_path, synthetic_prefix, distributed):
    """Defect 2: with lr ~ 0 a model started from a trained checkpoint keeps its loss; before the
    fix the first optimizer step copied the random initial weights back (loss jumped up)."""
    trained = _cfg(tmp_path, "trained", synthetic_prefix, "train.steps=20", "train.bf16=true")
    _train(trained)
    trained_loss = _metrics(trained)[20]["loss"]
    flag = str(distributed).lower()
    cfg = _cfg(tmp_path, "ft", synthetic_prefix, "train.steps=3", "train.bf16=true", "train.lr=1e-9",
               "train.min_lr=0", f"train.distributed_optimizer={flag}", f"checkpoint.load={trained.checkpoint_dir}")
    _train(cfg)
    losses = [r["loss"] for r in _metrics(cfg).values()]
    fresh = _cfg(tmp_path, "fresh", synthetic_prefix, "train.steps=1", "train.bf16=true")
    _train(fresh)
    random_loss = _metrics(fresh)[1]["loss"]
    assert random_loss - trained_loss > 0.3, (random_loss, trained_loss)  # the check is not vacuous
    assert max(losses) < trained_loss + 0.15, (losses, trained_loss)


@pytest.mark.parametrize("distributed", [False, True], ids=["plain", "distopt"])
def test_bf16_checkpoint_with_optimizer_resumes_exactly(rank_env, tmp_path, synthetic_prefix, distributed):
    """Defect 3: bf16 + plain optimizer could not save optimizer state ('Param id ... does not
    match'); a resume from step 2 must reproduce steps 3-4."""
    flag = str(distributed).lower()
    cfg = _cfg(tmp_path, "bf16", synthetic_prefix, "train.steps=4", "train.bf16=true",
               f"train.distributed_optimizer={flag}", "checkpoint.save_interval=2")
    _train(cfg)
    reference = _metrics(cfg)
    _rewind(cfg, 2)
    _train(cfg)
    resumed = _metrics(cfg)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5)


def test_resume_without_optimizer_state(rank_env, tmp_path, synthetic_prefix):
    """Defect 7a: a checkpoint.save_optimizer=false run resumes (fresh Adam moments)."""
    cfg = _cfg(tmp_path, "noopt", synthetic_prefix, "train.steps=4", "checkpoint.save_interval=2",
               "checkpoint.save_optimizer=false", "train.distributed_optimizer=true", "train.bf16=true")
    _train(cfg)
    first = _metrics(cfg)
    _rewind(cfg, 2)
    _train(cfg)
    resumed = _metrics(cfg)
    assert sorted(resumed) == [1, 2, 3, 4]
    # the weights were restored: step 3 is close to the uninterrupted run, not a fresh model's loss
    assert abs(resumed[3]["loss"] - first[3]["loss"]) < 0.1


def _scheduled_lr(step: int, lr: float, min_lr: float, warmup: int, steps: int) -> float:
    """OptimizerParamScheduler's cosine schedule after `step` increments (init_lr 0)."""
    if step <= warmup:
        return lr * step / warmup
    ratio = (step - warmup) / (max(steps, warmup + 1) - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (math.cos(math.pi * ratio) + 1.0)


def test_changed_schedule_overrides_the_checkpoint(rank_env, tmp_path, synthetic_prefix):
    """Defect 7b: steps, lr, min_lr and warmup changed between runs take effect on resume
    (Megatron-LM's --override-opt_param-scheduler)."""
    first = _cfg(tmp_path, "sched", synthetic_prefix, "train.steps=3", "train.warmup=1")
    _train(first)
    longer = _cfg(tmp_path, "sched", synthetic_prefix, "train.steps=8", "train.warmup=2", "train.lr=1e-3",
                  "train.min_lr=1e-4")
    _train(longer)
    lrs = {s: r["lr"] for s, r in _metrics(longer).items()}
    assert sorted(lrs) == list(range(1, 9))
    for step in range(4, 9):
        assert lrs[step] == pytest.approx(_scheduled_lr(step, 1e-3, 1e-4, 2, 8), rel=1e-6), step


def test_checkpoint_records_its_optimizer_format(rank_env, tmp_path, synthetic_prefix):
    """Defect 6: distributed-optimizer state is dp_reshardable by default, fully_reshardable on
    request, and the format is in the checkpoint's content metadata (read back on load)."""
    from megatron.core import dist_checkpointing

    formats = {}
    for name, extra in (("dp", []), ("full", ["checkpoint.optim_fully_reshardable=true"])):
        cfg = _cfg(tmp_path, name, synthetic_prefix, "train.steps=1", "train.distributed_optimizer=true", *extra)
        _train(cfg)
        path = Path(cfg.checkpoint_dir) / "iter_0000001"
        formats[name] = dist_checkpointing.load_content_metadata(str(path))["distrib_optim_sharding_type"]
    assert formats == {"dp": "dp_reshardable", "full": "fully_reshardable"}


def test_async_save_resumes_exactly(rank_env, tmp_path, synthetic_prefix):
    """checkpoint.async_save: the checkpoint is complete once training returns and resumes exactly."""
    cfg = _cfg(tmp_path, "async", synthetic_prefix, "train.steps=4", "checkpoint.save_interval=2",
               "checkpoint.async_save=true", "train.distributed_optimizer=true")
    _train(cfg)
    reference = _metrics(cfg)
    assert (Path(cfg.checkpoint_dir) / "iter_0000004").is_dir()
    assert not list(Path(cfg.checkpoint_dir).glob(".tmp_*"))
    _rewind(cfg, 2)
    _train(cfg)
    resumed = _metrics(cfg)
    for step in (3, 4):
        assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5)


class _WithExtraState:
    """Mixin giving a module a Transformer-Engine-like `_extra_state` entry."""

    def get_extra_state(self):
        return torch.tensor([1.0])

    def set_extra_state(self, state):
        self.extra_state_loaded = state


def _add_extra_state(model) -> int:
    count = 0
    for layer in model.decoder.layers:
        module = layer.self_attention.linear_proj
        module.__class__ = type("TELike" + type(module).__name__, (_WithExtraState, type(module)), {})
        count += 1
    return count


def test_local_checkpoint_loads_into_a_model_with_extra_state(rank_env, tmp_path, synthetic_prefix):
    """Defect 5: a local-spec checkpoint loads into a model whose sharded state dict has
    `_extra_state` entries the checkpoint lacks; any other absent entry is still an error."""
    from megatron_bolt import runtime
    from megatron_bolt.training import checkpoint as ckpt
    from megatron_bolt.training.loop import build_model

    cfg = _cfg(tmp_path, "te", synthetic_prefix)
    runtime.init_distributed(1, 1, cfg.train.seed)
    try:
        source = build_model(cfg, wrap_ddp=False)
        ckpt.save_checkpoint(tmp_path / "ckpt", 1, [source], cfg=cfg)
        target = build_model(cfg, wrap_ddp=False)
        with torch.no_grad():
            for p in target.parameters():
                p.zero_()
        assert _add_extra_state(target) == cfg.model.num_layers
        assert any(k.endswith("_extra_state") for k in target.sharded_state_dict())
        ckpt.load_checkpoint(tmp_path / "ckpt", [target])
        for (name, a), b in zip(source.named_parameters(), target.parameters()):
            assert torch.equal(a, b), name

        other = build_model(cfg, wrap_ddp=False)
        other.decoder.layers[0].mlp.register_parameter("extra_weight", torch.nn.Parameter(torch.zeros(3)))
        with pytest.raises(Exception, match="extra_weight"):
            ckpt.load_checkpoint(tmp_path / "ckpt", [other])
    finally:
        runtime.shutdown()


def test_megatron_core_gets_the_cuda_settings(rank_env, tmp_path, synthetic_prefix, monkeypatch):
    """The blind spot: the arguments given to Megatron-Core on CPU are those of a CUDA run.

    `settings.megatron_settings` is computed from the config alone (asserted by computing it with
    CUDA reported present), and a CPU training run is spied on to pass exactly those values to
    initialize_model_parallel, DDP, get_megatron_optimizer and the checkpoint save."""
    import megatron.core.parallel_state as ps
    from megatron.core import dist_checkpointing

    from megatron_bolt.training import loop, settings

    cfg = _cfg(tmp_path, "spy", synthetic_prefix, "train.steps=1", "train.bf16=true",
               "train.distributed_optimizer=true", "parallel.gloo_process_groups=false")
    expected = settings.megatron_settings(cfg)
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        assert repr(settings.megatron_settings(cfg)) == repr(expected)
    assert expected["initialize_model_parallel"]["create_gloo_process_groups"] is False
    assert expected["get_megatron_optimizer"] == {"use_gloo_process_groups": False}
    assert expected["optimizer_config"].bf16 and expected["params_dtype"] == torch.bfloat16
    assert expected["checkpoint_metadata"]["distrib_optim_sharding_type"] == "dp_reshardable"

    seen: dict = {}

    def spy(name, real, record):
        def wrapper(*args, **kwargs):
            seen[name] = record(*args, **kwargs)
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(ps, "initialize_model_parallel",
                        spy("init", ps.initialize_model_parallel, lambda **kw: kw))
    monkeypatch.setattr(loop, "get_megatron_optimizer",
                        spy("optimizer", loop.get_megatron_optimizer, lambda c, m, **kw: (c, kw)))
    monkeypatch.setattr(loop, "DistributedDataParallel",
                        spy("ddp", loop.DistributedDataParallel, lambda **kw: kw["ddp_config"]))
    monkeypatch.setattr(dist_checkpointing, "save",
                        spy("save", dist_checkpointing.save, lambda *a, **kw: kw["content_metadata"]))
    _train(cfg)
    assert seen["init"] == expected["initialize_model_parallel"]
    assert repr(seen["optimizer"][0]) == repr(expected["optimizer_config"])
    assert seen["optimizer"][1] == expected["get_megatron_optimizer"]
    assert repr(seen["ddp"]) == repr(expected["ddp_config"])
    assert seen["save"] == expected["checkpoint_metadata"]


def test_validation_loss_and_perplexity(rank_env, tmp_path, synthetic_prefix):
    """train.eval_interval / eval_iters on a data.split share: metrics.jsonl and TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tmp_path, "valid", synthetic_prefix, "train.steps=4", "train.eval_interval=2",
               "train.eval_iters=2", "data.split=90,10,0")
    _train(cfg)
    records = _metrics(cfg)
    assert [s for s, r in records.items() if "valid_loss" in r] == [2, 4]
    for step in (2, 4):
        assert records[step]["valid_ppl"] == pytest.approx(math.exp(records[step]["valid_loss"]))
    assert records[4]["valid_loss"] < records[2]["valid_loss"]  # the model learns
    events = EventAccumulator(str(Path(cfg.output_dir) / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("valid/loss")] == [2, 4]
    assert "valid/ppl" in events.Tags()["scalars"]


def test_validation_on_its_own_prefixes(rank_env, tmp_path, synthetic_prefix):
    cfg = _cfg(tmp_path, "vprefix", synthetic_prefix, "train.steps=2", "train.eval_interval=1",
               "train.eval_iters=1", "data.split=100,0,0", f"data.valid_prefixes=[{synthetic_prefix}]")
    _train(cfg)
    assert all("valid_loss" in r for r in _metrics(cfg).values())


def test_eval_interval_without_validation_data_is_a_clear_error(rank_env, tmp_path, synthetic_prefix):
    cfg = _cfg(tmp_path, "novalid", synthetic_prefix, "train.steps=2", "train.eval_interval=1",
               "data.split=100,0,0")
    with pytest.raises(UserError, match="no validation data"):
        _train(cfg)


def test_exit_duration_saves_and_stops(rank_env, tmp_path, synthetic_prefix):
    """train.exit_duration_mins (Megatron's --exit-duration-in-mins): a checkpoint at the step it stopped."""
    cfg = _cfg(tmp_path, "duration", synthetic_prefix, "train.steps=50", "train.exit_duration_mins=1e-6")
    last = _train(cfg)
    assert last["step"] == 1 and "exit_duration_mins" in last["stopped"]
    assert (Path(cfg.checkpoint_dir) / "latest_checkpointed_iteration.txt").read_text().strip() == "1"


def test_exit_signal_handler_records_and_restores():
    import signal

    from megatron_bolt.training.exit import ExitSignalHandler

    before = signal.getsignal(signal.SIGUSR1)
    handler = ExitSignalHandler("SIGUSR1")
    try:
        assert not handler.received
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.received and handler.name == "SIGUSR1"
    finally:
        handler.restore()
    assert signal.getsignal(signal.SIGUSR1) == before
