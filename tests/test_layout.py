"""The code's shape, checked: stages do not import one another, and every table, marker and
checkpoint file is named and read only by its owner (``model.tables``, ``model.checkpoint``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from model import tables

REPO = Path(__file__).resolve().parent.parent
PIPELINE = REPO / "pipeline"
CODE = [p for d in ("model", "cluster", "pipeline") for p in sorted((REPO / d).rglob("*.py"))]

STAGES = sorted(
    p.stem if p.is_file() else p.name
    for p in PIPELINE.iterdir()
    if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__main__.py").is_file()
)

TABLE_FILES = {t.file for t in tables.TABLES.values() if t.file} | {
    o.folder for o in tables.OUTPUTS.values() if o.folder
}
OWNED_NAMES = {
    "model/tables.py": {tables.MANIFEST, *TABLE_FILES},
    "model/checkpoint.py": {"model.pt", "meta.json", "whitening.npz"},
}
MARKERS = {"_SUCCESS"}
"""No output is marked complete by anything but its manifest."""
PARQUET_CALLS = {"read_table", "write_table", "ParquetFile", "read_parquet", "dataset"}
PARQUET_OWNERS = {"model/tables.py", "model/descriptor_cache.py"}
"""Who may open Parquet files: the table specs, and evaluate's descriptor cache (its own
private files, no stage's output)."""


def _module_of(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_pipeline_holds_only_stages():
    names = {p.stem if p.is_file() else p.name for p in PIPELINE.iterdir()} - {
        "__init__",
        "__pycache__",
    }
    assert names == set(STAGES), f"not stages: {sorted(names - set(STAGES))}"
    for stage in ("ingest", "extract", "group", "sfm", "pairs", "train", "index", "serve"):
        assert stage in STAGES


COMPOSERS = {"run", "cli", "demo"}
"""The chain as one command (``pipeline.run``), the ``cirray`` command and ``make demo``: they
compose the stages, and no stage imports them."""


@pytest.mark.parametrize("stage", sorted(set(STAGES) - COMPOSERS))
def test_no_stage_imports_another_stage(stage):
    root = PIPELINE / stage if (PIPELINE / stage).is_dir() else PIPELINE / f"{stage}.py"
    files = sorted(root.rglob("*.py")) if root.is_dir() else [root]
    crossing = [
        f"{f.relative_to(REPO)} imports {name}"
        for f in files
        for name in sorted(_imports(f))
        if name.startswith("pipeline.") and name.split(".")[1] != stage
    ]
    assert not crossing, "\n".join(crossing)


def test_no_stage_imports_the_composers():
    upward = [
        f"{f.relative_to(REPO)} imports {name}"
        for f in CODE
        for name in sorted(_imports(f))
        if name in {f"pipeline.{c}" for c in COMPOSERS}
        and _module_of(f) not in {f"pipeline.{c}" for c in COMPOSERS}
    ]
    assert not upward, "\n".join(upward)


def test_model_and_cluster_import_no_stage():
    upward = [
        f"{f.relative_to(REPO)} imports {name}"
        for f in CODE
        if not f.is_relative_to(PIPELINE)
        for name in sorted(_imports(f))
        if name == "pipeline" or name.startswith("pipeline.")
    ]
    assert not upward, "\n".join(upward)


def test_table_and_checkpoint_files_are_named_only_by_their_owners():
    owner_of = {name: owner for owner, names in OWNED_NAMES.items() for name in names}
    strays = []
    for path in CODE:
        where = path.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
                continue
            name = node.value
            if name in MARKERS or (name in owner_of and owner_of[name] != where):
                strays.append(f"{where}:{node.lineno} names {name!r}")
    assert not strays, "\n".join(strays)


def test_parquet_is_opened_only_through_the_table_specs():
    strays = []
    for path in CODE:
        where = path.relative_to(REPO).as_posix()
        if where in PARQUET_OWNERS:
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in (
                "pyarrow.parquet",
                "pyarrow.dataset",
            ):
                strays.append(f"{where}:{node.lineno} imports {node.module}")
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in ("pyarrow.parquet", "pyarrow.dataset"):
                        strays.append(f"{where}:{node.lineno} imports {alias.name}")
            if (
                isinstance(node, ast.Attribute)
                and node.attr in PARQUET_CALLS - {"dataset"}
                and not (isinstance(node.value, ast.Name) and node.value.id in {"self", "tables"})
            ):
                strays.append(f"{where}:{node.lineno} calls .{node.attr}")
    assert not strays, "\n".join(strays)


def test_no_test_imports_a_private_name():
    """Tests use what a module offers; what they share lives in conftest.py or helpers.py."""
    private = []
    for path in sorted((REPO / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [a.name for a in node.names if a.name.startswith("_")]
                if node.module.startswith("tests.test_"):
                    names.append(f"(from the test module {node.module})")
                private += [f"tests/{path.name}:{node.lineno} imports {n}" for n in names]
    assert not private, "\n".join(private)


ALL_CODE = CODE + [p for d in ("tests", "bench") for p in sorted((REPO / d).rglob("*.py"))]

PINNED_SIGNATURES = {"apply_whitening", "alpha_qe", "recall_at_k"}
"""Functions whose positional signature DESIGN.md pins."""


def test_imports_inside_functions_say_why():
    """Imports belong at the top; one inside a function is a process boundary (pycolmap before
    torch, Ray or torch in a worker, an optional dependency) and says so on its line."""
    silent = []
    for path in ALL_CODE:
        lines = path.read_text().splitlines()
        for function in ast.walk(ast.parse("\n".join(lines), str(path))):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    text = lines[node.lineno - 1 : node.end_lineno]
                    if not any("#" in line for line in text):
                        where = path.relative_to(REPO)
                        silent.append(f"{where}:{node.lineno} {text[0].strip()}")
    assert not silent, "\n".join(sorted(set(silent)))


def test_parameters_past_the_third_are_keyword_only():
    """A call with four or more positional arguments is read wrongly; name them."""
    long = []
    for path in CODE:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            positional = [a.arg for a in node.args.posonlyargs + node.args.args]
            positional = [a for a in positional if a not in ("self", "cls")]
            if len(positional) > 3 and node.name not in PINNED_SIGNATURES:
                where = path.relative_to(REPO)
                long.append(f"{where}:{node.lineno} {node.name}({', '.join(positional)})")
    assert not long, "\n".join(long)
