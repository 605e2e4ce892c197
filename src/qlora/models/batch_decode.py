"""BatchDecoder: decode many requests at once, each with its own adapter, over one base model.

This is the loop behind `qlora serve`'s continuous batching and `qlora generate`. It runs the
model's own modules (embedding, norms, rotary embedding, the k-bit or full-precision
projections) in a forward written for decoding, instead of transformers' generic forward:

* **Rows come and go.** Keys and values live in a `SlotKVCache`: each request owns a row,
  left-aligned, with its own length. A request joins with `prefill` (its prompt alone, one
  causal attention over its tokens) and from then on advances one token per `step`
  together with every other row: each row's query attends to its own columns only (a
  mask), at its own rotary position. `release` frees a row between steps.
* **One base matmul for the whole batch, each row's adapter on its own rows.** Every
  projection calls the *base* layer once on the batch ([n, in] -> [n, out]: for a CPU
  QuantLinear the fused k-bit kernel of `qlora.quant.matvec`, through a `MatvecPlan` whose
  arguments are bound once), then each adapter present adds its low-rank update on the rows
  that use it (`qlora.models.lora_rows`: the A's of projections sharing an input stacked
  into one matmul, the scaling folded into A). Adapters are plain tensors, not modules:
  loading one for serving never touches the model, and a row keeps the tensors it started
  with even if its adapter is unloaded meanwhile.
* **Fewer bytes for an 8-bit output head.** A float32 head that is exactly 8-bit blocks
  (the default model's, from its GGUF's Q8_0) is read as those blocks by the same kernel:
  the same weights, a quarter of the bytes (`qlora.quant.lossless`); any other head stays
  as it is.
* **Little per-token Python.** Module look-ups, masks and rotary angles are prepared once
  per step, not per layer; nothing is allocated per token but the activations.

The math is transformers' Llama forward (RMSNorm, rotary embedding by the model's own
rotary module, grouped-query attention by `scaled_dot_product_attention`, SwiGLU MLP), for
the architectures that share it: llama, mistral and qwen2 (full attention; sliding windows
only when wider than the context), qwen3 (with its q/k norms). Tested against transformers'
forward and ``generate`` (greedy tokens equal on the default model) and against the
composed `LoRALinear` forward for adapters; a row's logits do not depend on the other rows
beyond float32 summation order (tested: greedy answers equal batched and alone).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qlora.kernels import c_extension
from qlora.models.decode_glue import LAYER_FIELDS, DecodeGlue, LayerShape, float_bits
from qlora.models.kv_slots import SlotKVCache
from qlora.models.lora_rows import (
    PreparedAdapter,
    RowLayout,
    StackedAdapters,
    add_site_update,
    add_stacked_update,
    prepare_adapter,
    row_layout,
    site_table,
    stack_adapters,
)
from qlora.nn import fast_decoding
from qlora.nn.inject import lora_layers
from qlora.nn.lora import LoRALinear
from qlora.nn.qlinear import QuantLinear
from qlora.quant.lossless import lossless_int8
from qlora.quant.matvec import MATVEC_MAX_ROWS
from qlora.quant.matvec_plan import MatvecPlan

__all__ = [
    "AdapterWeights",
    "BatchDecoder",
    "LowRank",
    "PreparedAdapter",
    "adapter_weights",
    "batch_decode_unsupported",
]

# A [r, in], B [out, r], scaling: the low-rank update scaling · B(A(x)) of one layer.
LowRank = tuple[torch.Tensor, torch.Tensor, float]
# Module path (e.g. "model.layers.0.self_attn.q_proj") -> its low-rank update.
AdapterWeights = Mapping[str, LowRank]

_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
_RAW_PREPARED_KEPT = 8
# Activation modules that are F.silu (torch's, transformers' ACT2FN["silu"]): the C glue's SwiGLU.
_SILU_MODULES = ("SiLU", "SiLUActivation")


def batch_decode_unsupported(model: nn.Module) -> str | None:
    """Why `BatchDecoder` cannot run ``model`` (one line), or None when it can."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _ARCHITECTURES:
        return f"model_type {model_type!r} (the batch decoder runs {', '.join(_ARCHITECTURES)})"
    context = int(getattr(config, "max_position_embeddings", 0) or 0)
    window = getattr(config, "sliding_window", None)
    windowed = getattr(config, "use_sliding_window", model_type == "mistral")
    if windowed and window is not None and int(window) < context:
        return f"sliding-window attention ({window} < context {context})"
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        return f"layer types {sorted(kinds)} (only full attention)"
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, n) for n in needed) or not hasattr(model, "lm_head"):
        return "not the model.layers / lm_head layout of a transformers causal LM"
    return None


