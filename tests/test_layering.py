"""The arrows the design allows between peft_ctx's rooms, read from every import statement of the package (those
inside functions too): the library never reaches the harness, the benchmarks or the tests; training never reaches
the hub (pushing is the scripts' job); a method folder reaches neither serving, the engines, the hub nor the harness,
except its ``rows.py``, the harness's plug-in that only the harness imports (``ContextMethod.rows_module``). The
``train/`` scripts are the library's users: they reach neither the harness nor the benchmarks."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "peft_ctx"
METHOD_FOLDERS = ("xrag", "spring", "cocom")


def imported(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module name ``source`` (the text of ``module``) imports, relative imports resolved."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            names.add(name)
            names.update(f"{name}.{alias.name}" for alias in node.names)
    return names


def forbidden(module: str, names: set[str]) -> list[str]:
    """The imports of ``module`` that cross an arrow the design does not allow."""
    parts = module.split(".")
    rows_plugin = len(parts) == 3 and parts[1] in METHOD_FOLDERS and parts[2] == "rows"
    bad = []
    for name in sorted(names):
        if name.split(".")[0] in ("benchmarks", "tests"):
            bad.append(name)
        elif name.startswith("peft_ctx.harness") and not (module.startswith("peft_ctx.harness") or rows_plugin):
            bad.append(name)
        elif name.endswith(".rows") and name != "peft_ctx.harness.rows" and not module.startswith("peft_ctx.harness"):
            bad.append(name)
        elif module.startswith("peft_ctx.training") and name.startswith("peft_ctx.hub"):
            bad.append(name)
        elif (
            len(parts) > 1
            and parts[1] in METHOD_FOLDERS
            and not rows_plugin
            and name.startswith(("peft_ctx.serving", "peft_ctx.hub"))
        ):
            bad.append(name)
    return bad


def package_modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        is_package = path.name == "__init__.py"
        module = ".".join(relative.parts[:-1] if is_package else relative.parts)
        yield module, path, is_package


def test_no_module_of_the_package_crosses_a_forbidden_arrow():
    crossings = {}
    for module, path, is_package in package_modules():
        bad = forbidden(module, imported(path.read_text(), module, is_package))
        if bad:
            crossings[module] = bad
    assert not crossings, crossings


def test_the_training_scripts_use_the_library_only():
    scripts = sorted((PACKAGE.parent / "train").glob("*.py"))
    assert scripts
    crossings = {}
    for path in scripts:
        names = imported(path.read_text(), f"train.{path.stem}")
        bad = sorted(n for n in names if n.startswith(("peft_ctx.harness", "benchmarks", "tests")))
        if bad:
            crossings[path.name] = bad
    assert not crossings, crossings


@pytest.mark.parametrize(
    ("module", "source", "bad"),
    [
        ("peft_ctx.training.trainer", "def push():\n    from ..hub import push_to_hub\n", "peft_ctx.hub"),
        ("peft_ctx.cocom.compressed", "from ..serving import adapter_digest\n", "peft_ctx.serving"),
        ("peft_ctx.model", "from .harness.rows import Entry\n", "peft_ctx.harness.rows"),
        ("peft_ctx.inference", "import tests.helpers\n", "tests.helpers"),
        ("peft_ctx.methods", "from .xrag import rows\n", "peft_ctx.xrag.rows"),
    ],
)
def test_the_check_sees_each_kind_of_crossing(module, source, bad):
    assert bad in forbidden(module, imported(source, module))


def test_a_method_folders_rows_module_may_import_the_harness():
    module = "peft_ctx.cocom.rows"
    assert forbidden(module, imported("from ..harness.rows import Entry\n", module)) == []
