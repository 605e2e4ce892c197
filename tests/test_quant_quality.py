"""Smoke test of benchmarks/quant_quality.py on a tiny random Llama (no model download).

The real report runs SmolLM2-135M for minutes; here only the machinery is checked: the int4
reference quantizer, the storage and error accounting, and the perplexity/KL evaluation.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.tiny_models import tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def _load_benchmark() -> ModuleType:
    # benchmarks/ is not a package; load the script as a module by its path.
    spec = importlib.util.spec_from_file_location(
        "quant_quality", ROOT / "benchmarks" / "quant_quality.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


qq = _load_benchmark()


def test_int4_reference_round_trip() -> None:
    weight = torch.randn(37, 64) * 0.02
    weight[3] = 0.0  # an all-zero block must come back as zeros, not NaN
    state = qq.quantize_int4_absmax(weight, 64)
    restored = qq.dequantize_int4_absmax(state)
    assert restored.shape == weight.shape
    assert torch.equal(restored[3], torch.zeros(64))
    blocks = weight.view(-1, 64)
    absmax = blocks.abs().amax(dim=-1, keepdim=True)
    expected = torch.clamp(torch.round(blocks / absmax.clamp(min=1e-38) * 7), -7, 7) / 7 * absmax
    torch.testing.assert_close(restored.view(-1, 64), expected, rtol=0, atol=1e-7)
    # the rounding error of a uniform 15-level grid is at most half a step, absmax / 14
    assert bool(((restored - weight).view(-1, 64).abs() <= absmax / 14 + 1e-7).all())
    # 4-bit codes + one float32 scale per 64 elements
    assert state.bits_per_parameter() == pytest.approx(4 + 32 / 64)


def test_int4_odd_sizes() -> None:
    weight = torch.randn(101)
    restored = qq.dequantize_int4_absmax(qq.quantize_int4_absmax(weight, 32))
    assert restored.shape == weight.shape
    assert float((restored - weight).abs().max()) <= float(weight.abs().max()) / 14 + 1e-6


def test_report_on_tiny_llama() -> None:
    pytest.importorskip("transformers")
    reference = tiny_llama(vocab=96, tied=True)
    models, rows = {}, {}
    for variant in qq.VARIANTS:
        models[variant.name], states = qq.build_variant(reference, variant)
        rows[variant.name] = qq.weight_metrics(reference, states)
    # the reference is untouched and the output head is never quantized
    assert isinstance(reference.model.layers[0].mlp.up_proj, torch.nn.Linear)
    assert rows["nf4+DQ"]["layers"] == 14  # 7 Linears per layer, lm_head excluded
    assert rows["nf4"]["bits_per_param_no_codebook"] == pytest.approx(4.5)
    assert rows["int4"]["bits_per_param"] == pytest.approx(4.5)
    assert rows["nf4+DQ"]["bits_per_param"] > rows["nf4+DQ"]["bits_per_param_no_codebook"]
    assert rows["int8"]["rel_fro_overall"] < rows["nf4"]["rel_fro_overall"]
    assert rows["nf4"]["rel_fro_overall"] < rows["nf2+DQ"]["rel_fro_overall"]

    tokens = torch.randint(0, reference.config.vocab_size, (70,))
    scores = qq.evaluate(models, tokens, window=32, progress=False)
    assert scores["fp32"]["positions"] == 31 + 31 + 5  # windows of 32, 32 and 6 tokens
    assert scores["fp32"]["kl"] == 0.0 and scores["fp32"]["top1_agree"] == 1.0
    for name, score in scores.items():
        assert math.isfinite(score["ppl"]) and score["kl"] >= -1e-6, name
    assert scores["nf2+DQ"]["kl"] > scores["int8"]["kl"]

    for name in rows:
        rows[name].update(scores[name])
    check = qq.check_paper_ordering(rows)
    expected = rows["int4"]["ppl"] > rows["fp4+DQ"]["ppl"] > rows["nf4+DQ"]["ppl"]
    assert check["holds"] == expected
    table = qq.markdown_table(rows)
    assert table.count("\n") == len(qq.VARIANTS) + 1


def test_write_docs_keeps_text_outside_markers(tmp_path: Path) -> None:
    page = tmp_path / "q.md"
    page.write_text(f"intro\n{qq.BEGIN_MARK}\nold\n{qq.END_MARK}\nreading\n", encoding="utf-8")
    qq.write_docs(page, "new table")
    text = page.read_text(encoding="utf-8")
    assert text.startswith("intro\n") and text.endswith("reading\n")
    assert "new table" in text and "old" not in text
