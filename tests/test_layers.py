"""Imports point one way (docs/design.md, "Architecture").

Every module of ``ickd/`` is parsed with ``ast``; each import, at module level or inside a function,
is mapped to a layer. An import from a lower layer to a higher one fails the test, which prints the
offending edges. ``python tests/test_layers.py`` prints every edge between layers (the measurement
behind the issue-13 report)."""
from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "ickd"

# Bottom to top. A module belongs to the layer of its longest matching prefix. Inside one layer any
# import is allowed; across layers only downwards.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("ickd", "ickd.errors", "ickd.registry", "ickd.fastpath")),
    ("runs", ("ickd.runs",)),  # the run folder (RunDir), atomic I/O, SLURM environment, signals, exit codes
    ("core", ("ickd.data", "ickd.models", "ickd.losses", "ickd.memory", "ickd.methods", "ickd.distill", "ickd.engine")),
    ("config", ("ickd.config_schema", "ickd.config_store", "ickd.resources", "ickd.redaction", "ickd.naming",
                "ickd.cli_args", "ickd.run_logging")),
    ("track", ("ickd.track",)),
    ("sweep", ("ickd.sweep",)),
    ("launch", ("ickd.launch",)),
    ("report", ("ickd.report",)),
    ("app", ("ickd.cli", "ickd.train", "ickd.demo")),
]
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}
CORE = {"core"}
PLATFORM = {"runs", "config", "track", "sweep", "launch", "report"}

# Function-level imports of ickd modules that are fine for a stated reason (never an upward edge;
# the direction check applies to them as to every other import).
ALLOWED_LATE = {
    # ickd.cli dispatches to one subcommand: importing only that one keeps `ickd --help` fast.
    "ickd.cli",
}


def layer_of(module: str) -> str:
    best, best_len = None, -1
    for name, prefixes in LAYERS:
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = name, len(p)
    if best is None:
        raise AssertionError(f"{module}: in no layer; add it to LAYERS in tests/test_layers.py")
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported ickd module, line, inside a function) for every import of ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    mod = module_name(path)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    late: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            late.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from ickd.x import y` may import the submodule ickd.x.y
            targets = []
            for a in node.names:
                sub = PKG.parent / Path(*f"{target}.{a.name}".split("."))
                targets.append(f"{target}.{a.name}" if sub.with_suffix(".py").is_file() or (sub / "__init__.py").is_file() else target)
        else:
            continue
        for t in targets:
            if t == "ickd" or t.startswith("ickd."):
                found.append((t, node.lineno, id(node) in late))
    return found


def all_edges() -> list[tuple[str, str, str, str, int, bool]]:
    """(from layer, to layer, from module, to module, line, late) for every cross-layer import."""
    edges = set()
    for path in sorted(PKG.rglob("*.py")):
        if "_shipped" in path.parts:
            continue
        src = module_name(path)
        src_layer = layer_of(src)
        for target, line, late in imports(path):
            dst_layer = layer_of(target)
            if dst_layer != src_layer:
                edges.add((src_layer, dst_layer, src, target, line, late))
    return sorted(edges)


def upward(edges):
    return [e for e in edges if RANK[e[1]] > RANK[e[0]]]


def fmt(e) -> str:
    return f"{e[0]} -> {e[1]}: {e[2]}:{e[4]} imports {e[3]}{' (in a function)' if e[5] else ''}"


def test_every_module_has_a_layer():
    for path in PKG.rglob("*.py"):
        if "_shipped" not in path.parts:
            layer_of(module_name(path))


def test_imports_point_down():
    bad = upward(all_edges())
    assert not bad, "imports from a lower layer to a higher one:\n" + "\n".join(fmt(e) for e in bad)


def test_core_imports_nothing_of_the_platform():
    bad = [e for e in all_edges() if e[0] in CORE and e[1] not in ("base", "runs", "core")]
    assert not bad, "\n".join(fmt(e) for e in bad)


def test_runs_layer_is_neutral():
    """ickd.runs sits under the core (the trainer writes the run folder through RunDir): stdlib and
    ickd.errors only, so it can never pull the platform or torch into the core."""
    for path in sorted((PKG / "runs").glob("*.py")):
        for target, line, _ in imports(path):
            assert layer_of(target) in ("base", "runs") and not target.startswith("ickd.fastpath"), f"{path}:{line} imports {target}"


def test_late_intra_package_imports_have_a_reason():
    """A function-level import of an ickd module hides an edge from a reader; only modules listed in
    ALLOWED_LATE (with their reason) may use one across layers."""
    bad = [e for e in all_edges() if e[5] and e[2] not in ALLOWED_LATE]
    assert not bad, "function-level imports across layers:\n" + "\n".join(fmt(e) for e in bad)


def platform_edges(edges):
    """Layer-to-layer edges between platform layers (and the app), with the modules behind each."""
    grouped = defaultdict(set)
    for e in edges:
        if e[0] in PLATFORM | {"app"} and e[1] in PLATFORM | {"app"}:
            grouped[(e[0], e[1])].add(f"{e[2]} -> {e[3]}{' (late)' if e[5] else ''}")
    return grouped


if __name__ == "__main__":
    edges = all_edges()
    grouped = platform_edges(edges)
    for (a, b), mods in sorted(grouped.items(), key=lambda kv: (-RANK[kv[0][0]], -RANK[kv[0][1]])):
        arrow = "UP  " if RANK[b] > RANK[a] else "down"
        print(f"[{arrow}] {a} -> {b} ({len(mods)})")
        if "-v" in sys.argv or arrow == "UP  ":
            for m in sorted(mods):
                print(f"         {m}")
    core_out = [e for e in edges if e[0] in CORE and e[1] not in ("base", "runs", "core")]
    core_runs = sorted({f"{e[2]} -> {e[3]}" for e in edges if e[0] in CORE and e[1] == "runs"})
    print(f"core -> runs ({len(core_runs)}): " + ", ".join(core_runs))
    late = [e for e in edges if e[5]]
    print(f"upward edges: {len(upward(edges))}; core -> platform: {len(core_out)}; "
          f"cross-layer function-level imports: {len(late)}")
