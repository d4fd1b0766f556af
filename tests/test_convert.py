"""HF <-> Megatron conversion for Llama 2, Llama 3.1 (llama3 RoPE scaling), Qwen2 (q/k/v biases, tied)
and Mistral (explicit head_dim): bit-identical round trips, `bolt score` against transformers at
TP=1 and TP=2, latent tokens, one training step at TP=2 and PP=2, refusals naming the field, and the
TinyLlama-1.1B shape dry check on meta tensors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import scrubbed_env
from safetensors.torch import load_file

from megatron_bolt.convert import llama
from megatron_bolt.convert.hf_to_mcore import convert_hf_to_mcore
from megatron_bolt.convert.mcore_to_hf import convert_mcore_to_hf
from megatron_bolt.errors import UserError

pytestmark = pytest.mark.usefixtures("megatron_cpu")  # conversion runs Megatron-Core in this process

REPO = Path(__file__).resolve().parents[1]

# (name, config overrides): GQA and MHA, tied and untied, odd vocabularies, bf16 storage; one per family.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
FAMILY_CASES = {
    # Llama 2: MHA, untied, theta 10000
    "llama2": dict(vocab_size=301, num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0),
    # Llama 3.1+: GQA, llama3-scaled RoPE (changes the low frequencies even at short positions)
    "llama3_1": dict(vocab_size=300, num_attention_heads=4, num_key_value_heads=2, rope_parameters=LLAMA3_ROPE,
                     max_position_embeddings=131072),
    # Qwen2/2.5 small: q/k/v biases, tied embeddings, theta 1e6
    "qwen2": dict(family="qwen2", vocab_size=299, num_attention_heads=4, num_key_value_heads=2,
                  tie_word_embeddings=True, rope_theta=1000000.0, max_position_embeddings=32768),
    # Mistral without sliding window, with head_dim 32 != hidden 64 / 4 heads
    "mistral_head_dim": dict(family="mistral", vocab_size=303, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=32, sliding_window=None),
}
CASES = {
    **FAMILY_CASES,
    "gqa_untied_odd_vocab": dict(vocab_size=301, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "mha_tied_odd_vocab": dict(vocab_size=257, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "gqa1_tied_bf16": dict(
        vocab_size=131, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True, dtype="bfloat16"
    ),
}


def make_hf_model(path: Path, family: str = "llama", **overrides) -> Path:
    """A randomly initialised tiny Llama / Qwen2 / Mistral model saved with save_pretrained (plus a tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = overrides.pop("dtype", "float32")
    kwargs = dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=64,
        rope_theta=5000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    )
    kwargs.update(overrides)
    if "rope_parameters" in overrides:
        kwargs.pop("rope_theta")
    torch.manual_seed(sum(map(ord, path.name)))
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kwargs))
    with torch.no_grad():  # norms away from 1 and biases away from 0, so a swapped one would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.uniform_(-0.5, 0.5)
    model.to(getattr(torch, dtype)).save_pretrained(path)
    _write_tokenizer(path, kwargs["vocab_size"])
    return path


