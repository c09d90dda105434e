"""Running one trace on many processes: torchrun (one process per GPU, on one node or several) and scheduler job
arrays (SLURM). Each process traces a contiguous shard of the images into its own part file, resuming its own
batches after an interruption; one process (rank 0, or ``regcls merge --wait``) merges the parts once all are
there. The parts are files, so a rerun after any failure resumes every shard, and the merge waits on the files
themselves (a barrier that needs no network between the processes).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

from .errors import RegclsError
from .tracefile import merge_traces


class World(NamedTuple):
    """This process's place among the processes of one run: ``rank`` of ``size``; ``local_rank`` picks its GPU."""

    rank: int
    size: int
    local_rank: int

    @property
    def shard(self) -> str:
        return f"{self.rank}/{self.size}"


def torchrun_world() -> World | None:
    """The torchrun world from ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (None outside torchrun)."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    try:
        w = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise RegclsError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
    if not 0 <= w.rank < w.size:
        raise RegclsError(f"RANK {w.rank} is outside WORLD_SIZE {w.size}")
    return w


def array_shard() -> str:
    """``"i/k"`` of this job-array task, from ``SLURM_ARRAY_TASK_ID`` (counted from ``SLURM_ARRAY_TASK_MIN``,
    default 0) and ``SLURM_ARRAY_TASK_COUNT``."""
    try:
        task = int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
        count = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
    except KeyError as e:
        raise RegclsError(f"--shard auto needs a job array: {e.args[0]} is not set (sbatch --array=0-N)") from None
    except ValueError:
        raise RegclsError("SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT must be integers") from None
    if not 0 <= task < count:
        raise RegclsError(f"array task {task} is outside the array's {count} tasks")
    return f"{task}/{count}"


def device_for(world: World | None, device: str) -> str:
    """``device`` for this process: under torchrun, ``"auto"`` and ``"cuda"`` mean this rank's own GPU."""
    import torch

    if world is None or device not in ("auto", "cuda"):
        return device
    if torch.cuda.is_available():
        return f"cuda:{world.local_rank % torch.cuda.device_count()}"
    return "cpu"


def part_path(out: str | Path, shard: str) -> Path:
    """The part file of shard ``"i/k"`` of the trace ``out``: ``NAME.part-i-of-k.npz`` beside it."""
    out = Path(out)
    i, k = shard.split("/")
    return out.with_name(f"{out.stem}.part-{int(i):04d}-of-{int(k):04d}{out.suffix}")


def all_parts(out: str | Path, count: int) -> list[Path]:
    return [part_path(out, f"{i}/{count}") for i in range(count)]


def merge_parts(out: str | Path, count: int, timeout: float | None = None) -> Path:
    """Wait until all ``count`` parts of ``out`` are there, merge them into ``out`` (checking that they belong
    together, :func:`regcls.trace.merge_traces`), and remove them."""
    parts = all_parts(out, count)
    wait_for(parts, timeout=timeout)
    merge_traces(parts, out)
    for p in parts:
        p.unlink()
    return Path(out)


def wait_for(paths: list[Path], timeout: float | None = None, poll: float = 2.0, say=None) -> None:
    """Block until every file exists (written atomically, so a file that exists is whole). ``timeout`` seconds
    (None: forever) raises :class:`RegclsError` naming the missing ones."""
    start, told = time.monotonic(), -1
    while True:
        missing = [p for p in paths if not p.is_file()]
        if not missing:
            return
        if timeout is not None and time.monotonic() - start > timeout:
            raise RegclsError(f"{len(missing)} of {len(paths)} parts still missing after {timeout:.0f} s: "
                              + ", ".join(p.name for p in missing[:4]) + (" ..." if len(missing) > 4 else ""))
        if len(missing) != told:
            (say or (lambda m: print(m, file=sys.stderr, flush=True)))(
                f"waiting for {len(missing)} of {len(paths)} parts ({missing[0].name} ...)")
            told = len(missing)
        time.sleep(poll)
