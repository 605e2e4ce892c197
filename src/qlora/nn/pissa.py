"""PiSSA: start the adapter at the principal part of W, freeze the rest (Meng et al., 2024).

LoRA starts at B·A = 0 and trains a correction on top of W. PiSSA instead splits W by its
singular value decomposition W = U S Vᵀ:

    s · B₀ A₀ = U_r S_r V_rᵀ       (the r largest singular triplets: the principal part)
    W_res     = W − s · B₀ A₀      (the rest, frozen as the new base)

so that W_res + s·B₀A₀ = W at step 0 (the model is unchanged) and the adapter trains the
directions that carry most of W's energy. The factors share √S_r, as PEFT does:
A₀ = √(S_r/s) V_rᵀ [r, in], B₀ = U_r √(S_r/s) [out, r]. With ``niter`` > 0 the top-r
triplets come from a randomized SVD (`torch.svd_lowrank`, ``niter`` subspace iterations: seconds
instead of minutes on 4096-wide matrices); W_res is computed as W − s·B₀A₀ either way, so
the split is exact whatever the SVD's error.

QPiSSA (``quant.kind`` set): W_res is quantized, not W. The principal part - the
large-magnitude directions a 4-bit code rounds worst - stays in the float32 adapter, so the
quantization error of the base is smaller than QLoRA's (reported by `init_pissa`).

The adapter belongs to W_res. Two ways to use it elsewhere, as in PEFT: a file saved with
``init_lora_weights: "pissa"`` makes the loader redo the split on the original full-precision
W (deterministic for the exact SVD; the randomized one depends on the RNG), or
`pissa_to_lora` turns it into a plain LoRA adapter of rank 2r over W itself:
s·B·A − s·B₀A₀ = s·[B, −B₀]·[A; A₀].

The op order follows PEFT's (float32 SVD, S_r / s, √ on the diagonal), so the same W gives
the same A₀, B₀ and W_res to the last bit (tested against the real PEFT).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from qlora.config import LoraConfig, QuantConfig
from qlora.nn.inject import find_targets, replace_module
from qlora.nn.loftq import full_precision_base
from qlora.nn.lora import LoRALinear
from qlora.nn.qlinear import QuantLinear
from qlora.quant import dequantize, quantize

__all__ = ["PissaReport", "PissaSplit", "init_pissa", "pissa_split", "pissa_to_lora"]


@torch.no_grad()
def pissa_split(
    weight: torch.Tensor, r: int, scaling: float, niter: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A₀ [r, in], B₀ [out, r], W_res [out, in]) of ``weight`` [out, in], all float32.

    ``niter`` 0: the exact SVD (`torch.linalg.svd`); > 0: `torch.svd_lowrank` with that many
    subspace iterations (it draws from torch's global RNG).
    """
    weight = weight.detach().to(torch.float32)  # [out, in]
    if niter == 0:
        left, values, right_t = torch.linalg.svd(weight, full_matrices=False)
        left_r, values_r, right_t_r = left[:, :r], values[:r], right_t[:r]
    else:
        left_r, values_r, right = torch.svd_lowrank(weight, r, niter=niter)
        right_t_r = right.t()
    values_r = values_r / scaling
    root = torch.diag(torch.sqrt(values_r))  # [r, r]
    lora_a = root @ right_t_r  # [r, in]
    lora_b = left_r @ root  # [out, r]
    residual = weight - scaling * lora_b @ lora_a  # [out, in]
    return lora_a, lora_b, residual


@dataclass
class PissaReport:
    """What `init_pissa` did (print it).

    Attributes:
        kind: the quantization kind of the new base (None: it stays full precision).
        layers: LoRA layer name -> ‖s·B₀A₀‖ / ‖W‖, the share of W moved into the adapter.
        quant_error: layer -> (‖W − Q(W)‖, ‖W_res − Q(W_res)‖) / ‖W‖ when quantized: QLoRA's
            base error beside QPiSSA's.
        initial: layer -> (A₀, B₀), the starting factors (what `pissa_to_lora` subtracts).
    """

    kind: str | None
    layers: dict[str, float] = field(default_factory=dict)
    quant_error: dict[str, tuple[float, float]] = field(default_factory=dict)
    initial: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.layers:
            return "PiSSA: no adapter initialized"
        share = sum(self.layers.values()) / len(self.layers)
        text = (
            f"PiSSA: {len(self.layers)} adapters start at the principal part of W "
            f"(mean {share:.1%} of ‖W‖)"
        )
        if self.quant_error:
            plain = sum(e[0] for e in self.quant_error.values()) / len(self.quant_error)
            ours = sum(e[1] for e in self.quant_error.values()) / len(self.quant_error)
            text += (
                f"; {self.kind} base error (relative to ‖W‖): QLoRA's {plain:.4f}, "
                f"QPiSSA's {ours:.4f}"
            )
        return text


def _relative_error(weight: torch.Tensor, state: object, norm: float) -> float:
    return float(torch.linalg.norm(weight - dequantize(state, dtype=torch.float32))) / norm


