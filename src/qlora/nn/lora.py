"""LoRALinear: low-rank adapters around a frozen Linear, by composition.

    y = base(x) + Σ_{a ∈ active} scaling_a · B_a(A_a(dropout_a(x)))

The layer *holds* its base (an ``nn.Linear`` or a `QuantLinear`) instead of subclassing it, so
the same adapter code serves full-precision LoRA and 4-bit QLoRA, and the base's own state
dict layout (bitsandbytes keys for QuantLinear) is untouched. Attribute names mirror PEFT's
``LoraLayer`` on purpose - ``base_layer``, ``lora_A``, ``lora_B``, ``lora_dropout`` and
``scaling`` - so state-dict keys such as ``q_proj.lora_A.default.weight`` map 1:1 onto the
PEFT adapter file format.

Merging is offered in two shapes:

* pure functions, `delta_weight` and `merged_weight`, that compute weights without touching
  the layer (what export needs);
* reversible in-place `merge_adapter` / `unmerge_adapter` for inference without the adapter
  matmuls. On a QuantLinear base the merge swaps in a dequantized full-precision
  ``nn.Linear`` and keeps the QuantLinear aside, so unmerging gives back the very same object,
  bit for bit. Nothing here ever re-quantizes: a 4-bit base plus a delta is not representable
  in 4 bits, and silently rounding the delta away would destroy the fine-tune.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

from qlora.nn.cast_linear import CastLinear
from qlora.nn.dora import base_row_norms_sq, weight_norm
from qlora.nn.dora_fused import fused_dora
from qlora.nn.lora_fused import base_compute_dtype, fused_lora, fused_lora_supported
from qlora.nn.qlinear import QuantLinear

__all__ = [
    "LoRALinear",
    "base_weight_dtype",
    "delta_weight",
    "merge_adapter",
    "merged_weight",
    "unmerge_adapter",
]

InitKind = Literal["kaiming", "gaussian"]


def _module_device(module: nn.Module) -> torch.device:
    """Device of a module's first parameter or buffer (QuantLinear keeps its weight in buffers)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def base_weight_dtype(base: nn.Module) -> torch.dtype:
    """The dtype a full-precision copy of ``base``'s weight should have.

    For a QuantLinear this is the dtype the weight had before quantization (recorded in its
    QuantState), so a merged model keeps the dtype of the rest of the network.
    """
    if isinstance(base, QuantLinear):
        return base.quant_state.dtype
    if isinstance(base, CastLinear):
        return base.full_dtype
    return base.weight.dtype


