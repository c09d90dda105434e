"""The library's imports go one way: each module imports only modules below it in LAYERS (function-level imports
included), so the import graph is a DAG and a reader can take the modules in this order."""
import ast
from pathlib import Path

LIB = Path(__file__).resolve().parents[1] / "lib" / "regcls"
# bottom to top: a module may import the ones before it
LAYERS = ["errors", "env", "files", "download", "testtime", "profiles", "planted", "data", "models", "metrics", "ablation", "maps", "probe", "tracefile", "trace", "precision", "runner", "launch",
          "cache", "claims", "rules", "plots", "page", "doctor", "bench", "gpucheck", "cli", "__main__"]
PACKAGE = {"__version__", "REPOSITORY"}   # the package's own attributes (regcls/__init__.py imports only errors)


def imports(path: Path) -> set[str]:
    """The regcls modules a file imports, at any depth (top level and inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out |= {a.name for a in node.names if a.name not in PACKAGE}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            out |= {n.split(".")[1] for n in names if n and n.startswith("regcls.")}
    return out


def test_every_module_has_a_layer():
    assert sorted(p.stem for p in LIB.glob("*.py") if p.stem != "__init__") == sorted(LAYERS)


def test_imports_only_go_down():
    upward = []
    for name in LAYERS:
        for dep in imports(LIB / f"{name}.py"):
            if LAYERS.index(dep) >= LAYERS.index(name):
                upward.append(f"{name} imports {dep}")
    assert not upward, "imports that go up (or sideways) in LAYERS: " + "; ".join(sorted(upward))


def test_the_library_imports_itself_at_the_top_of_each_module():
    """The dependency direction is read from the top of a module: no function imports a regcls module (lazy imports
    remain only for heavy third parties)."""
    inside = []
    for path in sorted(LIB.glob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inside += [f"{path.stem}.{fn.name}: from .{node.module or ''} import {node.names[0].name}"
                           for node in ast.walk(fn) if isinstance(node, ast.ImportFrom) and node.level == 1]
    assert not inside, "; ".join(inside)


def test_the_check_sees_function_level_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from .cli import main\n    import regcls.bench\n")
    assert imports(f) == {"cli", "bench"}


def test_the_repository_says_its_license_and_how_to_cite_it():
    import tomllib

    import yaml

    root = LIB.parents[1]
    assert tomllib.loads((root / "pyproject.toml").read_text())["project"]["license"] == "MIT"
    assert (root / "LICENSE").read_text().startswith("MIT License")
    cff = yaml.safe_load((root / "CITATION.cff").read_text())
    assert {"cff-version", "message", "title", "authors", "license"} <= set(cff) and cff["license"] == "MIT"
    assert cff["preferred-citation"]["year"] == 2025 and "2505.05892" in cff["preferred-citation"]["url"]
    assert "CITATION.cff" in (root / "book" / "intro.md").read_text()


def test_every_cited_work_links_to_itself():
    """The bibliography gives each work a link a reader can follow (arXiv, a DOI, the journal's page)."""
    import re

    bib = (LIB.parents[1] / "book" / "references.bib").read_text()
    entries = re.findall(r"^@\w+\{([^,]+),(.*?)^\}", bib, flags=re.M | re.S)
    assert len(entries) >= 17
    missing = [key for key, body in entries if not re.search(r"^\s*(url|doi)\s*=\s*\{(https://|10\.)", body, flags=re.M)]
    assert missing == []