@torch.no_grad()
def init_pissa(
    model: nn.Module,
    lora: LoraConfig,
    quant: QuantConfig | None = None,
    adapter_name: str = "default",
    progress: bool = True,
) -> PissaReport:
    """Split each adapted layer's W into the adapter (A₀, B₀) and the frozen residual.

    Call it after `qlora.nn.add_lora` on a model in full precision (``quant=None`` at load).
    Every layer with adapter ``adapter_name`` gets `pissa_split` with its rank, scaling and
    ``lora.pissa_niter``; its base weight becomes W_res. With ``quant.kind`` set, the targets
    of ``quant`` are then quantized (the residual where an adapter sits: QPiSSA).

    Raises:
        ValueError: a target that is already quantized or merged.
    """
    kind = quant.kind if quant is not None else None
    if kind == "gguf":
        raise ValueError(
            "lora.init='pissa' re-quantizes the base, but quant.kind='gguf' keeps the GGUF "
            "file's blocks as they are; use a codebook kind (nf4) or quant.kind null"
        )
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    layers = [(n, m) for n, m in layers if adapter_name in m.lora_A]
    report = PissaReport(kind)
    bar = tqdm(layers, desc="PiSSA", unit="layer", disable=not progress)
    for name, layer in bar:
        base = full_precision_base(name, layer, init="pissa")
        weight = base.weight  # [out, in]
        lora_a, lora_b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        a0, b0, residual = pissa_split(
            weight, lora_a.shape[0], layer.scaling[adapter_name], lora.pissa_niter
        )
        norm = float(torch.linalg.norm(weight.float()))
        report.layers[name] = float(torch.linalg.norm(weight.float() - residual)) / max(norm, 1e-30)
        lora_a.copy_(a0)
        lora_b.copy_(b0)
        report.initial[name] = (a0.clone(), b0.clone())
        if kind is not None:
            original = weight.float()
            plain = quantize(original, kind, quant.blocksize, quant.double_quant)
            state = quantize(residual, kind, quant.blocksize, quant.double_quant)
            report.quant_error[name] = (
                _relative_error(original, plain, norm),
                _relative_error(residual, state, norm),
            )
            bias = base.bias.data if base.bias is not None else None
            quantized = QuantLinear(state, bias, quant.compute_dtype)
            quantized.requires_grad_(False)
            quantized.train(base.training)
            layer.base_layer = quantized
        else:
            weight.copy_(residual.to(weight.dtype))
        layer._base_row_norms_sq = None  # DoRA's cache: the base changed
    if kind is not None:  # the other targets: plainly, as load_model would
        for name in find_targets(model, quant.target_modules):
            module = model.get_submodule(name)
            if isinstance(module, nn.Linear):
                state = quantize(module.weight.data, kind, quant.blocksize, quant.double_quant)
                bias = module.bias.data if module.bias is not None else None
                quantized = QuantLinear(state, bias, quant.compute_dtype)
                quantized.requires_grad_(False)
                quantized.train(module.training)
                replace_module(model, name, quantized)
    return report


class PissaSplit:
    """PiSSA while the model loads: a `qlora.models.loader.WeightSplit` for ``load_model``.

    Each adapted Linear's weight is split as it streams in; the loader then quantizes the
    residual (QPiSSA) or keeps it, so neither the full-precision model nor a second copy of
    it ever exists: the peak is the loaded model plus one float32 weight and its SVD (what
    a 7B model on a 6 GB machine needs). `finish` adds the adapters (as `add_lora`) and puts
    the principal factors in them. The exact SVD gives what `init_pissa` gives; the
    randomized one draws in another order (during loading, seeded by ``seed`` at `start`).
    """

    def __init__(self, lora: LoraConfig, seed: int = 0, adapter_name: str = "default") -> None:
        if lora.init != "pissa":
            raise ValueError(f"PissaSplit needs lora.init='pissa', got {lora.init!r}")
        self.lora, self.seed, self.adapter_name = lora, seed, adapter_name
        self.targets: set[str] = set()
        self.report = PissaReport(None)

    def start(self, skeleton: nn.Module) -> None:
        torch.manual_seed(self.seed)
        lora = self.lora
        self.targets = set(find_targets(skeleton, lora.target_modules, lora.exclude_modules))

    def wants(self, owner: str) -> bool:
        return owner in self.targets

    def __call__(self, owner: str, weight: torch.Tensor) -> torch.Tensor:
        lora = self.lora
        a0, b0, residual = pissa_split(weight, lora.r, lora.scaling, lora.pissa_niter)
        norm = float(torch.linalg.norm(weight.float()))
        self.report.layers[owner] = float(torch.linalg.norm(weight.float() - residual)) / max(
            norm, 1e-30
        )
        self.report.initial[owner] = (a0, b0)
        return residual

    @torch.no_grad()
    def finish(self, model: nn.Module) -> PissaReport:
        """Add the adapters to the loaded ``model`` and start them at the principal part."""
        from qlora.nn.inject import add_lora

        add_lora(model, self.lora, adapter_name=self.adapter_name)
        for owner, (a0, b0) in self.report.initial.items():
            layer = model.get_submodule(owner)
            assert isinstance(layer, LoRALinear)
            layer.lora_A[self.adapter_name].weight.copy_(a0)
            layer.lora_B[self.adapter_name].weight.copy_(b0)
            layer._base_row_norms_sq = None
            if self.adapter_name in layer.lora_magnitude_vector:  # DoRA: ‖W_res + s·B₀A₀‖
                magnitude = layer.lora_magnitude_vector[self.adapter_name]
                magnitude.copy_(layer.dora_weight_norm(self.adapter_name))
        return self.report


def pissa_to_lora(
    final: dict[str, tuple[torch.Tensor, torch.Tensor]],
    initial: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A [2r, in], B [out, 2r]) of the plain LoRA adapter over the original W that
    equals the trained PiSSA adapter ``final`` (module -> (A, B)) over W_res, given the
    ``initial`` factors: s·B·A − s·B₀A₀ = s·[B, −B₀]·[A; A₀] (the same scaling s needs the
    rank and alpha both doubled; rsLoRA's alpha times √2)."""
    out = {}
    for module, (lora_a, lora_b) in final.items():
        a0, b0 = initial[module]
        out[module] = (
            torch.cat([lora_a, a0.to(lora_a)], dim=0),
            torch.cat([lora_b, -b0.to(lora_b)], dim=1),
        )
    return out
