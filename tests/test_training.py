"""The training engine against real Megatron-Core: parallel equivalence, resume, resharding, bad configs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, TINY_CONFIG, bolt


def _losses(output_dir) -> dict[int, float]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def _train(tmp_path, name, prefix, *overrides, nproc=1):
    out = tmp_path / name
    bolt("train", str(TINY_CONFIG), f"output_dir={out}", f"data.prefixes=[{prefix}]",
         f"data.cache_dir={tmp_path / 'cache'}", "train.steps=5", "train.warmup=1", *overrides, nproc=nproc)
    return out


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, synthetic_prefix):
    tmp = tmp_path_factory.mktemp("baseline")
    return tmp, _losses(_train(tmp, "tp1", synthetic_prefix))


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [("parallel.tp=2",), ("parallel.pp=2",), (), ("train.distributed_optimizer=true",)],
    ids=["tp2", "pp2", "dp2", "dp2-distopt"],
)
def test_parallel_equivalence(baseline, synthetic_prefix, overrides):
    tmp, reference = baseline
    losses = _losses(_train(tmp, "run-" + "-".join(overrides or ("dp2",)), synthetic_prefix, *overrides, nproc=2))
    assert sorted(losses) == [1, 2, 3, 4, 5]
    for step, ref in reference.items():
        assert abs(losses[step] - ref) <= 1e-4 * abs(ref), (step, losses[step], ref)
    # the model learns something in 5 steps, so equality is not vacuous
    assert reference[5] < reference[1]


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted(tmp_path, synthetic_prefix):
    common = [str(TINY_CONFIG), f"data.prefixes=[{synthetic_prefix}]", f"data.cache_dir={tmp_path / 'cache'}",
              "train.steps=8", "checkpoint.save_interval=2"]
    bolt("train", *common, f"output_dir={tmp_path / 'full'}")
    reference = _losses(tmp_path / "full")

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    # Its own process group, killed whole as a scheduler or Ctrl-C would: Megatron's checkpoint
    # writer keeps a multiprocessing Manager server (a spawned child with a socket) that a kill of
    # the trainer alone would leave running.
    proc = subprocess.Popen([sys.executable, "-m", "megatron_bolt", "train", *common, f"output_dir={out}"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGSTOP)  # frozen while read: a slow reader must not miss step 8
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        os.killpg(proc.pid, signal.SIGCONT)
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):  # a run that already ended is reported below
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len((out / "metrics.jsonl").read_text().splitlines())
    assert killed_at < 8, "the run finished before it could be killed"

    bolt("train", *common, f"output_dir={out}")
    resumed = _losses(out)
    assert sorted(resumed) == list(range(1, 9))  # nothing lost, nothing duplicated
    for step, ref in reference.items():
        assert abs(resumed[step] - ref) <= 1e-5 * abs(ref), (step, resumed[step], ref)


@pytest.mark.slow
def test_tp2_checkpoint_scores_the_same_at_tp1(tmp_path, synthetic_prefix):
    out = _train(tmp_path, "tp2", synthetic_prefix, "parallel.tp=2", nproc=2)
    ckpt_dir = out / "checkpoints"
    seqs = tmp_path / "seqs.jsonl"
    seqs.write_text("".join(json.dumps({"tokens": list(range(i + 1, i + 40))}) + "\n" for i in range(5)))
    bolt("score", "--ckpt", str(ckpt_dir), "--input", str(seqs), "--output", str(tmp_path / "tp1.jsonl"))
    bolt("score", "--ckpt", str(ckpt_dir), "--input", str(seqs), "--output", str(tmp_path / "tp2.jsonl"), nproc=2)
    tp1 = [json.loads(x) for x in (tmp_path / "tp1.jsonl").read_text().splitlines()]
    tp2 = [json.loads(x) for x in (tmp_path / "tp2.jsonl").read_text().splitlines()]
    assert len(tp1) == 5 and [r["num_tokens"] for r in tp1] == [38] * 5
    for a, b in zip(tp1, tp2):
        assert abs(a["logprob"] - b["logprob"]) <= 1e-4 * abs(a["logprob"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.hiden_size=64", "unknown config key 'model.hiden_size'"),
        ("model.num_attention_heads=5", "must divide model.hidden_size"),
        ("parallel.tp=8", "parallel.tp (8) must divide model.num_attention_heads"),
        ("data.prefixes=[/nonexistent/corpus]", "missing dataset file /nonexistent/corpus.bin"),
        ("train.steps=abc", "config key 'train.steps': expected an integer"),
    ],
)
def test_bad_config_is_one_clear_line(override, message, capsys):
    from megatron_bolt.cli import main

    assert main(["train", str(TINY_CONFIG), override]) == 2  # in-process: the same parser and checks
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.fixture(scope="module")
def four_layer_baseline(tmp_path_factory, synthetic_prefix):
    tmp = tmp_path_factory.mktemp("four_layers")
    return tmp, _metrics(_train(tmp, "pp1", synthetic_prefix, "model.num_layers=4"))


def _metrics(output_dir) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [("parallel.pp=2", "parallel.vp=2"),
     ("train.distributed_optimizer=true", "parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true")],
    ids=["pp2-vp2", "dp2-overlap"],
)
def test_interleaved_pipeline_and_overlap_match_one_process(four_layer_baseline, synthetic_prefix, overrides):
    """PP=2 x VP=2 (Megatron's interleaved 1F1B) and DP=2 with overlapped grad reduce / param
    gather give the single-process losses and gradient norms, over gloo."""
    tmp, reference = four_layer_baseline
    run = _metrics(_train(tmp, "-".join(overrides), synthetic_prefix, "model.num_layers=4", *overrides, nproc=2))
    assert sorted(run) == [1, 2, 3, 4, 5]
    for step, ref in reference.items():
        assert abs(run[step]["loss"] - ref["loss"]) <= 1e-4 * abs(ref["loss"]), (step, run[step], ref)
        assert run[step]["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-3)
    assert reference[5]["loss"] < reference[1]["loss"]


@pytest.mark.slow
def test_dp_reshardable_optimizer_state_follows_a_dp_change_not_a_tp_change(tmp_path, synthetic_prefix):
    """The default dp_reshardable distributed-optimizer checkpoint resumes at another DP size
    exactly; at another TP it is an error naming the fix."""
    opt = ("train.distributed_optimizer=true", "checkpoint.save_interval=2")
    out = _train(tmp_path, "dp1", synthetic_prefix, "train.steps=4", *opt)
    reference = _metrics(out)
    (out / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("2\n")
    _train(tmp_path, "dp1", synthetic_prefix, "train.steps=4", *opt, nproc=2)  # resumes at DP=2
    resumed = _metrics(out)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert abs(resumed[step]["loss"] - reference[step]["loss"]) <= 1e-4 * reference[step]["loss"]

    (out / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("2\n")
    proc = bolt("train", str(TINY_CONFIG), f"output_dir={out}", f"data.prefixes=[{synthetic_prefix}]",
                f"data.cache_dir={tmp_path / 'cache'}", "train.steps=5", "train.warmup=1", *opt, "parallel.tp=2",
                nproc=2, check=False)
    assert proc.returncode != 0 and "cannot be loaded at tp 2" in proc.stderr
    assert "checkpoint.optim_fully_reshardable=true" in proc.stderr


@pytest.mark.slow
def test_fully_reshardable_optimizer_state_follows_a_tp_change(tmp_path, synthetic_prefix):
    opt = ("train.distributed_optimizer=true", "checkpoint.save_interval=2", "checkpoint.optim_fully_reshardable=true")
    out = _train(tmp_path, "full", synthetic_prefix, "train.steps=4", *opt)
    reference = _metrics(out)
    (out / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("2\n")
    _train(tmp_path, "full", synthetic_prefix, "train.steps=4", *opt, "parallel.tp=2", nproc=2)
    resumed = _metrics(out)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert abs(resumed[step]["loss"] - reference[step]["loss"]) <= 1e-4 * reference[step]["loss"]
