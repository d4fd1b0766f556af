"""Shared fixtures: small data the tests generate themselves (no ../shared, no downloads)."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "examples" / "tiny" / "config.yaml"


# The suite is an entry point: it sets what `bolt` sets for its process (cli.process_defaults),
# here an in-process engine core for the tests that build a vLLM engine themselves.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


_PORTS_GIVEN: set[int] = set()
_PORTS_PER_WORKER = 1000


def free_port(span: int = 1) -> int:
    """The first of `span` consecutive loopback ports that nothing holds, for a server a test starts
    (it binds them seconds later). They come from below the kernel's ephemeral range, from a range of
    this pytest-xdist worker's own, and are never handed out twice in a session: a port from bind(0)
    is an ephemeral one, which in those seconds can go to any socket of the other worker (its
    clients' connections, its own servers), and two ports picked before either server binds can
    be the same."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    index = int(worker) if worker.isdigit() else 0
    low = max(1024, ephemeral_low - _PORTS_PER_WORKER * (index + 1))
    for base in range(low, low + _PORTS_PER_WORKER - span + 1):
        ports = range(base, base + span)
        if any(p in _PORTS_GIVEN for p in ports):
            continue
        try:
            for p in ports:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        _PORTS_GIVEN.update(ports)
        return base
    raise RuntimeError(f"no {span} free consecutive ports in {low}-{low + _PORTS_PER_WORKER}")


@pytest.fixture(scope="session")
def megatron_cpu() -> None:
    """For tests that run Megatron-Core in this process: the entry point's step (as in the bolt
    commands) of entering the CPU compatibility layer; a no-op with CUDA. It stays for the session."""
    from megatron_bolt.compat import cpu as cpu_compat

    cpu_compat.install()


def scrubbed_env(**extra: str) -> dict[str, str]:
    """This environment for a child `bolt` as a user would start it: no launcher variables
    inherited (a test runner under torchrun or SLURM must not make it a rank), one thread."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}


def bolt(*args: str, nproc: int = 1, timeout: int = 600, env: dict | None = None, check: bool = True,
         cwd: Path | str = REPO):
    """Run the bolt CLI as a user would: one process, or `torchrun --nproc-per-node nproc`."""
    full_env = scrubbed_env(**(env or {}))
    if nproc > 1:
        # --standalone: torchrun binds its rendezvous port itself (no port picked here that a
        # concurrent test could take first), as runtime.launch_command does
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "megatron_bolt", *args]
    else:
        cmd = [sys.executable, "-m", "megatron_bolt", *args]
    if Path(cwd) != REPO:
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def tiny_llama(path: Path, vocab_size: int = 48, max_positions: int = 256, sharpen: float = 8.0,
               bos_id: int = 0, eos_id: int = 1) -> str:
    """A random 2-layer GQA LlamaForCausalLM saved at `path` (HF layout), seeded; its lm_head is
    scaled by `sharpen` so sampling is not uniform noise and greedy argmaxes have clear margins."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_positions, eos_token_id=eos_id, bos_token_id=bos_id,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    model.save_pretrained(path)
    return str(path)


# ------------------------------------------------------------------ no process outlives the suite
# Every process the suite starts inherits this variable, so one left behind is found even after its
# parent died and it was re-parented to init (an orphaned server or multiprocessing child).
SESSION_VAR = "MEGATRON_BOLT_TEST_SESSION"


def _session_processes(tag: str) -> list[tuple[int, str]]:
    """(pid, command line) of live processes other than this one whose environment has the tag."""
    found, needle = [], f"{SESSION_VAR}={tag}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # a zombie holds nothing; its parent has not reaped it yet
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        found.append((int(entry.name), cmdline))
    return found


# ------------------------------------------------------------------ two workers (pytest-xdist)
# `make test` runs the suite on two pytest-xdist workers with `--dist loadscope`: each module goes
# whole to one worker, so its module-scoped fixtures (trained checkpoints, a vLLM engine, a SLURM
# cluster) are built once. The README test reads the session's micro EM run, so it goes with the EM
# tests (SHARED_SCOPE). Modules are handed out in collection order (the Makefile's
# --no-loadscope-reorder; xdist would otherwise order them by test count), which puts the longest first
# (measured, serial run on 2 idle cores, 2026-12-02: training 205 s, EM + README 194 s, CLI settings
# 133 s, SLURM 108 s, ponder 87 s, vLLM 78 s, ...) so that no long module starts last.
SHARED_SCOPE = {"tests/test_readme.py": "tests/test_em.py"}
LONGEST_FIRST = ("test_training", "test_em", "test_readme", "test_cli_gpu_settings", "test_slurm", "test_ponder",
                 "test_vllm", "test_megatron_features", "test_convert", "test_serve_router", "test_estep")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: a module keeps its order


class _ModuleScheduling:
    """pytest-xdist hook: loadscope scheduling with SHARED_SCOPE's modules merged."""

    @staticmethod
    def pytest_xdist_make_scheduler(config: pytest.Config, log):
        from xdist.scheduler import LoadScopeScheduling

        class Scheduling(LoadScopeScheduling):
            def _split_scope(self, nodeid: str) -> str:
                scope = super()._split_scope(nodeid)
                return SHARED_SCOPE.get(scope, scope)

        return Scheduling(config, log) if config.getvalue("dist") == "loadscope" else None


def pytest_configure(config: pytest.Config) -> None:
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_ModuleScheduling(), "megatron_bolt_module_scheduling")


