"""How faithful a merged GGUF export is: the file read back against our own forward.

`fidelity_report` reads the written ``.gguf`` with the ``gguf`` package's own reader
(`gguf.GGUFReader`), dequantizes every tensor with `gguf.quants.dequantize`, undoes
llama.cpp's q/k row permutation (`qlora.models.gguf_names.unpermute_qk`), loads the weights
into a float32 copy of the model's architecture (built by transformers from ``model.config``,
never its remote code) and compares that copy's logits with the source model's forward (base
+ adapters, exactly as it was exported) on a few held-out windows of text
(``qlora/resources/heldout.txt`` unless ``texts`` are given):

* **top-1 agreement**: the fraction of positions whose arg-max token is the same;
* **mean KL(ours || exported)** in nats per position, from float64 log-softmaxes;
* **max |Δlogit|**: the largest absolute difference of a raw logit.

What it measures: the rounding of the *weights* the file holds (f16, q8_0, q4_0 ...) plus
the merge itself, both run by our float32 forward. It does not measure llama.cpp's own
arithmetic (its F16 K/V cache, quantized activations in the q8/q4 dot products, summation
order); the llama.cpp tests (tests/export/test_gguf_llama.py) check that against the real
llama.cpp. Memory: the float32 copy costs 4 bytes per parameter on top of the source model,
so for a 7B model it needs ~28 GB (``qlora export --no-fidelity`` skips it).

Not for adapter GGUFs (``general.type = adapter``): they hold no base to run.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn

from qlora.files import atomic_write
from qlora.models.gguf_names import gguf_arch, tensor_name_map, unpermute_qk

__all__ = [
    "FidelityError",
    "FidelityReport",
    "exported_model",
    "fidelity_path",
    "fidelity_report",
    "heldout_windows",
    "read_fidelity_report",
    "write_fidelity_report",
]

# llama.cpp-only tensors with no place in the HF model (it recomputes them from the config)
_DERIVED = frozenset({"rope_freqs.weight"})


class FidelityError(ValueError):
    """The GGUF cannot be compared with the model; the message names the culprit."""


@dataclass(frozen=True)
class FidelityReport:
    """The exported file against our forward of the model it came from.

    Attributes:
        path: the ``.gguf`` file compared.
        type: its ``general.file_type`` as an export type name (``q8_0``, ``f16`` ...).
        texts: how many held-out windows were run.
        positions: how many token positions were compared (the sum of the windows' lengths).
        top1: the fraction of positions with the same arg-max token (1.0 = all).
        mean_kl: mean KL(ours || exported) per position, in nats.
        max_logit_diff: the largest |our logit - exported logit| over positions and vocabulary.
    """

    path: str
    type: str
    texts: int
    positions: int
    top1: float
    mean_kl: float
    max_logit_diff: float

    def __str__(self) -> str:
        return (
            f"fidelity of {Path(self.path).name} ({self.type}) vs our forward on {self.texts} "
            f"held-out texts ({self.positions} positions): top-1 {100 * self.top1:.1f}%, "
            f"mean KL {self.mean_kl:.3g} nats/token, max |Δlogit| {self.max_logit_diff:.3g}"
        )

    def to_json(self) -> str:
        """The report as a JSON object (the fields above), one key per line."""
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> FidelityReport:
        """The report `to_json` wrote.

        Raises:
            FidelityError: not such a JSON object.
        """
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError) as e:
            raise FidelityError(f"not a fidelity report: {e}") from None


def fidelity_path(gguf_path: str | os.PathLike) -> Path:
    """Where the report of ``gguf_path`` goes: ``<gguf_path>.fidelity.json`` beside it."""
    path = Path(gguf_path)
    return path.with_name(path.name + ".fidelity.json")


def write_fidelity_report(report: FidelityReport) -> Path:
    """Write ``report`` atomically to `fidelity_path` of its GGUF; returns that path."""
    return atomic_write(fidelity_path(report.path), report.to_json())


def read_fidelity_report(gguf_path: str | os.PathLike) -> FidelityReport:
    """The report written beside ``gguf_path``."""
    return FidelityReport.from_json(fidelity_path(gguf_path).read_text(encoding="utf-8"))


def heldout_windows(
    tokenizer: Any, texts: Sequence[str] | None = None, *, max_tokens: int = 128, count: int = 4
) -> list[list[int]]:
    """Token windows to compare on.

    Without ``texts``: ``count`` consecutive windows of ``max_tokens`` tokens of the packaged
    held-out prose (original text, never trained on). With ``texts``: each text's first
    ``max_tokens`` tokens (empty texts are skipped).
    """
    if texts is None:
        text = resources.files("qlora.resources").joinpath("heldout.txt").read_text("utf-8")
        ids = tokenizer.encode(text, add_special_tokens=False)
        windows = [ids[i : i + max_tokens] for i in range(0, len(ids), max_tokens)][:count]
    else:
        windows = [tokenizer.encode(t, add_special_tokens=False)[:max_tokens] for t in texts]
    windows = [w for w in windows if w]
    if not windows:
        raise FidelityError("no held-out text to compare on: give at least one non-empty text")
    return windows


def _file_type(reader: gguf.GGUFReader) -> str:
    field = reader.fields.get("general.file_type")
    if field is None:
        return "unknown"
    try:  # MOSTLY_Q8_0 -> q8_0, ALL_F32 -> f32: the export's --type names
        return gguf.LlamaFileType(int(field.contents())).name.split("_", 1)[1].lower()
    except ValueError:
        return f"file_type {field.contents()}"


def _weights(reader: gguf.GGUFReader, model: nn.Module) -> dict[str, torch.Tensor]:
    """The file's tensors under HF names, dequantized to float32, q/k rows in HF order."""
    config = model.config
    arch = gguf_arch(model)
    n_layers = int(config.num_hidden_layers)
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    # the writer's table (the f32 round-trip test holds the two directions together)
    names = tensor_name_map(arch, n_layers)
    hf_names = {}
    for key in model.state_dict():
        if (mapped := names.get_name(key, try_suffixes=(".weight", ".bias"))) is not None:
            hf_names[mapped] = key
    out = {}
    for t in reader.tensors:
        if t.name in _DERIVED:
            continue
        if t.name not in hf_names:
            raise FidelityError(
                f"tensor {t.name!r} of the GGUF has no place in a {arch.hf_name}; was the "
                "file exported from this model?"
            )
        data = gguf.quants.dequantize(t.data, t.tensor_type)  # [out, in] or [n], float32
        tensor = torch.from_numpy(np.array(data, dtype=np.float32))
        if arch.permute_qk and (".attn_q." in t.name or ".attn_k." in t.name):
            tensor = unpermute_qk(tensor, n_head if ".attn_q." in t.name else n_kv)
        out[hf_names[t.name]] = tensor
    return out


def _rebuild_meta_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (rotary ``inv_freq``) come from the config: build them again."""
    for name, module in list(model.named_modules()):
        buffers = module._buffers
        if not any(b in buffers and buffers[b].is_meta for b in module._non_persistent_buffers_set):
            continue
        parent_name, _, child = name.rpartition(".")
        with torch.device("cpu"):  # these modules have no parameters: cheap
            fresh = type(module)(config=module.config)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, fresh)


def exported_model(
    model: nn.Module, gguf_path: str | os.PathLike, reader: gguf.GGUFReader | None = None
) -> nn.Module:
    """A float32 CPU copy of ``model``'s architecture holding the weights of ``gguf_path``.

    ``reader``: the file already opened (reading the tokenizer's fields takes seconds).

    Raises:
        FidelityError: a tensor missing from the file, of the wrong shape, or with no place.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    with torch.device("meta"):
        twin = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, trust_remote_code=False
        )
    weights = _weights(reader or gguf.GGUFReader(gguf_path), twin)
    expected = twin.state_dict()
    tied = "lm_head.weight" in expected and "lm_head.weight" not in weights
    if tied:  # no output.weight in the file: llama.cpp ties the head to the embedding
        weights["lm_head.weight"] = weights.get("model.embed_tokens.weight")
    missing = [k for k in expected if weights.get(k) is None]
    if missing:
        raise FidelityError(f"{gguf_path}: no tensor for {missing[0]} ({len(missing)} missing)")
    for k, v in weights.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise FidelityError(
                f"{gguf_path}: {k} is {tuple(v.shape)} in the file, the model has "
                f"{tuple(expected[k].shape)}"
            )
    twin.load_state_dict(weights, assign=True)
    _rebuild_meta_buffers(twin)
    return twin.eval()


@torch.no_grad()
def _logits(model: nn.Module, batch: list[list[int]]) -> torch.Tensor:
    """[windows, seq, vocab] float64 logits of windows of one length (no padding needed)."""
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor(batch, device=device)).logits  # [windows, seq, vocab]
    return out.detach().double().cpu()


