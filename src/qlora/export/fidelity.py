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

`adapter_fidelity_report` does the same for a LoRA adapter GGUF (``general.type = adapter``),
which holds no base to run: the float32 copy gets the base weights (from the base GGUF that
llama.cpp will run the adapter on, read and un-permuted as above, or else our model's own
base weights, dequantized) and every ``<name>.lora_a`` / ``<name>.lora_b`` pair of the file
folded in as llama.cpp applies it, ``W += (alpha / r) · B @ A`` (its ``get_scale``: one
``adapter.lora.alpha`` per file, r read off B), B's q/k rows un-permuted. Both reports share
one comparison (`_compare`).
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

from qlora.adapters.merge import merged_state_dict
from qlora.files import atomic_write
from qlora.models.gguf_names import GGUFArch, gguf_arch, tensor_name_map, unpermute_qk

__all__ = [
    "OWN_BASE",
    "FidelityError",
    "FidelityReport",
    "adapter_fidelity_report",
    "adapter_model",
    "exported_model",
    "fidelity_path",
    "fidelity_report",
    "heldout_windows",
    "read_fidelity_report",
    "write_fidelity_report",
]

# llama.cpp-only tensors with no place in the HF model (it recomputes them from the config)
_DERIVED = frozenset({"rope_freqs.weight"})

