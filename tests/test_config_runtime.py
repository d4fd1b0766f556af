"""Config parsing/validation and process-group environment detection (no processes started)."""

from __future__ import annotations

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
        (["model.num_query_groups=3"], "model.num_query_groups (3) must divide"),
        (["parallel.pp=3"], "parallel.pp (3) must divide model.num_layers"),
        (["train.global_batch=6"], "train.micro_batch (4) must divide train.global_batch (6)"),
        (["model.fp8=e5m2"], "model.fp8: expected null"),
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
