"""qlora.optim against its oracles: torch.optim.AdamW (bit for bit, 32-bit state), a
whole-tensor 8-bit reference (bit for bit), bitsandbytes' AdamW8bit (within its quantization
error), and each other (paged == unpaged, any page size, in place or staged)."""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
import torch

from qlora.optim import AdamW8bit, PagedAdamW, PagedAdamW8bit, build_optimizer
from qlora.optim.state8bit import BLOCK, dequantize_state, quantize_state, state_code
from qlora.optim.update import CHUNK, Hyper, update_quantized_state

from ..conftest import requires_cuda

SHAPES = [(300, 700), (17,), (5000,), (96, 64), (4095,), (1, 4097)]


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def _run(make: Callable[[list], torch.optim.Optimizer], steps: int, seed: int = 1) -> list:
    params = _params()
    opt = make(params)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-2
        opt.step()
    return [p.detach() for p in params]


def _groups(params: list) -> list[dict]:  # two groups with their own settings
    return [{"params": params[:3], "lr": 2e-2}, {"params": params[3:], "weight_decay": 0.0}]


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"page_bytes": 1 << 16}, {"page_bytes": 1 << 16, "staged": True}],
    ids=["default-pages", "small-pages", "staged"],
)
def test_paged_adamw_is_torch_adamw_bit_for_bit(tmp_path, kwargs: dict) -> None:
    expected = _run(lambda ps: torch.optim.AdamW(_groups(ps), lr=1e-2, weight_decay=0.1), 50)

    def paged(ps: list) -> PagedAdamW:
        return PagedAdamW(_groups(ps), lr=1e-2, weight_decay=0.1, state_dir=tmp_path, **kwargs)

    got = _run(paged, 50)
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)


