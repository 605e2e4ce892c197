"""The fidelity report: the merged GGUF read back with `gguf.GGUFReader` vs our own forward."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from qlora.adapters import load_adapter, save_adapter
from qlora.cli import main
from qlora.config import LoraConfig, QuantConfig
from qlora.export.fidelity import (
    OWN_BASE,
    FidelityError,
    FidelityReport,
    adapter_fidelity_report,
    adapter_model,
    exported_model,
    fidelity_path,
    fidelity_report,
    read_fidelity_report,
    write_fidelity_report,
)
from qlora.export.gguf_adapter import export_adapter_gguf
from qlora.export.gguf_model import export_gguf
from qlora.files import DestinationError
from qlora.models.gguf_names import unpermute_qk
from qlora.nn import add_lora, lora_layers, quantize_model
from tests.adapters.helpers import randomize
from tests.export.test_gguf_adapter import randomize_b, vary_ranks
from tests.tiny_models import tiny_llama

KEYS = {"path", "type", "texts", "positions", "top1", "mean_kl", "max_logit_diff"}


def _adapted(tokenizer: Any, tied: bool = False) -> torch.nn.Module:
    """A tiny random Llama with a LoRA whose B is random (so the merge matters)."""
    model = tiny_llama(seed=0, vocab=len(tokenizer), tied=tied)
    return randomize(add_lora(model, LoraConfig(r=4, alpha=8.0, dropout=0.0)))


def _export(model: torch.nn.Module, tokenizer: Any, path: Path, type: str) -> FidelityReport:
    out = export_gguf(model, path, tokenizer, type=type, progress=False, fidelity=True)
    return read_fidelity_report(out)


@pytest.mark.parametrize("tied", [False, True])
def test_f32_export_reproduces_our_forward(tmp_path: Path, tokenizer: Any, tied: bool) -> None:
    model = _adapted(tokenizer, tied=tied).train()  # mode is restored after the report
    report = _export(model, tokenizer, tmp_path / "m.gguf", "f32")
    assert model.training
    assert (report.type, report.texts, report.positions) == ("f32", 4, 4 * 128)
    assert report.top1 == 1.0 and report.mean_kl < 1e-6 and report.max_logit_diff < 1e-4


def test_exported_weights_are_the_merged_ones(tmp_path: Path, tokenizer: Any) -> None:
    model = _adapted(tokenizer)
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer, type="f32", progress=False)
    twin = exported_model(model, path)  # float32 HF Llama, no adapter layers
    assert not any("lora" in name for name, _ in twin.named_parameters())
    ids = torch.tensor([[1, 5, 9, 40, 7]])
    with torch.no_grad():
        torch.testing.assert_close(twin(input_ids=ids).logits, model(input_ids=ids).logits)


def test_q4_0_rounding_shows_in_the_report(tmp_path: Path, tokenizer: Any) -> None:
    model = _adapted(tokenizer)
    exact = _export(model, tokenizer, tmp_path / "f32.gguf", "f32")
    q4 = _export(model, tokenizer, tmp_path / "q4_0.gguf", "q4_0")
    print(f"\n{exact}\n{q4}")
    assert q4.type == "q4_0"
    assert q4.mean_kl > 1e-5 and q4.mean_kl > 100 * exact.mean_kl  # measured 3.0e-3
    assert q4.max_logit_diff > 100 * exact.max_logit_diff
    assert q4.top1 < 1.0  # tiny random models have flat distributions: 54% measured


def test_report_json_beside_the_export(tmp_path: Path, tokenizer: Any) -> None:
    model = _adapted(tokenizer)
    out = export_gguf(model, tmp_path / "m.gguf", tokenizer, type="q8_0", progress=False)
    assert not fidelity_path(out).exists()  # fidelity=False (the default): no report
    export_gguf(model, out, tokenizer, type="q8_0", progress=False, overwrite=True, fidelity=True)
    written = fidelity_path(out)
    assert written == tmp_path / "m.gguf.fidelity.json"
    fields = json.loads(written.read_text())
    assert set(fields) == KEYS and fields["type"] == "q8_0" and fields["path"] == str(out)
    report = FidelityReport(**fields)
    assert str(report).startswith(
        "fidelity of m.gguf (q8_0) vs our forward on 4 held-out texts (512 positions): top-1 "
    )
    assert "nats/token, max |Δlogit| " in str(report)
    assert FidelityReport.from_json(report.to_json()) == report


def test_existing_report_is_refused_before_writing(tmp_path: Path, tokenizer: Any) -> None:
    out = tmp_path / "m.gguf"
    fidelity_path(out).write_text("mine")
    with pytest.raises(DestinationError, match=r"m\.gguf\.fidelity\.json exists; choose another"):
        export_gguf(_adapted(tokenizer), out, tokenizer, progress=False, fidelity=True)
    assert not out.exists() and fidelity_path(out).read_text() == "mine"


def test_given_texts_and_a_foreign_file(tmp_path: Path, tokenizer: Any) -> None:
    model = _adapted(tokenizer)
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer, type="f32", progress=False)
    texts = ["hello world, hello there", "the quick brown fox"]
    report = fidelity_report(model, tokenizer, path, texts=texts, max_tokens=3)
    assert (report.texts, report.positions, report.top1) == (2, 6, 1.0)
    with pytest.raises(FidelityError, match="no held-out text"):
        fidelity_report(model, tokenizer, path, texts=[""])
    other = tiny_llama(seed=0, vocab=len(tokenizer), hidden=32, intermediate=64)
    with pytest.raises(FidelityError, match=r"model\.embed_tokens\.weight is \(\d+, 64\) in the"):
        fidelity_report(other, tokenizer, path)


def test_cli_prints_the_report(tiny_dir: Path, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "tiny.gguf"
    assert main(["export", str(out), "--model", str(tiny_dir), "--type", "f32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    line = next(x for x in lines if x.startswith("fidelity of "))
    assert line.startswith(
        "fidelity of tiny.gguf (f32) vs our forward on 4 held-out texts (512 positions): "
        "top-1 100.0%, mean KL "
    )
    assert line.endswith(f"(wrote {fidelity_path(out)})")
    assert read_fidelity_report(out).top1 == 1.0
    quiet = tmp_path / "quiet.gguf"
    assert main(["export", str(quiet), "--model", str(tiny_dir), "--no-fidelity"]) == 0
    assert "fidelity" not in capsys.readouterr().out and not fidelity_path(quiet).exists()


def test_default_model_q8_0(tmp_path: Path) -> None:
    """SmolLM2-135M + a random LoRA, q8_0: the numbers quoted in docs/export.md (run with -s)."""
    from qlora.models import load_model

    start = time.perf_counter()
    model, tok = load_model("smollm2-135m", quant=None, progress=False)
    torch.manual_seed(0)  # A's init
    add_lora(model, LoraConfig(r=8, alpha=16.0, dropout=0.0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # as tests/export/test_gguf_llama.py: B random, so the merge matters
        for _, layer in lora_layers(model):
            b = layer.lora_B["default"].weight  # [out, r]
            b.copy_(torch.randn(b.shape, generator=generator) * 0.01)
    loaded = time.perf_counter()
    out = export_gguf(model, tmp_path / "m.gguf", tok, type="q8_0", progress=False)
    exported = time.perf_counter()
    report = fidelity_report(model, tok, out)
    done = time.perf_counter()
    print(
        f"\n{report}\n(load {loaded - start:.1f} s, export {exported - loaded:.1f} s, "
        f"fidelity {done - exported:.1f} s)"
    )
    assert report.positions == 512 and report.top1 >= 0.95 and report.mean_kl < 0.05


def test_nf4_base_with_adapter_f32_is_exact(tmp_path: Path, tokenizer: Any) -> None:
    """The merge folds B@A into the dequantized NF4 weights our forward runs: same logits."""
    model = tiny_llama(seed=0, vocab=len(tokenizer))
    quantize_model(model, QuantConfig(kind="nf4", compute_dtype="float32"))
    randomize(add_lora(model, LoraConfig(r=4, alpha=8.0, dropout=0.0)))
    report = _export(model, tokenizer, tmp_path / "nf4.gguf", "f32")
    assert report.top1 == 1.0 and report.mean_kl < 1e-6 and report.max_logit_diff < 1e-4


def test_cli_skips_the_report_when_its_copy_would_not_fit(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from qlora.cli import _fidelity_fits

    model = tiny_llama(seed=0)
    assert _fidelity_fits(model)
    monkeypatch.setattr("qlora.cli.os.sysconf", lambda name: 1)  # 1 page of 1 byte free
    assert not _fidelity_fits(model)
    assert "fidelity report skipped: its float32 copy" in capsys.readouterr().err


# -- the adapter GGUF ------------------------------------------------------------------------


def _adapter_gguf(
    directory: Path, tokenizer: Any, *, rslora: bool = False, patterns: bool = False, seed: int = 0
) -> Path:
    """A random all-linear adapter of the tiny Llama (seed 0), saved as PEFT files in
    ``directory`` and exported as ``directory.gguf``."""
    model = tiny_llama(seed=0, vocab=len(tokenizer))
    torch.manual_seed(seed)  # A's init
    lora = LoraConfig(r=4, alpha=8.0, dropout=0.0, target_modules="all-linear", use_rslora=rslora)
    add_lora(model, lora)
    if patterns:
        vary_ranks(model)
    randomize_b(model, 0.2, seed)
    save_adapter(model, directory, base_model_name_or_path="/nonexistent/base")
    return export_adapter_gguf(directory, directory.with_suffix(".gguf"), model=model)


def _loaded(directory: Path, tokenizer: Any) -> torch.nn.Module:
    """What `qlora export --format gguf-adapter` runs: the base + `load_adapter`."""
    model = tiny_llama(seed=0, vocab=len(tokenizer))
    load_adapter(model, directory)
    return model


@pytest.mark.parametrize(("rslora", "patterns"), [(False, False), (True, False), (False, True)])
def test_adapter_on_our_base_reproduces_our_forward(
    tmp_path: Path, tokenizer: Any, rslora: bool, patterns: bool
) -> None:
    path = _adapter_gguf(tmp_path / "adapter", tokenizer, rslora=rslora, patterns=patterns)
    model = _loaded(tmp_path / "adapter", tokenizer).train()  # its mode is restored
    report = adapter_fidelity_report(model, tokenizer, path)
    assert model.training
    assert (report.type, report.base, report.base_type) == ("lora", OWN_BASE, None)
    assert (report.path, report.texts, report.positions) == (str(path), 4, 512)
    # measured: top-1 100%, KL ~1e-15, max |Δlogit| <= 1.6e-6
    assert report.top1 == 1.0 and report.mean_kl < 1e-9 and report.max_logit_diff < 1e-4
    assert str(report).startswith(
        "fidelity of adapter.gguf (lora adapter on our model's base weights) vs our forward "
        "on 4 held-out texts (512 positions): top-1 100.0%, mean KL "
    )


def test_adapter_report_json_beside_the_adapter(tmp_path: Path, tokenizer: Any) -> None:
    path = _adapter_gguf(tmp_path / "adapter", tokenizer)
    report = adapter_fidelity_report(_loaded(tmp_path / "adapter", tokenizer), tokenizer, path)
    written = write_fidelity_report(report)
    assert written == tmp_path / "adapter.gguf.fidelity.json"
    assert set(json.loads(written.read_text())) == KEYS | {"base"}  # base_type: None, left out
    assert read_fidelity_report(path) == report


def test_adapter_on_a_base_gguf(tmp_path: Path, tokenizer: Any) -> None:
    """The base read from a GGUF (dequantized, q/k un-permuted): exact at f32; q4_1 shows."""
    path = _adapter_gguf(tmp_path / "adapter", tokenizer, patterns=True)
    model = _loaded(tmp_path / "adapter", tokenizer)
    reports = {}
    for kind in ("f32", "q4_1"):
        base = tiny_llama(seed=0, vocab=len(tokenizer))
        base_gguf = export_gguf(
            base, tmp_path / f"{kind}.gguf", tokenizer, type=kind, progress=False
        )
        reports[kind] = adapter_fidelity_report(model, tokenizer, path, base_gguf)
        assert (reports[kind].base, reports[kind].base_type) == (str(base_gguf), kind)
    exact, q4 = reports["f32"], reports["q4_1"]
    print(f"\n{exact}\n{q4}")
    assert "(lora adapter on f32.gguf, f32)" in str(exact)
    assert exact.top1 == 1.0 and exact.mean_kl < 1e-9 and exact.max_logit_diff < 1e-4
    assert q4.mean_kl > 100 * exact.mean_kl and q4.max_logit_diff > 100 * exact.max_logit_diff
    report = FidelityReport.from_json(q4.to_json())
    assert report == q4 and json.loads(q4.to_json())["base_type"] == "q4_1"


def _rewritten(
    src: Path,
    dst: Path,
    *,
    alpha: float | None = None,
    drop: str | None = None,
    lora_b: Callable[[str, np.ndarray], np.ndarray] | None = None,
) -> Path:
    """A copy of the adapter GGUF ``src`` with its alpha, a tensor or its B changed: the
    broken files a wrong writer could produce."""
    reader = gguf.GGUFReader(src)
    file_alpha = float(reader.fields["adapter.lora.alpha"].contents())
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, file_alpha if alpha is None else alpha)
    for t in reader.tensors:
        data = np.array(t.data)
        if t.name == drop:
            continue
        if lora_b is not None and t.name.endswith(".lora_b"):
            data = lora_b(t.name, data)
        writer.add_tensor(t.name, np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def _hf_rows(name: str, b: np.ndarray) -> np.ndarray:
    """q/k B back in HF row order: a writer that forgot llama.cpp's permutation."""
    heads = {"attn_q": 4, "attn_k": 2}.get(name.split(".")[2])  # tiny_llama's heads
    return b if heads is None else unpermute_qk(torch.from_numpy(b), heads).numpy()


