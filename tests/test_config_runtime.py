"""Config parsing/validation and process-group environment detection (no processes started)."""

from __future__ import annotations

import os

import pytest
from conftest import TINY_CONFIG, bolt

from megatron_bolt.config import load_config, validate
from megatron_bolt.errors import UserError
from megatron_bolt.runtime import detect_env, first_slurm_host


def test_yaml_and_dotted_overrides():
    cfg = load_config(TINY_CONFIG, ["train.steps=7", "parallel.tp=2", "data.prefixes=[1.0, a, 2, b]", "model.fp8=null"])
    assert cfg.train.steps == 7 and cfg.parallel.tp == 2
    assert cfg.data.prefixes == [1.0, "a", 2, "b"]
    assert cfg.model.num_query_groups == 2 and cfg.model.kv_heads == 2
    assert cfg.train.lr == pytest.approx(3e-3)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["nonsense=1"], "unknown config key 'nonsense'"),
        (["model.layers=2"], "unknown config key 'model.layers'"),
        (["train.bf16=maybe"], "config key 'train.bf16': expected true/false"),
        (["parallel.tp=3"], "parallel.tp (3) must divide model.num_attention_heads"),
        (["model.num_query_groups=3"], "config key 'model.num_query_groups': 3 must divide model.num_attention_heads (4)"),
        (["parallel.pp=3"], "parallel.pp (3) must divide model.num_layers"),
        (["train.global_batch=6"], "config key 'train.micro_batch': 4 must divide train.global_batch (6)"),
        (["model.fp8=e5m2"], "config key 'model.fp8': expected one of null, 'hybrid', 'e4m3', got 'e5m2'"),
        (["model.fp8=hybrid", "model.transformer_impl=local"], "needs the Transformer Engine layer spec"),
        (["model.fp8_recipe=fancy"], "config key 'model.fp8_recipe': expected one of 'delayed', 'tensorwise'"),
        (["model.recompute_granularity=full"], "needs model.recompute_method (uniform|block)"),
        (["model.recompute_granularity=full", "model.recompute_method=block", "model.recompute_num_layers=3"],
         "'model.recompute_num_layers': expected 1..2"),
        (["model.recompute_method=uniform"], "apply to recompute_granularity=full only"),
        (["model.recompute_granularity=selective", "model.recompute_modules=[moe]"],
         "'model.recompute_modules[0]': expected one of 'core_attn', 'mlp', 'layernorm', got 'moe'"),
        (["train.lr_decay_style=WSD"], "needs train.lr_wsd_decay_iters"),
        (["train.lr_decay_style=step"], "'train.lr_decay_style': expected one of 'cosine'"),
        (["parallel.cp=2", "model.transformer_impl=local"], "parallel.cp > 1 needs Transformer Engine"),
        (["parallel.cp=3"], "model.seq_len (128) must be divisible by 2 * parallel.cp (6)"),
        (["train.steps"], "not of the form key=value"),
    ],
)
def test_bad_config_messages(overrides, message):
    with pytest.raises(UserError, match=None) as err:
        load_config(TINY_CONFIG, overrides)
    assert message in str(err.value)


def test_world_size_checks():
    cfg = load_config(TINY_CONFIG, ["parallel.tp=2"])
    validate(cfg, 4)  # dp = 2: 8 = 4 * 2 * 1
    with pytest.raises(UserError, match="not divisible by tp"):
        validate(cfg, 3)
    with pytest.raises(UserError, match="must be divisible by micro_batch"):
        validate(load_config(TINY_CONFIG, ["train.global_batch=4"]), 2)


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: [1, 2\n")
    with pytest.raises(UserError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(bad)


@pytest.mark.parametrize(
    "nodelist, host",
    [("gpu001", "gpu001"), ("gpu[003-005,9]", "gpu003"), ("gpu[12,14],cpu1", "gpu12"), ("a1,b2", "a1"), ("n[007-008]-ib", "n007-ib")],
)
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_env_from_torchrun_and_slurm():
    tr = detect_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234"})
    assert (tr.rank, tr.world_size, tr.local_rank, tr.master_addr, tr.master_port) == (3, 8, 1, "h", 1234)
    sl = detect_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                     "SLURM_JOB_NODELIST": "node[010-011]", "SLURM_JOB_ID": "4242"})
    assert (sl.rank, sl.world_size, sl.local_rank, sl.master_addr) == (5, 16, 1, "node010")
    assert sl.master_port == 20000 + 4242  # every task derives the same port from the job id