# FidelityReport.base of an adapter run on our model's own base weights (no base GGUF given)
OWN_BASE = "model"


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
        base: an adapter's report only (None for a merged model): the base GGUF the adapter
            was applied to, or `OWN_BASE` (our model's own base weights).
        base_type: the base GGUF's type name (``q4_1`` ...); None with `OWN_BASE`.
    """

    path: str
    type: str
    texts: int
    positions: int
    top1: float
    mean_kl: float
    max_logit_diff: float
    base: str | None = None
    base_type: str | None = None

    def __str__(self) -> str:
        return (
            f"fidelity of {Path(self.path).name} ({self._what()}) vs our forward on "
            f"{self.texts} held-out texts ({self.positions} positions): top-1 "
            f"{100 * self.top1:.1f}%, mean KL {self.mean_kl:.3g} nats/token, "
            f"max |Δlogit| {self.max_logit_diff:.3g}"
        )

    def _what(self) -> str:
        if self.base is None:
            return self.type
        if self.base == OWN_BASE:
            return f"{self.type} adapter on our model's base weights"
        return f"{self.type} adapter on {Path(self.base).name}, {self.base_type}"

    def to_json(self) -> str:
        """The report as a JSON object (the fields above; unset ``base*`` left out, so a
        merged model's report keeps its seven keys), one key per line."""
        fields = {k: v for k, v in asdict(self).items() if v is not None or k not in _OPTIONAL}
        return json.dumps(fields, indent=2) + "\n"

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


_OPTIONAL = frozenset({"base", "base_type"})


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


def _hf_names(model: nn.Module, arch: GGUFArch) -> dict[str, str]:
    """GGUF tensor name -> ``model``'s state-dict key (``blk.0.attn_q.weight`` -> ...)."""
    # the writer's table (the f32 round-trip test holds the two directions together)
    names = tensor_name_map(arch, int(model.config.num_hidden_layers))
    hf_names = {}
    for key in model.state_dict():
        if (mapped := names.get_name(key, try_suffixes=(".weight", ".bias"))) is not None:
            hf_names[mapped] = key
    return hf_names


def _hf_rows(tensor: torch.Tensor, name: str, arch: GGUFArch, config: Any) -> torch.Tensor:
    """``tensor`` [out, ...] of GGUF tensor ``name`` with q/k rows back in HF's rope layout."""
    if not arch.permute_qk or not (".attn_q." in name or ".attn_k." in name):
        return tensor
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    return unpermute_qk(tensor, n_head if ".attn_q." in name else n_kv)


def _float32(t: Any) -> torch.Tensor:
    """A GGUFReader tensor dequantized by the gguf package itself, as a float32 torch tensor
    in numpy's shape ([out, in] for a weight)."""
    data = gguf.quants.dequantize(t.data, t.tensor_type)
    return torch.from_numpy(np.array(data, dtype=np.float32))


def _weights(reader: gguf.GGUFReader, model: nn.Module) -> dict[str, torch.Tensor]:
    """The file's tensors under HF names, dequantized to float32, q/k rows in HF order."""
    arch = gguf_arch(model)
    hf_names = _hf_names(model, arch)
    out = {}
    for t in reader.tensors:
        if t.name in _DERIVED:
            continue
        if t.name not in hf_names:
            raise FidelityError(
                f"tensor {t.name!r} of the GGUF has no place in a {arch.hf_name}; was the "
                "file exported from this model?"
            )
        out[hf_names[t.name]] = _hf_rows(_float32(t), t.name, arch, model.config)
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
    twin = _meta_twin(model)
    weights = _weights(reader or gguf.GGUFReader(gguf_path), twin)
    return _filled(twin, weights, gguf_path)


def _meta_twin(model: nn.Module) -> nn.Module:
    """``model``'s architecture in float32 on the meta device (transformers, no remote code)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, trust_remote_code=False
        )


def _filled(twin: nn.Module, weights: dict[str, torch.Tensor], source: Any) -> nn.Module:
    """``twin`` holding ``weights`` (HF names; checked complete and of the right shapes)."""
    expected = twin.state_dict()
    tied = "lm_head.weight" in expected and "lm_head.weight" not in weights
    if tied:  # no output.weight in the file: llama.cpp ties the head to the embedding
        weights["lm_head.weight"] = weights.get("model.embed_tokens.weight")
    missing = [k for k in expected if weights.get(k) is None]
    if missing:
        raise FidelityError(f"{source}: no tensor for {missing[0]} ({len(missing)} missing)")
    for k, v in weights.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise FidelityError(
                f"{source}: {k} is {tuple(v.shape)} in the file, the model has "
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
    measured = _compare(model, twin, heldout_windows(tokenizer, texts, max_tokens=max_tokens))
    return FidelityReport(path=str(path), type=_file_type(reader), **measured)


@torch.no_grad()
def _compare(model: nn.Module, twin: nn.Module, windows: list[list[int]]) -> dict[str, Any]:
    """The one comparison of both reports: ``model``'s forward (eval mode for the duration,
    its mode restored after) against ``twin``'s on ``windows``; FidelityReport's measured
    fields (texts, positions, top1, mean_kl, max_logit_diff)."""
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
    return {
        "texts": len(windows),
        "positions": positions,
        "top1": agree / positions,
        "mean_kl": mean_kl if math.isfinite(mean_kl) else float("inf"),
        "max_logit_diff": worst,
    }


# -- the adapter GGUF ------------------------------------------------------------------------


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _check_adapter(reader: gguf.GGUFReader, path: Path, arch: GGUFArch) -> float:
    """The file's ``adapter.lora.alpha``, once it is known to be a LoRA for ``arch``."""
    kind, lora = _field(reader, "general.type"), _field(reader, "adapter.type")
    if kind != "adapter" or lora != "lora":
        raise FidelityError(
            f"{path}: not a LoRA adapter GGUF (general.type={kind!r}, adapter.type={lora!r}); "
            "give the file `qlora export --format gguf-adapter` wrote"
        )
    file_arch = _field(reader, "general.architecture")
    if file_arch != arch.name:
        raise FidelityError(
            f"{path}: an adapter for llama.cpp's {file_arch!r} architecture, the model is "
            f"{arch.name!r} ({arch.hf_name}); was it exported for this model?"
        )
    alpha = _field(reader, "adapter.lora.alpha")
    if alpha is None:
        raise FidelityError(f"{path}: no adapter.lora.alpha (llama.cpp needs it)")
    return float(alpha)


def _llama_cpp_scale(alpha: float, rank: int) -> float:
    """llama.cpp's ``get_scale`` (src/llama-adapter.h), in float32 as it computes it:
    ``alpha ? adapter_scale * alpha / rank : adapter_scale`` with ``adapter_scale = 1``.
    Written from llama.cpp, not shared with the writer, so a wrong writer cannot agree with
    itself here."""
    if alpha == 0:
        return 1.0
    return float(np.float32(1.0) * np.float32(alpha) / np.float32(rank))


def _lora_pairs(reader: gguf.GGUFReader, path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """base tensor name -> {"lora_a": [r, in], "lora_b": [out, r]} float32, as in the file."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for t in reader.tensors:
        base, _, part = t.name.rpartition(".")
        if part not in ("lora_a", "lora_b"):
            raise FidelityError(
                f"{path}: tensor {t.name!r} is not <name>.lora_a / <name>.lora_b; not a LoRA "
                "adapter GGUF"
            )
        pairs.setdefault(base, {})[part] = _float32(t)
    for base, pair in pairs.items():
        for part in ("lora_a", "lora_b"):
            if part not in pair:
                raise FidelityError(
                    f"{path}: {base}.{part} is missing (LoRA tensors come in pairs)"
                )
    return pairs


def _apply_lora(twin: nn.Module, reader: gguf.GGUFReader, path: Path, alpha: float) -> None:
    """Fold every pair of the adapter file into ``twin``'s weights as llama.cpp applies it:
    W += scale · B @ A (float32), B's q/k rows un-permuted."""
    arch = gguf_arch(twin)
    hf_names = _hf_names(twin, arch)
    for base, pair in _lora_pairs(reader, path).items():
        key = hf_names.get(base)
        if key is None or not key.endswith(".weight"):
            raise FidelityError(
                f"{path}: {base}.lora_a/.lora_b adapt no weight of a {arch.hf_name}; was the "
                "file exported for this model?"
            )
        a, b = pair["lora_a"], pair["lora_b"]  # [r, in], [out, r]
        module = twin.get_submodule(key.removesuffix(".weight"))
        weight = module.weight.detach()  # [out, in]
        if (
            a.ndim != 2
            or b.ndim != 2
            or a.shape[0] != b.shape[1]
            or ((b.shape[0], a.shape[1]) != tuple(weight.shape))
        ):
            raise FidelityError(
                f"{path}: {base}.lora_a is {tuple(a.shape)} and .lora_b {tuple(b.shape)}; "
                f"{key} is {tuple(weight.shape)} (A must be [r, in], B [out, r])"
            )
        delta = _llama_cpp_scale(alpha, b.shape[1]) * (b @ a)  # [out, in], llama.cpp's rows
        # a new tensor, not +=: the weight may share memory with the source model
        module.weight = nn.Parameter(weight + _hf_rows(delta, base, arch, twin.config))


def _own_base(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s base weights without any adapter, float32 (QuantLinear: the exact
    dequantized weight its forward multiplies by), under the plain model's HF names."""
    return merged_state_dict(model, adapter=[], dtype=torch.float32)


def adapter_model(
    model: nn.Module,
    adapter_gguf: str | os.PathLike,
    base_gguf: str | os.PathLike | None = None,
) -> nn.Module:
    """A float32 CPU copy of ``model``'s architecture running the adapter GGUF as llama.cpp
    does: the base weights (of ``base_gguf``, dequantized by the gguf package, q/k rows
    un-permuted; else ``model``'s own base weights) with every LoRA pair folded in.

    Raises:
        FidelityError: not a LoRA adapter GGUF for this architecture, a pair that fits no
            weight, or a base GGUF that does not fit the model.
    """
    base = None if base_gguf is None else (Path(base_gguf), gguf.GGUFReader(base_gguf))
    return _adapter_twin(model, Path(adapter_gguf), base)


def _adapter_twin(
    model: nn.Module, path: Path, base: tuple[Path, gguf.GGUFReader] | None
) -> nn.Module:
    """`adapter_model` with the base GGUF already opened (its reader is slow to build)."""
    arch = gguf_arch(model)
    reader = gguf.GGUFReader(path)
    alpha = _check_adapter(reader, path, arch)
    if base is None:
        twin = _filled(_meta_twin(model), _own_base(model), "the model's base weights")
    else:
        _check_base(base[1], base[0], arch)
        twin = exported_model(model, base[0], base[1])
    _apply_lora(twin, reader, path, alpha)
    return twin


def _check_base(reader: gguf.GGUFReader, path: Path, arch: GGUFArch) -> None:
    kind, file_arch = _field(reader, "general.type"), _field(reader, "general.architecture")
    if kind == "adapter":
        raise FidelityError(f"{path}: base_gguf is an adapter; give the base model's GGUF")
    if file_arch != arch.name:
        raise FidelityError(
            f"{path}: a {file_arch!r} model, the adapter's base is {arch.name!r} "
            f"({arch.hf_name}); give the GGUF of the model the adapter was trained on"
        )


@torch.no_grad()
def adapter_fidelity_report(
    model: nn.Module,
    tokenizer: Any,
    adapter_gguf: str | os.PathLike,
    base_gguf: str | os.PathLike | None = None,
    texts: Sequence[str] | None = None,
    *,
    max_tokens: int = 128,
) -> FidelityReport:
    """Compare the LoRA adapter GGUF at ``adapter_gguf``, applied as llama.cpp applies it,
    with ``model``'s own forward.

    Args:
        model: our model with the adapter loaded (base + `qlora.load_adapter`), run as it is
            (eval mode for the duration, its mode restored after).
        tokenizer: its tokenizer.
        adapter_gguf: the adapter written by `qlora.export.gguf_adapter.export_adapter_gguf`.
        base_gguf: the GGUF llama.cpp will run the adapter on (e.g. the default model's own
            Q4_1 file); None: ``model``'s own base weights, dequantized to float32.
        texts: the texts to compare on (default: 4 windows of the packaged held-out prose).
        max_tokens: tokens per window (each text is cut to this).

    Returns:
        The report; ``type`` is ``"lora"``, ``base`` the base GGUF's path or `OWN_BASE`,
        ``base_type`` the base GGUF's type. `write_fidelity_report` writes it beside the
        adapter as ``<adapter_gguf>.fidelity.json``.

    Raises:
        FidelityError: the files do not fit the model (see `adapter_model`), or no text.
    """
    windows = heldout_windows(tokenizer, texts, max_tokens=max_tokens)
    base = None if base_gguf is None else (Path(base_gguf), gguf.GGUFReader(base_gguf))
    measured = _compare(model, _adapter_twin(model, Path(adapter_gguf), base), windows)
    return FidelityReport(
        path=str(Path(adapter_gguf)),
        type="lora",
        base=OWN_BASE if base is None else str(base[0]),
        base_type=None if base is None else _file_type(base[1]),
        **measured,
    )
