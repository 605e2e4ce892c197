"""The Ollama Modelfile: exact text for the default model's ChatML template, and the fallback."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlora.adapters import ExportError
from qlora.export.ollama import ChatML, chatml_of, modelfile_text, write_modelfile
from qlora.files import DestinationError

# SmolLM2-135M-Instruct's template (as its GGUF and tokenizer_config.json carry it).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SMOLLM2_MODELFILE = '''FROM ./base.gguf
ADAPTER ./adapter.gguf
TEMPLATE """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ else }}<|im_start|>system
You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
{{ end }}
{{- range .Messages }}
{{- if ne .Role "system" }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}
{{- end }}<|im_start|>assistant
"""
PARAMETER stop "<|im_start|>"
PARAMETER stop "<|im_end|>"
'''

LLAMA3_TEMPLATE = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


class _Tok:
    def __init__(self, template: str | None, eos: str = "<|eot_id|>") -> None:
        self.chat_template, self.eos_token, self.bos_token = template, eos, ""


def _files(tmp_path: Path) -> tuple[Path, Path]:
    base, adapter = tmp_path / "base.gguf", tmp_path / "adapter.gguf"
    base.write_bytes(b"GGUF")
    adapter.write_bytes(b"GGUF")
    return base, adapter


def test_default_model_template_exact(tmp_path: Path) -> None:
    base, adapter = _files(tmp_path)
    out = write_modelfile(base, adapter_gguf=adapter, tokenizer=_Tok(SMOLLM2_TEMPLATE))
    assert out == tmp_path / "Modelfile"
    assert out.read_text() == SMOLLM2_MODELFILE


def test_default_model_gguf_and_tokenizer_agree() -> None:
    """The real default model: its GGUF's template, and its converted tokenizer's."""
    from qlora.models.registry import registered_path

    path = registered_path("smollm2-135m")
    assert path is not None
    expected = SMOLLM2_MODELFILE.replace("ADAPTER ./adapter.gguf\n", "").replace(
        "./base.gguf", f"./{path.name}"
    )
    assert modelfile_text(path) == expected  # template read from the GGUF itself

    from transformers import AutoTokenizer

    from qlora.models import resolve_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint("smollm2-135m"))
    assert modelfile_text(path, tokenizer=tokenizer) == expected


def test_plain_chatml_has_no_default_system(tokenizer: object) -> None:
    chat = chatml_of(tokenizer.chat_template)
    assert chat == ChatML(default_system=None)


def test_other_template_falls_back_without_template(tmp_path: Path) -> None:
    base, _ = _files(tmp_path)
    with pytest.warns(UserWarning, match="no TEMPLATE written.*not ChatML"):
        out = write_modelfile(base, tokenizer=_Tok(LLAMA3_TEMPLATE))
    assert out.read_text() == 'FROM ./base.gguf\nPARAMETER stop "<|eot_id|>"\n'


def test_no_template_falls_back(tmp_path: Path) -> None:
    base, _ = _files(tmp_path)
    with pytest.warns(UserWarning, match="no chat template"):
        text = modelfile_text(base, tokenizer=_Tok(None, eos="</s>"))
    assert text == 'FROM ./base.gguf\nPARAMETER stop "</s>"\n'


@pytest.mark.parametrize(
    "template",
    [
        "{{ raise_exception('no') }}",  # a template that refuses to render
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>"
        "{% endfor %}<|im_start|>assistant\n",  # ChatML-like, but turns lack the newline
        "{% for m in messages %}{% if m['role'] != 'system' %}<|im_start|>{{ m['role'] }}\n"
        "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}<|im_start|>assistant\n",
    ],
)
def test_near_misses_are_not_chatml(template: str) -> None:
    assert chatml_of(template) is None


def test_paths_outside_are_absolute_and_quoted(tmp_path: Path) -> None:
    _, adapter = _files(tmp_path)
    base = tmp_path / "my models" / "base.gguf"
    base.parent.mkdir()
    base.write_bytes(b"GGUF")
    text = modelfile_text(base, adapter_gguf=adapter, tokenizer=_Tok(SMOLLM2_TEMPLATE))
    assert text.splitlines()[:2] == [f'FROM "{base}"', "ADAPTER ./adapter.gguf"]


def test_adapter_modelfile_goes_beside_the_adapter(tmp_path: Path) -> None:
    """The base GGUF may live in site-packages: never write there."""
    base, _ = _files(tmp_path)
    adapter = tmp_path / "run" / "adapter.gguf"
    adapter.parent.mkdir()
    adapter.write_bytes(b"GGUF")
    out = write_modelfile(base, adapter_gguf=adapter, tokenizer=_Tok(SMOLLM2_TEMPLATE))
    assert out == adapter.parent / "Modelfile"
    assert out.read_text().splitlines()[:2] == [f"FROM {base}", "ADAPTER ./adapter.gguf"]
    assert not (tmp_path / "Modelfile").exists()


def test_refuses_existing_modelfile_and_missing_gguf(tmp_path: Path) -> None:
    base, _ = _files(tmp_path)
    (tmp_path / "Modelfile").write_text("mine")
    with pytest.raises(DestinationError, match="overwrite"):
        write_modelfile(base, tokenizer=_Tok(SMOLLM2_TEMPLATE))
    assert (tmp_path / "Modelfile").read_text() == "mine"
    write_modelfile(base, tokenizer=_Tok(SMOLLM2_TEMPLATE), overwrite=True)
    assert (tmp_path / "Modelfile").read_text().startswith("FROM ./base.gguf\n")
    with pytest.raises(ExportError, match="not a file"):
        write_modelfile(tmp_path / "missing.gguf")