def test_wrong_adapter_files_are_visibly_worse(tmp_path: Path, tokenizer: Any) -> None:
    """The report can fail: each broken file scores far below the exact one."""
    path = _adapter_gguf(tmp_path / "adapter", tokenizer)
    model = _loaded(tmp_path / "adapter", tokenizer)
    alpha = float(gguf.GGUFReader(path).fields["adapter.lora.alpha"].contents())
    wrong = {
        "another adapter": _adapter_gguf(tmp_path / "other", tokenizer, seed=1),
        "B x 2": _rewritten(path, tmp_path / "b2.gguf", lora_b=lambda _, b: 2 * b),
        "alpha x 2": _rewritten(path, tmp_path / "alpha.gguf", alpha=2 * alpha),
        "q/k not permuted": _rewritten(path, tmp_path / "perm.gguf", lora_b=_hf_rows),
    }
    exact = adapter_fidelity_report(model, tokenizer, path)
    for what, file in wrong.items():
        report = adapter_fidelity_report(model, tokenizer, file)
        print(f"\n{what}: {report}")
        assert report.mean_kl > 1e-5 and report.mean_kl > 1e6 * exact.mean_kl, what
        assert report.max_logit_diff > 1e3 * exact.max_logit_diff, what
        assert report.top1 < 0.95, what


