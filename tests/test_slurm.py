"""The sbatch scripts of slurm/ on a real SLURM: a one-node cluster on loopback started for this module.

slurm/testing/local_cluster.sh installs Debian's slurm-wlm and munge when missing (CI is root on a
fresh Debian machine), starts munged, slurmctld and slurmd under a temporary directory with free
ports, and stops exactly those daemons at the end. If SLURM cannot be started the tests fail.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY_CONFIG, bolt, free_port, scrubbed_env

pytestmark = pytest.mark.slow  # a real SLURM controller on loopback

CLUSTER = REPO / "slurm" / "testing" / "local_cluster.sh"
EM = REPO / "slurm" / "em.sh"
STEPS, SAVE_INTERVAL = 80, 10
TRAIN_OVERRIDES = [
    "model.seq_len=64", f"train.steps={STEPS}", "train.micro_batch=2", "train.global_batch=4",
    f"checkpoint.save_interval={SAVE_INTERVAL}", "train.log_interval=1",
]
# Small jobs: the test cluster's node declares 16 CPUs on a 2-core machine.
SBATCH = {
    "TRAIN_SBATCH": "--ntasks-per-node=2 --gpus-per-node=0 --cpus-per-task=1 --time=15",
    "FLEET_SBATCH": "--ntasks-per-node=2 --gpus-per-node=0 --cpus-per-task=1 --time=15",
    "ESTEP_SBATCH": "--cpus-per-task=1 --time=15",
    "STEP_SBATCH": "--cpus-per-task=1 --time=15",
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm") / "cluster"
    proc = subprocess.run([str(CLUSTER), "start", str(d), "16"], capture_output=True, text=True, timeout=900)
    env = scrubbed_env(SLURM_CONF=str(d / "slurm.conf"), PATH=f"{REPO / '.venv' / 'bin'}:{os.environ.get('PATH', '')}")
    try:
        if proc.returncode != 0:
            pytest.fail(f"could not start SLURM ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        yield env
    finally:
        if (d / "slurm.conf").exists():
            subprocess.run([str(CLUSTER), "stop", str(d)], timeout=120)


def slurm(env: dict, *cmd: str) -> str:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=60).stdout


def job_fields(env: dict, job: str) -> list[dict[str, str]]:
    """`scontrol -o show job` as dicts, one per job (an array gives one per task)."""
    out = slurm(env, "scontrol", "-o", "show", "job", job)
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]


def wait_for(predicate, timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s: {what}")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Toy documents, a small BPE, a chunk store and a 3-step starting checkpoint, from scratch."""
    from megatron_bolt.toy.world import make_documents, write_jsonl

    d = tmp_path_factory.mktemp("run")
    write_jsonl(d / "docs.jsonl", [{"text": t} for t in make_documents(12, seed=3)])
    bolt("tokenizer", "train", "--input", str(d / "docs.jsonl"), "--vocab-size", "320", "--out", str(d / "tok"))
    bolt("preprocess", "--input", str(d / "docs.jsonl"), "--tokenizer-model", str(d / "tok"),
         "--output-prefix", str(d / "data" / "corpus"), "--chunk-store", str(d / "data" / "chunks.zarr"), "--no-progress")
    from megatron_bolt.tokenizer import load_tokenizer

    vocab = load_tokenizer(str(d / "tok")).vocab_size
    bolt("train", str(TINY_CONFIG), f"data.prefixes=[{d / 'data' / 'corpus_text_document'}]",
         f"model.vocab_size={vocab}", "model.seq_len=64", "train.steps=3",
         f"output_dir={d / 'start'}", f"checkpoint.dir={d / 'start' / 'checkpoints'}")
    return d


def em_args(run: Path) -> list[str]:
    from megatron_bolt.tokenizer import load_tokenizer

    vocab = load_tokenizer(str(run / "tok")).vocab_size  # the model's vocabulary is the tokenizer's
    return [
        str(EM), "--run-dir", str(run), "--config", str(TINY_CONFIG), "--start-ckpt", "start/checkpoints",
        "--tokenizer", "tok", "--chunks", "data/chunks.zarr", "--samples", "2", "--shards", "2",
        "--estep-args", "--block-size 4 --max-latent-tokens 8 --prefix-chunks 1",
        "--", f"model.vocab_size={vocab}", *TRAIN_OVERRIDES,
    ]


