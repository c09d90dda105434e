"""Scale-out: torchrun (two CPU ranks, gloo's world of processes) and job arrays (two fake SLURM tasks), each
against a single-process run of the same trace; a rank killed mid-run and a rerun; one line per failed rank."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import TINY_CLI, random_png_folder

from regcls import launch
from regcls.runner import images_kept
from regcls.errors import RegclsError

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ARGS = [*TINY_CLI, "--batch-size", "3"]


def env(**extra):
    e = {**os.environ, **extra}
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    return e


def regcls(*args, prefix=(), timeout=300, **extra):
    return subprocess.run([*prefix, *([sys.executable] if not prefix else []), "-m", "regcls", *args],
                          capture_output=True, text=True, timeout=timeout, env=env(**extra))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return random_png_folder(tmp_path_factory.mktemp("imgs"), 21, seed=4)


@pytest.fixture(scope="module")
def single(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "one.npz"
    r = regcls("trace", *ARGS, "--images", str(folder), "--out", str(out))
    assert r.returncode == 0, r.stderr
    return np.load(out)


def same(path, ref):
    got = np.load(path)
    assert list(got["image_ids"]) == list(ref["image_ids"])
    for k in ref.files:
        if ref[k].dtype.kind == "f":
            np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=1e-6, err_msg=k)


def test_two_ranks_merge_into_what_one_process_writes(folder, single, tmp_path):
    out = tmp_path / "two.npz"
    r = regcls("trace", *ARGS, "--images", str(folder), "--out", str(out), prefix=TORCHRUN)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "from 2 ranks" in r.stdout
    same(out, single)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two.npz"]      # rank 0 alone writes; no parts left


def test_rank_0_waits_for_every_part_before_it_merges(folder, single, tmp_path):
    """The two ranks of a world of two, started by hand one after the other: rank 1 starts only once rank 0 has
    written its part and says it waits, so the order is fixed, not a race."""
    out = tmp_path / "two.npz"
    cmd = [sys.executable, "-m", "regcls", "trace", *ARGS, "--images", str(folder), "--out", str(out)]
    rank0 = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**env(), "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    lines = []
    while not any("waiting for 1 of 2 parts" in line for line in lines):
        lines.append(rank0.stderr.readline())
        assert lines[-1] or rank0.poll() is None, "rank 0 ended without waiting: " + "".join(lines)
    assert (tmp_path / "two.part-0000-of-0002.npz").is_file() and not out.exists()   # its part, no merge yet
    rank1 = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                           env={**env(), "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert rank1.returncode == 0, rank1.stderr
    assert "two.part-0001-of-0002.npz" in rank1.stdout and "ranks" not in rank1.stdout   # rank 1: its part only
    stdout, stderr = rank0.communicate(timeout=120)
    assert rank0.returncode == 0, stderr
    assert "from 2 ranks" in stdout
    same(out, single)


def test_a_rank_killed_mid_run_and_a_rerun_give_the_same_file(folder, single, tmp_path):
    out = tmp_path / "two.npz"
    cmd = [*TORCHRUN, "-m", "regcls", "trace", *ARGS, "--images", str(folder), "--out", str(out)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env(REGCLS_TEST_PAUSE_AFTER_BATCHES="2"),
                            start_new_session=True)
    pids, deadline = [], time.monotonic() + 240
    while len(pids) < 2 and time.monotonic() < deadline:   # both ranks have two batches on disk
        line = proc.stderr.readline()
        if "paused after 2 batches (pid " in line:
            pids.append(int(line.rsplit("pid ", 1)[1].split(")")[0]))
    assert len(pids) == 2, "the ranks did not pause"
    os.kill(pids[1], signal.SIGKILL)                        # one rank dies; torchrun stops the other
    proc.wait(timeout=120)
    assert proc.returncode != 0 and not out.exists()
    kept = [images_kept(p) for p in tmp_path.glob("two.part-*.npz.parts")]
    assert kept == [6, 6]                                    # two batches of each rank survive
    r = regcls("trace", *ARGS, "--images", str(folder), "--out", str(out), prefix=TORCHRUN)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("resuming: 6 of") == 2             # every rank resumes its own batches
    same(out, single)


def test_a_failed_rank_says_which_in_one_line(tmp_path):
    r = regcls("trace", *ARGS, "--images", str(tmp_path / "missing"), "--out", str(tmp_path / "t.npz"), prefix=TORCHRUN)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: rank ")]
    assert {line.split(":")[1].strip() for line in lines} <= {"rank 0", "rank 1"} and lines
    assert all("does not exist" in line for line in lines)


def test_job_array_tasks_and_merge_wait(folder, single, tmp_path):
    out = tmp_path / "a.npz"
    merge = subprocess.Popen([sys.executable, "-m", "regcls", "merge", "--wait", "--parts", "2", "--out", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    assert "waiting for 2 of 2 parts" in merge.stderr.readline()    # waiting before any task has run
    assert merge.poll() is None
    for task in (1, 0):
        r = regcls("trace", *ARGS, "--images", str(folder), "--shard", "auto", "--out", str(out),
                   SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_TASK_COUNT="2")
        assert r.returncode == 0, r.stderr
        assert f"a.part-{task:04d}-of-0002.npz" in r.stdout
    stdout, stderr = merge.communicate(timeout=120)
    assert merge.returncode == 0, stderr
    assert "from 2 shards" in stdout
    same(out, single)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz"]


def test_parts_of_other_requests_do_not_merge(folder, tmp_path):
    out = tmp_path / "a.npz"
    for task, limit in ((0, "20"), (1, "21")):
        r = regcls("trace", *ARGS, "--images", str(folder), "--limit", limit, "--shard", "auto", "--out", str(out),
                   SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_TASK_COUNT="2")
        assert r.returncode == 0, r.stderr
    r = regcls("merge", "--parts", "2", "--out", str(out))
    assert r.returncode == 2 and "request_ids_sha256" in r.stderr and not out.exists()


def test_array_and_world_settings_are_checked(monkeypatch, tmp_path):
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    with pytest.raises(RegclsError, match="needs a job array: SLURM_ARRAY_TASK_ID"):
        launch.array_shard()
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert launch.array_shard() == "2/3"
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "9")
    with pytest.raises(RegclsError, match="outside the array's 3 tasks"):
        launch.array_shard()
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RegclsError, match="RANK 2 is outside WORLD_SIZE 2"):
        launch.torchrun_world()
    assert launch.part_path(tmp_path / "t.npz", "3/12").name == "t.part-0003-of-0012.npz"
    with pytest.raises(RegclsError, match="1 of 1 parts still missing after 0 s: x.npz"):
        launch.wait_for([tmp_path / "x.npz"], timeout=0.0, poll=0.01, say=lambda m: None)


def test_the_book_cache_filled_by_two_ranks_equals_one_process(tmp_path, monkeypatch):
    """``make book GPUS=2`` on the CPU: every trace of the workload computed by two ranks, each shared; two of the
    entries against the same entries computed in one process."""
    r = regcls("cache", "--profile", "smoke-laptop", "--quiet", prefix=TORCHRUN,
               REGCLS_CACHE=str(tmp_path / "two"), REGCLS_LIMIT="8")
    assert r.returncode == 0, r.stderr
    two = sorted((tmp_path / "two" / "traces").glob("*.npz"))
    assert not [p for p in two if ".part-" in p.name]
    r = regcls("cache", "--profile", "smoke-laptop", "--quiet", REGCLS_CACHE=str(tmp_path / "one"), REGCLS_LIMIT="8")
    assert r.returncode == 0, r.stderr
    one = sorted((tmp_path / "one" / "traces").glob("*.npz"))
    assert [p.name for p in one] == [p.name for p in two]   # the same entries, under the same keys
    for a, b in zip(one, two):
        same(b, np.load(a))
    from regcls.cache import disk_needed                     # what regcls doctor promises, against the files
    from regcls.profiles import PROFILES
    monkeypatch.setenv("REGCLS_LIMIT", "8")
    written = sum(p.stat().st_size for p in (tmp_path / "one").rglob("*.npz"))
    assert written == pytest.approx(disk_needed(PROFILES["smoke-laptop"], capped=True), rel=0.1)