def test_adapter_report_refuses_files_that_do_not_fit(tmp_path: Path, tokenizer: Any) -> None:
    path = _adapter_gguf(tmp_path / "adapter", tokenizer)
    model = _loaded(tmp_path / "adapter", tokenizer)
    merged = export_gguf(model, tmp_path / "m.gguf", tokenizer, type="f32", progress=False)
    with pytest.raises(FidelityError, match=r"m\.gguf: not a LoRA adapter GGUF"):
        adapter_fidelity_report(model, tokenizer, merged)
    with pytest.raises(FidelityError, match=r"base_gguf is an adapter"):
        adapter_fidelity_report(model, tokenizer, path, path)
    half = _rewritten(path, tmp_path / "half.gguf", drop="blk.1.ffn_up.weight.lora_a")
    with pytest.raises(FidelityError, match=r"blk\.1\.ffn_up\.weight\.lora_a is missing"):
        adapter_fidelity_report(model, tokenizer, half)
    other = tiny_llama(seed=0, vocab=len(tokenizer), intermediate=64)
    with pytest.raises(FidelityError, match=r"\.lora_b \(128, 4\); model\.layers\.0\.mlp"):
        adapter_fidelity_report(other, tokenizer, path)


def test_default_model_adapter_on_its_own_q4_1_gguf(tmp_path: Path) -> None:
    """SmolLM2-135M (its fp32 weights ARE its Q4_1 GGUF dequantized) + a random r=8 adapter,
    applied to that Q4_1 file: measured top-1 100%, mean KL 9e-12, max |Δlogit| 7.3e-5 (the
    same with our own base weights). Run with -s for the numbers."""
    from qlora.models import load_model
    from qlora.models.registry import registered_path

    model, tok = load_model("smollm2-135m", quant=None, progress=False)
    torch.manual_seed(0)  # A's init
    add_lora(model, LoraConfig(r=8, alpha=16.0, dropout=0.0, target_modules="all-linear"))
    randomize_b(model, 0.01)
    save_adapter(model, tmp_path / "adapter")
    path = export_adapter_gguf(tmp_path / "adapter", tmp_path / "a.gguf", model=model)
    base = registered_path("smollm2-135m")
    assert base is not None and base.suffix == ".gguf"
    start = time.perf_counter()
    report = adapter_fidelity_report(model, tok, path, base)
    print(f"\n{report} ({time.perf_counter() - start:.1f} s)")
    assert (report.base, report.base_type, report.positions) == (str(base), "q4_1", 512)
    assert report.top1 >= 0.99 and report.mean_kl < 1e-6 and report.max_logit_diff < 1e-3


