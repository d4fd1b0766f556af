"""Continuous latent thoughts (ponder model) on real Megatron-Core: Jacobi exactness against the
sequential KV-cached computation, TP=2 / PP=2 / DP=2 training equivalence, a PP=2 checkpoint at
PP=1, bolt generate / score."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_CONFIG, bolt, free_port

from megatron_bolt.config import load_config

PONDER = ["model.type=ponder", "ponder.latents_per_token=1", "ponder.jacobi_iters=[2,3]"]


@pytest.fixture(scope="module")
def single_rank(megatron_cpu):
    from megatron_bolt import runtime

    runtime.init_distributed(1, 1, 1234, env=runtime.DistEnv(0, 1, 0, "127.0.0.1", free_port()))
    yield
    runtime.shutdown()


def _model(latents: int):
    from megatron_bolt.training.loop import build_model

    # init_std 0.2: with the default 0.02 the latents barely move the logits and Jacobi converges
    # in ~3 iterations, which would make the exactness check nearly vacuous.
    cfg = load_config(TINY_CONFIG, ["model.type=ponder", f"ponder.latents_per_token={latents}", "model.seq_len=16",
                                    "model.init_std=0.2"])
    model = build_model(cfg, wrap_ddp=False)
    model.eval()
    return model, cfg


@pytest.mark.parametrize("latents", [1, 2])
def test_jacobi_equals_sequential_kv_cached(single_rank, latents):
    from megatron_bolt.models.generation import prefill, sequential_logits, step_token

    model, cfg = _model(latents)
    V = cfg.model.vocab_size
    T = 10
    tokens = torch.randint(1, V, (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = sequential_logits(model, tokens, V)
        model.jacobi_override = latents * T  # enough iterations for exactness
        exact = model(tokens, torch.arange(T).unsqueeze(0).expand(2, T), None)[..., :V].float()
        model.jacobi_override = None
        default = model(tokens, torch.arange(T).unsqueeze(0).expand(2, T), None)[..., :V].float()
    gap = (exact - reference).abs().max().item()
    assert gap < 1e-4, gap
    # the default J (eval_jacobi_iters = 3 < T) is not exact: report the gap
    default_gap = (default - reference).abs().max().item()
    print(f"K={latents}: max |logit gap| at J={latents * T}: {gap:.2e}; at default J={cfg.ponder.eval_jacobi_iters}: "
          f"{default_gap:.2e}")
    assert default_gap > 100 * gap  # the latents matter, so exactness at J = K*T is not vacuous
    # Jacobi prefill + cached decoding continues exactly where the sequential computation is
    cache, logits = prefill(model, tokens[:, :6], V, jacobi_iters=latents * 6)
    torch.testing.assert_close(logits, reference[:, 5], atol=1e-4, rtol=1e-4)
    nxt = step_token(model, tokens[:, 6], 6, cache, V)
    torch.testing.assert_close(nxt, reference[:, 6], atol=1e-4, rtol=1e-4)


def test_warm_up_grows_the_sequence_and_prefill_runs_j_iterations(single_rank):
    """K = 2, J = 1 by hand: a plain pass; a pass over (e, z1) whose two slot outputs become z1, z2
    (PonderLM-2's warm-up, not copies of the plain pass); one Jacobi pass over (e, z1, z2); the
    final pass. The generation prefill ends with that final pass, so its logits are the forward's."""
    from megatron_bolt.models.generation import prefill

    model, cfg = _model(2)
    V, T = cfg.model.vocab_size, 7
    tokens = torch.randint(1, V, (1, T), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(T)
    with torch.no_grad():
        emb = model.embed(tokens, pos.unsqueeze(0))  # [T, 1, h]

        def run(slots):  # slots: [T, s, 1, h] -> outputs [T, s, 1, h]
            s = slots.shape[1]
            out = model.decoder(hidden_states=slots.reshape(T * s, 1, -1), attention_mask=None,
                                rotary_pos_emb=model.rotary_for(pos.repeat_interleave(s)))
            return out.view(T, s, 1, -1)

        plain = run(emb[:, None])[:, 0]
        warm = run(torch.stack([emb, plain], 1))
        z1, z2 = warm[:, 0], warm[:, 1]
        jac = run(torch.stack([emb, z1, z2], 1))
        final = run(torch.stack([emb, jac[:, 0], jac[:, 1]], 1))
        want = model.logits(final[:, 2])[..., :V].transpose(0, 1).float()
        model.jacobi_override = 1
        got = model(tokens, pos.unsqueeze(0), None)[..., :V].float()
        _, last = prefill(model, tokens, V, jacobi_iters=1)
        model.jacobi_override = None
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, got[:, -1], atol=1e-4, rtol=1e-4)
    assert (z2 - plain).abs().max() > 1e-2  # z2 starts from a 2-step computation, not a copy of z1


def test_cached_decoding_of_a_gpt_model_matches_its_forward(single_rank):
    """`bolt generate` on vanilla checkpoints uses the same cached decoder with K = 0."""
    from megatron_bolt.models.generation import generate, prefill, sequential_logits
    from megatron_bolt.training.loop import build_model

    cfg = load_config(TINY_CONFIG, ["model.seq_len=16", "model.init_std=0.2"])
    model = build_model(cfg, wrap_ddp=False).eval()
    V, T = cfg.model.vocab_size, 12
    tokens = torch.randint(1, V, (2, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens, torch.arange(T).unsqueeze(0).expand(2, T), None)[..., :V].float()
    torch.testing.assert_close(sequential_logits(model, tokens, V), full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(prefill(model, tokens, V)[1], full[:, -1], atol=1e-4, rtol=1e-4)
    # greedy generation continues with the argmax of the full forward over the growing sequence
    new = generate(model, tokens[0].tolist(), 3, V)
    seq = tokens[0].tolist()
    for t in new:
        with torch.no_grad():
            logits = model(torch.tensor([seq]), torch.arange(len(seq)).unsqueeze(0), None)[0, -1, :V]
        assert t == int(logits.argmax())
        seq.append(t)


@pytest.mark.slow
def test_gradients_flow_through_all_passes(single_rank):
    model, cfg = _model(1)
    model.train()
    model.jacobi_override = 2
    T = 8
    tokens = torch.randint(1, cfg.model.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    losses = model(tokens, torch.arange(T).unsqueeze(0).expand(2, T), None, labels=tokens.roll(-1, 1))
    assert losses.shape == (2, T)
    # d loss / d (latent fed back) is non-zero only if the graph spans the passes: check via a hook
    seen = []
    handle = model.decoder.final_layernorm.register_forward_hook(lambda m, i, o: seen.append(o))
    losses = model(tokens, torch.arange(T).unsqueeze(0).expand(2, T), None, labels=tokens.roll(-1, 1))
    handle.remove()
    assert len(seen) == 4  # plain pass, J = 2 Jacobi passes, final pass
    grads = torch.autograd.grad(losses.sum(), [seen[0], seen[1]])
    assert all(g.abs().sum() > 0 for g in grads)


def _metrics(output_dir) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines())}


def _assert_same_training(reference_dir, run_dir) -> None:
    """Per-step losses and gradient norms agree (what the vanilla model's equivalence tests check)."""
    reference, run = _metrics(reference_dir), _metrics(run_dir)
    assert sorted(run) == [1, 2, 3]
    for step, ref in reference.items():
        for key in ("loss", "grad_norm"):
            assert abs(run[step][key] - ref[key]) <= 1e-4 * abs(ref[key]), (step, key, run[step][key], ref[key])
    assert reference[3]["loss"] < reference[1]["loss"]  # it learns, so equality is not vacuous


def _train(tmp, name, prefix, *overrides, nproc=1):
    # init_std 0.2 (as in _model): at 0.02 the gradients through the plain pass are ~1e-6 of the
    # total, so a parallel run that dropped them would still pass the comparison.
    out = tmp / name
    bolt("train", str(TINY_CONFIG), *PONDER, f"output_dir={out}", f"data.prefixes=[{prefix}]",
         f"data.cache_dir={tmp / 'cache'}", "model.seq_len=32", "model.init_std=0.2", "train.steps=3",
         "train.warmup=1", *overrides, nproc=nproc)
    return out


@pytest.fixture(scope="module")
def ponder_baseline(tmp_path_factory, synthetic_prefix):
    tmp = tmp_path_factory.mktemp("ponder")
    return tmp, _train(tmp, "tp1", synthetic_prefix)


@pytest.fixture(scope="module")
def ponder_pp2(ponder_baseline, synthetic_prefix):
    """The baseline run at PP = 2 (one layer per stage; 2 micro-batches per step)."""
    tmp, _ = ponder_baseline
    return _train(tmp, "pp2", synthetic_prefix, "parallel.pp=2", nproc=2)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [("parallel.tp=2",), ()], ids=["tp2", "dp2"])
def test_ponder_parallel_equivalence(ponder_baseline, synthetic_prefix, overrides):
    tmp, base_dir = ponder_baseline
    _assert_same_training(base_dir, _train(tmp, "run-" + "-".join(overrides or ("dp2",)), synthetic_prefix,
                                           *overrides, nproc=2))


@pytest.mark.slow
def test_ponder_pp2_equivalence(ponder_baseline, ponder_pp2):
    """Every Jacobi pass traverses both stages (models/ponder_pipeline.py); the drawn J, losses and
    gradient norms (which include stage 0's gradients from all passes) match PP = 1."""
    _assert_same_training(ponder_baseline[1], ponder_pp2)


@pytest.mark.slow
def test_ponder_pp2_checkpoint_scores_the_same_at_pp1(single_rank, ponder_baseline, ponder_pp2, tmp_path):
    """A checkpoint saved at PP = 2 reshards to PP = 1 for `bolt score` (score_file is its library
    function) and, trained equivalently, scores as the PP = 1 run's checkpoint does."""
    from megatron_bolt.training import checkpoint as ckpt
    from megatron_bolt.training.score import score_file

    assert ckpt.read_run_config(ponder_pp2 / "checkpoints").parallel.pp == 2
    seqs = tmp_path / "seqs.jsonl"
    seqs.write_text("".join(json.dumps({"tokens": list(range(i + 1, i + 20))}) + "\n" for i in range(3)))
    scores = []
    for run in (ponder_baseline[1], ponder_pp2):
        score_file(str(run / "checkpoints"), str(seqs), str(tmp_path / "scores.jsonl"))
        scores.append([json.loads(x) for x in (tmp_path / "scores.jsonl").read_text().splitlines()])
    assert [r["num_tokens"] for r in scores[1]] == [18] * 3
    for a, b in zip(*scores):
        assert abs(a["logprob"] - b["logprob"]) <= 1e-4 * abs(a["logprob"]), (a, b)


@pytest.mark.slow
def test_generate_and_score_ponder_checkpoint(ponder_baseline, tmp_path):
    _, base_dir = ponder_baseline
    ckpt_dir = base_dir / "checkpoints"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"tokens": list(range(i + 1, i + 9))}) + "\n" for i in range(3)))
    outs = []
    for nproc in (1, 2):
        out = tmp_path / f"gen{nproc}.jsonl"
        bolt("generate", "--ckpt", str(ckpt_dir), "--input", str(prompts), "--output", str(out),
             "--max-new-tokens", "5", "--nproc-per-node", str(nproc))
        outs.append([json.loads(x) for x in out.read_text().splitlines()])
    assert [len(r["generated"]) for r in outs[0]] == [5, 5, 5]
    assert outs[0] == outs[1]  # greedy decoding agrees at TP=1 and TP=2
    bolt("score", "--ckpt", str(ckpt_dir), "--input", str(prompts), "--output", str(tmp_path / "s.jsonl"))
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow  # export, transformers load, generate, eval and score end to end
def test_ponder_export_to_hf_matches_megatron(single_rank, tmp_path):
    """A ponder checkpoint (K = 2, q/k/v biases, head dim 32 != 64/4, tied embeddings) exported to
    HF with its modeling code: transformers loads it (trust_remote_code), and its log-likelihood,
    its generate and the engine of `bolt eval` agree with the Megatron model; `bolt score` gives the
    same numbers on the checkpoint and on the export."""
    import shutil

    from transformers import AutoModelForCausalLM

    from megatron_bolt.convert.mcore_to_hf import convert_mcore_to_hf
    from megatron_bolt.evaluation.evaluate import evaluate
    from megatron_bolt.inference.local import LocalEngine
    from megatron_bolt.models.generation import generate
    from megatron_bolt.tokenizer import train_bpe_tokenizer
    from megatron_bolt.toy.world import make_documents
    from megatron_bolt.training.checkpoint import save_checkpoint
    from megatron_bolt.training.loop import build_model

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_documents(20, 0)))
    tok = train_bpe_tokenizer([str(docs)], 320, str(tmp_path / "tok"))
    cfg = load_config(TINY_CONFIG, ["model.type=ponder", "ponder.latents_per_token=2", "model.seq_len=64",
                                    "model.init_std=0.2", f"model.vocab_size={tok.vocab_size}", "model.qkv_bias=true",
                                    "model.kv_channels=32", "model.tie_embeddings=true"])
    model = build_model(cfg, wrap_ddp=False).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("linear_qkv.bias"):
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(5))
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, 0, [model], cfg=cfg)
    shutil.copytree(tmp_path / "tok", ckpt / "tokenizer")
    convert_mcore_to_hf(ckpt, tmp_path / "hf", log=lambda *a: None)
    assert {"modeling_ponder.py", "configuration_ponder.py", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "hf").iterdir()}
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True, dtype=torch.float32).eval()
    assert type(hf).__name__ == "PonderForCausalLM" and hf.config.latents_per_token == 2

    V, T = cfg.model.vocab_size, 12
    tokens = torch.randint(1, V, (2, T), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(tokens, torch.arange(T).unsqueeze(0).expand(2, T), None)[..., :V].float()
        got = hf(input_ids=tokens).logits.float()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    prompts = [tokens[0, :7].tolist(), tokens[1, :4].tolist()]
    ref = [generate(model, p, 6, V) for p in prompts]
    for p, r in zip(prompts, ref):
        out = hf.generate(torch.tensor([p]), max_new_tokens=6, eos_token_id=[])
        assert out[0, len(p):].tolist() == r
    # bolt eval's engine: both prompts in one left-padded batch, one shared cache
    rows = LocalEngine(str(tmp_path / "hf"), device="cpu").generate_greedy(prompts, 6, stop=[])
    assert [r.tokens for r in rows] == ref
    result = evaluate(str(tmp_path / "hf"), "toy", None, shots=1, limit=2, max_new_tokens=4, batch_size=2)
    assert result["n"] == 2 and result["truncated_prompts"] == 2  # ran; prompts cut to the 64-token context

    seqs = tmp_path / "seqs.jsonl"
    seqs.write_text("".join(json.dumps({"tokens": s}) + "\n" for s in tokens.tolist()))
    scores = {}
    for name, target in (("megatron", ckpt), ("hf", tmp_path / "hf")):
        bolt("score", "--ckpt", str(target), "--input", str(seqs), "--output", str(tmp_path / f"{name}.jsonl"))
        scores[name] = [json.loads(x)["logprob"] for x in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    lp = torch.log_softmax(got, -1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0].sum(-1).tolist()
    for a, b, c in zip(scores["megatron"], scores["hf"], lp):
        assert abs(a - b) <= 1e-4 * abs(a) and abs(a - c) <= 1e-4 * abs(a), (a, b, c)
