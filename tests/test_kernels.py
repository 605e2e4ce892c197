"""`qlora.kernels`: the one loader of the C extensions and the one switch for every kernel.

``QLORA_DISABLE_KERNELS`` set after import must turn off the C dequantize / quantize, the
dropout kernel and the optimizer's fused step as well as Triton (it used to be read once, at
import, by each module that loaded an extension).
"""

from __future__ import annotations

import ast
import importlib
import shutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch

import qlora.kernels as kernels
from qlora.kernels import c_extension, describe, kernels_disabled, triton_enabled
from qlora.nn.dropout import apply_dropout, keep_mask_reference
from qlora.optim import AdamW8bit
from qlora.optim.state8bit import dequantize_state, quantize_state
from qlora.quant import dequantize, dequantize_reference, quantize

from .conftest import has_module

SRC = Path(__file__).resolve().parents[1] / "src" / "qlora"


class _Tripwire(ModuleType):
    """Stands in for a C extension: any use of it fails the test."""

    def __getattr__(self, name: str) -> None:
        raise AssertionError(f"kernel {self.__name__}.{name} used")


def _tripwire_function(name: str) -> Callable[..., None]:
    def call(*args: object) -> None:
        raise AssertionError(f"kernel {name} used")

    return call


@pytest.fixture
def tripwires(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every C extension the loader would hand out is a tripwire, and so is every function of
    the built extensions (a module that kept a reference to one is caught too)."""
    monkeypatch.setattr(kernels, "_import_extension", lambda name: _Tripwire(f"_{name}"))
    for name in kernels.C_EXTENSIONS:
        try:
            module = importlib.import_module(f"qlora.kernels._{name}")
        except ImportError:
            continue
        for attr in dir(module):
            if not attr.startswith("_"):
                monkeypatch.setattr(module, attr, _tripwire_function(f"_{name}.{attr}"))


def _use_every_c_kernel() -> None:
    """Run each caller of a C extension once on the CPU: dequantize, quantize, the dropout,
    the 8-bit state codecs and the fused AdamW8bit step."""
    weight = torch.randn(64, 128)
    state = quantize(weight, "nf4", 64)
    assert torch.equal(dequantize(state), dequantize_reference(state))
    x = torch.randn(4, 1000)
    keep = keep_mask_reference(x.numel(), (5, 7), 0.3).view(x.shape)
    assert torch.equal(apply_dropout(x, (5, 7), 0.3), torch.where(keep, x * (1 / 0.7), 0))
    codes, absmax = torch.empty(5000, dtype=torch.uint8), torch.empty(20)
    quantize_state(torch.randn(5000), True, codes, absmax)
    dequantize_state(codes, absmax, True, torch.empty(5000))
    param = torch.nn.Parameter(torch.randn(8192))
    param.grad = torch.randn(8192)
    AdamW8bit([param]).step()


@pytest.mark.parametrize("value", ["1", "yes"])
def test_disabling_after_import_stops_every_c_kernel(
    tripwires: None, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("QLORA_DISABLE_KERNELS", value)
    _use_every_c_kernel()  # the reference paths only: a tripwire would raise


@pytest.mark.parametrize("value", [None, "", "0"])
def test_enabled_kernels_are_used(
    tripwires: None, monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    """The counterpart that shows the tripwire test can fail: with kernels on, the same
    calls reach the extension."""
    if value is None:
        monkeypatch.delenv("QLORA_DISABLE_KERNELS", raising=False)
    else:
        monkeypatch.setenv("QLORA_DISABLE_KERNELS", value)
    with pytest.raises(AssertionError, match="kernel _cpu"):
        _use_every_c_kernel()
    with pytest.raises(AssertionError, match="kernel _ops"):
        apply_dropout(torch.randn(10), (1, 2), 0.5)


def test_switch_is_read_at_every_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QLORA_DISABLE_KERNELS", "1")
    assert kernels_disabled()
    assert c_extension("cpu") is None and c_extension("ops") is None
    assert not triton_enabled()
    monkeypatch.setenv("QLORA_DISABLE_KERNELS", "0")
    assert not kernels_disabled()
    assert triton_enabled() == has_module("triton")


def test_loader_returns_the_built_extensions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QLORA_DISABLE_KERNELS", raising=False)
    cpu, ops = c_extension("cpu"), c_extension("ops")
    if cpu is None or ops is None:
        pytest.skip("the C extensions are not built here")
    assert cpu.__name__ == "qlora.kernels._cpu" and hasattr(cpu, "dequantize")
    assert ops.__name__ == "qlora.kernels._ops" and hasattr(ops, "dropout")
    assert c_extension("cpu") is cpu  # cached, not re-imported


def test_unknown_extension_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"unknown C extension 'gpu'.*'gguf', 'matvec', 'ops'"):
        c_extension("gpu")


def test_describe_says_what_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QLORA_DISABLE_KERNELS", raising=False)
    rows = describe()
    assert rows.keys() == {"c kernels", "cpu dequant kernel", "cpu features", "triton kernels"}
    assert all(isinstance(v, str) and v for v in rows.values())
    if c_extension("cpu") is not None:
        assert rows["c kernels"].startswith("built: cpu")
        assert rows["cpu dequant kernel"] in ("avx2", "scalar (no AVX2 on this CPU)")
    monkeypatch.setenv("QLORA_DISABLE_KERNELS", "1")
    rows = describe()
    assert "disabled by QLORA_DISABLE_KERNELS" in rows["c kernels"]
    if has_module("triton"):
        assert "disabled by QLORA_DISABLE_KERNELS" in rows["triton kernels"]


def _qlora_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n == "qlora" or n.startswith("qlora.")}


def test_kernels_is_the_lowest_layer() -> None:
    for path in (SRC / "kernels").glob("*.py"):
        outside = {n for n in _qlora_imports(path) if not n.startswith("qlora.kernels")}
        assert not outside, f"{path.name} imports {outside}"


def test_blockwise_and_dequant_do_not_import_each_other() -> None:
    assert "qlora.quant.dequant" not in _qlora_imports(SRC / "quant" / "blockwise.py")


def test_only_the_loader_imports_the_extensions_and_reads_the_switch() -> None:
    for path in SRC.rglob("*.py"):
        if path.parent.name == "kernels":
            continue
        imports = _qlora_imports(path)
        assert not {"qlora.kernels._cpu", "qlora.kernels._ops"} & imports, path
        literals = {
            node.value
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
        }
        assert "QLORA_DISABLE_KERNELS" not in literals, f"{path} reads the switch itself"


@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler here"
)
def test_every_c_extension_is_built_where_a_compiler_is() -> None:
    """The extensions are optional at install (no compiler: the reference paths run), so a
    source that stops compiling would only show as slower code and skipped kernel tests;
    with a compiler on the machine, every one must have been built."""
    missing, stale = [], []
    for name in kernels.C_EXTENSIONS:
        try:
            module = importlib.import_module(f"qlora.kernels._{name}")
        except ImportError as error:
            missing.append(f"_{name} ({error})")
            continue
        # An editable install keeps the library beside its source; a failed rebuild leaves
        # the previous library in place, which imports fine: it must not predate the source.
        built = Path(module.__file__)
        source = built.parent / f"{name}.c"
        if source.is_file() and built.stat().st_mtime < source.stat().st_mtime:
            stale.append(f"_{name} (older than {source.name})")
    assert not missing, f"C extensions not built: {', '.join(missing)}; rerun the install"
    assert not stale, f"C extensions not rebuilt: {', '.join(stale)}; rerun the install"