class LoRALinear(nn.Module):
    """A frozen Linear (``nn.Linear`` or `QuantLinear`) plus named low-rank adapters.

    Several adapters can live on one layer; only the *active* ones contribute to the output
    and have ``requires_grad=True`` (as in PEFT's ``set_adapter``), so an optimizer built over
    ``requires_grad`` parameters trains exactly the active adapter(s).

    Adapter weights default to float32 whatever the base dtype: the LoRA update is small
    relative to W, and a bf16/fp16 optimizer state on it loses most of the signal.

    Args:
        base_layer: the layer to adapt; must expose ``in_features`` and ``out_features``.
        adapter_name: if given, an adapter of this name is added right away with the
            remaining arguments (see `add_adapter`); ``None`` adds none.
        r, alpha, dropout, use_rslora, init, dtype: see `add_adapter`.

    Attributes:
        base_layer: the wrapped layer (a dequantized ``nn.Linear`` while a QuantLinear base is
            merged in place).
        lora_A: adapter name -> ``nn.Linear(in, r, bias=False)``, weight [r, in].
        lora_B: adapter name -> ``nn.Linear(r, out, bias=False)``, weight [out, r].
        lora_dropout: adapter name -> ``nn.Dropout`` (``nn.Identity`` when p == 0).
        scaling: adapter name -> alpha / r (or alpha / sqrt(r) with rsLoRA).
        lora_magnitude_vector: DoRA adapter name -> its trainable magnitude m [out]
            (PEFT's name; see `qlora.nn.dora`). Plain LoRA adapters have no entry.
        active_adapters: names that currently contribute to forward.
        merged_adapters: names currently folded into ``base_layer``'s weight.
        disabled: when True forward returns the base output only.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str | None = None,
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: InitKind = "kaiming",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if isinstance(base_layer, LoRALinear):
            raise TypeError("base_layer is already a LoRALinear; call add_adapter on it instead")
        if not (hasattr(base_layer, "in_features") and hasattr(base_layer, "out_features")):
            raise TypeError(
                f"LoRALinear wraps a Linear-like layer with in_features/out_features, "
                f"got {type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        # DoRA: ‖W_j‖² of the base (float64 [out]), computed on first use, and each merged
        # DoRA adapter's row factor m / n (to unmerge an nn.Linear base)
        self._base_row_norms_sq: torch.Tensor | None = None
        self._dora_factors: dict[str, torch.Tensor] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        # The QuantLinear set aside while a merged dequantized copy stands in for it. It is
        # deliberately *not* a registered submodule: it must not show up in state_dict(),
        # parameters() or the trainable count while the merged copy is the base.
        object.__setattr__(self, "_unmerged_base", None)
        if adapter_name is not None:
            self.add_adapter(adapter_name, r, alpha, dropout, use_rslora, init, dtype)
            self.set_adapter(adapter_name)

    # -- pass-throughs so code that inspects a Linear keeps working on the wrapper ----------

    @property
    def in_features(self) -> int:
        return int(self.base_layer.in_features)

    @property
    def out_features(self) -> int:
        return int(self.base_layer.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """The base's ``weight`` (packed uint8 bytes for a QuantLinear), as PEFT exposes it."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    # -- adapter management ------------------------------------------------------------------

    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: InitKind = "kaiming",
        dtype: torch.dtype = torch.float32,
        use_dora: bool = False,
    ) -> None:
        """Add adapter ``name`` (inactive until `set_adapter`; its parameters are frozen).

        Init follows PEFT: A kaiming-uniform with a=√5 (nn.Linear's own default, so the
        adapter input starts at a sensible scale), or N(0, 1/r) with ``init="gaussian"``; B is
        zeros either way, so a fresh adapter leaves the layer's output unchanged.

        Args:
            name: adapter name; becomes a state-dict key component, so it may not contain ".".
            r: rank; A is [r, in], B is [out, r].
            alpha: scaling numerator: alpha / r, or alpha / sqrt(r) with ``use_rslora``.
            dropout: dropout probability on the adapter input (train mode only).
            use_rslora: rank-stabilized scaling.
            init: "kaiming" or "gaussian" (for A).
            dtype: adapter parameter dtype.
            use_dora: DoRA: also a magnitude per output row, initialized to ‖W + s·B·A‖
                (= ‖W‖ with B = 0), so that the layer's output starts unchanged.
        """
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if r <= 0:
            raise ValueError(f"adapter {name!r}: rank r must be positive, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"adapter {name!r}: dropout must be in [0, 1), got {dropout}")
        if init not in ("kaiming", "gaussian"):
            raise ValueError(
                f"adapter {name!r}: init must be 'kaiming' or 'gaussian', got {init!r}"
            )
        device = _module_device(self.base_layer)
        lora_a = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)  # [r, in]
        lora_b = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)  # [out, r]
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(lora_a.weight, std=1.0 / r)
            else:
                nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
            nn.init.zeros_(lora_b.weight)
        lora_a.weight.requires_grad_(False)
        lora_b.weight.requires_grad_(False)
        self.lora_A[name] = lora_a
        self.lora_B[name] = lora_b
        self.lora_dropout[name] = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        for module in (lora_a, lora_b, self.lora_dropout[name]):
            module.train(self.training)  # an adapter added to a model in eval mode stays eval
        self.scaling[name] = float(alpha) / (math.sqrt(r) if use_rslora else r)
        if use_dora:
            magnitude = self.dora_weight_norm(name).to(dtype)  # [out]
            self.lora_magnitude_vector[name] = nn.Parameter(magnitude, requires_grad=False)

    def dora_weight_norm(self, name: str) -> torch.Tensor:
        """‖W + s·B·A‖ per output row [out] for adapter ``name`` (float32, no gradient), by
        `qlora.nn.dora.weight_norm`'s closed form (no dense merged weight)."""
        return weight_norm(
            self.base_layer,
            self.base_row_norms_sq(),
            self.lora_A[name].weight,
            self.lora_B[name].weight,
            self.scaling[name],
        )

    def base_row_norms_sq(self) -> torch.Tensor:
        """‖W_j‖² of the base layer [out], float64; computed once (again after a merge)."""
        device = _module_device(self.base_layer)
        if self._base_row_norms_sq is None or self._base_row_norms_sq.device != device:
            self._base_row_norms_sq = base_row_norms_sq(self.base_layer).to(device)
        return self._base_row_norms_sq

    def set_adapter(self, names: str | Iterable[str]) -> None:
        """Make ``names`` the active adapters: they train (requires_grad) and contribute.

        Every other adapter is frozen and skipped. Adapters merged in place that would become
        inactive are unmerged first (with a warning), since their delta sits in the weight.
        """
        wanted = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in wanted if n not in self.lora_A]
        if unknown:
            raise ValueError(
                f"unknown adapter(s) {unknown}; this layer has {self.adapter_names or 'none'}"
            )
        if any(m not in wanted for m in self.merged_adapters):
            warnings.warn(
                f"unmerging adapters {self.merged_adapters} before activating {wanted}",
                stacklevel=2,
            )
            unmerge_adapter(self)
        for name in self.lora_A:
            on = name in wanted
            self.lora_A[name].weight.requires_grad_(on)
            self.lora_B[name].weight.requires_grad_(on)
            if name in self.lora_magnitude_vector:
                self.lora_magnitude_vector[name].requires_grad_(on)
        self.active_adapters = wanted

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` entirely (unmerging it first if it is merged)."""
        if name not in self.lora_A:
            raise ValueError(f"unknown adapter {name!r}; this layer has {self.adapter_names}")
        if name in self.merged_adapters:
            unmerge_adapter(self)
        del self.lora_A[name]
        del self.lora_B[name]
        del self.lora_dropout[name]
        del self.scaling[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    # -- forward -------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [.., in] -> [.., out] in the base output's dtype.

        One active adapter on a float32 CPU layer takes the fused path (`fused_lora`, or
        `fused_dora` for a DoRA adapter: one autograd Function, counter-based dropout, nothing
        but the input saved); everything else composes the modules (`reference_forward`).
        """
        if self.disabled and self.merged:
            # A merged delta lives in the base weight, so "disabled" needs it out first (PEFT
            # does the same). unmerge is exact for QuantLinear bases, float-exact otherwise.
            unmerge_adapter(self)
        if not self.disabled and len(self.active_adapters) == 1 and not self.merged_adapters:
            name = self.active_adapters[0]
            dora = name in self.lora_magnitude_vector
            if (
                name in self.lora_A
                and fused_lora_supported(
                    self.base_layer, x, self.lora_A[name].weight, self.lora_dropout[name]
                )
                # fused DoRA reads the base weight for its norm at the activations' precision
                and not (dora and base_compute_dtype(self.base_layer) != x.dtype)
            ):
                if dora:
                    return fused_dora(
                        x,
                        self.base_layer,
                        self.lora_A[name],
                        self.lora_B[name],
                        self.lora_magnitude_vector[name],
                        self.base_row_norms_sq(),
                        self.lora_dropout[name],
                        self.scaling[name],
                    )
                return fused_lora(
                    x,
                    self.base_layer,
                    self.lora_A[name],
                    self.lora_B[name],
                    self.lora_dropout[name],
                    self.scaling[name],
                )
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` composed from the modules: the oracle the fused path is tested against."""
        if self.disabled and self.merged:
            unmerge_adapter(self)
        result = self.base_layer(x)  # [.., out]
        if self.disabled:
            return result
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A or name in self.merged_adapters:
                continue
            lora_a = self.lora_A[name]
            # Cast x to the adapter dtype (fp32 by default) so the update is computed at the
            # adapter's precision, not the (possibly bf16) activations'.
            h = x.to(lora_a.weight.dtype)
            if name in self.lora_magnitude_vector:
                result = result + self._dora_update(name, h, result)
                continue
            h = self.lora_dropout[name](h)  # [.., in]
            result = result + self.lora_B[name](lora_a(h)) * self.scaling[name]  # [.., out]
        return result.to(out_dtype)

    def _dora_update(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to ``result`` (the output so far), as PEFT computes it:

            (m/n - 1) ⊙ base_result + (m/n) ⊙ s·B·A·x,      n = ‖W + s·B·A‖ (detached)

        so that result + this = bias + (m/n) ⊙ (W x + s·B·A x). ``base_result`` is ``result``
        without the bias when dropout is off (eval, or p = 0); with dropout on, PEFT
        multiplies the dropped-out input by W again, and so does this.
        """
        dropout = self.lora_dropout[name]
        bias = getattr(self.base_layer, "bias", None)
        if isinstance(dropout, nn.Identity) or not self.training:
            base_result = result if bias is None else result - bias  # [.., out]
        else:
            x = dropout(x)
            base_result = self.base_layer(x)
            base_result = base_result if bias is None else base_result - bias
        scale = self.lora_magnitude_vector[name] / self.dora_weight_norm(name)  # [out]
        lora_result = self.lora_B[name](self.lora_A[name](x))  # [.., out]
        return (scale - 1) * base_result + scale * lora_result * self.scaling[name]

    def extra_repr(self) -> str:
        ranks = {n: self.lora_A[n].out_features for n in self.lora_A}
        return (
            f"adapters={ranks}, active={self.active_adapters}, "
            f"merged={self.merged_adapters}, disabled={self.disabled}"
        )


