"""Run unmodified Megatron-Core on CPU + gloo (CI, laptops). Active only without CUDA.

Megatron-Core assumes CUDA in a handful of places: tensors allocated with `device="cuda"` or
`device=torch.cuda.current_device()`, `.cuda()` calls, and a few `torch.cuda.*` queries. Rather than
patching files in site-packages, a `TorchFunctionMode` rewrites CUDA devices to CPU on every torch
call, and the few `torch.cuda` queries get CPU answers. On a GPU machine none of this is installed.

The layer is entered explicitly: an entry point (a `bolt` command, a test, a script) calls
`install()` before it runs Megatron-Core code; library code only checks that it did (`require`).
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_installed = False


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # Megatron passes torch.cuda.current_device() (an int) as a device.
    return isinstance(device, int) and not isinstance(device, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites `device=` arguments and `.cuda()`/`.to("cuda")` calls to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        if func is torch.Tensor.record_stream:
            return None
        if func is torch.Tensor.type:
            # Megatron asserts `t.type() == "torch.cuda.FloatTensor"`; answer with the CUDA name,
            # and turn requests for a CUDA type into the CPU one.
            if len(args) == 1 and "dtype" not in kwargs:
                return func(*args).replace("torch.", "torch.cuda.", 1)
            target = args[1] if len(args) > 1 else kwargs.pop("dtype")
            if isinstance(target, str):
                target = target.replace("torch.cuda.", "torch.")
            return func(args[0], target, **{k: v for k, v in kwargs.items() if k != "dtype"})
        dev = kwargs.get("device")
        if dev is not None and _is_cuda(dev):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for torch.cuda.Stream: work on CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullEvent()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NullEvent(_NullStream):
    def record(self, *args, **kwargs):
        pass

    def query(self):
        return True

    def elapsed_time(self, *args):
        return 0.0


def installed() -> bool:
    return _installed


def require(what: str) -> None:
    """For library code that runs Megatron-Core: on a machine without CUDA, the entry point (a
    `bolt` command, a test, a script) must have called `install()` first."""
    if not _installed and not torch.cuda.is_available():
        raise RuntimeError(f"{what} runs Megatron-Core, which needs CUDA or the CPU compatibility layer: "
                           "call megatron_bolt.compat.cpu.install() first (the bolt commands do)")


def install() -> bool:
    """Install the CPU compatibility layer once, if and only if CUDA is unavailable. Entry points
    call it (the `bolt` commands that run Megatron-Core: train, score, generate, convert; tests);
    library code never does, it only `require`s it. It stays active for the life of the process."""
    global _installed
    if _installed or torch.cuda.is_available():
        return _installed
    mode = CudaToCpuMode()
    mode.__enter__()  # stays active for the life of the process
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.set_device = lambda *a, **k: None
    cuda.device_count = lambda: 0
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.get_device_capability = lambda *a, **k: (0, 0)
    # Activation recomputation saves and restores the device RNG around the recomputed forward.
    # On CPU the device RNG is the CPU generator, which megatron-core saves and restores itself
    # (torch.get_rng_state); its CUDA restore goes through torch.cuda._lazy_call and never runs.
    cuda.random.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.get_rng_state = cuda.random.get_rng_state
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None
    _installed = True
    return True