@pytest.mark.slow
def test_fp8_without_transformer_engine_is_one_line(synthetic_prefix, tmp_path):
    proc = bolt("train", str(TINY_CONFIG), "model.fp8=hybrid", f"data.prefixes=[{synthetic_prefix}]",
                f"output_dir={tmp_path}", check=False, timeout=300)
    assert proc.returncode == 2
    assert "needs Transformer Engine" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("text, value", [("1e-4", 1e-4), ("3E-4", 3e-4), ("1_000", 1000.0), (".5", 0.5), ("-2e+1", -20.0)])
def test_numbers_as_typed_on_the_command_line_and_in_yaml(tmp_path, text, value):
    # a float key without range checks (train.lr must lie above train.min_lr), so any sign parses
    cfg = load_config(TINY_CONFIG, [f"model.rope_base={text}", "train.steps=1_000", "train.warmup=1e2"])
    assert cfg.model.rope_base == pytest.approx(value) and cfg.train.steps == 1000 and cfg.train.warmup == 100
    path = tmp_path / "c.yaml"
    path.write_text(f"model:\n  rope_base: {text}\ntrain:\n  lr: {text if value > 0 else 1}\n  min_lr: 0\n"
                    "  steps: 2_000\n")
    cfg = load_config(path)
    assert cfg.model.rope_base == pytest.approx(value) and cfg.train.steps == 2000
    assert cfg.train.lr == pytest.approx(value if value > 0 else 1)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lr=1e-4x"], "config key 'train.lr': expected a number"),
        (["train.min_lr=-1e-5"], "config key 'train.min_lr': -1e-05 must be between 0 and train.lr"),
        (["train.steps=1.5"], "config key 'train.steps': expected an integer"),
        (["train.exit_signal=SIGFOO"], "config key 'train.exit_signal': expected a signal name"),
        (["parallel.vp=2"], "config key 'parallel.vp': 2 needs parallel.pp > 1"),
        (["parallel.pp=2", "parallel.vp=2"], "parallel.pp * parallel.vp (2*2) must divide model.num_layers (2)"),
        (["parallel.overlap_param_gather=true"], "needs train.distributed_optimizer=true"),
    ],
)
def test_new_key_errors(overrides, message):
    with pytest.raises(UserError) as err:
        load_config(TINY_CONFIG, overrides)
    assert message in str(err.value)


def test_package_metadata_takes_a_torch_range_and_make_setup_pins_it():
    import configparser

    from conftest import REPO

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    requires = [r.strip() for r in cfg["options"]["install_requires"].splitlines()
                if r.strip() and not r.strip().startswith("#")]
    torch_req = [r for r in requires if r.startswith("torch")]
    assert torch_req and "==" not in torch_req[0] and ">=" in torch_req[0], torch_req
    assert "pip install -q torch==2.13.0" in (REPO / "Makefile").read_text()


def test_ponder_section_and_the_old_spelling_under_model(tmp_path):
    from conftest import REPO

    cfg = load_config(REPO / "examples/ponder/config.yaml", ["ponder.latents_per_token=2", "ponder.embed_scale=1.5"])
    assert cfg.model.type == "ponder" and cfg.ponder.latents_per_token == 2 and cfg.ponder.jacobi_iters == [2, 3]
    assert cfg.ponder.scale(cfg.model.hidden_size) == 1.5
    assert load_config(TINY_CONFIG).ponder.scale(64) == pytest.approx((2.5 * 64) ** 0.5)  # the reference's default
    with pytest.raises(UserError) as err:
        load_config(TINY_CONFIG, ["model.jacobi_iters=[4]"])
    assert str(err.value) == "config key 'model.jacobi_iters' has moved: write it as 'ponder.jacobi_iters'"
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  type: ponder\n  latents_per_token: 2\n")
    with pytest.raises(UserError, match="'model.latents_per_token' has moved: write it as 'ponder.latents_per_token'"):
        load_config(old)
    for override, message in [("ponder.latents_per_token=0", "'ponder.latents_per_token': expected >= 1, got 0"),
                              ("ponder.jacobi_iters=[]", "'ponder.jacobi_iters': expected a non-empty list"),
                              ("ponder.embed_scale=-1", "'ponder.embed_scale': expected > 0 or null")]:
        with pytest.raises(UserError) as err:
            load_config(TINY_CONFIG, [override])
        assert message in str(err.value)