# -- merging -----------------------------------------------------------------------------------


def _check_names(layer: LoRALinear, names: Iterable[str]) -> list[str]:
    names = list(names)
    unknown = [n for n in names if n not in layer.lora_A]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; this layer has {layer.adapter_names}")
    return names


def _default_names(layer: LoRALinear, names: str | Iterable[str] | None) -> list[str]:
    """``names`` as a list; None means what forward currently adds (active, unless disabled)."""
    if names is None:
        if layer.disabled:
            return []
        return [n for n in layer.active_adapters if n in layer.lora_A]
    return _check_names(layer, [names] if isinstance(names, str) else names)


def delta_weight(layer: LoRALinear, name: str) -> torch.Tensor:
    """The weight update of adapter ``name``: scaling · B @ A, [out, in], in the adapter dtype.

    Pure: reads the layer, modifies nothing; the result is detached.
    """
    _check_names(layer, [name])
    weight_b = layer.lora_B[name].weight.detach()  # [out, r]
    weight_a = layer.lora_A[name].weight.detach()  # [r, in]
    return (weight_b @ weight_a) * layer.scaling[name]  # [out, in]


def merged_weight(layer: LoRALinear, names: str | Iterable[str] | None = None) -> torch.Tensor:
    """Full-precision W_base + Σ delta_weight(names), [out, in]. Pure: the layer is unchanged.

    W_base is the *unmerged* base weight: a QuantLinear's exact dequantized weight (the one
    its forward multiplies by), or an ``nn.Linear``'s weight. If adapters are currently
    merged in place, they are accounted for so the result depends only on ``names``.

    Args:
        layer: the LoRA layer.
        names: adapters to fold in; None means the ones forward currently adds (the active
            adapters, or none if the layer is disabled).

    Returns:
        [out, in] tensor in at least float32 (the promotion of the base and adapter dtypes).
    """
    names = _default_names(layer, names)
    merged_now = list(layer.merged_adapters)
    base: nn.Module = layer.base_layer
    if layer._unmerged_base is not None:
        # A QuantLinear is set aside: start from its exact weight, not the merged copy.
        base, merged_now = layer._unmerged_base, []
    if isinstance(base, QuantLinear):
        weight = base.dequantized_weight(torch.float32)  # [out, in]
    else:
        weight = base.weight.detach()  # [out, in]
    dtype = torch.promote_types(weight.dtype, torch.float32)
    for name in names:
        dtype = torch.promote_types(dtype, layer.lora_A[name].weight.dtype)
    weight = weight.to(dtype=dtype, copy=True)
    if any(n in layer.lora_magnitude_vector for n in [*names, *merged_now]):
        # DoRA rescales rows: take the merged adapters out in reverse, then fold in order
        for name in reversed(merged_now):
            _unfold(layer, name, weight)
        for name in names:
            _fold(layer, name, weight)
        return weight
    for name in names:
        if name not in merged_now:
            weight += delta_weight(layer, name).to(dtype)
    for name in merged_now:
        if name not in names:
            weight -= delta_weight(layer, name).to(dtype)
    return weight