@pytest.mark.llama
def test_the_reports_copy_runs_the_adapter_as_llama_cpp_does(tmp_path: Path) -> None:
    """The real peer: llama.cpp on a float32 copy of the default model's GGUF with an rsLoRA
    rank/alpha-pattern adapter gives the logits of `adapter_model` on the same files (so the
    report's "exported" side is what llama.cpp runs, not our reading of the writer)."""
    pytest.importorskip("llama_cpp")
    from tests.export.test_gguf_adapter import (
        PROMPTS,
        _llama_logits,
        _vary_default_model,
        dequantized_copy,
        smollm2,
    )

    model, tok, q4_1 = smollm2()
    lora = LoraConfig(r=4, alpha=8.0, target_modules="all-linear", use_rslora=True)
    add_lora(model, lora)
    _vary_default_model(model)
    randomize_b(model, 0.04, seed=3)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path="smollm2-135m")
    out = export_adapter_gguf(tmp_path / "adapter", tmp_path / "adapter.gguf")
    f32 = dequantized_copy(q4_1, tmp_path / "f32.gguf")
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    with torch.no_grad():
        twin, bare = adapter_model(model, out, f32), exported_model(model, f32)
        mine = torch.cat([twin(torch.tensor([ids])).logits[0].double() for ids in prompts])
        off = torch.cat([bare(torch.tensor([ids])).logits[0].double() for ids in prompts])
    theirs = _llama_logits(f32, out, prompts)  # [tokens, vocab]
    effect, diff = (mine - off).abs().max().item(), (theirs - mine).abs().max().item()
    print(f"\nadapter effect max|Δlogit| {effect:.3f}; llama.cpp vs the report's copy {diff:.4f}")
    assert diff < 0.05 < effect  # a wrong scale or permutation: an error the size of the effect
    top2 = mine.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.1  # no near-ties, where 0.02 may flip the order
    assert torch.equal(theirs.argmax(-1)[clear], mine.argmax(-1)[clear])