def test_em_iteration_through_slurm_with_a_requeued_training_job(cluster, run_dir):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_bolt.stores.latent_store import LatentStore

    env = {**cluster, **SBATCH, "FLEET_ENGINE": "bolt", "FLEET_PORT": str(free_port(span=3))}
    dry = subprocess.run([str(EM), "--dry-run", *em_args(run_dir)[1:]], env=env, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count("sbatch --parsable") == 6 and "--dependency=afterok:<iter1-merge>" in dry.stdout
    assert not slurm(env, "squeue", "-h").strip(), "--dry-run submitted jobs"

    out = subprocess.run(em_args(run_dir), env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    jobs = dict(line.split() for line in out.stdout.splitlines())
    assert list(jobs) == [f"iter1-{s}" for s in ("export", "fleet", "estep", "stop", "merge", "train")]
    train = jobs["iter1-train"]
    ckpt = run_dir / "iter1" / "checkpoints"
    latest = ckpt / "latest_checkpointed_iteration.txt"

    def no_failure():
        for name, job in jobs.items():
            for f in job_fields(env, job):
                bad = f["JobState"] not in ("PENDING", "RUNNING", "COMPLETING", "COMPLETED", "CONFIGURING")
                assert not bad, f"{name} ({f['JobId']}) is {f['JobState']}; see {run_dir / 'logs'}"

    # Preempt the running training job once it has saved a checkpoint. It is frozen (suspend) the
    # moment the checkpoint appears so that the check below holds however fast this machine trains,
    # then resumed and requeued at once, far from its last step.
    polls = 0
    while not (latest.exists() and latest.read_text().strip()):
        if polls % 40 == 0:
            no_failure()
            assert job_fields(env, train)[0]["JobState"] in ("PENDING", "RUNNING"), "training ended without a checkpoint"
        polls += 1
        assert polls < 12000, "no training checkpoint after 10 minutes"
        time.sleep(0.05)
    slurm(env, "scontrol", "suspend", train)
    saved = int(latest.read_text())
    assert SAVE_INTERVAL <= saved <= STEPS - 4 * SAVE_INTERVAL
    slurm(env, "scontrol", "resume", train)
    assert job_fields(env, train)[0]["JobState"] == "RUNNING"
    slurm(env, "scontrol", "requeue", train)
    wait_for(lambda: job_fields(env, train)[0]["JobState"] == "PENDING", 60, "the requeued job to be pending")
    # a requeued job waits for a begin time a little later; start it now to keep the test short
    slurm(env, "scontrol", "update", f"JobId={train}", "StartTime=now")

    wait_for(lambda: no_failure() or not slurm(env, "squeue", "-h").strip(), 600, "all jobs to finish", every=1)
    for name, job in jobs.items():
        for fields in job_fields(env, job):
            assert fields["JobState"] == "COMPLETED", f"{name} ({fields['JobId']}) is {fields['JobState']}; see {run_dir / 'logs'}"
    estep_tasks = job_fields(env, jobs["iter1-estep"])
    assert sorted(f["ArrayTaskId"] for f in estep_tasks) == ["0", "1"]
    assert job_fields(env, train)[0]["Restarts"] == "1"

    # outputs: a complete latent store, merged binaries Megatron reads, the trained checkpoint
    store = LatentStore.open(str(run_dir / "iter1" / "latents.zarr"), mode="r")
    assert store.blocks_done() == set(range(store.num_blocks)) and store.num_blocks >= 2
    merged = IndexedDataset(str(run_dir / "iter1" / "data" / "ltm_text_document"))
    assert len(merged) == 12
    assert int(latest.read_text()) == STEPS
    steps = [json.loads(line)["step"] for line in (run_dir / "iter1" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    log = (run_dir / "logs" / f"bolt-train-{train}.out").read_text()
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", log)]
    assert len(resumed) == 1 and saved <= resumed[0] < STEPS, log[-3000:]
    assert "loaded weights from start/checkpoints" in log  # the first run started from the previous model
    assert (run_dir / "iter1" / "model_hf" / "config.json").exists()
    fleet_log = (run_dir / "logs" / f"bolt-fleet-{jobs['iter1-fleet']}.out").read_text()
    assert "fleet stopped" in fleet_log and not (run_dir / "iter1" / "router_url").exists()


def test_estep_fails_at_once_with_one_clear_line(cluster, tmp_path):
    proc = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={tmp_path}", "--array=0-0", "--cpus-per-task=1", "--output=%x-%a.out",
         str(REPO / "slurm" / "estep.sbatch")],
        env={**cluster, "MODEL": "", "CHUNKS": "c.zarr"}, capture_output=True, text=True, timeout=60, check=True,
    )
    job = proc.stdout.strip().split(";")[0]
    wait_for(lambda: job_fields(cluster, job)[0]["JobState"] not in ("PENDING", "RUNNING", "COMPLETING"), 120,
             "the job to end")
    assert job_fields(cluster, job)[0]["JobState"] == "FAILED"
    assert "error: estep.sbatch: variable MODEL is not set" in (tmp_path / "bolt-estep-0.out").read_text()

    # an E-step whose fleet job has ended stops waiting for the router URL at once
    (tmp_path / "hf").mkdir()
    (tmp_path / "c.zarr").mkdir()
    fleet = slurm(cluster, "sbatch", "--parsable", f"--chdir={tmp_path}", "--output=/dev/null", "--wrap=exit 1").split(";")[0]
    wait_for(lambda: not slurm(cluster, "squeue", "-h", "-j", fleet).strip(), 60, "the stand-in fleet job to end")
    proc = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={tmp_path}", "--array=0-0", "--cpus-per-task=1", "--output=%x-%a-dead.out",
         str(REPO / "slurm" / "estep.sbatch")],
        env={**cluster, "MODEL": "hf", "CHUNKS": "c.zarr", "OUT": "l.zarr", "SAMPLES": "2", "URLFILE": "url",
             "FLEET_JOB": fleet}, capture_output=True, text=True, timeout=60, check=True,
    )
    job = proc.stdout.strip().split(";")[0]
    wait_for(lambda: job_fields(cluster, job)[0]["JobState"] not in ("PENDING", "RUNNING", "COMPLETING"), 120,
             "the job to end")
    assert job_fields(cluster, job)[0]["JobState"] == "FAILED"
    assert f"error: estep.sbatch: fleet job {fleet} ended before url held" in (tmp_path / "bolt-estep-0-dead.out").read_text()


