"""The mutation check's own contract (splam_studio/tools/mutation.py); its run is not part of the suite."""
from pathlib import Path

from splam_studio.tools import mutation

PKG = Path(mutation.__file__).resolve().parents[1]


def test_every_mutant_applies_once_and_every_file_has_tests():
    """An edit that makes a mutant's snippet vanish (or repeat) must update the mutant in the same commit (core and
    training alike: training/checkpoints.py's validated reader once left 5 of its mutants stale unnoticed)."""
    for rel, mutants in mutation.MUTANTS.items():
        assert mutation.TESTS.get(rel), rel
        assert all((PKG.parent / "tests" / f"{m}.py").is_file() for m in mutation.TESTS[rel]), rel
        names = [mu.name for mu in mutants]
        assert len(names) == len(set(names)), rel
        src = (PKG / rel).read_text()
        for mu in mutants:
            assert src.count(mu.old) == 1 and mu.old != mu.new, (rel, mu.name)
            assert src.replace(mu.old, mu.new) != src
    assert {f"core/{p.name}" for p in (PKG / "core").glob("*.py") if p.name != "__init__.py"} <= set(mutation.MUTANTS)


def test_markdown_table_counts_each_status():
    r = mutation.FileResult("core/x.py", ["tests/test_x.py"], "ok", [
        mutation.Outcome("core/x.py", "a", "killed", 1.0), mutation.Outcome("core/x.py", "b", "survived", 1.0),
        mutation.Outcome("core/x.py", "c", "timeout", 1.0), mutation.Outcome("core/x.py", "d", "stale", 0.0)])
    assert mutation.markdown([r]).splitlines()[-1] == "| `core/x.py` | 4 | 2 | 1 | 1 | b |"
