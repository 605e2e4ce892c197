"""How much memory does a fine-tuning step need? Weights, adapters, gradients, optimizer
states, activations, the loss head's logits and backward working memory, in bytes.

    total = weights + adapters + gradients + optimizer + activations + logits + overhead

Everything but the last three terms is a parameter count times bytes per parameter (§7).
The activation terms are *derived*, op by op, from what autograd keeps alive between the
forward and the backward pass of a Llama-style decoder as `transformers` implements it, with
our `LoRALinear` and `QuantLinear`. The derivation is checked two ways: the tests sum the
bytes of every tensor autograd saves (``torch.autograd.graph.saved_tensors_hooks``) on a
small model, and ``benchmarks/check_memory.py`` measures the peak resident memory of real
training steps on SmolLM2-135M.

Notation
--------
b batch, s sequence length, T = b·s tokens; h hidden size, i MLP intermediate size,
n_q / n_kv query / key-value heads, d head dim, q = n_q·d, k = n_kv·d; V vocabulary,
L decoder layers, r LoRA rank; E experts and K of them active per token (MoE).
p = bytes of the compute dtype (4 for float32 on a CPU, 2 for bfloat16 on a GPU);
a = bytes of the adapter dtype (4: `LoRALinear` keeps adapters in float32);
m = bytes of a dropout mask (1 on CUDA, a on the CPU, see §1).

1. What survives from forward to backward
-----------------------------------------
Only tensors that some op *saves for backward* cost activation memory; every other
intermediate is freed as soon as the forward pass has used it. What an op saves depends on
which inputs need a gradient, because PyTorch's generated autograd code saves an operand only
when the other operand's gradient needs it:

* ``x @ Wᵀ`` (``nn.Linear``) saves x only if W trains, and W (a parameter: no new memory)
  only if x needs a gradient. So the frozen base layers of LoRA keep *no* activation.
  `QuantLinear`'s autograd function saves the packed weight (already resident) and never x.
* views, transposes, ``reshape`` of contiguous tensors, ``.to()``, ``cat``, ``+`` and
  multiplication by a Python scalar save nothing of size.
* ``a * b`` saves b if a needs a gradient and a if b does; ``silu(x)`` and ``pow(x, 2)`` save
  x; ``rsqrt``, ``softmax`` and ``log_softmax`` save their output.
* dropout saves its mask. On CUDA ``native_dropout`` keeps a bool mask (1 byte per element);
  on the CPU PyTorch multiplies by a noise tensor of the input's dtype and saves that.
* ``scaled_dot_product_attention`` with the flash / memory-efficient kernels (CUDA) and the
  CPU flash kernel saves q, k, v, its output and a float32 log-sum-exp [b, n_q, s]; never
  the [s × s] attention matrix. With ``enable_gqa`` (transformers passes it when there is no
  padding mask) k and v stay at n_kv heads; with a padding mask transformers repeats them
  to n_q heads first and the copies are what gets saved. The eager path saves the softmax
  probabilities [b, n_q, s, s] (float32, plus a copy in the compute dtype).

A tensor saved by several ops (the norm output read by q, k and v) is stored once: we count
storages, not saves. Also, the CPU flash kernel and the CUDA kernels allocate their output
in [b, s, n_q, d] order, so the ``transpose(1, 2).contiguous()`` that feeds ``o_proj`` is a
no-op and o_proj's input *is* the saved attention output.

2. One decoder layer with LoRA on every linear layer
----------------------------------------------------
``LoRALinear`` computes ``base(x) + B(A(dropout(x.to(float32)))) · α/r``. Per target with
input width n: A saves its input - the dropout output [T, n]·a when dropout > 0, else the
float32 cast [T, n]·a when the compute dtype is not float32, else x itself (shared with the
other targets reading x) - and B saves A's output [T, r]·a; dropout adds its mask
[T, n]·m (only if x needs a gradient). On the CPU in float32 the fused path
(`qlora.nn.lora_fused`) regenerates the dropout mask from two seed words in backward, so
every target saves x itself (shared), with or without dropout. The layer, op by op:

====================================  ====================  ===================================
tensor                                saved by              bytes
====================================  ====================  ===================================
x, float32 (the residual stream)      input_layernorm pow,  T·h·4 (for p = 2 the ``.to(float32)``
                                      mul                   copy, for p = 4 the stream itself)
rsqrt(mean(x²) + ε)                   mul                   T·4
LoRA inputs of q, k, v (see above)    lora_A, dropout       3·T·h·(a + m) with dropout
A outputs of the 7 targets            lora_B                7·T·r·a
q, k after RoPE (new tensors)         SDPA                  T·(q + k)·p
v (the v_proj output, a view)         SDPA                  T·k·p
attention output                      SDPA, o_proj's A      T·q·p
log-sum-exp                           SDPA                  T·n_q·4
LoRA input of o_proj                  lora_A, dropout       T·q·(a + m) with dropout
x + attn, float32                     post_attention_ln     T·h·4 + T·4
LoRA inputs of gate, up               lora_A, dropout       2·T·h·(a + m) with dropout
g = gate(x)                           silu                  T·i·p
silu(g), up(x)                        the SwiGLU product    2·T·i·p (T·i·p: up(x) only, in
                                                            `SwiGLUMLP`, which recomputes
                                                            silu(g) in backward)
LoRA input of down_proj               lora_A, dropout       T·i·(a + m) with dropout
====================================  ====================  ===================================

RoPE saves only cos and sin (computed once per forward, [s, d]·p each, shared by all layers):
``q·cos + rotate_half(q)·sin`` multiplies by constants. Without dropout and with p = a,
the LoRA inputs collapse into three shared tensors (the two norm outputs T·h·p and the
SwiGLU product T·i·p). The first layer is cheaper: its input (the frozen embedding's
output) needs no gradient, so its norm saves nothing and its q/k/v dropouts keep no mask.

3. Full fine-tuning
-------------------
Every weight trains, so every Linear saves its input (the two norm outputs, the attention
output, the SwiGLU product: shared as above), each RMSNorm additionally saves its normalized
input for the weight gradient (T·h·p), there is no LoRA term, the embedding saves the token
ids and the output head saves the final norm output (T·h·p).

4. Gradient checkpointing
-------------------------
A checkpointed layer keeps only its input, T·h·p, and recomputes its activations during
backward. Live at the worst moment: one input per layer plus one layer's full activations
(§2; minus its input when p = 4, which *is* the kept checkpoint) while that layer's
backward runs.

5. The loss head
----------------
transformers computes ``logits = lm_head(norm(x))`` for all T tokens, upcasts them to
float32 and calls ``cross_entropy``: ``log_softmax`` saves its float32 output [T, V]·4. The
peak comes at the start of backward: ``nll_loss`` backward writes a dense [T, V] float32
gradient, and ``log_softmax``'s backward writes another while its saved output is still
alive - three [T, V] float32 tensors, 12·T·V bytes. (The logits themselves are gone by
then unless the caller holds the model output; keeping ``out = model(...)`` alive adds
T·V·p.) A chunked loss (our trainer) never forms them: it keeps the final hidden state
[T, h]·p and works on C tokens at a time, 3·C·V·4 bytes at its peak.

6. The peak
-----------
Backward frees saved tensors layer by layer, so the peak is the larger of two moments:

* loss backward: all saved layer activations (or the checkpoints) + the final norm's saves +
  the loss peak of §5;
* layer backward: the saved activations (or checkpoints + one recomputed layer) + the
  layer's backward working memory ("overhead"): the incoming gradient [T, h]·p and the two
  gradients of down_proj's input before they are summed, [T, i]·p from the frozen base and
  [T, i]·a from the adapter. This term is read off the order of the backward ops, not
  derived for every moment; against the allocator's own peak (``torch.profiler`` memory
  events) on SmolLM2-sized layers it is within 1 MiB. It is a small fraction of a layer.

The breakdown reports the terms at the larger moment. Gradients and optimizer states are
added in full: with a fused/per-tensor optimizer (no whole-model temporaries) and gradients
kept between steps this is exact; when gradients are freed between steps
(``zero_grad(set_to_none=True)``) it is an upper bound by the gradient bytes.

7. Parameters, gradients, optimizer states
------------------------------------------
* weights: the frozen base as stored. ``full-amp``: float32 master weights plus a 16-bit copy
  (6 B/param). ``full-16`` and ``lora-16``: 2 B/param. ``qlora-k``: every linear layer but
  the output head in k-bit blockwise storage, all scales and codebooks included - the bytes
  per element and per layer come from `qlora.quant.quantize` itself (NF4 + double
  quantization at blocksize 64: 4.127 bits/param); embeddings, norms and the output head stay
  16-bit. For an ``nn.Module`` the frozen tensors are counted at the dtype they have.
* adapters: r·(in + out) float32 parameters per adapted linear layer (all linear layers but
  the head; every expert's for MoE).
* gradients: one per trainable parameter in its dtype (float32 adapters and AMP master
  weights, 16-bit for ``full-16``).
* optimizer: ``adamw`` two states in the parameter's dtype (8 B/param for float32);
  ``adamw8bit`` two 8-bit states with a float32 absmax per 256 values (2.03 B/param);
  ``sgd`` none; ``paged_*`` the same bytes, but in CUDA unified memory that is evicted to
  the host under pressure, so they are reported as off-device and not in the total.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from qlora.dtypes import dtype_bytes
from qlora.memory.shapes import Attention, ComputeDtype, Device, Method, ModelShape


@dataclass(frozen=True)
class SavedTensor:
    """One tensor alive between forward and backward (or at the peak of backward).

    Attributes:
        name: what it is.
        saved_by: the op(s) that keep it.
        shape: symbolic shape and element size, e.g. "[T, h]·4".
        nbytes: bytes.
    """

    name: str
    saved_by: str
    shape: str
    nbytes: int


class _Saved:
    """Collects SavedTensor entries; a shared tensor (key) is counted once."""

    def __init__(self) -> None:
        self.items: list[SavedTensor] = []
        self._keys: set[str] = set()

    def add(self, name: str, saved_by: str, shape: str, nbytes: int, key: str = "") -> None:
        if key:
            if key in self._keys:
                return
            self._keys.add(key)
        self.items.append(SavedTensor(name, saved_by, shape, int(nbytes)))


@dataclass(frozen=True)
class _Run:
    """Settings the activation derivation depends on."""

    tokens: int
    seq_len: int
    batch: int
    lora: bool  # False: full fine-tuning
    rank: int
    dropout: bool
    p: int  # compute dtype bytes
    a: int  # adapter dtype bytes
    m: int  # dropout mask bytes
    attention: str
    fused: bool = False  # LoRALinear's fused CPU path: dropout regenerated, x saved once
    fused_mlp: bool = False  # qlora.nn.swiglu.SwiGLUMLP: g and up(x) saved, silu(g) is not


def layer_saved_tensors(
    shape: ModelShape,
    *,
    batch: int,
    seq_len: int,
    method: Method = "qlora-4",
    rank: int = 16,
    lora_dropout: float = 0.05,
    compute_dtype: ComputeDtype = "bfloat16",
    device: Device = "cuda",
    attention: Attention = "sdpa",
    input_requires_grad: bool = True,
    fused_mlp: bool = False,
) -> list[SavedTensor]:
    """The tensors one decoder layer saves for backward (module docstring §2-§3).

    Args:
        shape: the architecture.
        batch, seq_len: T = batch·seq_len tokens.
        method: full fine-tuning or (Q)LoRA (which tensors need gradients).
        rank, lora_dropout: the adapters (ignored for full fine-tuning).
        compute_dtype, device: element sizes of activations and dropout masks.
        attention: "sdpa" (flash-style kernels) or "eager".
        input_requires_grad: False for the first layer under LoRA without checkpointing.
        fused_mlp: the MLP is our `SwiGLUMLP` (what `load_model` builds for Llama, Mistral,
            Qwen2 and Qwen3), which keeps silu(g) out of the saved tensors.
    """
    run = _make_run(
        batch, seq_len, method, rank, lora_dropout, compute_dtype, device, attention, fused_mlp
    )
    return _layer(shape, run, input_requires_grad).items


def _make_run(
    batch: int,
    seq_len: int,
    method: str,
    rank: int,
    lora_dropout: float,
    compute_dtype: str,
    device: str,
    attention: str,
    fused_mlp: bool = False,
) -> _Run:
    lora = not method.startswith("full")
    adapter_bytes = 4
    return _Run(
        tokens=batch * seq_len,
        seq_len=seq_len,
        batch=batch,
        lora=lora,
        rank=rank,
        dropout=lora and lora_dropout > 0,
        p=dtype_bytes(compute_dtype),
        a=adapter_bytes,
        # CUDA's fused dropout keeps a bool mask; the CPU fallback a noise tensor of the
        # (float32, adapter-dtype) input's dtype.
        m=1 if device == "cuda" else adapter_bytes,
        attention=attention,
        # float32 on the CPU runs qlora.nn.lora_fused (when its C kernel is built): dropout
        # is regenerated from seeds in backward, so only x itself is kept, shared.
        fused=lora and device == "cpu" and compute_dtype == "float32" and _fused_available(),
        fused_mlp=fused_mlp,
    )


def _fused_available() -> bool:
    from qlora.kernels import c_extension

    return c_extension("ops") is not None


def _linear_input(
    saved: _Saved,
    run: _Run,
    target: str,
    n_in: int,
    tokens: int,
    x_key: str,
    x_name: str,
    x_requires_grad: bool = True,
) -> None:
    """What one linear layer keeps of its input x [tokens, n_in] (module docstring §2-§3)."""
    dims = "T·K" if tokens != run.tokens else "T"
    if not run.lora:  # the weight trains: x is saved (shared by all readers of x)
        saved.add(
            x_name,
            f"{target} (weight grad)",
            f"[{dims}, {n_in}]·{run.p}",
            tokens * n_in * run.p,
            key=x_key,
        )
        return
    if run.dropout and not run.fused:
        if x_requires_grad:
            saved.add(
                f"{target} dropout mask",
                f"{target} dropout",
                f"[{dims}, {n_in}]·{run.m}",
                tokens * n_in * run.m,
            )
        saved.add(
            f"{target} dropout output",
            f"{target} lora_A",
            f"[{dims}, {n_in}]·{run.a}",
            tokens * n_in * run.a,
        )
    elif run.p != run.a:  # LoRALinear casts x to the adapter dtype, one copy per target
        saved.add(
            f"{target} input cast to float32",
            f"{target} lora_A",
            f"[{dims}, {n_in}]·{run.a}",
            tokens * n_in * run.a,
        )
    else:
        saved.add(
            x_name,
            f"{target} lora_A",
            f"[{dims}, {n_in}]·{run.p}",
            tokens * n_in * run.p,
            key=x_key,
        )
    saved.add(
        f"{target} lora_A output",
        f"{target} lora_B",
        f"[{dims}, r]·{run.a}",
        tokens * run.rank * run.a,
    )


def _layer(shape: ModelShape, run: _Run, input_requires_grad: bool) -> _Saved:
    """Saved tensors of one decoder layer; see the module docstring for the derivation."""
    saved = _Saved()
    t, h, i, p = run.tokens, shape.hidden, shape.intermediate, run.p
    qd, kd = shape.q_dim, shape.kv_dim
    full = not run.lora

    # input_layernorm: x.to(float32) (the stream itself when p = 4) is saved by pow and by
    # the normalizing mul; rsqrt saves its output. Nothing if x needs no gradient.
    if input_requires_grad:
        saved.add("input_layernorm: x in float32", "pow, mul", "[T, h]·4", t * h * 4)
        saved.add("input_layernorm: rsqrt", "mul", "[T, 1]·4", t * 4)
    if full:  # the norm weight trains: weight * normed saves normed
        saved.add("input_layernorm: normed", "weight mul", f"[T, h]·{p}", t * h * p)
    for proj in ("q_proj", "k_proj", "v_proj"):
        _linear_input(
            saved,
            run,
            proj,
            h,
            t,
            "n1",
            "input_layernorm output",
            x_requires_grad=input_requires_grad,
        )

    # attention: RoPE saves only the shared cos/sin; the kernel saves q, k, v, out, lse.
    groups = shape.heads // shape.kv_heads
    if run.attention == "eager":
        k_saved = qd if groups > 1 else kd  # repeat_kv copies
        saved.add("q after RoPE", "q @ kᵀ", f"[T, q]·{p}", t * qd * p)
        saved.add("k after RoPE (repeated to n_q heads)", "q @ kᵀ", "[T, q or k]", t * k_saved * p)
        saved.add("v (repeated to n_q heads)", "probs @ v", "[T, q or k]", t * k_saved * p)
        probs = run.batch * shape.heads * run.seq_len * run.seq_len
        saved.add("attention probabilities, float32", "softmax", "[b, n_q, s, s]·4", probs * 4)
        if p != 4:
            saved.add(
                "attention probabilities, compute dtype",
                "probs @ v",
                f"[b, n_q, s, s]·{p}",
                probs * p,
            )
        # The output (a new contiguous tensor) is kept only by o_proj, if at all (below).
    else:
        saved.add("q after RoPE", "SDPA", f"[T, q]·{p}", t * qd * p)
        saved.add("k after RoPE", "SDPA", f"[T, k]·{p}", t * kd * p)
        saved.add("v (v_proj output)", "SDPA", f"[T, k]·{p}", t * kd * p)
        saved.add("attention output", "SDPA", f"[T, q]·{p}", t * qd * p, key="attn")
        saved.add("log-sum-exp", "SDPA", "[b, n_q, s]·4", t * shape.heads * 4)
    _linear_input(saved, run, "o_proj", qd, t, "attn", "attention output")

    # post_attention_layernorm (the residual sum always needs a gradient here)
    saved.add("post_attention_layernorm: x in float32", "pow, mul", "[T, h]·4", t * h * 4)
    saved.add("post_attention_layernorm: rsqrt", "mul", "[T, 1]·4", t * 4)
    if full:
        saved.add("post_attention_layernorm: normed", "weight mul", f"[T, h]·{p}", t * h * p)

    if shape.is_moe:
        _moe_mlp(saved, shape, run)
    else:
        for proj in ("gate_proj", "up_proj"):
            _linear_input(saved, run, proj, h, t, "n2", "post_attention_layernorm output")
        saved.add("g = gate_proj(x)", "silu", f"[T, i]·{p}", t * i * p)
        if not run.fused_mlp:  # SwiGLUMLP recomputes silu(g) in backward
            saved.add("silu(g)", "SwiGLU mul", f"[T, i]·{p}", t * i * p)
        saved.add("up_proj(x)", "SwiGLU mul", f"[T, i]·{p}", t * i * p)
        _linear_input(saved, run, "down_proj", i, t, "prod", "silu(g)·up")
    return saved


def _moe_mlp(saved: _Saved, shape: ModelShape, run: _Run) -> None:
    """Mixtral-style sparse MLP: a router, then K experts per token (derived, not measured).

    Each expert gathers its tokens (``x[idx]``, a copy), runs the SwiGLU MLP on them and
    its output is scaled by the routing weight (a mul that saves both). Over all experts that
    is the dense MLP's tensors for T·K tokens, plus the gathered inputs and outputs.
    """
    t, h, i, p, k = run.tokens, shape.hidden, shape.intermediate, run.p, shape.active_experts
    tk = t * k
    _linear_input(saved, run, "router", h, t, "n2", "post_attention_layernorm output")
    saved.add("router probabilities, float32", "softmax", "[T, E]·4", t * shape.experts * 4)
    for proj in ("gate_proj", "up_proj"):
        _linear_input(saved, run, f"experts' {proj}", h, tk, "gathered", "gathered expert inputs")
    saved.add("g = gate_proj(x)", "silu", f"[T·K, i]·{p}", tk * i * p)
    saved.add("silu(g)", "SwiGLU mul", f"[T·K, i]·{p}", tk * i * p)
    saved.add("up_proj(x)", "SwiGLU mul", f"[T·K, i]·{p}", tk * i * p)
    _linear_input(saved, run, "experts' down_proj", i, tk, "prod", "silu(g)·up")
    saved.add("expert outputs", "routing-weight mul", f"[T·K, h]·{p}", tk * h * p)
    saved.add("routing weights", "routing-weight mul", f"[T·K, 1]·{p}", tk * p)


def _sum(items: Iterable[SavedTensor]) -> int:
    return sum(item.nbytes for item in items)