def adapter_weights(model: nn.Module, name: str) -> dict[str, LowRank]:
    """Adapter ``name`` of the model's `LoRALinear` layers as plain tensors (shared, not
    copied), for a row of `BatchDecoder`.

    Raises:
        ValueError: no layer has an adapter ``name``, or it is a DoRA adapter (the decoder
            adds plain low-rank updates; merge a DoRA adapter into the base to serve it).
    """
    if any(name in layer.lora_magnitude_vector for _, layer in lora_layers(model)):
        raise ValueError(
            f"adapter {name!r} is DoRA: the batch decoder adds plain LoRA updates; merge it "
            "into the base (qlora merge) to serve it"
        )
    found = {
        path: (layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach(),
               layer.scaling[name])
        for path, layer in lora_layers(model)
        if name in layer.lora_A
    }  # fmt: skip
    if not found:
        raise ValueError(f"the model has no adapter {name!r}")
    return found


@dataclass(frozen=True)
class _Projection:
    """One Linear of the model: its path (adapters are keyed by it), its base layer, and for
    a CPU k-bit base the fused kernel's prepared call (what `QuantLinear.forward` runs inside
    `fast_decoding`, minus ~30 us of per-call bookkeeping)."""

    path: str
    base: nn.Module
    plan: MatvecPlan | None = None
    float32: bool = False  # a k-bit layer: decoded in float32 (any compute dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, in] -> [n, out]: QuantLinear.forward's arithmetic, step for step."""
        if self.plan is None or x.shape[0] > MATVEC_MAX_ROWS:
            return self.base(x)
        base = self.base
        if self.float32 and x.dtype == torch.float32:  # the casts below are no-ops: skip them
            return self.plan(x) if base.bias is None else self.plan(x) + base.bias
        if not isinstance(base, QuantLinear):
            return base(x)
        out = self.plan(x.to(base.compute_dtype)).to(x.dtype)  # [n, out]
        if base.bias is not None:  # added in the activations' dtype, as QuantLinear does
            out = out + base.bias.to(out.dtype)
        return out


def _projection(model: nn.Module, path: str) -> _Projection:
    module = model.get_submodule(path)
    if isinstance(module, LoRALinear):
        if module.merged_adapters:
            raise ValueError(
                f"{path} has adapters {module.merged_adapters} merged into its weight; unmerge "
                "them (qlora.nn.lora.unmerge_adapter) before batch decoding"
            )
        module = module.base_layer
    plan = None
    if isinstance(module, QuantLinear) and module.weight.device.type == "cpu":
        plan = MatvecPlan.create(module.quant_state)
    # The decode kernels accumulate in float32 whatever the layer's compute dtype (as
    # QuantLinear's own fast_decoding path): bf16 is for the many-row training matmuls.
    float32 = isinstance(module, QuantLinear)
    return _Projection(path, module, plan, float32)


def _head_projection(model: nn.Module) -> _Projection:
    """lm_head; a float32 head made of 8-bit blocks (a GGUF's Q8_0 output, as the default
    model's) runs as those blocks through the fused kernel: the same weights bit for bit
    (`qlora.quant.lossless`), a quarter of the bytes to read per token."""
    projection = _projection(model, "lm_head")
    base = projection.base
    weight = getattr(base, "weight", None)
    if projection.plan is not None or type(base) is not nn.Linear or weight is None:
        return projection
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return projection
    state = lossless_int8(weight)
    plan = MatvecPlan.create(state) if state is not None else None
    return projection if plan is None else _Projection(projection.path, base, plan, True)


@dataclass(frozen=True)
class _Block:
    """One decoder layer's modules, looked up once."""

    input_norm: _Norm
    post_attention_norm: _Norm
    q: _Projection
    k: _Projection
    v: _Projection
    o: _Projection
    gate: _Projection
    up: _Projection
    down: _Projection
    act: nn.Module
    q_norm: _Norm | None
    k_norm: _Norm | None


