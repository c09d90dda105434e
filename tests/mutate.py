"""Mutation testing of the code the numbers rest on: `make mutate` (not part of CI: about 4 min on 2 cores).

mutmut 3 makes small changes to the library one at a time (a `<` for a `<=`, a constant off by one, an
argument dropped) and runs the fast tests that reach the changed function; a mutant the tests still pass is
a bug they would miss. Scope (issue #19): `metrics` and `probe` whole, the trace's hooks (the recomputed
[CLS] row, the split into token groups, the hooked forward and the projection), and the image pipeline
(decoding, geometry, normalisation, the store). Kill rate = mutants a test fails on (or that time out or
crash) / all mutants in scope; target >= 90% per module.

mutmut expects the package under `src/` (or the root), ours lives in `lib/`: the run is staged in
`_mutate/` (gitignored) with `lib/regcls` copied to `src/regcls` and the tests beside it. every run starts
afresh (about 4 min on 2 cores: mutmut would keep a survivor's verdict after a new test). Results: `_mutate/rates.md` and the table the
README quotes. `python tests/mutate.py --show` lists the surviving mutants with their diffs.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGE = ROOT / "_mutate"

# module -> mutmut name patterns (module.x_function / module.xǁClassǁmethod, then __mutmut_N)
SCOPE: dict[str, list[str]] = {
    "metrics": ["regcls.metrics.*"],
    "probe": ["regcls.probe.*"],
    "trace hooks": ["regcls.tracefile.x_patch_sample_index__*", "regcls.trace.x__cls_row__*", "regcls.trace.x__split__*",
                    "regcls.trace.xǁTracerǁ*", "regcls.trace.x_trace_batch__*", "regcls.runner.xǁ_Packerǁ*",
                    "regcls.runner.x_unpack__*"],
    "image pipeline": ["regcls.data.x_list_images__*", "regcls.data.x_load_rgb__*", "regcls.data.xǁGeometryǁ*",
                       "regcls.data.x_eval_config__*", "regcls.data.x__decode_one__*", "regcls.data.xǁImageStoreǁ*",
                       "regcls.data.xǁNormalizedǁ*", "regcls.data.x_decode_images__*"],
}
FILES = ["metrics.py", "probe.py", "tracefile.py", "trace.py", "runner.py", "data.py"]
# The fast unit tests that guard these modules (about 10 s in all); mutmut runs, per mutant, only those that reach
# it. The planted controls (tests/test_controls.py) are left out: each trace mutant would retrace them (~1 min).
TESTS = ["tests/test_metrics.py", "tests/test_trace_exact.py", "tests/test_data.py", "tests/test_gpu_path.py"]
DETECTED = {1, 3, 36, 24, -24, 152, 255, -11, -9, 37}  # killed, timeout, crash (mutmut's exit-code table)
SURVIVED = {0: "survived", 5: "no tests", 33: "no tests"}


CONFTEST = """

@pytest.fixture(autouse=True, scope="session")
def _trace_cache_per_mutant(tmp_path_factory):
    # a mutant of the trace or the image pipeline traces with its own code: the cache filled by the unmutated
    # run would hide it (mutants of metrics and probe read the same traces as the unmutated code, cache or not)
    if os.environ.get("MUTANT_UNDER_TEST", "").startswith(("regcls.trace.", "regcls.tracefile.", "regcls.runner.", "regcls.data.")):
        os.environ["REGCLS_CACHE"] = str(tmp_path_factory.mktemp("cache"))


# each mutant runs in a fork of one process: torch's thread pools do not survive a fork once used, so one thread
torch.set_num_threads(1)
"""


def stage() -> None:
    """Copy the library and tests into `_mutate/` (src layout) with mutmut's settings."""
    STAGE.mkdir(exist_ok=True)
    # mutmut keeps a survivor's verdict until its function changes, not when a test is added: start afresh
    shutil.rmtree(STAGE / "mutants", ignore_errors=True)
    for src, dst in [(ROOT / "lib" / "regcls", STAGE / "src" / "regcls"), (ROOT / "tests", STAGE / "tests")]:
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    # mutmut runs, per mutant, the tests that called the function while it collected its statistics; a call made
    # while setting up a module-scoped fixture counts for the first test only, so fixtures are per test here
    for t in TESTS:
        path = STAGE / t
        path.write_text(path.read_text().replace('@pytest.fixture(scope="module", ', "@pytest.fixture(")
                        .replace('@pytest.fixture(scope="module")', "@pytest.fixture"))
    with open(STAGE / "tests" / "conftest.py", "a") as f:  # mutants share a process tree, not a trace cache
        f.write(CONFTEST)
    only = ", ".join(f'"src/regcls/{f}"' for f in FILES)
    tests = ", ".join(f'"{t}"' for t in TESTS)
    (STAGE / "pyproject.toml").write_text(
        "[tool.mutmut]\n"
        'source_paths = ["src"]\n'
        f"only_mutate = [{only}]\n"
        f"pytest_add_cli_args_test_selection = [{tests}]\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q"]\n'
        'also_copy = ["tests"]\n'
        "use_git_change_detection = false\n"
        "timeout_constant = 60.0\n"  # a trace-code mutant retraces the planted controls (tens of seconds)
        "[tool.pytest.ini_options]\n"
        'markers = ["slow: slow", "notebook: notebook", "browser: browser"]\n')