def _reference_quantize(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-tensor blockwise quantization to the dynamic map, written out plainly."""
    code = state_code(signed)
    bounds = (code[:-1] + code[1:]) / 2
    n = x.numel()
    absmax, scaled = [], []
    for start in range(0, n, BLOCK):
        block = x[start : start + BLOCK]
        m = block.abs().max()
        if block.numel() == BLOCK:
            scaled.append(torch.clamp(block * (1.0 / m.clamp(min=1e-38)), -1, 1))
        else:  # a short last block divides and keeps the floored scale
            m = m.clamp(min=1e-38)
            scaled.append(torch.clamp(block / m, -1, 1))
        absmax.append(m)
    codes = torch.bucketize(torch.cat(scaled), bounds).to(torch.uint8)
    return codes, torch.stack(absmax)


def _reference_dequantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    return state_code(signed)[codes.long()] * absmax.repeat_interleave(BLOCK)[: codes.numel()]


class ReferenceAdamW8bit:
    """The oracle: one whole tensor at a time, state dequantized → AdamW → requantized.

    For 8-bit moments the square root is the correctly rounded one (via float64): the fused C
    kernel uses the CPU's sqrtss, while torch.sqrt on an MKL build of PyTorch may be 1 ulp
    off. fp32 moments (small tensors) follow torch.optim.AdamW, torch.sqrt included."""

    def __init__(self, params: list, lr: float, weight_decay: float) -> None:
        self.params, self.lr, self.wd = params, lr, weight_decay
        self.state: list[dict] = [{} for _ in params]

    @torch.no_grad()
    def step(self) -> None:
        for p, st in zip(self.params, self.state, strict=True):
            n = p.numel()
            quantized = n >= 4096
            if not st:
                zeros = torch.zeros(n)
                st.update(step=0, m=zeros.clone(), v=zeros.clone())
                if quantized:
                    st["m"], st["am"] = _reference_quantize(zeros, True)
                    st["v"], st["av"] = _reference_quantize(zeros, False)
            st["step"] += 1
            m = _reference_dequantize(st["m"], st["am"], True) if quantized else st["m"]
            v = _reference_dequantize(st["v"], st["av"], False) if quantized else st["v"]
            flat, g = p.view(-1), p.grad.view(-1)
            flat.mul_(1 - self.lr * self.wd)
            m.lerp_(g, 1 - 0.9)
            v.mul_(0.999).addcmul_(g, g, value=1 - 0.999)
            c1, c2 = 1 - 0.9 ** st["step"], 1 - 0.999 ** st["step"]
            root = v.double().sqrt().float() if quantized else v.sqrt()
            flat.addcdiv_(m, (root / c2**0.5).add_(1e-8), value=-self.lr / c1)
            if quantized:
                st["m"], st["am"] = _reference_quantize(m, True)
                st["v"], st["av"] = _reference_quantize(v, False)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps, d: AdamW8bit(ps, lr=1e-2, weight_decay=0.1),
        lambda ps, d: PagedAdamW8bit(ps, lr=1e-2, weight_decay=0.1, state_dir=d),
        lambda ps, d: PagedAdamW8bit(ps, 1e-2, weight_decay=0.1, state_dir=d, page_bytes=1 << 14),
        lambda ps, d: PagedAdamW8bit(ps, 1e-2, weight_decay=0.1, page_bytes=1 << 14, staged=True),
    ],
    ids=["adamw8bit", "paged", "paged-small-pages", "paged-staged"],
)
def test_adamw8bit_matches_the_whole_tensor_reference_bit_for_bit(tmp_path, make) -> None:
    expected = _run(lambda ps: ReferenceAdamW8bit(ps, lr=1e-2, weight_decay=0.1), 20)
    got = _run(lambda ps: make(ps, tmp_path), 20)
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)


def test_fused_kernel_and_pytorch_path_agree() -> None:
    """The PyTorch path (GPUs, 16-bit parameters) against the fused C kernel: the same
    operations except torch.sqrt's last bit, so moments may land one code apart."""
    gen = torch.Generator().manual_seed(0)
    n = 300_000 + 77
    fused = [torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 1e-2]
    codes = [torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)]
    scales = [torch.zeros(-(-n // BLOCK)), torch.zeros(-(-n // BLOCK))]
    fused = [fused[0], fused[1], *codes, *scales]
    slow = [t.clone() for t in fused]
    scratch = torch.empty(2, CHUNK)
    h = Hyper(1e-3, 0.9, 0.999, 1e-8, 0.01)
    for step in range(1, 6):
        before = fused[0].clone()
        update_quantized_state(*fused, step, h, scratch)
        update_quantized_state(*slow, step, h, scratch, reference=True)
        scale = (fused[0] - before).abs().max()
        assert float((fused[0] - slow[0]).abs().max()) <= 1e-3 * float(scale) + 1e-7
        for a, b in zip(fused[2:4], slow[2:4], strict=True):
            assert float((a == b).float().mean()) > 0.999
            assert int((a.int() - b.int()).abs().max()) <= 1
        with torch.no_grad():  # continue both from the same state
            for a, b in zip(slow, fused, strict=True):
                a.copy_(b)


def test_quantize_state_kernel_equals_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    cases = [
        torch.randn(10_000, generator=gen),
        torch.randn(10_000, generator=gen) * torch.logspace(-8, 2, 10_000),  # wide range
        torch.zeros(1000),
        torch.cat([torch.zeros(256), torch.randn(300, generator=gen)]),  # zero block + tail
        torch.rand(777, generator=gen) ** 4,  # unsigned, skewed
    ]
    for x in cases:
        for signed in (True, False):
            if not signed:
                x = x.abs()
            nb = -(-x.numel() // BLOCK)
            fast = torch.empty(x.numel(), dtype=torch.uint8), torch.empty(nb)
            slow = torch.empty(x.numel(), dtype=torch.uint8), torch.empty(nb)
            quantize_state(x, signed, *fast)
            quantize_state(x, signed, *slow, reference=True)
            assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
            oracle = _reference_quantize(x, signed)
            assert torch.equal(fast[0], oracle[0]) and torch.equal(fast[1], oracle[1])
            out = torch.empty(x.numel())
            dequantize_state(*fast, signed, out)
            torch.testing.assert_close(out, _reference_dequantize(*fast, signed), rtol=0, atol=0)


def test_state_is_two_bytes_per_parameter() -> None:
    params = [torch.nn.Parameter(torch.zeros(1024, 1024)), torch.nn.Parameter(torch.zeros(100))]
    eight, full = AdamW8bit(params), PagedAdamW(params)
    n = 1024 * 1024
    assert eight.state_nbytes() == 2 * n + 2 * 4 * (n // 256) + 8 * 100
    assert full.state_nbytes() == 8 * (n + 100)


def _gap(code: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The larger distance from code[idx] to its neighbours."""
    up = code[(idx + 1).clamp(max=255)] - code[idx]
    down = code[idx] - code[(idx - 1).clamp(min=0)]
    return torch.maximum(up, down)


def test_matches_bitsandbytes_adamw8bit_within_its_quantization_error() -> None:
    """Each step starts ours from bitsandbytes' current parameters and 8-bit state; the
    single-step results must agree up to one code of the map."""
    bnb = pytest.importorskip("bitsandbytes")
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 1024, generator=gen)
    theirs_p, ours_p = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    with _quiet():
        theirs = bnb.optim.AdamW8bit([theirs_p], lr=1e-3, weight_decay=0.01)
    ours = AdamW8bit([ours_p], lr=1e-3, weight_decay=0.01)
    ours.state_dict()  # lay out the state
    for step in range(1, 9):
        grad = torch.randn(w.shape, generator=gen)
        with torch.no_grad():
            ours_p.copy_(theirs_p)
        if step > 1:
            st = theirs.state[theirs_p]
            for dst, src in zip(ours._slots[0].tensors,
                                (st["state1"], st["state2"], st["absmax1"], st["absmax2"]),
                                strict=True):  # fmt: skip
                dst.copy_(src.view(-1))
        before = theirs_p.detach().clone()
        theirs_p.grad, ours_p.grad = grad.clone(), grad.clone()
        with _quiet():
            theirs.step()
        ours.step()
        d_theirs, d_ours = theirs_p.detach() - before, ours_p.detach() - before
        # the update reads the fp32 moments of this step (before requantization)
        torch.testing.assert_close(d_ours, d_theirs, rtol=1e-4, atol=5e-7)  # ulps of p
        st, (codes_m, codes_v, am, av) = theirs.state[theirs_p], ours._slots[0].tensors
        for signed, (ours_codes, ours_scale), (their_codes, their_scale) in (
            (True, (codes_m, am), (st["state1"], st["absmax1"])),
            (False, (codes_v, av), (st["state2"], st["absmax2"])),
        ):
            # 1 ulp: bitsandbytes updates m with mul + add, torch and we with lerp
            torch.testing.assert_close(ours_scale, their_scale, rtol=1e-6, atol=0)
            a, b = torch.empty(w.numel()), torch.empty(w.numel())
            dequantize_state(ours_codes, ours_scale, signed, a)
            dequantize_state(their_codes.view(-1), their_scale, signed, b)
            scale = ours_scale.repeat_interleave(BLOCK)
            # one code step of the map (bitsandbytes rounds through a 65536-point grid)
            allowed = (_gap(state_code(signed), ours_codes.long()) + 2 / 65535) * scale
            assert bool(((a - b).abs() <= allowed * 1.0001).all()), (step, signed)
            assert float((ours_codes == their_codes.view(-1)).float().mean()) > 0.95


class _quiet:  # bitsandbytes warns about CPU paths; not our concern here
    def __enter__(self) -> None:
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc: object) -> None:
        self._cm.__exit__(*exc)


def _tiny_lm_losses(optim: str, steps: int) -> list[float]:
    """Full fine-tuning of a tiny Llama on sequences whose next token is the previous one plus
    1, 2, 3 or 4 (mod 64): learnable down to an entropy floor of ln 4 ≈ 1.386 nats."""
    from tests.tiny_models import tiny_llama

    model = tiny_llama(vocab=64, seed=0).train()
    opt = build_optimizer(optim, model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        start = torch.randint(0, 64, (8, 1), generator=gen)
        steps_taken = torch.randint(1, 5, (8, 23), generator=gen)
        ids = torch.cat([start, start + steps_taken.cumsum(1)], dim=1) % 64
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def test_adamw8bit_follows_adamw_loss_curve() -> None:
    torch.manual_seed(0)
    reference = _tiny_lm_losses("adamw", 200)
    eight = _tiny_lm_losses("adamw8bit", 200)
    assert reference[-1] < 0.5 * reference[0]  # it learned (from ln 64 ≈ 4.16)
    tail_ref, tail_8 = sum(reference[-10:]) / 10, sum(eight[-10:]) / 10
    assert abs(tail_8 - tail_ref) <= 0.01 * tail_ref, (tail_ref, tail_8)
    for start in range(0, 200, 20):  # and the whole curve, window by window
        a, b = sum(reference[start : start + 20]), sum(eight[start : start + 20])
        assert abs(a - b) <= 0.02 * a, start


@pytest.mark.parametrize("name", ["adamw8bit", "paged_adamw", "paged_adamw8bit"])
def test_state_dict_round_trip_resumes_exactly(tmp_path, name: str) -> None:
    def make(ps: list) -> torch.optim.Optimizer:
        return build_optimizer(name, ps, lr=1e-2, weight_decay=0.1, page_bytes=1 << 16,
                               state_dir=tmp_path)  # fmt: skip

    expected = _run(make, 10)
    params = _params()
    opt = make(params)
    gen = torch.Generator().manual_seed(1)
    for step in range(10):
        if step == 5:  # save, throw the optimizer away, load into a fresh one
            buffer = io.BytesIO()
            torch.save(opt.state_dict(), buffer)
            del opt
            opt = make(params)
            buffer.seek(0)
            opt.load_state_dict(torch.load(buffer, weights_only=False))
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-2
        opt.step()
    for a, b in zip(expected, params, strict=True):
        assert torch.equal(a, b.detach())


def test_torch_adamw_state_loads_into_paged_adamw_and_back(tmp_path) -> None:
    expected = _run(lambda ps: torch.optim.AdamW(ps, lr=1e-2), 8)
    params = _params()
    opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for step in range(8):
        if step in (3, 6):  # switch torch -> paged, then paged -> torch
            state = opt.state_dict()
            if isinstance(opt, PagedAdamW):
                state = {"state": {i: {k: v.clone() for k, v in s.items()}
                                   for i, s in state["state"].items()},
                         "param_groups": state["param_groups"]}  # fmt: skip
                opt = torch.optim.AdamW(params, lr=1e-2)
            else:
                opt = PagedAdamW(params, lr=1e-2, state_dir=tmp_path)
            opt.load_state_dict(state)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-2
        opt.step()
    for a, b in zip(expected, params, strict=True):
        assert torch.equal(a, b.detach())


def test_8bit_and_32bit_states_convert(tmp_path) -> None:
    params = _params()
    full = PagedAdamW(params, lr=1e-2, state_dir=tmp_path)
    for p in params:
        p.grad = torch.ones_like(p)
    full.step()
    eight = AdamW8bit(params, lr=1e-2)
    eight.load_state_dict(full.state_dict())
    back = PagedAdamW(params, lr=1e-2, state_dir=tmp_path)
    back.load_state_dict(eight.state_dict())
    for slot_full, slot_back in zip(full._slots, back._slots, strict=True):
        for a, b in zip(slot_full.tensors, slot_back.tensors, strict=True):
            torch.testing.assert_close(b, a, rtol=0.02, atol=1e-9)  # within 8-bit error
        assert slot_back.step == 1


def test_errors_name_the_culprit(tmp_path) -> None:
    params = _params()
    opt = AdamW8bit(params)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    with pytest.raises(RuntimeError, match="add parameter groups before the first step"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
    with pytest.raises(ValueError, match="has 6 parameters, this optimizer's 2"):
        AdamW8bit(params[:2]).load_state_dict(opt.state_dict())
    strided = torch.nn.Parameter(torch.zeros(8, 8).t())
    with pytest.raises(ValueError, match=r"contiguous.*shape \(8, 8\)"):
        AdamW8bit([strided]).state_dict()
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(OSError, match="cannot create the paged optimizer state file"):
        PagedAdamW([torch.nn.Parameter(torch.zeros(10))], state_dir=blocked / "sub").state_dict()
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        build_optimizer("sgd", params, lr=1.0, weight_decay=0.0)


def _run_cuda(make: Callable[[list], torch.optim.Optimizer], steps: int) -> list:
    """`_run` with the parameters and gradients on the GPU (the same values)."""
    params = [torch.nn.Parameter(p.detach().cuda()) for p in _params()]
    opt = make(params)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).cuda()
        opt.step()
    return [p.detach().cpu() for p in params]


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("state_dir", [False, True], ids=["pinned-host", "file"])
def test_paged_optimizers_on_cuda_equal_unpaged(tmp_path, state_dir: bool) -> None:
    """The staged path on a GPU (two device page buffers, a copy stream overlapping the
    updates) changes nothing: element-wise updates on the same device give the same bits."""
    where = {"state_dir": tmp_path} if state_dir else {}
    small = {"page_bytes": 1 << 16, **where}  # many pages: every buffer swap is exercised
    expected = _run_cuda(lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False), 12)
    got = _run_cuda(lambda ps: PagedAdamW(ps, lr=1e-2, **small), 12)
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)
    expected = _run_cuda(lambda ps: AdamW8bit(ps, lr=1e-2), 12)
    got = _run_cuda(lambda ps: PagedAdamW8bit(ps, lr=1e-2, **small), 12)
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)
