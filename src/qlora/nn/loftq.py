"""LoftQ: start LoRA from the quantization error instead of from zero (Li et al., 2023).

QLoRA freezes Q = quantize(W) and starts the adapters at B = 0, so training begins from the
*quantized* model: at 4 bits that costs little, at 2 bits (or with a poor codebook such as
FP4) the starting point is already far from the model we wanted to adapt, and the adapters
spend their capacity and the first steps repairing the damage.

LoftQ instead chooses Q and the adapter jointly so that at step 0

    Q + s · B A  ≈  W          (s = the adapter's scaling, alpha / r)

i.e. the rank-r adapter absorbs the largest directions of the quantization error. With
Q_0 = 0 and B_0 A_0 = 0 it alternates, for t = 1 .. T:

    Q_t          = quantize(W − s · B_{t−1} A_{t−1})      the base, with the adapter's share removed
    s · B_t A_t  = SVD_r(W − Q_t)                          best rank-r fit of what Q_t misses

where SVD_r keeps the r largest singular triplets U_r S_r V_rᵀ (Eckart–Young: the best rank-r
approximation in Frobenius norm). The split between the factors is balanced,
B = U_r √S_r / √s and A = √S_r V_rᵀ / √s, so both start at the same scale and neither is zero
(a zero factor would zero the other's gradient). T = 1 is "quantize, then fit the error";
T > 1 lets the quantizer see a target from which the low-rank part has been taken out, so Q
spends its codes on what the adapter cannot represent. The error ‖W − Q_t − s·B_t A_t‖_F is
recorded per iteration (`LoftQResult.errors`); it is not guaranteed to fall monotonically
(quantization is not a projection onto a convex set), so the best iterate is kept.

Use: ``add_lora(model, lora)`` on a full-precision model, then
``print(init_loftq(model, lora, quant))``: the targets of ``quant`` are quantized (LoftQ-style
where the adapter sits, plainly elsewhere) and the adapter's A and B are overwritten with the
fit.

Compatibility: with ``iters == 1`` the base is exactly ``quantize(W)``, the same bytes
`qlora.load_model` produces, so the trained adapter works on a normally loaded base. With
``iters > 1`` the base differs from ``quantize(W)``: an adapter trained over it must be used
over the same LoftQ base (re-run this initialization with the same settings, which is
deterministic up to SVD round-off, or save the quantized base).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from qlora.config import LoraConfig, QuantConfig
from qlora.nn.inject import find_targets, replace_module
from qlora.nn.lora import LoRALinear
from qlora.nn.qlinear import QuantLinear
from qlora.quant import QuantState, dequantize, quantize

__all__ = [
    "LoftQReport",
    "LoftQResult",
    "full_precision_base",
    "init_loftq",
    "loftq_decompose",
    "low_rank_factors",
]

# Above this many rows and columns an exact SVD costs seconds per matrix; a randomized
# range finder with a few power iterations gets the top r directions for a fraction of it.
EXACT_SVD_MAX_DIM = 2048


@dataclass
class LoftQResult:
    """A LoftQ base and adapter for one weight W [out, in].

    Attributes:
        state: the frozen quantized base Q.
        lora_A: [r, in] adapter down-projection.
        lora_B: [out, r] adapter up-projection; Q + scaling · lora_B @ lora_A ≈ W.
        errors: relative error ‖W − Q_t − s·B_t A_t‖_F / ‖W‖_F after each iteration t.
        quant_error: ‖W − quantize(W)‖_F / ‖W‖_F (plain QLoRA's starting error), for comparison.
    """

    state: QuantState
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    errors: list[float] = field(default_factory=list)
    quant_error: float = float("nan")


def low_rank_factors(
    matrix: torch.Tensor, r: int, exact: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced rank-``r`` factors (L [m, r], R [r, n]) with L @ R ≈ ``matrix`` [m, n].

    L = U_r √S_r and R = √S_r V_rᵀ from the truncated SVD: exact (``torch.linalg.svd``) by
    default for matrices up to `EXACT_SVD_MAX_DIM` on the short side, randomized
    (``torch.svd_lowrank`` with oversampling and 4 power iterations) beyond.
    """
    m, n = matrix.shape
    r = min(r, m, n)
    if exact is None:
        exact = min(m, n) <= EXACT_SVD_MAX_DIM
    matrix = matrix.float()
    if exact:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(matrix, q=min(r + 10, m, n), niter=4)
        u, s, vh = u[:, :r], s[:r], v[:, :r].T
    root = s.sqrt()
    return u * root, root[:, None] * vh


@torch.no_grad()
def loftq_decompose(
    weight: torch.Tensor,
    r: int,
    scaling: float,
    kind: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    iters: int = 1,
) -> LoftQResult:
    """LoftQ for one weight: a quantized base and rank-``r`` adapter with Q + s·BA ≈ W.

    Args:
        weight: [out, in] full-precision weight (any float dtype; computed in float32).
        r: adapter rank.
        scaling: the adapter's scaling s (alpha / r, or alpha / sqrt(r) with rsLoRA).
        kind, blocksize, double_quant: the base's quantization (as `qlora.quant.quantize`).
        iters: alternating quantize / SVD rounds T (>= 1).

    Returns:
        The iterate with the smallest reconstruction error (see `LoftQResult`).
    """
    if weight.dim() != 2:
        raise ValueError(f"LoftQ needs a 2-D weight, got shape {tuple(weight.shape)}")
    if iters < 1:
        raise ValueError(f"LoftQ needs iters >= 1, got {iters}")
    if scaling <= 0:
        raise ValueError(f"LoftQ needs a positive adapter scaling, got {scaling}")
    target = weight.detach().float()  # W [out, in]
    norm = float(torch.linalg.norm(target)) or 1.0
    low_rank = torch.zeros_like(target)  # s·B A, zero before the first round
    best: LoftQResult | None = None
    errors: list[float] = []
    quant_error = float("nan")
    for t in range(iters):
        state = quantize((target - low_rank).to(weight.dtype), kind, blocksize, double_quant)
        base = dequantize(state, torch.float32)  # Q_t [out, in]
        residual = target - base
        if t == 0:
            quant_error = float(torch.linalg.norm(residual)) / norm
        left, right = low_rank_factors(residual, r)  # [out, r], [r, in]
        low_rank = left @ right
        error = float(torch.linalg.norm(residual - low_rank)) / norm
        errors.append(error)
        if best is None or error < best.errors[-1]:
            root = math.sqrt(scaling)
            best = LoftQResult(state, right / root, left / root, [error])
    assert best is not None
    best.errors, best.quant_error = errors, quant_error
    return best


@dataclass(frozen=True)
class LoftQReport:
    """What `init_loftq` did.

    Attributes:
        kind: the quantization kind of the new base.
        fitted: LoRA layer name -> its `LoftQResult` (base quantized LoftQ-style, A and B fitted).
        plain: names of the layers quantized plainly (no adapter of this name on them).
    """

    kind: str
    fitted: dict[str, LoftQResult]
    plain: list[str]

    def __str__(self) -> str:
        if not self.fitted:
            return f"LoftQ {self.kind}: no adapter fitted, {len(self.plain)} layers quantized"
        before = sum(r.quant_error for r in self.fitted.values()) / len(self.fitted)
        after = sum(min(r.errors) for r in self.fitted.values()) / len(self.fitted)
        return (
            f"LoftQ {self.kind}: {len(self.fitted)} adapters fitted to the quantization error "
            f"(mean relative error {before:.4f} -> {after:.4f}), {len(self.plain)} other "
            "layers quantized plainly"
        )


def _check_loftq(lora: LoraConfig, quant: QuantConfig) -> None:
    if quant.kind is None:
        raise ValueError(
            "lora.init='loftq' fits the adapters to a quantization error, but quant.kind is "
            "None; set quant.kind (nf4, fp4, int8, nf2) or use init='kaiming'"
        )
    if quant.kind == "gguf":
        raise ValueError(
            "lora.init='loftq' re-quantizes the base, but quant.kind='gguf' keeps the GGUF "
            "file's blocks as they are; use init='kaiming' with gguf, or a codebook kind (nf4)"
        )
    if lora.loftq_iters > 1:
        warnings.warn(
            f"lora.loftq_iters={lora.loftq_iters}: the LoftQ base differs from plain "
            "quantization, so the trained adapter belongs to this base; rebuild it with the "
            "same LoftQ settings (or keep loftq_iters=1) before loading the adapter elsewhere",
            stacklevel=3,
        )


def full_precision_base(name: str, module: nn.Module, init: str = "loftq") -> nn.Linear:
    """The ``nn.Linear`` under ``module`` (itself or a LoRALinear's base), which lora.init
    ``init`` (loftq, pissa) rewrites; a quantized or merged one is refused, saying why."""
    base = module.base_layer if isinstance(module, LoRALinear) else module
    merged = isinstance(module, LoRALinear) and module.merged
    if merged or not isinstance(base, nn.Linear):
        raise ValueError(
            f"lora.init='{init}' needs the full-precision weight of {name}, but it is "
            f"{'merged' if merged else 'already a ' + type(base).__name__}; load the model "
            f"with quant=None, call add_lora, then init_{init}(model, lora, QuantConfig(...))"
        )
    return base


@torch.no_grad()
def _fit_layer(layer: LoRALinear, adapter: str, quant: QuantConfig, iters: int) -> LoftQResult:
    """Quantize ``layer``'s base LoftQ-style and copy the fitted factors into its adapter."""
    weight = layer.base_layer.weight  # [out, in]
    lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight  # [r, in], [out, r]
    assert quant.kind is not None  # _check_loftq
    result = loftq_decompose(
        weight,
        lora_a.shape[0],
        layer.scaling[adapter],
        quant.kind,
        quant.blocksize,
        quant.double_quant,
        iters,
    )
    lora_a.copy_(result.lora_A)
    lora_b.copy_(result.lora_B)
    return result


@torch.no_grad()
def init_loftq(
    model: nn.Module,
    lora: LoraConfig,
    quant: QuantConfig,
    adapter_name: str = "default",
    progress: bool = True,
) -> LoftQReport:
    """Quantize ``quant``'s targets in place, fitting adapter ``adapter_name`` LoftQ-style.

    Call it after `qlora.nn.add_lora` on a model still in full precision (loaded with
    ``quant=None``). A target that carries the adapter gets a LoftQ base (`loftq_decompose`
    with the adapter's rank and scaling and ``lora.loftq_iters`` rounds) and its A, B are
    overwritten with the fit; every other target is quantized plainly. What was trainable
    stays trainable, and nothing else becomes so.

    Returns:
        A `LoftQReport` (print it).

    Raises:
        ValueError: no quantization kind, or a target that is already quantized or merged
            (LoftQ needs the full-precision weight).
    """
    _check_loftq(lora, quant)
    assert quant.kind is not None
    targets = find_targets(model, quant.target_modules)
    bases = {name: full_precision_base(name, model.get_submodule(name)) for name in targets}
    fitted: dict[str, LoftQResult] = {}
    plain: list[str] = []
    bar = tqdm(targets, desc=f"LoftQ {quant.kind}", unit="layer", disable=not progress)
    for name in bar:
        module, base = model.get_submodule(name), bases[name]
        if isinstance(module, LoRALinear) and adapter_name in module.lora_A:
            result = _fit_layer(module, adapter_name, quant, lora.loftq_iters)
            fitted[name], state = result, result.state
        else:
            state = quantize(base.weight.data, quant.kind, quant.blocksize, quant.double_quant)
            plain.append(name)
        bias = base.bias.data if base.bias is not None else None
        quantized = QuantLinear(state, bias, quant.compute_dtype)
        quantized.requires_grad_(False)
        quantized.train(base.training)
        if isinstance(module, LoRALinear):
            module.base_layer = quantized
        else:
            replace_module(model, name, quantized)
    return LoftQReport(quant.kind, fitted, plain)
