"""An Ollama ``Modelfile`` beside an exported GGUF, so ``ollama create NAME -f Modelfile`` works.

The file holds ``FROM`` (the base GGUF), ``ADAPTER`` (a LoRA adapter GGUF, when given),
``TEMPLATE`` and ``PARAMETER stop`` lines. Paths are written relative to the Modelfile
(``./model.gguf``) when the file lies beside it, absolute otherwise; Ollama resolves a
relative path against the Modelfile's directory.

TEMPLATE: Ollama formats chats with a Go template, Hugging Face with Jinja; there is no
general translation. We translate what we can verify: the Jinja template is *rendered* on
probe conversations and, when every rendering is exactly ChatML
(``<|im_start|>ROLE\\nCONTENT<|im_end|>\\n`` per message, ``<|im_start|>assistant\\n`` to
prompt), optionally with a fixed system message when the chat has none (SmolLM2, Qwen2), the
equivalent Go template is written. Any other template (or none) is the documented fallback:
no TEMPLATE line, and a warning (on stderr) saying so; Ollama then chooses a template from
the GGUF's own ``tokenizer.chat_template``, which it matches against the templates it knows.
Check what it chose with ``ollama show NAME --template``.

Stops: ``<|im_start|>`` and ``<|im_end|>`` for ChatML; otherwise the end-of-sequence token
when it is known.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora.adapters.merge import ExportError
from qlora.files import atomic_write, check_file_destination

__all__ = ["MODELFILE_NAME", "ChatML", "chatml_of", "modelfile_text", "write_modelfile"]

MODELFILE_NAME = "Modelfile"

_START, _END = "<|im_start|>", "<|im_end|>"
# Placeholders that cannot occur in a real template's own text.
_U1, _U2, _A1, _S = "\x00user-one\x00", "\x00user-two\x00", "\x00assistant\x00", "\x00system\x00"


@dataclass(frozen=True)
class ChatML:
    """A chat template recognized as ChatML; ``default_system`` is what it inserts when the
    conversation has no system message (None: nothing)."""

    default_system: str | None


def _turn(role: str, content: str) -> str:
    return f"{_START}{role}\n{content}{_END}\n"


def _render(template: str, messages: list[dict[str, str]], special: dict[str, str]) -> str:
    """The template rendered as transformers renders it (a sandboxed Jinja environment)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=True, **special
    )


def chatml_of(template: str | None, special: dict[str, str] | None = None) -> ChatML | None:
    """`ChatML` when ``template`` renders every probe conversation exactly as ChatML, else None.

    Probes: one user turn; a system and a user turn; user, assistant, user. The first must
    give ``[default system turn] + user turn + "<|im_start|>assistant\\n"``; the others must
    put the given system message in place of the default and keep every turn.
    """
    if not template:
        return None
    user, assistant, system = ("user", _U1), ("assistant", _A1), ("system", _S)
    probes = [[user], [system, user], [user, assistant, ("user", _U2)]]
    try:
        texts = [
            _render(template, [{"role": r, "content": c} for r, c in probe], special or {})
            for probe in probes
        ]
    except Exception:  # any Jinja error, undefined name, raise_exception: not ours to run
        return None
    prompt = f"{_START}assistant\n"
    turns = [_turn("user", _U1), _turn("system", _S) + _turn("user", _U1)]
    turns.append(_turn("user", _U1) + _turn("assistant", _A1) + _turn("user", _U2))
    first = texts[0]
    if not first.endswith(turns[0] + prompt):
        return None
    prefix = first[: -len(turns[0] + prompt)]
    default = None
    if prefix:
        match = re.fullmatch(
            re.escape(_START) + r"system\n(.*)" + re.escape(_END) + r"\n", prefix, re.S
        )
        if match is None or not _safe(match[1]):
            return None
        default = match[1]
    if texts[1] != turns[1] + prompt or texts[2] != prefix + turns[2] + prompt:
        return None
    return ChatML(default_system=default)


def _safe(text: str) -> bool:
    """Text that can stand literally inside a Go template in a triple-quoted Modelfile value."""
    return "{{" not in text and "}}" not in text and '"""' not in text and _START not in text


def _go_template(chat: ChatML) -> str:
    """The Go template that renders what the Jinja template renders (module docstring).

    Ollama passes the system prompt as ``.System`` (the Modelfile's SYSTEM or the chat's
    system messages) and every message, system ones included, in ``.Messages``; the system
    turn is written once, first, from ``.System``.
    """
    system = "{{- if .System }}" + _turn("system", "{{ .System }}")
    if chat.default_system is not None:
        system += "{{ else }}" + _turn("system", chat.default_system)
    return (
        system
        + "{{ end }}\n"
        + "{{- range .Messages }}\n"
        + '{{- if ne .Role "system" }}'
        + _turn("{{ .Role }}", "{{ .Content }}")
        + "{{ end }}\n"
        + "{{- end }}"
        + f"{_START}assistant\n"
    )