@dataclass(frozen=True)
class _Groups:
    """Which adapter each row of a forward uses. Either ``per_adapter``: (an adapter, its
    rows' indices or None for all rows), one update per adapter; or, with two adapters or
    more, ``stacked`` and each row's place on their grid in ``layout``."""

    per_adapter: tuple[tuple[PreparedAdapter, torch.Tensor | None], ...] = ()
    stacked: StackedAdapters | None = None
    layout: RowLayout | None = None


# A decoder layer's sites (projections sharing an input), in order; lm_head is the last site.
_LAYER_SITES = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))


def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, transformers' x·cos + rotate_half(x)·sin in fewer ops: rotate_half(x)
    is [-x2, x1], so it is the halves swapped times [-sin1, sin2] (``signed_sin``): the same
    products, the sign moved onto sin (exact)."""
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # [x2, x1]
    return x * cos + swapped * signed_sin


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


class _Norm:
    """An RMSNorm module as one fused op (``torch.rms_norm``) on float32 input, where it is
    transformers' RMSNorm (weight · x / rms(x)); the module itself otherwise."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        weight = getattr(module, "weight", None)
        eps = getattr(module, "variance_epsilon", None)
        plain = type(module).__name__.endswith("RMSNorm") and isinstance(eps, float)
        self.fused = plain and weight is not None and weight.dtype == torch.float32
        self.shape = (int(weight.shape[-1]),) if weight is not None else ()
        self.eps = eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and x.dtype == torch.float32:
            return torch.rms_norm(x, self.shape, self.module.weight, self.eps)
        return self.module(x)