def _write_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer over `vocab_size - 8` words (so latent tokens get fresh ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(vocab_size - 11)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def _hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_is_bit_identical(tmp_path, case):
    hf = make_hf_model(tmp_path / case, **CASES[case])
    convert_hf_to_mcore(hf, tmp_path / "ckpt", log=lambda *a: None)
    run_cfg = (tmp_path / "ckpt" / "run_config.yaml").read_text()
    assert "vocab_size: " + str(CASES[case]["vocab_size"]) in run_cfg
    assert (tmp_path / "ckpt" / "tokenizer" / "tokenizer.json").is_file()
    convert_mcore_to_hf(tmp_path / "ckpt", tmp_path / "back", log=lambda *a: None)

    before, after = _hf_tensors(hf), _hf_tensors(tmp_path / "back")
    assert sorted(before) == sorted(after)
    for name, t in before.items():
        assert after[name].dtype == t.dtype, name
        assert after[name].shape == t.shape, name  # vocabulary padding does not leak
        assert torch.equal(after[name], t), name
    assert (tmp_path / "back" / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()
    cfg_in = json.loads((hf / "config.json").read_text())
    cfg_out = json.loads((tmp_path / "back" / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "num_key_value_heads", "tie_word_embeddings", "rms_norm_eps",
                "bos_token_id", "eos_token_id", "rope_parameters", "max_position_embeddings", "model_type",
                "architectures", "head_dim"):
        if key in cfg_in or key != "head_dim":  # transformers' Qwen2Config writes no head_dim
            assert cfg_out[key] == cfg_in[key], key
    # transformers 4.x / SGLang spellings next to the 5.x ones, with the same values
    params = cfg_in["rope_parameters"]
    assert cfg_out["rope_theta"] == params["rope_theta"]
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    assert cfg_out["rope_scaling"] == (None if params["rope_type"] == "default" else scaling)
    assert cfg_out["torch_dtype"] == cfg_out["dtype"] == CASES[case].get("dtype", "float32")


def test_export_loads_in_transformers_without_key_warnings(tmp_path):
    from transformers import LlamaForCausalLM

    hf = make_hf_model(tmp_path / "m", **CASES["gqa_untied_odd_vocab"])
    convert_hf_to_mcore(hf, tmp_path / "ckpt", log=lambda *a: None)
    # Tiny shards: exercise the sharded save_pretrained layout (index json).
    convert_mcore_to_hf(tmp_path / "ckpt", tmp_path / "back", max_shard_bytes=40_000, log=lambda *a: None)
    assert (tmp_path / "back" / "model.safetensors.index.json").is_file()
    model, info = LlamaForCausalLM.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ref = LlamaForCausalLM.from_pretrained(hf)
    ids = torch.tensor([[1, 5, 9, 200, 3, 17]])
    assert torch.equal(model(ids).logits, ref(ids).logits)


def test_qkv_grouping_inverts_and_matches_megatron_layout():
    cfg = llama.model_config_from_hf(
        dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=10)
    )
    d = 8
    # Row r of head j carries the value 100*j + r, so positions in the fused tensor are checkable.
    q = torch.tensor([[100.0 * j + r] for j in range(4) for r in range(d)]).expand(-1, 32)
    k = torch.tensor([[1000.0 + 100 * j + r] for j in range(2) for r in range(d)]).expand(-1, 32)
    v = -k
    qkv = llama.fuse_qkv(q, k, v, cfg)
    # Group 0: q heads 0, 1, then k head 0, then v head 0; group 1 likewise with heads 2, 3 / 1.
    expected_heads = [0, 100, 1000, -1000, 200, 300, 1100, -1100]
    assert [qkv[i * d, 0].item() for i in range(8)] == expected_heads
    q2, k2, v2 = llama.split_qkv(qkv, cfg)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


@pytest.mark.parametrize("case", sorted(FAMILY_CASES))
def test_add_latent_tokens_extends_vocab_and_tokenizer(tmp_path, case):
    from megatron_bolt.tokenizer import LATENT_TOKENS, load_tokenizer

    hf = make_hf_model(tmp_path / "m", **CASES[case])
    convert_hf_to_mcore(hf, tmp_path / "ckpt", add_latent_tokens=True, seed=7, log=lambda *a: None)
    tok = load_tokenizer(str(tmp_path / "ckpt" / "tokenizer"), add_latent_tokens=False)
    ids = [tok.token_to_id(t) for t in LATENT_TOKENS]
    assert None not in ids and len(set(ids)) == 4
    convert_mcore_to_hf(tmp_path / "ckpt", tmp_path / "back", log=lambda *a: None)
    before, after = _hf_tensors(hf), _hf_tensors(tmp_path / "back")
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["vocab_size"] == max(CASES[case]["vocab_size"], max(ids) + 1)
    assert cfg["model_type"] == CASES[case].get("family", "llama")
    d = cfg["hidden_size"]
    tied = CASES[case].get("tie_word_embeddings", False)
    assert ("lm_head.weight" in after) == (not tied)
    for name in ("model.embed_tokens.weight",) + (() if tied else ("lm_head.weight",)):
        old = before[name]
        new = after[name]
        assert new.shape == (cfg["vocab_size"], d)
        keep = [i for i in range(old.shape[0]) if i not in ids]
        assert torch.equal(new[keep], old[keep]), name
        rows = new[ids]
        assert rows.abs().max() <= 3 * d**-0.5 + 1e-6
        assert 0.5 * d**-0.5 < rows.std() < 1.5 * d**-0.5
    if not tied:
        assert not torch.equal(after["model.embed_tokens.weight"][ids], after["lm_head.weight"][ids])
    for name, t in before.items():  # every other tensor (biases too) is untouched
        if name not in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(after[name], t), name
    hf_tok = load_tokenizer(str(tmp_path / "back"), add_latent_tokens=False)
    assert [hf_tok.token_to_id(t) for t in LATENT_TOKENS] == ids


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    hf = make_hf_model(tmp_path / "m", **CASES["mha_tied_odd_vocab"])
    with pytest.raises(UserError, match="parallel.tp \\(3\\) must divide"):
        convert_hf_to_mcore(hf, tmp_path / "c1", tp=3, log=lambda *a: None)
    assert not (tmp_path / "c1").exists()
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(UserError, match="field 'rope_scaling.rope_type' is 'yarn'"):
        convert_hf_to_mcore(hf, tmp_path / "c2", log=lambda *a: None)
    assert not (tmp_path / "c2").exists()
    with pytest.raises(UserError, match="no config.json"):
        convert_hf_to_mcore(tmp_path, tmp_path / "c3", log=lambda *a: None)
    from megatron_bolt.cli import main  # in-process: the same parser and error path as `bolt convert`

    assert main(["convert", "mcore-to-hf", "--ckpt", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not a megatron-bolt checkpoint" in capsys.readouterr().err.strip().splitlines()[-1]


_BASE = dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             vocab_size=100, max_position_embeddings=4096)


@pytest.mark.parametrize(
    "fields,named",
    [
        (dict(model_type="gemma", architectures=["GemmaForCausalLM"]), "'model_type' is 'gemma'"),
        (dict(architectures=["LlamaForSequenceClassification"]), "'architectures'"),
        (dict(model_type="mistral", sliding_window=1024), "'sliding_window' is 1024"),
        (dict(model_type="qwen2", use_sliding_window=True, sliding_window=1024), "'use_sliding_window'"),
        (dict(layer_types=["full_attention", "sliding_attention"]), "'layer_types'"),
        (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "'rope_parameters.rope_type'"),
        (dict(rope_scaling={"type": "linear", "factor": 2.0}), "'rope_scaling.rope_type' is 'linear'"),
        (dict(rope_scaling={**LLAMA3_ROPE, "low_freq_factor": 2.0}), "'rope_scaling.low_freq_factor'"),
        (dict(rope_scaling={**LLAMA3_ROPE, "original_max_position_embeddings": 4096}),
         "'rope_scaling.original_max_position_embeddings'"),
        (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
         "'rope_parameters.partial_rotary_factor'"),
        (dict(attention_bias=True), "'attention_bias'"),
        (dict(mlp_bias=True), "'mlp_bias'"),
        (dict(hidden_act="gelu"), "'hidden_act'"),
        (dict(head_dim=15), "'head_dim'"),
        (dict(quantization_config={"quant_method": "gptq"}), "'quantization_config'"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_unsupported_option_is_refused_naming_the_field(fields, named):
    with pytest.raises(UserError) as err:
        llama.model_config_from_hf({**_BASE, **fields}, "m/config.json")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("m/config.json: field ") and named in msg, msg


def test_transformers4_spellings_parse_like_transformers5():
    """Llama-3.1-8B's config.json as transformers 4.x writes it, and the 5.x spelling of the same."""
    v4 = {**_BASE, "rope_theta": 500000.0, "torch_dtype": "bfloat16", "max_position_embeddings": 131072,
          "rope_scaling": {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}}
    v5 = {**_BASE, "dtype": "bfloat16", "max_position_embeddings": 131072, "rope_parameters": LLAMA3_ROPE}
    a, b = llama.model_config_from_hf(v4), llama.model_config_from_hf(v5)
    assert a == b and a.rope_base == 500000.0 and a.rope_scaling_factor == 8.0 and a.context == 131072
    out = llama.hf_config_from_model(a, torch.bfloat16)
    assert llama.model_config_from_hf(out) == a
    # a Mistral window at least as long as the context is full attention
    assert llama.model_config_from_hf({**_BASE, "model_type": "mistral", "sliding_window": 4096}).qkv_bias is False


def test_tinyllama_shapes_dry_check_on_meta():
    """TinyLlama-1.1B v1.1's config.json through the mapping and into a real Megatron-Core model
    built on the meta device: every parameter filled with the right shape, no memory used."""
    from megatron_bolt.convert.megatron_side import build_tp1, single_rank

    tinyllama = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
        "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }
    cfg = llama.model_config_from_hf(tinyllama)
    shapes = llama.hf_shapes(cfg)
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 1_100_048_384  # TinyLlama's 1.1B
    with single_rank():
        model = build_tp1(cfg, padding_tp=1, bf16=True, meta=True)
        params = {n: p for n, p in model.named_parameters()}
        assert all(p.is_meta for p in params.values())
        got = dict(llama.mcore_from_hf(cfg, cfg.padded_vocab_size(1), lambda n: torch.empty(shapes[n], device="meta")))
        assert sorted(got) == sorted(params)
        for name, t in got.items():
            assert t.shape == params[name].shape, name
        back = dict(llama.hf_from_mcore(cfg, got.__getitem__))
        assert {n: tuple(t.shape) for n, t in back.items()} == shapes
        # The real model converts for training at TP 1, 2, 4 and PP 1, 2, 11, 22.
        from megatron_bolt.config import ParallelConfig, RunConfig, validate

        for tp in (1, 2, 4):
            for pp in (1, 2, 11, 22):
                validate(RunConfig(model=cfg, parallel=ParallelConfig(tp=tp, pp=pp)))


# ------------------------------------------------------------------------------------------------
# `bolt score` on the converted checkpoint vs transformers' summed log-probs
# ------------------------------------------------------------------------------------------------


def _hf_summed_logprobs(hf: Path, seqs: list[list[int]]) -> list[float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s])
            logp = torch.log_softmax(model(ids).logits.float(), dim=-1)[0, :-1]
            out.append(logp.gather(-1, ids[0, 1:, None]).sum().item())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case,tp", [("llama2", 1), ("llama3_1", 2), ("qwen2", 2), ("mistral_head_dim", 1)])
def test_bolt_score_matches_transformers(tmp_path, case, tp):
    hf = make_hf_model(tmp_path / f"score_{case}", **CASES[case])
    # Converted for the *other* TP, so the vocabulary padding differs between save and load
    # (e.g. 301 rows saved padded to 512, loaded as 384; 300 saved as 384, loaded as 512).
    convert_hf_to_mcore(hf, tmp_path / "ckpt", tp=3 - tp, log=lambda *a: None)
    gen = torch.Generator().manual_seed(tp)
    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    seqs = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (2, 7, 33, 64)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"tokens": s}) + "\n" for s in seqs))
    env = scrubbed_env()
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_bolt", "score", "--ckpt", str(tmp_path / "ckpt"), "--input",
         str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"), "--nproc-per-node", str(tp)],
        capture_output=True, text=True, cwd=REPO, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    want = _hf_summed_logprobs(hf, seqs)
    assert [g["num_tokens"] for g in got] == [len(s) - 1 for s in seqs]
    for g, w in zip(got, want):
        assert g["logprob"] == pytest.approx(w, rel=1e-4)


def test_wrapper_script_help_names_both_directions():
    for sub, flag in (("hf-to-mcore", "--add-latent-tokens"), ("mcore-to-hf", "--max-shard-gb")):
        proc = subprocess.run(
            [sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), sub, "--help"],
            capture_output=True, text=True, cwd=REPO, timeout=60,
        )
        assert proc.returncode == 0 and flag in proc.stdout, proc.stderr


