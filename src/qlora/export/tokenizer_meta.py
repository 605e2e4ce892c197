"""A Hugging Face fast tokenizer as GGUF ``tokenizer.*`` metadata, so llama.cpp needs no other file.

What llama.cpp reads: ``tokenizer.ggml.model`` (``gpt2``: byte-level BPE; ``llama``:
SentencePiece-style BPE with byte fallback), ``tokenizer.ggml.pre`` (which pre-tokenizer
regexes a ``gpt2`` vocabulary uses), the token strings by id, their types (normal, control,
user-defined, byte, unused), scores (``llama`` only: the merge order), merges (``gpt2``),
the special token ids and whether BOS/EOS are added, and ``tokenizer.chat_template``.

Merges, special ids and add-BOS/EOS are read by the ``gguf`` package's own `gguf.SpecialVocab`
from the tokenizer's saved files (the code llama.cpp's converter runs); the token list and
types are built here from the tokenizer itself, as the converter does for a fast tokenizer.
"""

from __future__ import annotations

import json
import re
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

__all__ = ["TokenizerError", "TokenizerMeta", "add_tokenizer", "tokenizer_meta"]


class TokenizerError(ValueError):
    """The tokenizer cannot be written as GGUF metadata; the message says why."""


@dataclass
class TokenizerMeta:
    """Everything written under ``tokenizer.*``; see the module docstring."""

    model: str  # "gpt2" | "llama"
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    special: gguf.SpecialVocab
    chat_template: str | None = None
    space_prefix: bool = False  # llama: "▁" is prepended to the text before tokenizing
    notes: list[str] = field(default_factory=list)


def _backend_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerError(
            f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer; GGUF export needs "
            "one with tokenizer.json"
        )
    return json.loads(backend.to_str())


def _is_type(node: dict[str, Any] | None, kind: str) -> bool:
    return bool(node) and node.get("type") == kind


def _pre_name(pre: dict[str, Any] | None) -> str | None:
    """llama.cpp's name for a byte-level BPE's pre-tokenizer, when its structure says it.

    ``gpt-2``: ByteLevel with GPT-2's regex alone; ``smollm``: single digits split first, then
    GPT-2's regex; ``llama-bpe`` / ``qwen2``: Llama 3's / Qwen2's Split regex (numbers in
    groups of up to 3 / one by one). None: unknown (llama.cpp then uses its default).
    """
    if _is_type(pre, "ByteLevel") and pre.get("use_regex", True):
        return "gpt-2"  # llama.cpp spells the pre-tokenizer with a hyphen
    steps = pre.get("pretokenizers", []) if _is_type(pre, "Sequence") else []
    kinds = [s.get("type") for s in steps]
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and steps[1].get("use_regex", True)
    ):
        return "smollm"
    if kinds[:1] == ["Split"] and kinds[-1:] == ["ByteLevel"]:
        pattern = steps[0].get("pattern", {}).get("Regex", "")
        if "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in pattern:
            if r"\p{N}{1,3}" in pattern:
                return "llama-bpe"
            if r"\p{N}|" in pattern or r"\p{N}" in pattern:
                return "qwen2"
    return None


def _model_kind(spec: dict[str, Any]) -> str:
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise TokenizerError(
            f"tokenizer model {model.get('type')!r} is not supported for GGUF export; "
            "supported: byte-level BPE (gpt2) and BPE with byte fallback (llama)"
        )
    return "llama" if model.get("byte_fallback") else "gpt2"