def run_mutmut(children: int) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", REGCLS_PROFILE="smoke", PYTHONHASHSEED="0", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    patterns = [p for ps in SCOPE.values() for p in ps]
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(children), *patterns]
    r = subprocess.run(cmd, cwd=STAGE, env=env)
    if r.returncode not in (0, 1):  # mutmut exits 1 when mutants survive
        sys.exit(f"mutmut failed (exit {r.returncode}); see the output above")


def verdicts() -> dict[str, tuple[str, int | None]]:
    """Every mutant in SCOPE of the last run: name -> (module, mutmut's exit code; None when not checked)."""
    out = {}
    for f in FILES:
        meta = STAGE / "mutants" / "src" / "regcls" / (f + ".meta")
        if meta.exists():
            for key, code in json.loads(meta.read_text())["exit_code_by_key"].items():
                module = next((m for m, ps in SCOPE.items() if any(fnmatch(key, p) for p in ps)), None)
                if module is not None:
                    out[key] = (module, code)
    return out


def results() -> dict[str, Counter]:
    """Per module in SCOPE: counts of 'detected', 'survived', 'no tests', 'not checked'."""
    out = {m: Counter() for m in SCOPE}
    for module, code in verdicts().values():
        out[module]["detected" if code in DETECTED else SURVIVED.get(code, "not checked" if code is None
                                                                      else f"exit {code}")] += 1
    return out


def survivors() -> list[str]:
    return sorted(key for key, (_, code) in verdicts().items() if code not in DETECTED)


@functools.cache
def _functions(module: str) -> dict[str, str]:
    """Body of every function of one mutated module (mutmut writes each mutant as a function of its own)."""
    import ast

    tree = ast.parse((STAGE / "mutants" / "src" / "regcls" / f"{module}.py").read_text())
    return {f.name: ast.unparse(f).split("\n", 1)[1] for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}


def diff(name: str) -> str:
    """The changed lines of one mutant (what `mutmut show` prints, without a process per mutant)."""
    import difflib

    module, _, fn = name.removeprefix("regcls.").partition(".")
    funcs = _functions(module)
    orig = funcs[fn.split("__mutmut_")[0] + "__mutmut_orig"]
    return "\n".join(l for l in difflib.unified_diff(orig.splitlines(), funcs[fn].splitlines(), lineterm="", n=0)
                     if l[:1] in "+-" and l[:3] not in ("+++", "---"))


def table(counts: dict[str, Counter]) -> str:
    rows = ["| module | mutants | killed | survived | no test reaches it | kill rate |", "|---|---|---|---|---|---|"]
    for m, c in counts.items():
        n = sum(c.values())
        rate = f"{100 * c['detected'] / n:.0f}%" if n else "-"
        rows.append(f"| {m} | {n} | {c['detected']} | {c['survived']} | {c['no tests']} | {rate} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--children", type=int, default=os.cpu_count() or 2, help="mutants tested in parallel")
    ap.add_argument("--report", action="store_true", help="only print the rates of the last run")
    ap.add_argument("--show", action="store_true", help="print the diff of every surviving mutant")
    args = ap.parse_args()
    if not (args.report or args.show):
        stage()
        run_mutmut(args.children)
    if args.show:
        for name in survivors():
            print(f"# {name}\n{diff(name)}")
        return
    counts = results()
    text = table(counts)
    (STAGE / "rates.md").write_text(text + "\n")
    print(text)
    low = [m for m, c in counts.items() if sum(c.values()) and c["detected"] / sum(c.values()) < 0.9]
    if low:
        print(f"below the 90% target: {', '.join(low)} (python tests/mutate.py --show lists the survivors)")
        sys.exit(1)


if __name__ == "__main__":
    main()
