"""Megatron features a cluster run needs: recomputation, fused-kernel choice, FP8 options, context
parallelism's requirement, lr decay styles, the FLOPs/MFU figures and shard-local initialisation."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, TINY_CONFIG, bolt

from megatron_bolt.config import ModelConfig, ParallelConfig, TrainConfig, load_config
from megatron_bolt.errors import UserError
from megatron_bolt.models.gpt import FUSED_KERNELS, check_requirements, fused_kernels, transformer_config
from megatron_bolt.models.init import canonical_slices, shard_init
from megatron_bolt.training.flops import llama_flops_per_step, mfu, peak_tflops
from megatron_bolt.training.schedule import build_scheduler

# ---------------------------------------------------------------- initialisation


def _param(shape, partition_dim=None):
    p = torch.nn.Parameter(torch.empty(shape))
    if partition_dim is not None:
        p.tensor_model_parallel, p.partition_dim = True, partition_dim
    return p


CFG = ModelConfig(num_layers=4)


@pytest.mark.parametrize("name, full, dim", [
    ("decoder.layers.3.self_attention.linear_qkv.weight", (24, 16), 0),  # column-parallel
    ("decoder.layers.1.self_attention.linear_proj.weight", (16, 12), 1),  # row-parallel
    ("decoder.layers.0.mlp.linear_fc2.weight", (16, 40), 1),
    ("embedding.word_embeddings.weight", (32, 16), 0),  # vocab-parallel
    ("output_layer.weight", (32, 16), 0),
])
@pytest.mark.parametrize("tp", [2, 4])
def test_tp_shards_are_slices_of_the_tp1_tensor(name, full, dim, tp):
    whole = shard_init(name, _param(full, dim), CFG, seed=7, tp_rank=0, tp=1)
    shape = list(full)
    shape[dim] //= tp
    shards = [shard_init(name, _param(tuple(shape), dim), CFG, seed=7, tp_rank=r, tp=tp) for r in range(tp)]
    assert all(s.shape == tuple(shape) for s in shards)
    assert torch.equal(torch.cat(shards, dim=dim), whole)
    # a real draw with the configured std (scaled for output projections), and seed-dependent
    std = CFG.init_std / math.sqrt(2 * CFG.num_layers) if "proj" in name or "fc2" in name else CFG.init_std
    assert abs(whole.std().item() - std) < 0.25 * std
    assert not torch.equal(whole, shard_init(name, _param(full, dim), CFG, seed=8, tp_rank=0, tp=1))


def test_swiglu_fc1_shards_hold_their_gate_and_up_rows():
    name = "decoder.layers.0.mlp.linear_fc1.weight"
    whole = shard_init(name, _param((40, 16), 0), CFG, seed=1, tp_rank=0, tp=1)
    gate, up = whole.chunk(2, dim=0)
    for r in range(2):
        shard = shard_init(name, _param((20, 16), 0), CFG, seed=1, tp_rank=r, tp=2)
        assert torch.equal(shard, torch.cat([gate.chunk(2)[r], up.chunk(2)[r]]))


def test_norms_are_ones_and_unsplit_params_ignore_tp():
    norm = shard_init("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", _param((16,)), CFG, 1, 1, 2)
    assert torch.equal(norm, torch.ones(16))
    # not TP-partitioned: every rank gets the whole tensor
    a = shard_init("decoder.final_layernorm.weight", _param((16,)), CFG, 1, 0, 2)
    assert torch.equal(a, torch.ones(16))


def test_a_shard_of_a_huge_tensor_is_built_without_the_full_tensor():
    # The canonical tensor would be 2**20 x 2**13 floats (32 GiB); rank 5 of 2**19 holds 2 rows.
    start = time.time()
    shard = canonical_slices("output_layer.weight", (2**20, 2**13), 0, [10, 11], CFG, seed=3)
    assert shard.shape == (2, 2**13) and time.time() - start < 5
    assert torch.equal(shard[1], canonical_slices("output_layer.weight", (2**20, 2**13), 0, [11], CFG, 3)[0])


# ---------------------------------------------------------------- lr schedules


def _lrs(steps=20, **train):
    t = TrainConfig(steps=steps, lr=1.0, min_lr=0.1, warmup=4, weight_decay=0.0, **train)
    opt = SimpleNamespace(param_groups=[{}])
    sched = build_scheduler(opt, t)
    out = []
    for _ in range(steps + 2):
        sched.step(1)
        out.append(opt.param_groups[0]["lr"])
    return out  # out[i] = lr after i+1 steps


def _cosine(step, warmup=4, decay=20):
    r = (step - warmup) / (decay - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * r))


def test_warmup_then_cosine_to_min_lr():
    lrs = _lrs()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    for step in range(5, 21):
        assert lrs[step - 1] == pytest.approx(_cosine(step)), step
    assert lrs[20] == pytest.approx(0.1)  # past the decay: min_lr


def test_linear_decay_and_lr_decay_iters():
    lrs = _lrs(lr_decay_style="linear", lr_decay_iters=12)
    assert lrs[7] == pytest.approx(0.1 + 0.9 * (1 - (8 - 4) / 8))
    assert lrs[11] == pytest.approx(0.1) and lrs[15] == pytest.approx(0.1)


@pytest.mark.parametrize("style, coeff", [
    ("exponential", lambda r: 2 * 0.5**r - 1),
    ("linear", lambda r: 1 - r),
    ("cosine", lambda r: 0.5 * (1 + math.cos(math.pi * r))),
    ("minus_sqrt", lambda r: 1 - math.sqrt(r)),
])
def test_wsd_holds_the_peak_then_decays_over_the_last_iters(style, coeff):
    lrs = _lrs(lr_decay_style="WSD", lr_wsd_decay_style=style, lr_wsd_decay_iters=5)
    assert lrs[4:15] == pytest.approx([1.0] * 11)  # stable phase: steps 5..15
    for step in range(16, 21):
        assert lrs[step - 1] == pytest.approx(0.1 + 0.9 * coeff((step - 15) / 5)), (style, step)
    assert lrs[19] == pytest.approx(0.1)


# ---------------------------------------------------------------- FLOPs and MFU


def _hand_count(m: ModelConfig, batch: int, vocab: int) -> float:
    """Forward GEMMs listed one by one (m x k @ k x n = 2mkn), times 3 for the two backward GEMMs."""
    s, h = m.seq_len, m.hidden_size
    d = h // m.num_attention_heads
    tokens = batch * s
    gemms = [
        (tokens, h, m.num_attention_heads * d),  # q
        (tokens, h, m.kv_heads * d), (tokens, h, m.kv_heads * d),  # k, v
        (tokens, m.num_attention_heads * d, h),  # output projection
        (tokens, h, m.ffn), (tokens, h, m.ffn),  # gate, up
        (tokens, m.ffn, h),  # down
    ]
    per_layer = sum(2 * a * b * c for a, b, c in gemms)
    # scores and weighted values per head: [s, d] @ [d, s] and [s, s] @ [s, d]; causal: half of each
    per_layer += batch * m.num_attention_heads * 2 * (2 * s * d * s) / 2
    logits = 2 * tokens * h * vocab
    return 3 * (m.num_layers * per_layer + logits)


@pytest.mark.parametrize("shape", [
    dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=192, seq_len=128),
    dict(num_layers=22, hidden_size=2048, num_attention_heads=32, num_query_groups=4, ffn_hidden_size=5632,
         seq_len=2048),  # TinyLlama
])
def test_flops_formula_matches_a_hand_count(shape):
    m = ModelConfig(**shape)
    assert llama_flops_per_step(m, 8, 32000) == pytest.approx(_hand_count(m, 8, 32000), rel=1e-12)


def test_tinyllama_flops_are_near_six_n_t_and_mfu_divides_by_peak():
    m = ModelConfig(num_layers=22, hidden_size=2048, num_attention_heads=32, num_query_groups=4,
                    ffn_hidden_size=5632, seq_len=2048, vocab_size=32000)
    flops = llama_flops_per_step(m, 1, 32000)
    params = 22 * (2048 * (2048 + 2 * 256 + 2048) + 3 * 2048 * 5632) + 2048 * 32000  # matmul weights
    assert 1.0 < flops / (6 * params * 2048) < 1.25  # attention adds ~ s / (6 h) on top of 6NT
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.0 and peak_tflops("cpu") is None and peak_tflops("x", 5.0) == 5.0
    assert mfu(989e12 * 0.5, 1.0, 1, 989.0) == pytest.approx(0.5)
    assert mfu(4e12, 1.0, 4, 2.0) == pytest.approx(0.5)  # divided over the world size
    assert mfu(1.0, 1.0, 1, None) is None


@pytest.mark.slow  # a training run end to end
def test_metrics_carry_mfu_peak_memory_and_the_wsd_lr(tmp_path, synthetic_prefix):
    out = tmp_path / "run"
    bolt("train", str(TINY_CONFIG), f"output_dir={out}", f"data.prefixes=[{synthetic_prefix}]",
         f"data.cache_dir={tmp_path / 'cache'}", "train.steps=6", "train.warmup=1", "train.lr=0.01",
         "train.min_lr=0.001", "train.lr_decay_style=WSD", "train.lr_wsd_decay_iters=2",
         "train.lr_wsd_decay_style=linear", "train.peak_tflops=0.5", "train.adam_eps=0.000001")
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records]
    assert lrs == pytest.approx([0.01, 0.01, 0.01, 0.01, 0.0055, 0.001])  # hold, then linear over 2 steps
    cfg = load_config(TINY_CONFIG)
    flops = llama_flops_per_step(cfg.model, cfg.train.global_batch, cfg.model.padded_vocab_size(1))
    for r in records:
        seconds = cfg.train.global_batch * cfg.model.seq_len / r["tokens_per_s"]
        assert r["mfu"] == pytest.approx(flops / (seconds * 0.5e12), rel=1e-6)
        assert r["peak_mem_gib"] is None  # CPU: no device allocator (documented)


# ---------------------------------------------------------------- kernels, FP8, CP


def test_fused_kernels_follow_what_the_machine_has():
    m = ModelConfig()
    cpu = fused_kernels(m, cuda=False, importable=lambda _: True, te_rope_kernel=lambda: True)
    assert cpu == dict.fromkeys(FUSED_KERNELS, False)
    full = fused_kernels(m, cuda=True, importable=lambda _: True, te_rope_kernel=lambda: True, c_compiler=lambda: True)
    assert full == dict.fromkeys(FUSED_KERNELS, True)
    bare = fused_kernels(m, cuda=True, importable=lambda mod: mod == "triton", te_rope_kernel=lambda: False,
                         c_compiler=lambda: True)
    assert bare == {"gradient_accumulation_fusion": False, "bias_dropout_fusion": True,
                    "masked_softmax_fusion": False, "apply_rope_fusion": False}
    slim = fused_kernels(m, cuda=True, importable=lambda _: True, te_rope_kernel=lambda: True, c_compiler=lambda: False)
    assert not slim["bias_dropout_fusion"] and slim["apply_rope_fusion"]  # torch.compile needs a C compiler
    only_apex = fused_kernels(m, cuda=True, importable=lambda mod: mod == "fused_weight_gradient_mlp_cuda",
                              te_rope_kernel=lambda: False, c_compiler=lambda: True)
    assert only_apex["gradient_accumulation_fusion"] and not only_apex["masked_softmax_fusion"]
    m.bias_dropout_fusion = False  # an explicit choice wins
    assert not fused_kernels(m, cuda=True, importable=lambda _: True, te_rope_kernel=lambda: True,
                             c_compiler=lambda: True)["bias_dropout_fusion"]
    m.apply_rope_fusion = True
    with pytest.raises(UserError, match="model.apply_rope_fusion=true, but its kernel is not available"):
        fused_kernels(m, cuda=False)
    # this CPU machine: the TransformerConfig gets them all off
    tc = transformer_config(ModelConfig(), ParallelConfig())
    assert not any(getattr(tc, k) for k in FUSED_KERNELS)


def test_fp8_recipe_options_reach_transformer_config():
    m = ModelConfig(fp8="hybrid", fp8_recipe="tensorwise", fp8_margin=1, fp8_amax_history_len=16,
                    fp8_amax_compute_algo="max", fp8_wgrad=False)
    tc = transformer_config(m, ParallelConfig(), bf16=True)
    assert (tc.fp8, tc.fp8_recipe, tc.fp8_margin, tc.fp8_amax_history_len, tc.fp8_amax_compute_algo,
            tc.fp8_wgrad) == ("hybrid", "tensorwise", 1, 16, "max", False)
    assert transformer_config(ModelConfig(), ParallelConfig()).fp8 is None
    with pytest.raises(UserError, match="needs the Transformer Engine layer spec"):
        load_config(TINY_CONFIG, ["model.fp8=e4m3", "model.transformer_impl=local"])


def test_layernorm_recompute_without_transformer_engine_is_an_error():
    # megatron-core recomputes norms with its output-discarding checkpoint, which is built on TE
    m = ModelConfig(recompute_granularity="selective", recompute_modules=["core_attn", "layernorm"])
    with pytest.raises(UserError, match="'layernorm' needs Transformer Engine"):
        check_requirements(m, ParallelConfig())


def test_context_parallel_without_transformer_engine_is_one_line(tmp_path, synthetic_prefix):
    with pytest.raises(UserError, match="parallel.cp=2 needs Transformer Engine"):
        check_requirements(ModelConfig(), ParallelConfig(cp=2))
    proc = bolt("train", str(TINY_CONFIG), "parallel.cp=2", f"data.prefixes=[{synthetic_prefix}]",
                f"output_dir={tmp_path}", check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "parallel.cp=2 needs Transformer Engine" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- activation recomputation

_RECOMPUTE = '''
import json, sys
import torch
from megatron_bolt import runtime
from megatron_bolt.config import ModelConfig, ParallelConfig
from megatron_bolt.models.gpt import build_gpt
from megatron_bolt.compat import cpu as cpu_compat
from megatron_bolt.models.init import initialize_weights

cpu_compat.install()
runtime.init_distributed(tp=1, pp=1)
results = {}
tokens = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(0))
labels = torch.roll(tokens, -1, dims=1)
pos = torch.arange(32).unsqueeze(0).expand(2, -1)
for name, extra in json.loads(sys.argv[1]).items():
    cfg = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=128, vocab_size=500, seq_len=32, transformer_impl="local", **extra)
    model = build_gpt(cfg, ParallelConfig())
    initialize_weights(model, cfg, seed=5, layer_offset=0)
    calls = {"attn": 0, "layer": 0, "mlp": 0}
    for layer in model.decoder.layers:
        layer.register_forward_hook(lambda *a: calls.__setitem__("layer", calls["layer"] + 1))
        layer.self_attention.core_attention.register_forward_hook(
            lambda *a: calls.__setitem__("attn", calls["attn"] + 1))
        layer.mlp.register_forward_hook(lambda *a: calls.__setitem__("mlp", calls["mlp"] + 1))
    model.train()
    loss = model(tokens, pos, None, labels=labels).float().mean()
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    results[name] = (loss.item(), grads, dict(calls))
base_loss, base_grads, base_calls = results.pop("none")
assert base_calls == {"attn": 4, "layer": 4, "mlp": 4}, base_calls
for name, (loss, grads, calls) in results.items():
    assert loss == base_loss, (name, loss, base_loss)
    assert torch.allclose(grads, base_grads, rtol=1e-5, atol=1e-7), (name, (grads - base_grads).abs().max())
    print(name, json.dumps(calls), flush=True)
runtime.shutdown()
'''


def test_tinyllama_example_is_the_shape_the_gpu_check_reports():
    cfg = load_config(REPO / "examples" / "tinyllama" / "config.yaml")
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.kv_heads, m.ffn, m.vocab_size, m.seq_len) == (
        22, 2048, 32, 4, 5632, 32000, 2048)
    assert cfg.train.bf16 and cfg.train.distributed_optimizer
    assert cfg.train.steps == 30 and cfg.checkpoint.save_interval == 25  # bench/gpu_check.sh resumes from 25


def test_recomputation_gives_the_same_loss_and_grads_and_reruns_the_forward(tmp_path):
    cases = {
        "none": {},
        "selective": {"recompute_granularity": "selective"},
        "selective_mlp": {"recompute_granularity": "selective", "recompute_modules": ["mlp"]},
        "full_uniform": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 2},
        "full_block": {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 1},
    }
    script = tmp_path / "recompute.py"
    script.write_text(_RECOMPUTE)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(script), json.dumps(cases)], capture_output=True, text=True,
                          cwd=REPO, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = {line.split()[0]: json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()
             if line.split() and line.split()[0] in cases}
    # the recomputed parts ran again in the backward pass, so the equality above is not vacuous
    assert calls["selective"] == {"attn": 8, "layer": 4, "mlp": 4}
    assert calls["selective_mlp"] == {"attn": 4, "layer": 4, "mlp": 8}
    assert calls["full_uniform"] == {"attn": 8, "layer": 8, "mlp": 8}
    assert calls["full_block"] == {"attn": 5, "layer": 5, "mlp": 5}  # block: only the first layer of the stage


# ---------------------------------------------------------------- bench/gpu_check.sh


@pytest.mark.slow
def test_gpu_check_cpu_smoke(tmp_path):
    """The GPU check's steps (train, throughput, resume, HF export, score vs transformers) on tiny shapes."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu-smoke", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [x for x in proc.stdout.splitlines() if x.startswith("gpu_check:")]
    assert any("throughput over steps 2-6" in x and "peak memory n/a (CPU)" in x for x in lines), lines
    assert any("resume from step 4: steps 5-6" in x and x.endswith("ok") for x in lines), lines
    assert any("bolt score vs transformers" in x and x.endswith("ok") for x in lines), lines
    assert (tmp_path / "hf" / "config.json").is_file()
    bad = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--wheels", str(tmp_path / "none")],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "not a directory" in bad.stderr


