"""Process-group setup from torchrun or SLURM, device choice, Megatron-Core parallel state.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. Under `srun` (one task per GPU)
the same facts come from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, and the master is the first host
of SLURM_NODELIST, so sbatch scripts never hand-edit host names.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
import re
import signal
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO

import numpy as np
import torch
import torch.distributed as dist

from megatron_bolt.compat import cpu as cpu_compat


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int  # where the ranks meet; unused by a single rank (0: none)


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist: 'gpu[003-005,9],cpu1' -> 'gpu003' (no scontrol needed)."""
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    m = re.match(r"^([^\[]+)\[([^\]]+)\](.*)$", first)
    if not m:
        return first
    prefix, ranges, suffix = m.groups()
    start = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{start}{suffix}"


def _slurm_port(job_id: str | None) -> int:
    # Deterministic per job so every task agrees without talking; away from common ports.
    return 20000 + (int(job_id) % 20000 if job_id and job_id.isdigit() else 9999)


def detect_env(environ: dict[str, str] | None = None) -> DistEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or (first_slurm_host(nodelist) if nodelist else "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT") or _slurm_port(env.get("SLURM_JOB_ID"))),
        )
    return DistEnv(0, 1, 0, "127.0.0.1", 0)


def under_launcher(environ: dict[str, str] | None = None) -> bool:
    """True in a rank started by torchrun (RANK/WORLD_SIZE) or by srun (SLURM_PROCID/SLURM_NTASKS in a step)."""
    env = os.environ if environ is None else environ
    return ("RANK" in env and "WORLD_SIZE" in env) or (
        "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env
    )


def single_rank_env() -> DistEnv:
    """A job that is exactly one rank on this machine (what torchrun gives --nproc-per-node 1), so
    a stray SLURM allocation size is not mistaken for ranks. It binds no port (init_distributed)."""
    return DistEnv(0, 1, 0, "127.0.0.1", 0)


def rank_env() -> DistEnv:
    """Where this process stands: a rank of torchrun / srun when under one (`under_launcher`),
    otherwise the only rank (`single_rank_env`)."""
    return detect_env() if under_launcher() else single_rank_env()


def launch_command(argv: list[str], nproc: int = 1) -> list[str]:
    """The command line of `bolt <argv>` in a new process: plain for one rank, else under
    `torchrun --standalone --nproc-per-node nproc` (one machine, a free rendezvous port)."""
    bolt = ["-m", "megatron_bolt", *argv]
    if nproc <= 1:
        return [sys.executable, *bolt]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *bolt]


def relaunch(argv: list[str], nproc: int = 1, log: IO[str] | None = None, env: dict[str, str] | None = None,
             forward_signals: Iterable[signal.Signals] = ()) -> int:
    """Run `bolt <argv>` as `nproc` local ranks and wait; returns the exit code.

    The one way a command gets processes of its own: `bolt train/score/generate --nproc-per-node N`
    hand their own full argv here (under torchrun the flag is ignored, every other flag arrives as
    typed), and the EM driver runs its training and conversion steps through it. With `log`, the
    children's stdout and stderr go to that file. `forward_signals` received here are passed to the
    ranks themselves, not to torchrun (which would tear its workers down on SIGTERM and die of
    SIGUSR1), so a save-and-exit signal reaches the training loop."""
    child_env = dict(os.environ if env is None else env)
    # torchrun sets the launcher variables per rank; a single child is no rank of anything: without
    # them (and without SLURM's task numbers, when this runs inside an allocation) it is one process
    # that picks its own free port when it starts its process group, not seconds earlier here, where
    # another process could take the port in between.
    drop = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"]
    if nproc <= 1:
        drop += ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"]
    for key in drop:
        child_env.pop(key, None)
    out = {"stdout": log, "stderr": subprocess.STDOUT} if log is not None else {}
    proc = subprocess.Popen(launch_command(argv, nproc), env=child_env, **out)

    def forward(signum, frame):
        import psutil

        targets = psutil.Process(proc.pid).children() if nproc > 1 else [proc]
        for child in targets:  # under torchrun: the ranks, not their helpers
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in set(forward_signals)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(
    tp: int = 1,
    pp: int = 1,
    seed: int = 1234,
    timeout_min: int = 30,
    vp: int | None = None,
    gloo_process_groups: bool = True,
    cp: int = 1,
    env: DistEnv | None = None,
) -> DistEnv:
    """Start torch.distributed (NCCL on GPU, gloo on CPU) and Megatron-Core's TP/PP/CP/DP groups.

    `env` says where this rank stands (default: `detect_env()` of this process's environment). The
    ranks meet at its master address through a TCPStore (`tcp://` init; under torchrun, its agent's
    store); a single rank uses an in-process HashStore instead, on GPU and CPU alike, and binds no
    port. Nothing is exported to `os.environ`. Only the backend and the device depend on CUDA; the
    parallel state is created with the same arguments either way (`gloo_process_groups` is
    Megatron-LM's --disable-gloo-process-groups, and must be the flag the optimizer is built with:
    megatron_bolt.training.settings). Without CUDA, the entry point must have installed the CPU
    compatibility layer first (`megatron_bolt.compat.cpu.install()`).
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mp_random

    env = env or detect_env()
    cpu_compat.require("runtime.init_distributed")
    use_cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        backend, timeout = ("nccl" if use_cuda else "gloo"), datetime.timedelta(minutes=timeout_min)
        if env.world_size == 1:
            # One rank meets nobody: an in-process store, so no port is bound (two single-rank jobs
            # starting at once on a machine could otherwise both pick the same "free" port).
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            host = f"[{env.master_addr}]" if ":" in env.master_addr else env.master_addr  # IPv6
            dist.init_process_group(backend=backend, init_method=f"tcp://{host}:{env.master_port}",
                                    rank=env.rank, world_size=env.world_size, timeout=timeout)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            context_parallel_size=cp,
            virtual_pipeline_model_parallel_size=vp,
            create_gloo_process_groups=gloo_process_groups,
        )
    set_seed(seed)
    if use_cuda:
        mp_random.model_parallel_cuda_manual_seed(seed)
    else:
        # No CUDA RNG on CPU; dropout is off in our models, so a null tracker is exact.
        mp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    return env


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)