def _path_line(keyword: str, path: Path, directory: Path) -> str:
    """``FROM ./x.gguf``: relative when beside the Modelfile; quoted if it has whitespace."""
    path = path.absolute()
    text = f"./{path.name}" if path.parent == directory.absolute() else str(path)
    if any(c in text for c in '\n\r"'):
        raise ExportError(f"{path}: a path with a newline or quote cannot go in a Modelfile")
    return f'{keyword} "{text}"' if re.search(r"\s", text) else f"{keyword} {text}"


def _template_and_eos(gguf_path: Path, tokenizer: Any) -> tuple[str | None, dict[str, str]]:
    """(Jinja chat template, special tokens) from the tokenizer, or else from the GGUF."""
    if isinstance(tokenizer, str):
        return tokenizer, {}
    if tokenizer is not None:
        special = {
            k: str(getattr(tokenizer, k))
            for k in ("bos_token", "eos_token")
            if getattr(tokenizer, k, None)
        }
        return getattr(tokenizer, "chat_template", None), special
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    field = reader.fields.get(gguf.Keys.Tokenizer.CHAT_TEMPLATE)
    template = field.contents() if field is not None else None
    special = {}
    tokens, eos = (
        reader.fields.get(k) for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.eos_token_id")
    )
    if tokens is not None and eos is not None:
        special["eos_token"] = str(tokens.contents(int(eos.contents())))
    return template, special


def _modelfile_path(gguf_path: Path, adapter_gguf: str | os.PathLike | None) -> Path:
    """Beside the file that was exported: the adapter's GGUF when there is one (the base GGUF
    may sit in a package or a shared folder that is not ours to write into), else the model's.
    """
    exported = Path(adapter_gguf) if adapter_gguf is not None else gguf_path
    return exported.absolute().parent / MODELFILE_NAME


def modelfile_text(
    gguf_path: str | os.PathLike,
    *,
    adapter_gguf: str | os.PathLike | None = None,
    tokenizer: Any = None,
) -> str:
    """The Modelfile `write_modelfile` writes (see there); warns when TEMPLATE is left out."""
    gguf_path = Path(gguf_path)
    directory = _modelfile_path(gguf_path, adapter_gguf).parent
    template, special = _template_and_eos(gguf_path, tokenizer)
    chat = chatml_of(template, special)
    lines = [_path_line("FROM", gguf_path, directory)]
    if adapter_gguf is not None:
        lines.append(_path_line("ADAPTER", Path(adapter_gguf), directory))
    if chat is not None:
        lines.append(f'TEMPLATE """{_go_template(chat)}"""')
        stops = [_START, _END]
    else:
        why = "it has no chat template" if not template else "its chat template is not ChatML"
        warnings.warn(
            f"Modelfile for {gguf_path.name}: no TEMPLATE written ({why}); Ollama will pick "
            "one from the GGUF's tokenizer.chat_template - check it with `ollama show NAME "
            "--template`",
            stacklevel=3,
        )
        eos = special.get("eos_token")
        stops = [eos] if eos and '"' not in eos and "\n" not in eos else []
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    return "\n".join(lines) + "\n"


def write_modelfile(
    gguf_path: str | os.PathLike,
    *,
    adapter_gguf: str | os.PathLike | None = None,
    tokenizer: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write ``Modelfile`` for ``ollama create NAME -f Modelfile`` beside the exported file:
    ``adapter_gguf`` when given, else ``gguf_path``.

    Args:
        gguf_path: the base model GGUF (``FROM``); it must exist.
        adapter_gguf: a LoRA adapter GGUF for that base (``ADAPTER``), e.g. from
            `qlora.export.gguf_adapter.export_adapter_gguf`.
        tokenizer: where the chat template comes from: a transformers tokenizer (its
            ``chat_template``, ``bos_token``, ``eos_token``), a Jinja template string, or
            None to read ``tokenizer.chat_template`` from the GGUF itself.
        overwrite: replace an existing Modelfile.

    Returns:
        The Modelfile's path. A ChatML chat template becomes a Go TEMPLATE; any other is left
        out with a warning (module docstring).

    Raises:
        ExportError: ``gguf_path`` (or ``adapter_gguf``) is not a file.
        DestinationError: a Modelfile exists there and not ``overwrite``.
    """
    gguf_path = Path(gguf_path)
    for path in (gguf_path, adapter_gguf):
        if path is not None and not Path(path).is_file():
            raise ExportError(f"{path} is not a file; export the GGUF before its Modelfile")
    out = _modelfile_path(gguf_path, adapter_gguf)
    check_file_destination(out, overwrite=overwrite)
    return atomic_write(
        out, modelfile_text(gguf_path, adapter_gguf=adapter_gguf, tokenizer=tokenizer)
    )
