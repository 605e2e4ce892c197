"""``qlora export``: writes the file; bad input is a one-line error before any model loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import pytest
import torch
import transformers

from qlora.cli import main
from tests.export.conftest import tiny_tokenizer


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_export_writes_the_gguf(tiny_dir: Path, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "tiny.gguf"
    assert (
        main(["export", str(out), "--format", "gguf", "--model", str(tiny_dir), "--type", "f32"])
        == 0
    )
    assert f"wrote {out}" in capsys.readouterr().out
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir)
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    # loaded full precision (no adapter: --quant defaults to none), so exactly the weights
    assert torch.equal(torch.from_numpy(embd.data.copy()), model.model.embed_tokens.weight)


def test_existing_file_is_refused_before_loading(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "x.gguf"
    out.write_bytes(b"mine")
    assert main(["export", str(out), "--model", str(tmp_path / "missing")]) == 2
    assert "exists; choose another path, or pass --overwrite" in _error(capsys)
    assert out.read_bytes() == b"mine"


def test_bad_type_is_an_argparse_error(tmp_path: Path, capsys: Any) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["export", str(tmp_path / "x.gguf"), "--type", "q5_k"])
    assert exit.value.code == 2
    assert "invalid choice: 'q5_k'" in capsys.readouterr().err


def test_unsupported_architecture_is_one_line(tmp_path: Path, capsys: Any) -> None:
    source = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2)
    ).save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    capsys.readouterr()  # the save's progress bars
    out = tmp_path / "g.gguf"
    assert main(["export", str(out), "--model", str(source)]) == 2
    err = _error(capsys)
    assert "'GPT2LMHeadModel' cannot be exported to GGUF; supported: LlamaForCausalLM" in err
    assert not out.exists()


def test_adapter_format_and_ollama_are_wired(monkeypatch: Any, tmp_path: Path, capsys: Any) -> None:
    calls: list[tuple] = []

    def export_adapter_gguf(adapter_dir: str, out: str, *, model: Any, overwrite: bool) -> Path:
        calls.append(("adapter", adapter_dir, out, model, overwrite))
        Path(out).write_bytes(b"x")
        return Path(out)

    def write_modelfile(
        path: Path, *, adapter_gguf: Any = None, overwrite: bool = False, **kw: Any
    ) -> Path:
        calls.append(("ollama", Path(path).name, adapter_gguf, overwrite))
        return Path(path).parent / "Modelfile"

    import qlora.export.gguf_adapter as adapter_module
    import qlora.export.ollama as ollama_module

    monkeypatch.setattr(adapter_module, "export_adapter_gguf", export_adapter_gguf)
    monkeypatch.setattr(ollama_module, "write_modelfile", write_modelfile)
    base = tmp_path / "base.gguf"
    base.write_bytes(b"gguf")
    out = str(tmp_path / "a.gguf")
    argv = ["export", out, "--format", "gguf-adapter", "--adapter", "ad", "--model", str(base)]
    assert main([*argv, "--overwrite", "--ollama", "--no-fidelity"]) == 0
    assert calls == [
        ("adapter", "ad", out, str(base), True),
        ("ollama", "base.gguf", Path(out), True),
    ]
    assert main(["export", out, "--format", "gguf-adapter"]) == 2
    assert "give --adapter DIR once" in _error(capsys)


def test_adapter_export_ends_with_its_fidelity_report(
    tiny_dir: Path, tmp_path: Path, capsys: Any
) -> None:
    from qlora import LoraConfig, add_lora, load_model, save_adapter
    from qlora.export import read_fidelity_report
    from qlora.nn import lora_layers

    model, _ = load_model(tiny_dir, None, progress=False, tokenizer=False)
    add_lora(model, LoraConfig(r=4, alpha=8.0, use_rslora=True))
    with torch.no_grad():  # B = 0 would make any file look faithful
        for _, layer in lora_layers(model):
            layer.lora_B["default"].weight.normal_(0, 0.05)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tiny_dir))
    out = tmp_path / "adapter.gguf"
    argv = ["export", str(out), "--format", "gguf-adapter", "--adapter", str(tmp_path / "adapter")]
    assert main([*argv, "--quant", "none"]) == 0  # the base: the adapter's own, full precision
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "fidelity of adapter.gguf" in printed
    report = read_fidelity_report(out)
    assert report.top1 == 1.0 and report.max_logit_diff < 1e-3


def test_ollama_modelfile_beside_the_merged_gguf(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny.gguf"
    assert main(["export", str(out), "--model", str(tiny_dir), "--type", "q8_0", "--ollama"]) == 0
    modelfile = (tmp_path / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./tiny.gguf\n") and "TEMPLATE" in modelfile


def test_existing_modelfile_is_refused_before_writing(tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "Modelfile").write_text("mine")
    out = tmp_path / "m.gguf"
    assert main(["export", str(out), "--model", str(tmp_path / "missing"), "--ollama"]) == 2
    assert "Modelfile exists; choose another path, or pass --overwrite" in _error(capsys)
    assert not out.exists()