def test_refuses_non_empty_output(tmp_path):
    hf = make_hf_model(tmp_path / "m", **CASES["mha_tied_odd_vocab"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        convert_hf_to_mcore(hf, tmp_path / "out", log=lambda *a: None)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


_PP_CHECK = '''
import sys
import torch
from megatron_bolt import runtime
from megatron_bolt.compat import cpu as cpu_compat
from megatron_bolt.config import ParallelConfig
from megatron_bolt.convert import llama
from megatron_bolt.convert.hf_to_mcore import SafetensorsReader
from megatron_bolt.models.gpt import build_gpt
from megatron_bolt.models.init import global_name
from megatron_bolt.training.checkpoint import load_checkpoint, read_run_config

cpu_compat.install()
ckpt, hf = sys.argv[1], sys.argv[2]
cfg = read_run_config(ckpt).model
cfg.transformer_impl = "local"
env = runtime.init_distributed(tp=1, pp=2)
stage = env.rank
model = build_gpt(cfg, ParallelConfig(tp=1, pp=2), pre_process=stage == 0, post_process=stage == 1)
load_checkpoint(ckpt, [model])
reader = SafetensorsReader(hf)
want = dict(llama.mcore_from_hf(cfg, cfg.padded_vocab_size(1), reader.get))
offset = stage * cfg.num_layers // 2
names = []
for local, p in model.named_parameters():
    name = global_name(local, offset, cfg.tie_embeddings)
    assert torch.equal(p.detach(), want[name]), (stage, local, name)
    names.append(name)
print(f"stage {stage} ok: {len(names)} tensors", flush=True)
runtime.shutdown()
'''


@pytest.mark.slow
def test_converted_checkpoint_loads_at_pp2(tmp_path):
    """The step-0 checkpoint reshards on load: two pipeline stages each get exactly their layers."""
    hf = make_hf_model(tmp_path / "pp", **CASES["gqa_untied_odd_vocab"])
    convert_hf_to_mcore(hf, tmp_path / "ckpt", pp=2, log=lambda *a: None)
    script = tmp_path / "pp_check.py"
    script.write_text(_PP_CHECK)
    env = scrubbed_env(PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
         str(tmp_path / "ckpt"), str(hf)],
        capture_output=True, text=True, cwd=REPO, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage 0 ok" in proc.stdout and "stage 1 ok" in proc.stdout


@pytest.mark.slow
def test_one_training_step_after_conversion_at_tp2_and_pp2(tmp_path):
    """A converted Qwen2-shaped model (q/k/v biases split over TP, embeddings tied across PP stages)
    trains a step from its checkpoint at TP=2 and at PP=2, with the same first-step loss."""
    from conftest import bolt

    from megatron_bolt.data.synthetic import write_synthetic_dataset

    hf = make_hf_model(tmp_path / "qwen2", **CASES["qwen2"])
    ckpt = tmp_path / "ckpt"
    convert_hf_to_mcore(hf, ckpt, tp=2, log=lambda *a: None)
    data = write_synthetic_dataset(tmp_path / "data" / "syn", num_docs=40, vocab_size=CASES["qwen2"]["vocab_size"])
    losses = {}
    # The training loss is over the padded vocabulary (as in Megatron-LM), so both runs pad 299 to
    # 300 rows (a multiple of 150 * tp): otherwise TP=2 (512 rows) and PP=2 (384) compute different losses.
    for par in ("parallel.tp=2", "parallel.pp=2"):
        out = tmp_path / par.replace("=", "")
        bolt("train", str(ckpt / "run_config.yaml"), "parallel.tp=1", par, f"output_dir={out}", f"data.prefixes=[{data}]",
             f"data.cache_dir={tmp_path / 'cache'}", f"checkpoint.load={ckpt}", "data.split=100,0,0",
             "model.seq_len=32", "train.steps=1", "train.warmup=0", "train.micro_batch=2", "train.global_batch=4",
             "model.transformer_impl=local", "model.make_vocab_divisible_by=150", nproc=2)
        (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[par] = record["loss"]
    assert losses["parallel.tp=2"] == pytest.approx(losses["parallel.pp=2"], rel=1e-4)