def test_em_sh_rejects_missing_arguments(tmp_path):
    proc = subprocess.run([str(EM), "--run-dir", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: em.sh: --config is required (see --help)"
    proc = subprocess.run([str(EM), "--run-dir", str(tmp_path), "--config", "missing.yaml", "--start-ckpt", "c",
                           "--chunks", "x", "--samples", "2"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "training config not found: missing.yaml" in proc.stderr


def test_em_sh_dry_run_chains_iterations(tmp_path):
    (tmp_path / "train.yaml").write_text("model: {}\n")
    (tmp_path / "chunks.zarr").mkdir()
    proc = subprocess.run(
        [str(EM), "--dry-run", "--run-dir", str(tmp_path), "--config", "train.yaml", "--start-ckpt", "warm/checkpoints",
         "--chunks", "chunks.zarr", "--samples", "4", "--iterations", "2", "--first-iteration", "3",
         "--extra-data", "0.5:warm/merged_text_document", "--", "train.steps=7"],
        capture_output=True, text=True, timeout=30, env={**os.environ, "TRAIN_SBATCH": "--nodes=2"},
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 12 and all(" sbatch --parsable " in line for line in lines)
    assert "--dependency=afterok:<iter3-train> " in lines[6] and "--ckpt iter3/checkpoints" in lines[6]
    assert "--array=0-7 " in lines[8] and "--shard" not in lines[8]  # the array task picks its shard
    train4 = lines[11]
    assert "--nodes=2 " in train4 and "checkpoint.load=iter3/checkpoints" in train4 and train4.endswith("train.steps=7")
    assert 'data.prefixes=\\[0.5\\,\\"warm/merged_text_document\\"\\,1\\,\\"iter4/data/ltm_text_document\\"\\]' in train4
    assert not (tmp_path / "logs").exists() and not (tmp_path / "iter3").exists()  # a dry run writes nothing


def _readme_blocks(path: Path) -> list[str]:
    """The ```bash blocks of a markdown file, line continuations joined."""
    return [b.replace("\\\n", " ") for b in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S)]


def test_tinyllama_finemath_chain_dry_run(tmp_path):
    """The paper's example as documented: every iteration trains from the base model on its own
    latents only, the E-step uses the previous iteration's model, and the merges get the epochs of
    the training length in train.yaml."""
    from megatron_bolt.config import load_config
    from megatron_bolt.data.merge import planned_train_tokens

    example = REPO / "examples" / "tinyllama_finemath"
    blocks = _readme_blocks(example / "README.md")
    (chain,) = [b for b in blocks if "em.sh" in b]
    run = tmp_path / "runs" / "tinyllama_finemath"
    (run / "data" / "rest_chunks.zarr").mkdir(parents=True)
    (run / "base" / "tokenizer").mkdir(parents=True)
    (run / "train.yaml").write_text((example / "train.yaml").read_text())
    proc = subprocess.run(["bash", "-c", f"B={REPO / 'slurm'}; " + chain.replace("em.sh ", "em.sh --dry-run ", 1)],
                          cwd=run, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 18
    train = load_config(example / "train.yaml")
    iteration_tokens = planned_train_tokens(train.train.steps, train.train.global_batch, train.model.seq_len)
    for n in (1, 2, 3):
        export, _, estep, _, merge, trained = lines[6 * (n - 1): 6 * n]
        assert f"--ckpt {'warmstart' if n == 1 else f'iter{n - 1}'}/checkpoints" in export
        assert "SAMPLES=4 " in estep and "--prefix-chunks 3 --max-latent-tokens 1024" in estep
        assert f"--min-tokens {iteration_tokens}" in merge
        assert "checkpoint.load=base " in trained  # restart from the base model, every iteration
        assert f'data.prefixes=\\[\\"iter{n}/data/ltm_text_document\\"\\]' in trained  # its latents only
    # the warm start's merge covers its 4,069 x 96 x 2048 tokens, as its training command says
    warm = " ".join(blocks)
    assert f"--min-tokens {planned_train_tokens(4069, 96, 2048)}" in warm and "train.steps=4069 train.global_batch=96" in warm
    assert not (run / "logs").exists()