_CP_LOSS = '''
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron_bolt import runtime
from megatron_bolt.compat import cpu as cpu_compat
from megatron_bolt.training.context_parallel import cp_slice, masked_mean_loss

cpu_compat.install()
env = runtime.init_distributed(tp=1, pp=1, cp=2)
assert parallel_state.get_context_parallel_world_size() == 2
gen = torch.Generator().manual_seed(0)
full_losses = torch.rand(2, 16, generator=gen)
full_mask = (torch.rand(2, 16, generator=gen) > 0.3).float()
positions = torch.arange(16).expand(2, -1)
part = cp_slice({"losses": full_losses, "loss_mask": full_mask, "position_ids": positions})
r = parallel_state.get_context_parallel_rank()
# load balancing: rank r holds quarter r and quarter 3 - r of the sequence
want = torch.cat([torch.arange(4 * r, 4 * r + 4), torch.arange(4 * (3 - r), 4 * (3 - r) + 4)])
assert torch.equal(part["position_ids"][0], want), part["position_ids"][0]
local = part["losses"].clone().requires_grad_()
loss, reported = masked_mean_loss(local, part["loss_mask"])
true_mean = (full_losses * full_mask).sum() / full_mask.sum()
assert torch.allclose(reported, true_mean), (reported, true_mean)
loss.backward()
# DDP averages gradients over the data x context ranks: each rank's gradient / cp must be the
# gradient of the whole sequence's mean loss at its positions
full_grad = full_mask / full_mask.sum()
got = local.grad / 2
assert torch.allclose(got, cp_slice({"g": full_grad})["g"]), (got, full_grad)
print(f"cp rank {r} ok", flush=True)
runtime.shutdown()
'''


@pytest.mark.slow
def test_context_parallel_batch_slicing_and_loss_over_two_ranks(tmp_path):
    """The CP split and loss normalisation on a real 2-rank gloo context-parallel group (attention
    itself needs TE, so no model runs here)."""
    script = tmp_path / "cp_loss.py"
    script.write_text(_CP_LOSS)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script)], capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cp rank 0 ok" in proc.stdout and "cp rank 1 ok" in proc.stdout