def _nodes(node: Any) -> Iterator[dict[str, Any]]:
    """Every JSON object inside ``node`` (normalizers and pre-tokenizers nest in Sequences)."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _nodes(value)
    elif isinstance(node, list):
        for value in node:
            yield from _nodes(value)


def _space_prefix(spec: dict[str, Any]) -> bool:
    """Whether the tokenizer prepends "▁" (normalizer Prepend, or Metaspace's prepend_scheme)."""
    for node in _nodes([spec.get("normalizer"), spec.get("pre_tokenizer")]):
        if node.get("type") == "Prepend" and node.get("prepend") == "\u2581":
            return True
        if node.get("type") == "Metaspace" and node.get("prepend_scheme") in ("first", "always"):
            return True
    return False


def _merge_scores(spec: dict[str, Any], vocab: dict[str, int], n: int) -> list[float]:
    """``llama`` scores: the token a merge of rank r produces scores -r (earlier merges win)."""
    scores = [0.0] * n
    for rank, merge in enumerate(spec["model"].get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        token_id = vocab.get(left + right)
        if token_id is not None and token_id < n and scores[token_id] == 0.0:
            scores[token_id] = -float(rank + 1)
    return scores


_BYTE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _tokens_and_types(
    tokenizer: Any, spec: dict[str, Any], vocab_size: int, kind: str
) -> tuple[list[str], list[int]]:
    vocab: dict[str, int] = tokenizer.get_vocab()  # includes added tokens
    if max(vocab.values()) >= vocab_size:
        raise TokenizerError(
            f"the tokenizer has token id {max(vocab.values())} but the model's vocabulary has "
            f"{vocab_size} rows; export with the tokenizer the model was built for"
        )
    added = {t["id"]: bool(t.get("special")) for t in spec.get("added_tokens", [])}
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # rows the tokenizer never produces, as llama.cpp's converter
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        text = by_id[i]
        tokens.append(text)
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i] else gguf.TokenType.USER_DEFINED)
        elif kind == "llama" and _BYTE.fullmatch(text):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def tokenizer_meta(tokenizer: Any, vocab_size: int) -> TokenizerMeta:
    """The GGUF tokenizer metadata of a Hugging Face fast tokenizer.

    Args:
        tokenizer: a transformers fast tokenizer (with ``backend_tokenizer``).
        vocab_size: rows of the model's embedding; ids the tokenizer lacks become
            ``[PAD{id}]`` tokens of type UNUSED.

    Raises:
        TokenizerError: not a fast tokenizer, not BPE, or ids beyond ``vocab_size``.
    """
    spec = _backend_json(tokenizer)
    kind = _model_kind(spec)
    tokens, types = _tokens_and_types(tokenizer, spec, vocab_size, kind)
    notes = []
    pre = None
    if kind == "gpt2":
        pre = _pre_name(spec.get("pre_tokenizer"))
        if pre is None:
            notes.append("unknown pre-tokenizer: llama.cpp will use its default regexes")
    scores = _merge_scores(spec, tokenizer.get_vocab(), vocab_size) if kind == "llama" else None
    with tempfile.TemporaryDirectory(prefix="qlora-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(Path(tmp), load_merges=kind == "gpt2", n_vocab=vocab_size)
    # What the tokenizer itself does decides add_bos/add_eos (llama.cpp's defaults differ
    # by tokenizer model, so both are always written).
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    start = full.index(plain[0]) if plain and plain[0] in full else 0
    special.add_special_token["bos"] = start > 0 and full[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = len(full) > start + len(plain) and (
        full[-1] == tokenizer.eos_token_id
    )
    template = getattr(tokenizer, "chat_template", None)
    return TokenizerMeta(
        model=kind,
        pre=pre,
        tokens=tokens,
        types=types,
        scores=scores,
        special=special,
        chat_template=template if isinstance(template, str) else None,
        space_prefix=kind == "llama" and _space_prefix(spec),
        notes=notes,
    )


def add_tokenizer(writer: gguf.GGUFWriter, meta: TokenizerMeta) -> None:
    """Add ``meta`` to ``writer`` (before its header is written)."""
    writer.add_tokenizer_model(meta.model)
    if meta.pre is not None:
        writer.add_tokenizer_pre(meta.pre)
    writer.add_token_list(meta.tokens)
    writer.add_token_types(meta.types)
    if meta.scores is not None:
        writer.add_token_scores(meta.scores)
    if meta.model == "llama":
        writer.add_add_space_prefix(meta.space_prefix)
    meta.special.chat_template = None  # ours below: the template the tokenizer renders with
    meta.special.add_to_gguf(writer, quiet=True)
    if meta.chat_template:
        writer.add_chat_template(meta.chat_template)
    for note in meta.notes:
        warnings.warn(note, stacklevel=3)