def _by_length(windows: list[list[int]]) -> list[list[list[int]]]:
    """Windows grouped by length: one forward per group instead of one per window."""
    groups: dict[int, list[list[int]]] = {}
    for w in windows:
        groups.setdefault(len(w), []).append(w)
    return list(groups.values())


@torch.no_grad()
def fidelity_report(
    model: nn.Module,
    tokenizer: Any,
    gguf_path: str | os.PathLike,
    *,
    texts: Sequence[str] | None = None,
    max_tokens: int = 128,
) -> FidelityReport:
    """Compare the merged GGUF at ``gguf_path`` with ``model``'s own forward.

    ``model`` is the source of the export (base + active adapters, possibly quantized),
    run as it is (in eval mode for the duration, its mode restored after); the file's
    weights run in a float32 copy of its architecture (`exported_model`). This measures the
    weights' rounding (what the file holds) and the merge, not llama.cpp's activation
    rounding (see the module docstring).

    Args:
        model: the model the file was exported from.
        tokenizer: its tokenizer.
        gguf_path: the merged ``.gguf`` written by `qlora.export.export_gguf`.
        texts: the texts to compare on (default: 4 windows of the packaged held-out prose).
        max_tokens: tokens per window (each text is cut to this).

    Raises:
        FidelityError: the file does not fit the model, or no text to compare on.
    """
    path = Path(gguf_path)
    reader = gguf.GGUFReader(path)
    twin = exported_model(model, path, reader)
    windows = heldout_windows(tokenizer, texts, max_tokens=max_tokens)
    was_training = model.training
    model.eval()  # no LoRA dropout in the reference
    try:
        agree, positions, kl, worst = 0, 0, 0.0, 0.0
        for batch in _by_length(windows):
            ours, theirs = _logits(model, batch), _logits(twin, batch)  # [n, seq, vocab]
            log_p, log_q = ours.log_softmax(-1), theirs.log_softmax(-1)
            kl += float((log_p.exp() * (log_p - log_q)).sum())
            agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
            worst = max(worst, float((ours - theirs).abs().max()))
            positions += ours.shape[0] * ours.shape[1]
    finally:
        model.train(was_training)
    mean_kl = max(kl / positions, 0.0)  # float64 noise can make an exact copy -1e-17
    return FidelityReport(
        path=str(path),
        type=_file_type(reader),
        texts=len(windows),
        positions=positions,
        top1=agree / positions,
        mean_kl=mean_kl if math.isfinite(mean_kl) else float("inf"),
        max_logit_diff=worst,
    )
