"""`add_lora` for a model that is still loading: adapters drawn first, attached layer by layer.

FSDP shards each decoder layer as soon as it has loaded (`qlora.train.fsdp.ShardWhileLoading`),
so no rank ever holds the whole base. A layer's adapters must be in it before it is
sharded, but `add_lora` on the finished model draws every adapter's initialization in
module order, and the layers finish loading in the checkpoint's order (lexicographic:
``layers.0, layers.1, layers.10, ...``). `StagedLora` keeps `add_lora`'s result exact: it
draws all the adapters up front, from the meta-device skeleton, in module order and with the
same calls (`LoRALinear.add_adapter` on a stand-in of the layer's shape and device), and
`attach` later moves each one onto its loaded base. The same seed therefore gives the same
adapters as ``load_model`` then ``add_lora``, bit for bit, whatever order the layers load in.
"""

from __future__ import annotations

import torch
from torch import nn

from qlora.config import LoraConfig
from qlora.nn.inject import (
    _freeze_all_but_lora,
    activate_lora,
    add_configured_adapter,
    find_targets,
    replace_module,
    set_adapter,
)
from qlora.nn.lora import LoRALinear

__all__ = ["StagedLora"]


class _Shape(nn.Module):
    """A stand-in base layer: a Linear's shape and device, no weight."""

    def __init__(self, in_features: int, out_features: int, device: torch.device) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("where", torch.empty(0, device=device), persistent=False)


class StagedLora:
    """The adapters `add_lora` would add to ``skeleton`` (a meta-device model), drawn now.

    Args:
        skeleton: the model's architecture (meta tensors are fine: only shapes are read).
        config: the LoRA config, as for `add_lora` (init "kaiming" or "gaussian").
        device: where the adapters live (the device the model loads onto).
        adapter_name: as for `add_lora`.
    """

    def __init__(
        self,
        skeleton: nn.Module,
        config: LoraConfig,
        device: torch.device,
        adapter_name: str = "default",
    ) -> None:
        if config.bias != "none":
            raise ValueError(f"lora.bias={config.bias!r} is not supported; only 'none'")
        if config.init not in ("kaiming", "gaussian") or config.use_dora:
            what = "lora.use_dora" if config.use_dora else f"lora.init={config.init!r}"
            raise ValueError(f"{what} needs the base weights: it cannot be drawn before loading")
        self.config, self.adapter_name = config, adapter_name
        self.pending: dict[str, LoRALinear] = {}
        for name in find_targets(skeleton, config.target_modules, config.exclude_modules):
            base = skeleton.get_submodule(name)
            layer = LoRALinear(_Shape(base.in_features, base.out_features, device))
            add_configured_adapter(layer, adapter_name, config)
            self.pending[name] = layer

    def attach(self, block: nn.Module, prefix: str) -> None:
        """Wrap the targets inside ``block`` (the module at ``prefix`` in the model) with
        their adapters, freeze the block's other parameters and activate the adapter."""
        self._wrap(block, [n for n in self.pending if n.startswith(prefix + ".")], prefix + ".")
        _freeze_all_but_lora(block)
        set_adapter(block, self.adapter_name)

    def finish(self, model: nn.Module) -> nn.Module:
        """Attach what is left (targets outside the attached blocks) and end as `add_lora`
        does: all but the adapters frozen, the adapter active, the config recorded."""
        self._wrap(model, list(self.pending), "")
        return activate_lora(model, self.adapter_name, self.config)

    def _wrap(self, root: nn.Module, names: list[str], prefix: str) -> None:
        for name in names:
            relative = name.removeprefix(prefix)
            base = root.get_submodule(relative)
            layer = self.pending.pop(name)
            layer.base_layer = base
            layer.train(base.training)
            replace_module(root, relative, layer)