def _fold(layer: LoRALinear, name: str, weight: torch.Tensor) -> torch.Tensor | None:
    """weight += adapter ``name`` in place: W + Δ, or for DoRA (m/‖W + Δ‖) ⊙ (W + Δ).

    Returns DoRA's row factor m/‖W + Δ‖ [out] (what unfolding needs), else None.
    """
    delta = delta_weight(layer, name)  # [out, in]
    if name not in layer.lora_magnitude_vector:
        weight += delta.to(weight.dtype)
        return None
    folded = weight.float() + delta.float()  # [out, in]
    factor = layer.lora_magnitude_vector[name].detach().float() / torch.linalg.norm(folded, dim=1)
    weight.copy_(folded * factor[:, None])
    return factor


def _unfold(
    layer: LoRALinear, name: str, weight: torch.Tensor, factor: torch.Tensor | None = None
) -> None:
    """The inverse of `_fold` in place (DoRA: W / factor - Δ, ``factor`` as `_fold` gave)."""
    delta = delta_weight(layer, name)
    if name not in layer.lora_magnitude_vector:
        weight -= delta.to(weight.dtype)
        return
    if factor is None:
        factor = layer._dora_factors[name]
    weight.copy_(weight.float() / factor[:, None] - delta.float())


@torch.no_grad()
def merge_adapter(layer: LoRALinear, names: str | Iterable[str] | None = None) -> LoRALinear:
    """Fold adapters into the base weight in place, reversibly (see `unmerge_adapter`).

    Forward then skips the merged adapters, so outputs are unchanged (to float tolerance, in
    eval mode: dropout cannot be merged).

    * ``nn.Linear`` base: W += delta for each adapter, in W's dtype.
    * `QuantLinear` base: the base is replaced by a dequantized full-precision ``nn.Linear``
      (dtype: the weight's pre-quantization dtype) holding W_deq + deltas; the QuantLinear
      object is kept aside untouched. This NEVER re-quantizes - the merged layer stays full
      precision and therefore uses more memory; unmerge restores the QuantLinear exactly.
      A `CastLinear` base (bf16 weights under float32 activations) the same way, the merged
      Linear in the activations' dtype (ΔW added into bf16 in place would mostly round away).

    Args:
        layer: the LoRA layer (modified in place).
        names: adapters to merge; None means the active adapters not merged yet.

    Returns:
        ``layer``, for chaining.
    """
    names = [n for n in _default_names(layer, names) if n not in layer.merged_adapters]
    if not names:
        return layer
    base = layer.base_layer
    if isinstance(base, QuantLinear | CastLinear):  # stored narrower than it computes
        dtype = base_weight_dtype(base)
        if isinstance(base, QuantLinear):
            weight = base.dequantized_weight(torch.float32)  # [out, in]
        else:
            weight = base.weight.detach().float()  # [out, in]
        for name in names:
            _fold(layer, name, weight)
        dense = nn.Linear(
            base.in_features,
            base.out_features,
            bias=base.bias is not None,
            device=weight.device,
            dtype=dtype,
        )
        dense.weight.copy_(weight)
        if base.bias is not None:
            dense.bias.copy_(base.bias)
        dense.requires_grad_(False)
        object.__setattr__(layer, "_unmerged_base", base)
        layer.base_layer = dense
    else:
        for name in names:
            factor = _fold(layer, name, base.weight)
            if factor is not None:
                layer._dora_factors[name] = factor
    layer.merged_adapters = layer.merged_adapters + names
    layer._base_row_norms_sq = None  # the base weight changed
    return layer


@torch.no_grad()
def unmerge_adapter(layer: LoRALinear) -> LoRALinear:
    """Undo `merge_adapter`: take every merged delta back out of the base.

    A QuantLinear base comes back as the identical object that was set aside (moved to the
    current base's device if the model moved meanwhile), so its bytes are bit-exact. An
    ``nn.Linear`` base gets the deltas subtracted, exact up to float rounding.
    """
    if not layer.merged_adapters:
        return layer
    original = layer._unmerged_base
    if original is not None:
        original.to(_module_device(layer.base_layer))
        layer.base_layer = original
        object.__setattr__(layer, "_unmerged_base", None)
    else:
        weight = layer.base_layer.weight
        for name in reversed(layer.merged_adapters):
            _unfold(layer, name, weight)
            layer._dora_factors.pop(name, None)
    layer.merged_adapters = []
    layer._base_row_norms_sq = None
    return layer
