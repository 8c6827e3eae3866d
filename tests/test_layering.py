"""The rooms of the package: the core knows no model family, the families know no command line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import crop
from crop.errors import UnsupportedModelError

SOURCE = Path(crop.__file__).parent
CORE = ["region.py", "adapter.py", "pipeline.py", "localize", "strategies"]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports by statement, plus string arguments of `importlib.import_module` calls."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            found.update(arg.value for arg in node.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str))
    return found


def files(*names: str) -> list[Path]:
    paths = []
    for name in names:
        target = SOURCE / name
        paths += sorted(target.rglob("*.py")) if target.is_dir() else [target]
    return paths


@pytest.mark.parametrize("path", files(*CORE), ids=lambda p: str(p.relative_to(SOURCE)))
def test_the_core_imports_no_model_family(path):
    family = {m for m in imported_modules(path) if m == "crop.models" or m.startswith("crop.models.")}
    assert not family, f"{path.relative_to(SOURCE)} imports {sorted(family)}: the core must not know a family"


@pytest.mark.parametrize("path", files("models"), ids=lambda p: str(p.relative_to(SOURCE)))
def test_the_families_import_no_command_line(path):
    cli = {m for m in imported_modules(path) if m in ("crop.cli", "crop.web_demo") or m.startswith("crop.cli.")}
    assert not cli, f"{path.relative_to(SOURCE)} imports {sorted(cli)}"


def test_the_checker_sees_an_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import importlib\nfrom crop.models import llava\nimportlib.import_module('crop.models.x')\n")
    assert {"crop.models", "crop.models.llava", "crop.models.x"} <= imported_modules(sample)


def test_a_subclass_of_a_supported_class_is_supported(sdpa_model, processor):
    from conftest import batch_inputs
    from transformers import LlavaForConditionalGeneration

    class MyLlava(LlavaForConditionalGeneration):
        pass

    model = MyLlava(sdpa_model.config).eval()
    model.load_state_dict(sdpa_model.state_dict())
    inputs = batch_inputs(processor, 2)
    pruned = crop.apply(model, processor, method="fastv", budget=12)
    try:
        _, stats = pruned(**inputs)
    finally:
        pruned.remove()
    assert [row.kept_tokens for row in stats.rows] == [12, 12]


def test_an_unrelated_class_is_refused_with_the_supported_ones():
    class NotAVLM:
        pass

    with pytest.raises(UnsupportedModelError, match="NotAVLM is not supported.*LlavaForConditionalGeneration"):
        crop.adapter.adapter_for(NotAVLM())


LIBRARY = [*CORE, "loading.py", "evaluation", "cli.py"]


@pytest.mark.parametrize("path", files(*LIBRARY), ids=lambda p: str(p.relative_to(SOURCE)))
def test_library_code_imports_no_test_factory(path):
    testing = {m for m in imported_modules(path) if m == "crop.testing" or m.startswith("crop.testing.")}
    assert not testing, f"{path.relative_to(SOURCE)} imports {sorted(testing)}: test factories stay in crop/testing"


GENERIC = ["strategies/base.py", "strategies/context.py", "strategies/engine.py", "strategies/grids.py"]
METHOD_FILES = ["crop_method", "crop_fused", "fastv", "pyramid_drop", "sparsevlm", "visionzip", "random_select",
                "pooling", "learned_plc", "full", "divprune", "dart", "cdpruner", "registry"]  # fmt: skip


@pytest.mark.parametrize("path", files(*GENERIC), ids=lambda p: str(p.relative_to(SOURCE)))
def test_the_method_machinery_imports_no_method(path):
    methods = {m for m in imported_modules(path) if m.removeprefix("crop.strategies.").split(".")[0] in METHOD_FILES}
    assert not methods, f"{path.relative_to(SOURCE)} imports {sorted(methods)}: generic code knows no method"