class BatchDecoder:
    """Prefill and step rows of a batch of requests on ``model`` (see the module docstring).

    Args:
        model: a causal LM of a supported architecture (`batch_decode_unsupported`), loaded by
            `qlora.load_model` or transformers; its LoRALinear layers' *base* is used, their
            adapters only when passed to `prefill` as `AdapterWeights`.
        max_batch: most rows at once.
        c_glue: run a step's per-layer glue (norms, attention, SwiGLU) in C
            (`qlora.models.decode_glue`) where it applies: a float32 model on the CPU with
            plain RMSNorms and SiLU, the ``_decode`` extension built and kernels not disabled.
            False: the torch ops (the reference it is tested against).

    Raises:
        ValueError: an unsupported model, or adapters merged into its weights.
    """

    def __init__(self, model: nn.Module, max_batch: int = 8, c_glue: bool = True) -> None:
        reason = batch_decode_unsupported(model)
        if reason is not None:
            raise ValueError(f"the batch decoder cannot run this model: {reason}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        config = model.config
        self.model = model
        self.max_batch = max_batch
        self._embed = model.model.embed_tokens
        self._norm = _Norm(model.model.norm)
        self._rotary = model.model.rotary_emb
        self._head = _head_projection(model)
        self._blocks = [self._block(model, i) for i in range(len(model.model.layers))]
        self._sites: list[tuple[str, ...]] = [
            tuple(getattr(block, name).path for name in site)
            for block in self._blocks
            for site in _LAYER_SITES
        ] + [(self._head.path,)]
        attention = model.model.layers[0].self_attn
        self._heads = int(config.num_attention_heads)
        self._kv_heads = int(getattr(config, "num_key_value_heads", None) or self._heads)
        self._head_dim = int(attention.head_dim)
        self._scale = float(attention.scaling)
        self._dtype = self._embed.weight.dtype
        self._device = self._embed.weight.device
        self.cache = SlotKVCache(
            len(self._blocks),
            max_batch,
            self._kv_heads,
            self._head_dim,
            int(config.max_position_embeddings),
            self._dtype,
            self._device,
        )
        self._adapters: list[PreparedAdapter | None] = []
        self._groups: _Groups | None = None
        self._table: tuple[torch.Tensor | None] | None = None  # site_table, until rows change
        self._stack: tuple[tuple[int, ...], StackedAdapters] | None = None  # the last stacking
        self._raw_prepared: dict[int, tuple[AdapterWeights, PreparedAdapter]] = {}
        self._c_glue = c_glue and self._glue_applies()
        self._description = self._layer_description() if self._c_glue else None

    def _glue_applies(self) -> bool:
        """Whether the C glue computes what the torch path does for this model."""
        norms = [self._norm] + [
            n for b in self._blocks for n in (b.input_norm, b.post_attention_norm)
        ]
        return (
            self._device.type == "cpu"
            and self._dtype == torch.float32
            and all(norm.fused for norm in norms)
            and all(type(block.act).__name__ in _SILU_MODULES for block in self._blocks)
            and self._head_dim % 2 == 0
            and self._head_dim <= 512
        )

    def _layer_description(self) -> torch.Tensor | None:
        """The layers for the C decode loop (`DecodeGlue.layers`), or None where it does not
        apply: a projection that is not a float32-compute k-bit layer with a kernel plan, or
        q/k norms (Qwen3: the per-op glue runs those)."""
        rows = []
        for block in self._blocks:
            if block.q_norm is not None or block.k_norm is not None:
                return None
            norms = (block.input_norm, block.post_attention_norm)
            if any(not n.module.weight.is_contiguous() for n in norms):
                return None
            row = [n.module.weight.data_ptr() for n in norms]
            row += [float_bits(float(n.eps)) for n in norms]
            for name in ("q", "k", "v", "o", "gate", "up", "down"):
                projection: _Projection = getattr(block, name)
                if projection.plan is None or not projection.float32:
                    return None
                bias = projection.base.bias
                if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
                    return None
                row += [*projection.plan.fields(), 0 if bias is None else bias.data_ptr()]
            rows.append(row)
        description = torch.tensor(rows, dtype=torch.int64)
        return description if description.shape[1] == LAYER_FIELDS else None

    @property
    def c_glue(self) -> bool:
        """Whether the next `step` runs its glue in C (see the ``c_glue`` argument)."""
        return self._c_glue and c_extension("decode") is not None

    @staticmethod
    def _block(model: nn.Module, index: int) -> _Block:
        prefix = f"model.layers.{index}"
        layer = model.model.layers[index]
        attn, mlp = layer.self_attn, layer.mlp

        def proj(name: str) -> _Projection:
            return _projection(model, f"{prefix}.{name}")

        return _Block(
            input_norm=_Norm(layer.input_layernorm),
            post_attention_norm=_Norm(layer.post_attention_layernorm),
            q=proj("self_attn.q_proj"),
            k=proj("self_attn.k_proj"),
            v=proj("self_attn.v_proj"),
            o=proj("self_attn.o_proj"),
            gate=proj("mlp.gate_proj"),
            up=proj("mlp.up_proj"),
            down=proj("mlp.down_proj"),
            act=mlp.act_fn,
            q_norm=_Norm(attn.q_norm) if hasattr(attn, "q_norm") else None,
            k_norm=_Norm(attn.k_norm) if hasattr(attn, "k_norm") else None,
        )

    def prepare(self, adapter: AdapterWeights) -> PreparedAdapter:
        """``adapter`` laid out for this decoder (`qlora.models.lora_rows`): do it once per
        adapter and pass the result to every `prefill` that uses it.

        Raises:
            ValueError: the adapter has a layer this decoder does not run.
        """
        return prepare_adapter(adapter, self._sites)

    def _prepared_for(self, adapter: AdapterWeights) -> PreparedAdapter:
        """`prepare` once per weights object (rows given the same raw weights then share one
        adapter, and its low-rank matmuls); the last few are kept."""
        key = id(adapter)
        if key not in self._raw_prepared:
            if len(self._raw_prepared) >= _RAW_PREPARED_KEPT:
                self._raw_prepared.pop(next(iter(self._raw_prepared)))
            # The weights are held too, so that their id is not reused while cached.
            self._raw_prepared[key] = (adapter, self.prepare(adapter))
        return self._raw_prepared[key][1]

    # -- rows ------------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        """How many requests are in the batch (rows 0 .. rows-1)."""
        return self.cache.rows

    def length(self, row: int) -> int:
        """Tokens in ``row``'s cache (its prompt and the tokens fed back so far)."""
        return int(self.cache.lengths[row])

    def release(self, row: int) -> None:
        """Drops ``row``; the last row takes its index (callers mirror this swap-remove)."""
        self.cache.release(row)
        last = self._adapters.pop()
        if row < len(self._adapters):
            self._adapters[row] = last
        self._groups = None
        self._table = None

    # -- forward ---------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(
        self, prompt: Sequence[int], adapter: PreparedAdapter | AdapterWeights | None = None
    ) -> torch.Tensor:
        """Adds a row for ``prompt`` (token ids) with ``adapter`` (None: the base alone;
        better `prepare`d once than raw weights each time) and returns the float32 logits [V]
        that predict its next token.

        Raises:
            ValueError: an empty prompt, one beyond the model's context, or an adapter with a
                layer this decoder does not run.
            RuntimeError: the batch is full (``rows == max_batch``).
        """
        length = len(prompt)
        if length == 0:
            raise ValueError("the prompt is empty")
        if adapter is not None and not isinstance(adapter, PreparedAdapter):
            adapter = self._prepared_for(adapter)
        self.cache.reserve(length)
        row = self.cache.add_row()
        self._adapters.append(adapter)
        self._groups = None
        self._table = None
        try:
            ids = torch.tensor(prompt, dtype=torch.long, device=self._device)  # [T]
            positions = torch.arange(length, device=self._device)[None]  # [1, T]
            groups = _Groups(() if adapter is None else ((adapter, None),))
            with fast_decoding():
                hidden = self._embed(ids)  # [T, H]
                cos, sin = self._rotary(hidden[None], positions)  # [1, T, D] each
                cos, sin = cos[:, None], _signed_sin(sin[:, None])  # [1, 1, T, D]
                for index, block in enumerate(self._blocks):
                    hidden = self._layer(index, block, hidden, groups, cos, sin, row, None)
                logits = self._logits(hidden[-1:], groups)  # [1, V]
        except BaseException:
            self.release(row)
            raise
        self.cache.lengths[row] = length
        return logits[0]

    @torch.inference_mode()
    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        """Feeds ``tokens[i]`` to row i (one per row) and returns float32 logits [rows, V].

        Raises:
            ValueError: not one token per row, or a row at the end of the model's context.
        """
        rows = self.cache.rows
        if len(tokens) != rows or rows == 0:
            raise ValueError(f"step needs one token per row: {rows} rows, {len(tokens)} tokens")
        positions = self.cache.lengths[:rows].clone()  # [n]
        longest = int(positions.max()) + 1
        self.cache.reserve(longest)
        ids = torch.tensor(list(tokens), dtype=torch.long, device=self._device)  # [n]
        glue = DecodeGlue.create() if self._c_glue else None
        # Each row sees its own columns: [n, 1, 1, L]; None when all rows are as long (the C
        # glue reads each row's length instead).
        mask = None
        if glue is None and int(positions.min()) + 1 != longest:
            columns = torch.arange(longest, device=self._device)  # [L]
            mask = (columns[None] <= positions[:, None])[:, None, None]
        with fast_decoding():
            hidden = self._embed(ids)  # [n, H]
            cos, sin = self._rotary(hidden[:, None], positions[:, None])  # [n, 1, D] each
            if glue is not None:
                logits = self._glue_step(glue, hidden, cos, sin, positions)
            else:
                groups = self._step_groups()
                cos, sin = cos[:, None], _signed_sin(sin[:, None])  # [n, 1, 1, D]
                for index, block in enumerate(self._blocks):
                    hidden = self._layer(index, block, hidden, groups, cos, sin, positions, mask)
                logits = self._logits(hidden, groups)  # [n, V]
        self.cache.lengths[:rows] += 1
        return logits

    def _glue_step(
        self,
        glue: DecodeGlue,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
    ) -> torch.Tensor:
        """`step`'s layers with the glue in C: the same math as `_layer`, whose residual adds
        are deferred into the next norm (hidden += the last layer's down projection), and
        the adapters' updates by ``lora_rows`` (the torch updates for adapters it cannot
        read: not float32 CPU tensors)."""
        rows = hidden.shape[0]
        cos = cos.reshape(rows, -1).contiguous()  # [n, D]
        sin = sin.reshape(rows, -1).contiguous()
        pending: torch.Tensor | None = None  # the last layer's output, not yet in hidden
        if self._table is None:
            self._table = (site_table(self._adapters, len(self._sites)),)
        table = self._table[0]
        described = table is not None or all(adapter is None for adapter in self._adapters)
        if self._description is not None and described and rows <= MATVEC_MAX_ROWS:
            return self._loop_step(glue, hidden, cos, sin, positions, table)
        if table is None and any(adapter is not None for adapter in self._adapters):
            table_or_groups: torch.Tensor | _Groups = self._step_groups()
        else:
            table_or_groups = table if table is not None else _Groups()

        def adapt(site: int, outputs: tuple[torch.Tensor, ...], x: torch.Tensor) -> None:
            if isinstance(table_or_groups, torch.Tensor):
                glue.lora_rows(x, table_or_groups, site, outputs)
            elif table_or_groups.per_adapter or table_or_groups.stacked is not None:
                self._adapt(site, outputs, x, table_or_groups)

        for index, block in enumerate(self._blocks):
            site = index * len(_LAYER_SITES)
            x = glue.add_rms_norm(
                hidden, pending, block.input_norm.module.weight, block.input_norm.eps
            )
            queries, keys, values = block.q(x), block.k(x), block.v(x)  # [n, h·D] each
            adapt(site, (queries, keys, values), x)
            if block.q_norm is not None and block.k_norm is not None:
                shape = (rows, -1, self._head_dim)
                queries = block.q_norm(queries.view(shape)).reshape(rows, -1).contiguous()
                keys = block.k_norm(keys.view(shape)).reshape(rows, -1).contiguous()
            attended = glue.attend(
                queries,
                keys,
                values,
                self.cache.keys[index],
                self.cache.values[index],
                positions,
                cos,
                sin,
                self._scale,
            )  # [n, heads·D]
            out = block.o(attended)  # [n, H]
            adapt(site + 1, (out,), attended)
            x = glue.add_rms_norm(
                hidden, out, block.post_attention_norm.module.weight, block.post_attention_norm.eps
            )
            gate, up = block.gate(x), block.up(x)  # [n, I] each
            adapt(site + 2, (gate, up), x)
            gated = glue.swiglu(gate, up)
            pending = block.down(gated)  # [n, H]
            adapt(site + 3, (pending,), gated)
        x = glue.add_rms_norm(hidden, pending, self._norm.module.weight, self._norm.eps)
        logits = self._head(x)  # [n, V]
        adapt(len(self._sites) - 1, (logits,), x)
        return logits.float()

    def _loop_step(
        self,
        glue: DecodeGlue,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        table: torch.Tensor | None,
    ) -> torch.Tensor:
        """`_glue_step` with every layer in one C call (`DecodeGlue.layers`: the same
        calls in the same order, without Python between them); the output head here."""
        assert self._description is not None
        pairs = zip(self.cache.keys, self.cache.values, strict=True)
        caches = torch.tensor(
            [[k.data_ptr(), v.data_ptr()] for k, v in pairs], dtype=torch.int64
        )  # [layers, 2]: re-read each step (the cache reallocates when it grows)
        first = self._blocks[0]
        shape = LayerShape(
            hidden=hidden.shape[1],
            intermediate=first.gate.plan.out_features if first.gate.plan else 0,
            heads=self._heads,
            kv_heads=self._kv_heads,
            head_dim=self._head_dim,
            capacity=self.cache.capacity,
            scale=self._scale,
        )
        layer_sites = len(self._blocks) * len(_LAYER_SITES)
        x = glue.layers(
            self._description,
            hidden,
            shape,
            positions,
            cos,
            sin,
            caches,
            None if table is None else table[:layer_sites],
            self._norm.module.weight,
            self._norm.eps,
        )  # [n, H]: the final norm's output
        logits = self._head(x)  # [n, V]
        if table is not None:
            glue.lora_rows(x, table, layer_sites, (logits,))
        return logits.float()

    def _step_groups(self) -> _Groups:
        """Rows grouped by adapter (by identity), cached until the rows change."""
        if self._groups is not None:
            return self._groups
        members: dict[int, tuple[PreparedAdapter, list[int]]] = {}
        for row, adapter in enumerate(self._adapters):
            if adapter is not None:
                members.setdefault(id(adapter), (adapter, []))[1].append(row)
        if len(members) < 2:
            self._stack = None  # its copies are not needed any more
            everyone = len(self._adapters)
            self._groups = _Groups(
                tuple(
                    (
                        adapter,
                        None if len(rows) == everyone else torch.tensor(rows, device=self._device),
                    )
                    for adapter, rows in members.values()
                )
            )
            return self._groups
        key = tuple(sorted(members))  # the same adapters: reuse their stacking
        if self._stack is None or self._stack[0] != key:
            self._stack = (key, stack_adapters([members[k][0] for k in key]))
        group_of = {adapter_id: group for group, adapter_id in enumerate(key)}
        layout = row_layout(
            [None if a is None else group_of[id(a)] for a in self._adapters],
            len(key),
            self._device,
        )
        self._groups = _Groups(stacked=self._stack[1], layout=layout)
        return self._groups

    @staticmethod
    def _adapt(
        site: int, outputs: Sequence[torch.Tensor], x: torch.Tensor, groups: _Groups
    ) -> None:
        """Adds each row's adapter's low-rank update of ``site`` to ``outputs``."""
        if groups.stacked is not None and groups.layout is not None:
            stacked = groups.stacked.sites[site]
            if stacked is not None:
                add_stacked_update(outputs, x, stacked, groups.layout)
            return
        for adapter, rows in groups.per_adapter:
            update = adapter.sites[site]
            if update is not None:
                add_site_update(outputs, x, update, rows)

    def _layer(
        self,
        index: int,
        block: _Block,
        hidden: torch.Tensor,
        groups: _Groups,
        cos: torch.Tensor,
        sin: torch.Tensor,
        where: int | torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """One decoder layer. Prefill: hidden [T, H] of row ``where`` (an int); step: hidden
        [n, H], one token per row at positions ``where`` [n]."""
        site = index * len(_LAYER_SITES)
        x = block.input_norm(hidden)
        queries, keys, values = block.q(x), block.k(x), block.v(x)  # [n|T, h·D] each
        self._adapt(site, (queries, keys, values), x, groups)
        tokens = hidden.shape[0]
        shape = (tokens, -1, self._head_dim)
        queries, keys, values = (t.view(shape) for t in (queries, keys, values))  # [., h, D]
        if block.q_norm is not None and block.k_norm is not None:
            queries, keys = block.q_norm(queries), block.k_norm(keys)
        key_cache, value_cache = self.cache.keys[index], self.cache.values[index]
        if isinstance(where, int):  # prefill of one row: [1, h, T, D], causal
            queries, keys, values = (t.transpose(0, 1)[None] for t in (queries, keys, values))
            queries, keys = _rope(queries, cos, sin), _rope(keys, cos, sin)
            key_cache[where, :, :tokens] = keys[0]
            value_cache[where, :, :tokens] = values[0]
            attended = self._attend(queries, keys, values, None, causal=True)  # [1, h, T, D]
            attended = attended[0].transpose(0, 1).reshape(tokens, -1)  # [T, heads·D]
        else:  # one token per row: [n, h, 1, D] against each row's cached columns
            queries, keys, values = (t[:, :, None] for t in (queries, keys, values))
            queries, keys = _rope(queries, cos, sin), _rope(keys, cos, sin)
            rows = torch.arange(tokens, device=hidden.device)
            key_cache[rows, :, where] = keys[:, :, 0]
            value_cache[rows, :, where] = values[:, :, 0]
            longest = int(where.max()) + 1
            attended = self._attend(
                queries,
                key_cache[:tokens, :, :longest],
                value_cache[:tokens, :, :longest],
                mask,
                causal=False,
            )  # [n, h, 1, D]
            attended = attended.reshape(tokens, -1)  # [n, heads·D]
        out = block.o(attended)  # [n, H]
        self._adapt(site + 1, (out,), attended, groups)
        hidden = hidden + out
        x = block.post_attention_norm(hidden)
        gate, up = block.gate(x), block.up(x)  # [n, I] each
        self._adapt(site + 2, (gate, up), x, groups)
        gated = block.act(gate) * up
        down = block.down(gated)  # [n, H]
        self._adapt(site + 3, (down,), gated, groups)
        return hidden + down

    def _attend(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor | None,
        causal: bool,
    ) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            queries,
            keys,
            values,
            attn_mask=mask,
            is_causal=causal,
            scale=self._scale,
            enable_gqa=self._heads != self._kv_heads,
        )

    def _logits(self, hidden: torch.Tensor, groups: _Groups) -> torch.Tensor:
        x = self._norm(hidden)
        logits = self._head(x)  # [n, V]
        self._adapt(len(self._sites) - 1, (logits,), x, groups)
        return logits.float()