def test_a_checkpoint_saved_before_the_ponder_section_reads_with_its_keys_moved(tmp_path):
    import yaml

    from megatron_bolt.config import RunConfig
    from megatron_bolt.training.checkpoint import RUN_CONFIG, read_run_config

    saved = RunConfig().to_dict()
    del saved["ponder"]
    saved["model"].update(type="ponder", latents_per_token=3, jacobi_iters=[1], eval_jacobi_iters=5, embed_scale=2.0)
    (tmp_path / RUN_CONFIG).write_text(yaml.safe_dump(saved))
    cfg = read_run_config(tmp_path)
    assert cfg.model.type == "ponder"
    assert (cfg.ponder.latents_per_token, cfg.ponder.jacobi_iters, cfg.ponder.eval_jacobi_iters,
            cfg.ponder.embed_scale) == (3, [1], 5, 2.0)


def test_sections_built_in_code_are_checked_by_validate():
    """validate() runs every section's own checks (Literal choices included), not only YAML loading."""
    from megatron_bolt.config import (
        ModelConfig,
        ParallelConfig,
        PonderConfig,
        RunConfig,
        TrainConfig,
        section_problems,
    )

    validate(RunConfig())
    cases = [
        (RunConfig(model=ModelConfig(fp8="e5m2")), "config key 'model.fp8': expected one of null, 'hybrid', 'e4m3'"),
        (RunConfig(model=ModelConfig(recompute_modules=["mlp", "moe"])), "'model.recompute_modules[1]'"),
        (RunConfig(parallel=ParallelConfig(cp=0)), "config key 'parallel.cp': expected >= 1, got 0"),
        (RunConfig(model=ModelConfig(num_attention_heads=0)), "config key 'model.num_attention_heads': expected >= 1"),
        (RunConfig(model=ModelConfig(num_query_groups=0)), "config key 'model.num_query_groups': expected >= 1"),
        (RunConfig(train=TrainConfig(lr_decay_style="step")), "'train.lr_decay_style': expected one of 'cosine'"),
        (RunConfig(ponder=PonderConfig(latents_per_token=0)), "'ponder.latents_per_token': expected >= 1"),
        # across sections, after each section's own checks
        (RunConfig(parallel=ParallelConfig(tp=3)), "parallel.tp (3) must divide model.num_attention_heads (4)"),
    ]
    for cfg, message in cases:
        with pytest.raises(UserError) as err:
            validate(cfg)
        assert message in str(err.value)
    # a section lists all its problems, each naming its own field
    fields = [key for key, _ in section_problems(TrainConfig(micro_batch=0, eval_iters=0, adam_beta2=1.0))]
    assert fields == ["micro_batch", "eval_iters", "adam_beta2"]


def test_a_lone_process_in_a_batch_allocation_is_the_only_rank(monkeypatch):
    """sbatch's batch step has SLURM_PROCID/SLURM_NTASKS but no SLURM_STEP_ID: not a rank of
    SLURM_NTASKS, and rank_env() says so without touching os.environ."""
    from megatron_bolt import runtime

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[001-002]")
    before = dict(os.environ)
    env = runtime.rank_env()
    assert (env.rank, env.world_size, env.master_addr) == (0, 1, "127.0.0.1")
    monkeypatch.setenv("SLURM_STEP_ID", "0")  # under srun: a rank of the step
    assert runtime.rank_env().world_size == 8 and runtime.rank_env().master_addr == "gpu001"
    monkeypatch.delenv("SLURM_STEP_ID")
    assert dict(os.environ) == before


def test_init_distributed_writes_no_environment_and_needs_the_cpu_layer_entered(monkeypatch):
    import torch
    import torch.distributed as dist
    from conftest import free_port

    from megatron_bolt import runtime
    from megatron_bolt.compat import cpu as cpu_compat

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    # library code does not enter the CPU layer itself: without CUDA and without install(), an error
    monkeypatch.setattr(cpu_compat, "_installed", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"call megatron_bolt.compat.cpu.install\(\) first"):
        runtime.init_distributed(env=runtime.DistEnv(0, 1, 0, "127.0.0.1", free_port()))
    monkeypatch.undo()
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    cpu_compat.install()
    before = dict(os.environ)
    port = free_port()
    try:
        env = runtime.init_distributed(env=runtime.DistEnv(0, 1, 0, "127.0.0.1", port))
        assert env.master_port == port and dist.get_world_size() == 1
    finally:
        runtime.shutdown()
    assert dict(os.environ) == before  # the rendezvous address went to init_process_group, not to os.environ
