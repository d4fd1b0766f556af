"""Model FLOPs per step and MFU for the Llama-shaped GPT.

`llama_flops_per_step` follows Megatron-LM's `num_floating_point_operations`
(megatron/training/training.py, dense GQA transformer branch): every GEMM runs three times (forward,
data gradient, weight gradient), a GEMM costs 2*m*n*k, causal attention counts half the score
matrix. Per layer and token:
    attention projections  6 * 2 * h * (q + 2 * kv + q)        q = heads * d, kv = groups * d
    core attention         6 * 2 * q * s / 2 * 2               (QK^T and PV over the causal half)
    SwiGLU MLP             6 * 2 * h * 3 * ffn
and per token once: the logits, 6 * 2 * h * padded_vocab. Norms, RoPE and softmax are not counted
(as in Megatron-LM), and neither is activation recomputation: MFU counts model FLOPs, not hardware FLOPs.
"""

from __future__ import annotations

import torch

from megatron_bolt.config import ModelConfig

# Dense (no sparsity) bf16 tensor-core peak per device, TFLOP/s, from NVIDIA's data sheets.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,  # SXM ("NVIDIA H100 80GB HBM3")
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
}


def llama_flops_per_step(model: ModelConfig, global_batch: int, padded_vocab: int) -> float:
    """Model FLOPs of one optimizer step over `global_batch` sequences of `model.seq_len` tokens."""
    h, s, d = model.hidden_size, model.seq_len, model.hidden_size // model.num_attention_heads
    q, kv = model.num_attention_heads * d, model.kv_heads * d
    gemm = 3 * 2  # forward + two backward GEMMs, 2 FLOPs per multiply-add
    per_layer_token = gemm * (h * (q + 2 * kv) + q * h + h * 3 * model.ffn) + gemm * q * s / 2 * 2
    tokens = global_batch * s
    return float(tokens * (model.num_layers * per_layer_token + gemm * h * padded_vocab))


def peak_tflops(device_name: str, configured: float | None = None) -> float | None:
    """The per-device peak used for MFU: `train.peak_tflops` if set, else the table; None if unknown."""
    if configured is not None:
        return configured
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # "H100 NVL" before "H100"
        if key.lower() in device_name.lower():
            return PEAK_BF16_TFLOPS[key]
    return None


def device_peak_tflops(configured: float | None) -> float | None:
    """Peak of this rank's device; None on CPU (no meaningful peak), so metrics record mfu: null."""
    if not torch.cuda.is_available():
        return configured
    return peak_tflops(torch.cuda.get_device_name(), configured)


def mfu(flops_per_step: float, step_seconds: float, world_size: int, peak: float | None) -> float | None:
    if peak is None or step_seconds <= 0:
        return None
    return flops_per_step / (step_seconds * world_size * peak * 1e12)
