"""The layout DESIGN.md fixes: imports point one way (stages → shared_logic → stage_layout → engine) and engine/ has
no cycles, stage scripts are short recipes that import only shared_logic, run.sh follows the one stage table, and no
module grows into two concerns."""
import ast
import re
from pathlib import Path

import shared_logic as sl

ROOT = Path(__file__).resolve().parents[1]
ENGINE = sorted(p for p in (ROOT / "engine").glob("*.py") if p.name != "__init__.py")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth of the file (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A chain of imports that returns to its start, or None."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str] | None:
        if name in path:
            return path[path.index(name):] + [name]
        if name in done:
            return None
        for dep in sorted(graph.get(name, ())):
            found = visit(dep, path + [name])
            if found:
                return found
        done.add(name)
        return None

    return next((c for c in (visit(n, []) for n in sorted(graph)) if c), None)


def test_engine_imports_nothing_above_it_and_has_no_cycles():
    graph = {}
    for path in ENGINE:
        modules = imported_modules(path)
        above = sorted(m for m in modules if m.split(".")[0] in ("shared_logic", "stage_layout", "stages", "medko"))
        assert not above, f"{path.name} imports {above}"
        graph[path.stem] = {m.split(".")[1] for m in modules if m.startswith("engine.")}
    assert find_cycle(graph) is None, find_cycle(graph)


def test_stage_layout_imports_only_the_engine_and_shared_logic_builds_on_it():
    ours = {m.split(".")[0] for m in imported_modules(ROOT / "stage_layout.py")
            if (ROOT / f"{m.split('.')[0]}.py").is_file() or (ROOT / m.split(".")[0]).is_dir()}
    assert ours == {"engine"}, f"stage_layout imports {ours}; it may import only engine/"
    assert "stage_layout" in imported_modules(ROOT / "shared_logic.py")


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_stage_scripts_are_short_recipes_that_import_only_shared_logic():
    for stage in sl.STAGE_TABLE:
        path = ROOT / "stages" / f"{stage.directory}.py"
        text = path.read_text()
        assert len(text.splitlines()) <= 60, f"{path.name} has {len(text.splitlines())} lines"
        ours = {m for m in imported_modules(path) if m.split(".")[0] in ("engine", "stage_layout", "medko")}
        assert not ours, f"{path.name} imports {ours}; stages import only shared_logic"
        assert f'@sl.stage_script("{stage.name}"' in text, path.name
    assert sorted(p.stem for p in (ROOT / "stages").glob("*.py")) == sorted(s.directory for s in sl.STAGE_TABLE)


def test_run_sh_runs_the_stage_table_in_order():
    run_sh = (ROOT / "run.sh").read_text()
    order = re.findall(r"^\s*stage (\w+) (\w+_ARGS)", run_sh, re.M)
    curriculum = [(s.directory, f"{s.name.upper()}_ARGS") for s in sl.STAGE_TABLE if s.name != "sft"]
    assert [o for o in order if o[0] != "lora_sft"] == curriculum
    assert order[2] == ("lora_sft", "SFT_ARGS")  # --recipe lora-sft: the baseline after s0 and s1, in place of s1.1-s5


def test_no_module_is_two_concerns():
    sizes = {p.name: len(p.read_text().splitlines()) for p in ENGINE}
    assert all(n <= 450 for n in sizes.values()), sizes
    sizes = {name: len((ROOT / name).read_text().splitlines()) for name in ("shared_logic.py", "stage_layout.py")}
    assert all(n <= 450 for n in sizes.values()), sizes


def test_the_stage_runner_is_split_along_its_concerns():
    """StageRun is layered (inputs, measures, phases, guard, then lock/directory/save), no unit past 70 lines."""
    import ast

    tree = ast.parse((ROOT / "shared_logic.py").read_text())
    units = {n.name: n.end_lineno - n.lineno + 1 for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    assert {"RunInputs", "RunMeasures", "RunPhases", "RunGuard", "StageRun"} <= units.keys()
    assert max(units.values()) <= 70, sorted(units.items(), key=lambda kv: -kv[1])[:3]
    import shared_logic as sl

    assert [c.__name__ for c in sl.StageRun.__mro__[:5]] == ["StageRun", "RunGuard", "RunPhases", "RunMeasures",
                                                            "RunInputs"]
