"""Measure the resident memory an optimizer's state adds, in a fresh process:

    python -m tests.optim.rss_child OPTIM STATE_DIR PAGE_BYTES

Prints one JSON line: the peak RSS growth over three steps (VmHWM, reset just before them via
/proc/self/clear_refs) and the optimizer's state bytes.
"""

from __future__ import annotations

import json
import sys

import torch

from qlora.optim import build_optimizer
from qlora.procinfo import peak_rss_bytes, reset_peak_rss, rss_bytes


def main() -> None:
    name, state_dir, page_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(1)
    params = [torch.nn.Parameter(torch.randn(2048, 2048)) for _ in range(4)]  # 16.8M, 64 MiB
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = build_optimizer(name, params, lr=1e-3, weight_decay=0.0, page_bytes=page_bytes,
                          state_dir=state_dir)  # fmt: skip
    scratch = torch.empty(8 << 20, dtype=torch.uint8)  # warm the allocator's small paths
    del scratch
    before = rss_bytes()
    reset_peak_rss()  # VmHWM restarts from the current RSS
    for _ in range(3):
        opt.step()
    peak = peak_rss_bytes()
    state = opt.state_nbytes() if hasattr(opt, "state_nbytes") else sum(
        t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
        if torch.is_tensor(t) and t.dim() > 0
    )  # fmt: skip
    resident = opt.resident_state_bytes() if hasattr(opt, "resident_state_bytes") else state
    print(json.dumps({"peak_growth": peak - before, "state_bytes": state, "resident": resident}))


if __name__ == "__main__":
    main()