def pytest_sessionstart(session: pytest.Session) -> None:
    os.environ[SESSION_VAR] = f"{os.getpid()}-{time.time_ns()}"


def _own_tracker_excluded(procs: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Drop this process's multiprocessing resource tracker: it lives exactly as long as we do."""
    def ours(pid: int, cmd: str) -> bool:
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        return ppid == os.getpid() and "multiprocessing.resource_tracker" in cmd
    return [(pid, cmd) for pid, cmd in procs if not ours(pid, cmd)]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    tag = os.environ.get(SESSION_VAR)
    if not tag or not Path("/proc").is_dir():
        return
    # This process's own multiprocessing helpers (Megatron's async checkpoint writer caches a
    # Manager() here when a test trains in-process) end with it; stop them as its exit would,
    # and leave its resource tracker, which exits when this process closes its pipe.
    for child in multiprocessing.active_children():
        child.terminate()
        child.join(5)
    deadline = time.monotonic() + 10  # children that are shutting down get a moment
    left = _own_tracker_excluded(_session_processes(tag))
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = _own_tracker_excluded(_session_processes(tag))
    if left:
        for pid, _ in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        listing = "\n".join(f"  pid {pid}: {cmd[:200]}" for pid, cmd in left)
        session.config.get_terminal_writer().line(f"\nprocesses left running by the tests (now killed):\n{listing}",
                                                   red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# ------------------------------------------------------------------ one micro EM run for the session
MICRO_EM_TRAIN = """
model: {num_layers: 2, hidden_size: 32, num_attention_heads: 2, ffn_hidden_size: 64, seq_len: 128}
train: {steps: 4, micro_batch: 4, global_batch: 4, lr: 3.0e-3, min_lr: 3.0e-4, warmup: 1, log_interval: 2}
checkpoint: {save_interval: 2}
"""
# the shared run: the paper's protocol with everything on (both raw baselines, the K=1 ablation), a
# warm start of its own length, and three iterations (README's commands name runs/demo/iter3)
MICRO_EM_FULL = {"iterations": 3, "raw_baselines": "[tokens, flops]", "ablation_samples": "[1]"}


def micro_em_args(tmp: Path, **extra: object) -> list[str]:
    """`bolt em` arguments of a micro toy run into tmp/run (seconds per step); `extra` overrides."""
    (tmp / "train.yaml").write_text(MICRO_EM_TRAIN)
    overrides = {
        "output_dir": str(tmp / "run"), "train_config": str(tmp / "train.yaml"), "iterations": 1,
        "corpus.toy_warm_docs": 6, "corpus.toy_rest_docs": 6, "corpus.toy_valid_docs": 2,
        "warmstart.train_steps": 6,
        "estep.samples": 2, "estep.max_latent_tokens": 16, "engine.threads": 1,
        "eval.limit": 6, "eval.shots": 2, "eval.max_new_tokens": 24, "iwae_samples": "[1, 2]",
        **extra,
    }
    return [str(REPO / "examples" / "toy" / "em.yaml"), *(f"{k}={v}" for k, v in overrides.items())]


@pytest.fixture(scope="session")
def micro_em_run(tmp_path_factory) -> Path:
    """One finished micro `bolt em` run (MICRO_EM_FULL), shared by the EM and README tests, which
    only read it: the loop's most expensive part (a dozen training and export processes) runs once."""
    tmp = tmp_path_factory.mktemp("micro_em")
    proc = bolt("em", *micro_em_args(tmp, **MICRO_EM_FULL), timeout=1200)
    assert "iter3 (K=2)" in proc.stdout and "iter3 (K=1)" in proc.stdout  # the final table
    return tmp / "run"


@pytest.fixture(scope="session")
def synthetic_prefix(tmp_path_factory) -> str:
    from megatron_bolt.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "synthetic", num_docs=200)
