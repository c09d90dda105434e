"""One home for what a run reads from its environment and its machine: the ``REGCLS_*`` folders and the image
cap, the Hugging Face hub, the GPU (driver, native bfloat16, the device and the precision to use) and the
one-line description of the hardware."""
from __future__ import annotations

import contextlib
import os
import platform
import socket
from pathlib import Path

from .errors import RegclsError

HOME = Path.home() / ".cache" / "regcls"   # the default of every REGCLS_* folder


def image_cap() -> int | None:
    """``REGCLS_LIMIT``: at most this many images of every dataset, on any profile (None when unset)."""
    raw = os.environ.get("REGCLS_LIMIT", "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 4:
        raise RegclsError(f"REGCLS_LIMIT={raw!r}: give a whole number of images, at least 4")
    return int(raw)


def offline_requested() -> bool:
    """``HF_HUB_OFFLINE`` is set: the hub is not to be tried."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def hub_reachable(timeout: float = 2.0) -> bool:
    """True when the Hugging Face hub answers and offline mode is off (a quick TCP check)."""
    if offline_requested():
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_offline(offline: bool = True):
    """Within: the Hugging Face hub is read from its local cache only (no connection tried, no retries), where
    ``offline``; the process's setting (variable and the hub library's flag) is restored afterwards."""
    if not offline:
        yield
        return
    import huggingface_hub.constants as hc

    old = os.environ.get("HF_HUB_OFFLINE"), hc.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], hc.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        if old[0] is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old[0]
        hc.HF_HUB_OFFLINE = old[1]


def native_bf16() -> bool:
    """True on a CUDA GPU with native bfloat16 (A100, H100 or newer), false on a T4 or without a GPU."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def native_tf32(device: str) -> bool:
    """True on a CUDA device with TF32 tensor cores (compute capability 8.0 or newer: A100, H100, L4, ...)."""
    import torch

    dev = torch.device(device)
    return dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(dev) >= (8, 0)


def driver_cuda_version() -> tuple[int, int] | None:
    """The CUDA version the installed NVIDIA driver supports, ``(major, minor)``, asked of the driver library
    itself (``cuDriverGetVersion``), so that it answers where torch cannot use the GPU; None without a driver."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if lib.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
        return None
    return version.value // 1000, (version.value % 1000) // 10


def cuda_problem() -> str | None:
    """One line saying why torch cannot use this machine's NVIDIA GPU, or None (a usable GPU, or no NVIDIA
    driver at all). The common case: torch 2.14 is built for CUDA 13, which needs a driver of the 580 series or
    newer; on an older driver ``torch.cuda.is_available()`` is only False."""
    import torch

    if torch.cuda.is_available():
        return None
    driver = driver_cuda_version()
    if driver is None:
        return None
    have = f"{driver[0]}.{driver[1]}"
    built = torch.version.cuda
    if built is None:
        return (f"torch {torch.__version__} is a CPU-only build, but this machine has an NVIDIA driver (CUDA {have}): "
                "install a CUDA build of torch (see the reproducing page)")
    if tuple(int(x) for x in built.split(".")[:2]) > driver:
        return (f"the NVIDIA driver (CUDA {have}) is too old for this torch {torch.__version__} (CUDA {built}): update "
                f"the driver (CUDA {built.split('.')[0]} needs the 580 series or newer) or install the CUDA "
                f"{driver[0]} build of the same torch version (see the reproducing page)")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (f"an NVIDIA driver (CUDA {have}) is installed but torch sees no GPU"
            + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""))


def cache_dir() -> Path:
    """``REGCLS_CACHE`` or ``~/.cache/regcls``."""
    return Path(os.environ.get("REGCLS_CACHE", HOME))


def records_dir() -> Path:
    """Where the chapters record their claims and their runs (``claims/PROFILE``, ``chapters/PROFILE``):
    ``REGCLS_RECORDS``, else the cache folder. ``make book`` sets it inside the build folder, so that the records
    travel with the executed pages that show them: a build that reuses a chapter's cached outputs also finds the
    claims that run recorded, and a build with a fresh execution cache starts without them."""
    return Path(os.environ["REGCLS_RECORDS"]) if os.environ.get("REGCLS_RECORDS") else cache_dir()


def resolve_device(device: str) -> str:
    """``"auto"``: CUDA when there is a GPU, else the CPU. ``"cuda"`` without a GPU: the CPU, with a warning.

    Where the machine has an NVIDIA driver that torch cannot use (too old for its CUDA), both warn with the reason
    (:func:`cuda_problem`): a GPU machine never traces on the CPU silently."""
    import warnings

    import torch

    if torch.cuda.is_available() or not (device == "auto" or device.startswith("cuda")):
        return "cuda" if device == "auto" else device
    problem = cuda_problem()
    if device == "auto" and problem is None:
        return "cpu"
    warnings.warn(f"{problem or 'no CUDA device'}: tracing on the CPU, which is slow for the large models",
                  stacklevel=3)
    return "cpu"


def check_device(device: str) -> None:
    """Refuse a device this machine does not have, before any work (saying why, where the driver is the cause)."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise RegclsError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        problem = cuda_problem()
        raise RegclsError(problem or f"no CUDA device {device!r} on this machine "
                          f"({torch.cuda.device_count()} visible); use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise RegclsError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")


def resolve_precision(device: str, precision: str) -> tuple[str, bool]:
    """``(device, amp)`` for ``--device`` and ``--precision``: ``auto`` is CUDA when torch can use a GPU (else the
    CPU, with the reason when the machine has a GPU torch cannot use) and a lower precision on that GPU
    (:func:`use_amp`); ``bf16`` asks for a lower precision anywhere (each step is still checked against float32
    before use; on the CPU only bf16 is tried)."""
    if device != "auto":
        check_device(device)
    device = resolve_device(device)
    if precision == "auto":
        return device, use_amp(device)
    return device, precision == "bf16"


def data_root() -> Path:
    """Where datasets live: ``REGCLS_DATA`` or ``~/.cache/regcls/data``."""
    return Path(os.environ.get("REGCLS_DATA", HOME / "data"))


def hardware() -> str:
    """One line naming the machine a chapter ran on."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA), torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


def checkpoints_dir() -> Path:
    """Where local weights named in a profile live (iBOT's): ``REGCLS_CHECKPOINTS`` or ``~/.cache/regcls/checkpoints``."""
    return Path(os.environ.get("REGCLS_CHECKPOINTS", HOME / "checkpoints"))


def use_amp(device: str) -> bool:
    """The default precision: a lower one on any CUDA GPU -- bfloat16 autocast where it is native (A100, H100),
    float16 autocast elsewhere (a T4), TF32 as the next step -- each checked against float32 before use
    (:mod:`regcls.precision`); float32 on the CPU. The one place this is decided."""
    import torch

    return torch.device(device).type == "cuda"
