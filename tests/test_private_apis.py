"""Private APIs of torch, torchvision, onnxruntime and executorch live in one adapter module per library, which
states the version it was checked against (issue 16 item 11; qat/compat/__init__.py, constraints.txt).

A use is found statically (AST) in qat/, experiments/ and scripts/: an import or an attribute chain, through
any import alias, whose dotted path has a component with a leading underscore (dunders like ``__version__``
excepted), or that enters a module listed in ``INTERNAL``; ``getattr(alias, "_x")`` and
``importlib.import_module("lib._x")`` count too.
"""

from __future__ import annotations

import ast
import importlib
from importlib.metadata import version
from pathlib import Path

import pytest

from qat.compat import ADAPTERS

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "torchvision", "onnxruntime", "executorch")
# internal modules without an underscore in their names
INTERNAL = ("onnxruntime.capi", "executorch.backends.xnnpack.serialization")
# private uses still outside their adapter, in modules others own right now: {(library, file): what to move}.
# The check fails once such a use is gone, so an entry cannot go stale.
PENDING: dict[tuple[str, str], str] = {}


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def _library(dotted: str) -> str | None:
    top = dotted.split(".")[0]
    return top if top in LIBRARIES else None


def private_uses(source: str) -> set[tuple[str, str, int]]:
    """(library, private API up to its first private component, line) of each use in ``source``."""
    tree = ast.parse(source)
    alias: dict[str, str] = {}
    found: set[tuple[str, str, int]] = set()

    def record(dotted: str, line: int) -> None:
        library = _library(dotted)
        if library is None:
            return
        parts = dotted.split(".")
        for i, part in enumerate(parts):
            prefix = ".".join(parts[: i + 1])
            if _private(part) or prefix in INTERNAL:
                found.add((library, prefix, line))
                return

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for name in node.names:
                if _library(name.name):
                    top = name.name.split(".")[0]  # `import a.b` binds a; `import a.b as c` binds c to a.b
                    alias[name.asname or top] = name.name if name.asname else top
                    record(name.name, node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and _library(node.module):
            for name in node.names:
                alias[name.asname or name.name] = f"{node.module}.{name.name}"
                record(f"{node.module}.{name.name}", node.lineno)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, base = [], node
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in alias:
                record(".".join([alias[base.id], *reversed(chain)]), node.lineno)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            first = node.args[0]
            if name in ("import_module", "__import__") and isinstance(first, ast.Constant) \
                    and isinstance(first.value, str):
                record(first.value, node.lineno)
            elif name == "getattr" and len(node.args) >= 2 and isinstance(first, ast.Name) and first.id in alias \
                    and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
                record(f"{alias[first.id]}.{node.args[1].value}", node.lineno)
    return found


def _sources() -> list[Path]:
    return sorted(p for folder in ("qat", "experiments", "scripts") for p in (ROOT / folder).rglob("*.py"))


def _module_file(module: str) -> str:
    return module.replace(".", "/") + ".py"


def test_the_scan_finds_private_uses_through_aliases() -> None:
    source = '''
import importlib
import torch
import torch._dynamo
import onnxruntime as ort
from torch import nn, _C
from executorch.exir._serialize._flatbuffer import _flatc_decompile
from executorch.extension.pybindings import portable_lib
from executorch.backends.xnnpack.serialization.xnnpack_graph_serialize import XNNHeader
torch._foreach_mul(a, 2)
torch.fake_quantize_per_tensor_affine(x, 1.0, 0, 0, 255)
nn.functional.relu(x)
print(torch.__version__)
ort.capi.onnxruntime_pybind11_state.Fail
portable_lib._load_for_executorch_from_buffer(b"")
getattr(torch, "_C")
importlib.import_module("torch.ao.quantization.fx._decomposed")
'''
    apis = {(lib, api) for lib, api, _ in private_uses(source)}
    assert apis == {
        ("torch", "torch._dynamo"), ("torch", "torch._C"), ("torch", "torch._foreach_mul"),
        ("executorch", "executorch.exir._serialize"),
        ("executorch", "executorch.backends.xnnpack.serialization"), ("onnxruntime", "onnxruntime.capi"),
        ("executorch", "executorch.extension.pybindings.portable_lib._load_for_executorch_from_buffer"),
        ("torch", "torch.ao.quantization.fx._decomposed"),
    }


def test_private_uses_live_in_one_adapter_module_per_library() -> None:
    where: dict[str, dict[str, list[str]]] = {}
    for path in _sources():
        rel = path.relative_to(ROOT).as_posix()
        for library, api, line in private_uses(path.read_text()):
            where.setdefault(library, {}).setdefault(rel, []).append(f"{rel}:{line}: {api}")
    assert set(where) <= set(ADAPTERS), f"no adapter for {sorted(set(where) - set(ADAPTERS))} in qat/compat"
    for library, files in where.items():
        adapter = _module_file(ADAPTERS[library])
        outside = {f: uses for f, uses in files.items() if f != adapter and (library, f) not in PENDING}
        assert not outside, f"{library}'s private API outside {adapter}: " + "; ".join(sum(outside.values(), []))
    for (library, file), move in PENDING.items():
        assert file in where.get(library, {}), f"{file} no longer uses {library}'s private API: drop it from PENDING"
        assert move


@pytest.mark.parametrize("library", sorted(ADAPTERS))
def test_each_adapter_states_the_installed_version(library: str) -> None:
    adapter = importlib.import_module(ADAPTERS[library])
    checked = getattr(adapter, "CHECKED_AGAINST", None)
    assert isinstance(checked, dict) and library in checked, f"{ADAPTERS[library]} has no CHECKED_AGAINST[{library!r}]"
    installed = version(library)
    assert checked[library] == installed, (
        f"{library} {installed} is installed; {ADAPTERS[library]} was checked against {checked[library]}: "
        f"re-check its private uses, then bump CHECKED_AGAINST and constraints.txt")


@pytest.mark.parametrize("library", sorted(ADAPTERS))
def test_constraints_pin_the_checked_versions(library: str) -> None:
    pins = dict(line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert pins.get(library) == importlib.import_module(ADAPTERS[library]).CHECKED_AGAINST[library]
