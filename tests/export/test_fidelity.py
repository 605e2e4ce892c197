"""The fidelity report: the merged GGUF read back with `gguf.GGUFReader` vs our own forward."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from qlora.cli import main
from qlora.config import LoraConfig, QuantConfig
from qlora.export.fidelity import (
    FidelityError,
    FidelityReport,
    exported_model,
    fidelity_path,
    fidelity_report,
    read_fidelity_report,
)
from qlora.export.gguf_model import export_gguf
from qlora.files import DestinationError
from qlora.nn import add_lora, lora_layers, quantize_model
from tests.adapters.helpers import randomize
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
