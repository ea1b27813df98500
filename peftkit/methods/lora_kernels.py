"""LoRA's training kernels: y = x W^T + b + s (x A^T) B^T (and DoRA's form) as autograd Functions with hand-written
backward passes, for a frozen nn.Linear. The autograd graph of the same formulas keeps and re-reads more (N, ...)
buffers; these save only what the backward needs. LoraLinear.forward picks them when nothing else is in play
(one active adapter, no hooks, no autocast, no mixed batch). Tests: tests/test_lora_layers.py.
"""
from __future__ import annotations

import os

import torch


def _onednn_linear_op():
    """torch's oneDNN fp32 linear (the op its CPU compiler emits), or None where this build lacks it, it is
    turned off (PEFTKIT_ONEDNN=0), or a one-off check on a small product disagrees with torch.mm."""
    if os.environ.get("PEFTKIT_ONEDNN", "1") == "0" or not torch.backends.mkldnn.is_available():
        return None
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None:
        return None
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=gen), torch.randn(3, 7, generator=gen)
    try:
        ok = torch.allclose(op(a, b.t().contiguous().t(), None, "none", [], ""), a @ b.t(), atol=1e-5)
    except RuntimeError:
        return None
    return op if ok else None


_ONEDNN = _onednn_linear_op()


def uses_onednn(a: torch.Tensor, b: torch.Tensor, fast: bool = True) -> bool:
    """Whether ``linear(a, b, fast=fast)`` runs on oneDNN (float32 on CPU, see ``linear``). Not while torch.compile
    traces: inductor lowers this op only for a weight it holds as a frozen constant, which the adapter's is not."""
    return (fast and _ONEDNN is not None and a.dtype == torch.float32 and a.device.type == "cpu" and a.numel() > 0
            and b.numel() > 0 and torch.backends.mkldnn.enabled and not torch.compiler.is_compiling())


def linear(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, fast: bool = True,
           alpha: float = 1.0, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """alpha a @ b^T (+ bias) for 2-D a (N, k) and b (m, k), either of them possibly a transposed view, returned
    in ``out_dtype`` (default: a's).

    With ``fast``, float32 on CPU runs through oneDNN (unless torch.backends.mkldnn.enabled is False): torch's
    own fp32 matmul calls MKL's sgemm, which on AMD CPUs runs at under half of oneDNN's speed (measured on an
    EPYC: 576x576 weight, 512 rows, 1.59 ms vs 0.73 ms; bench/kernels.py). The kernels pass fast=False with grad mode off
    (torch.no_grad, inference_mode), so inference there rounds exactly as the base model's own nn.Linear
    does (B = 0 changes no bit of the output); a forward with grad mode on takes oneDNN whatever requires
    grad, so one model's outputs depend on grad mode only. Also fast=False inside a backward that builds a
    graph (create_graph=True): oneDNN's op has no derivative, torch's matmul has.

    Elsewhere alpha is the GEMM's own (addmm with beta = 0), and a float32 ``out_dtype`` for bf16/fp16 inputs
    is the GEMM's output type where torch has that on the device (CUDA): one kernel each, not a GEMM and a
    scale or a cast, which on a GPU is what a rank-r product costs (launch-bound). Where it lacks that, float16
    inputs with a float32 ``out_dtype`` are multiplied in float32 (bfloat16 ones in bfloat16, then cast: its
    range is float32's).
    """
    if bias is not None and alpha != 1:
        raise ValueError("linear: alpha scales a @ b^T only; add a bias after scaling")
    if (out_dtype == torch.float32 and a.dtype == torch.float16
            and not (fast and alpha == 1 and _has_out_dtype_mm(a.device, a.dtype, out_dtype))):
        # a weight gradient sums over every token, past float16's range (65,504) well before the activations'
        # gradients do (under a GradScaler's loss scale): float32 operands where no float32-output GEMM exists
        a, b = a.float(), b.float()
    if uses_onednn(a, b, fast):
        out = _ONEDNN(a, b, bias, "none", [], "")
        out = out.mul_(alpha) if alpha != 1 else out
    elif bias is not None:
        out = torch.addmm(bias, a, b.t())
    elif (fast and out_dtype not in (None, a.dtype) and alpha == 1  # fast=False: a graph is built, and mm's
          and _has_out_dtype_mm(a.device, a.dtype, out_dtype)):   # out_dtype overload has no derivative
        return torch.mm(a, b.t(), out_dtype=out_dtype)
    elif alpha != 1:
        out = torch.addmm(a.new_empty(()), a, b.t(), beta=0, alpha=alpha)  # beta = 0: the input is never read
    else:
        out = a @ b.t()
    return out if out_dtype in (None, out.dtype) else out.to(out_dtype)


_OUT_DTYPE_MM: dict = {}


def _has_out_dtype_mm(device: torch.device, dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """Whether torch.mm(..., out_dtype=out_dtype) runs for ``dtype`` inputs on ``device`` (bf16/fp16 -> float32 on
    CUDA in recent torch): tried once per (device, dtypes) on a small product, checked against float32. Not
    during CUDA graph capture (the check synchronises): there the answer is no, and it is not remembered."""
    if device.type != "cuda" or out_dtype != torch.float32 or dtype not in (torch.bfloat16, torch.float16):
        return False
    key = (device, dtype, out_dtype)
    if key not in _OUT_DTYPE_MM:
        if torch.cuda.is_current_stream_capturing():
            return False
        _OUT_DTYPE_MM[key] = _try_out_dtype_mm(device, dtype, out_dtype)
    return _OUT_DTYPE_MM[key]


def _try_out_dtype_mm(device: torch.device, dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """One small torch.mm(out_dtype=...) on ``device`` against the same product in ``out_dtype``, autocast off."""
    with torch.autocast(device.type, enabled=False):
        try:
            gen = torch.Generator(device=device).manual_seed(0)
            a = torch.randn(8, 32, device=device, generator=gen).to(dtype)
            b = torch.randn(32, 4, device=device, generator=gen).to(dtype)
            got = torch.mm(a, b, out_dtype=out_dtype)
            return got.dtype == out_dtype and torch.allclose(got, a.to(out_dtype) @ b.to(out_dtype), atol=1e-3, rtol=1e-3)
        except (RuntimeError, TypeError, NotImplementedError):
            return False


def compute_dtype(activations: torch.dtype, adapter: torch.dtype) -> torch.dtype:
    """The dtype the adapter's matmuls run in on the plain (autograd) path: the activations' for float32 adapters
    over bf16 activations (as torch.autocast would; upcasting the (N, in) activations instead costs a float32 copy
    of them, saved for backward, and float32 matmuls), else the adapter's own. Not for float16 activations, as in
    PEFT: autograd's A and B gradients would come out of float16 GEMMs, whose sum over every token overflows
    (the fused kernels keep float16 GEMMs and take those two gradients in float32, lora_kernels.linear)."""
    if activations == torch.bfloat16 and adapter == torch.float32:
        return activations
    return adapter


def compute_factors(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B in ``compute_dtype`` for the activations ``x``."""
    dtype = compute_dtype(x.dtype, a.dtype)
    return a.to(dtype), b.to(dtype)


def base_plus(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, h: torch.Tensor, b: torch.Tensor,
              fast: bool, alpha: float = 1.0) -> torch.Tensor:
    """x W^T (+ bias) + alpha h B^T, (N, out), in one buffer, for x (N, in), W (out, in), h (N, r), B (out, r).

    (Running the base GEMM last instead, onto the adapter's product as its C, measured level on an H200 and
    rounded bf16 on a CPU further from PEFT's float32 adapter: not kept.)"""
    return linear(x, weight, bias, fast).addmm_(h, b.t(), alpha=alpha)


def grad_plus(g: torch.Tensor, weight: torch.Tensor, gh: torch.Tensor, a: torch.Tensor, fast: bool) -> torch.Tensor:
    """g W + g_h A, (N, in): the base's and the adapter's input gradients in one buffer."""
    return linear(g, weight.t(), fast=fast).addmm_(gh, a)


def _prescaled(dtype: torch.dtype) -> bool:
    """Whether the kernels keep h = s x A^T (the scale applied once, on the narrow side) rather than x A^T with s
    applied in the GEMMs that read h: not in float16, whose range s times an outlier activation can overflow."""
    return dtype != torch.float16


class FusedLoraLinear(torch.autograd.Function):
    """y = x W^T + b + s (xd A^T) B^T for a frozen W, in one output buffer.

    Backward writes the base and the LoRA input gradients into one buffer too (g W + (s g B) A), so
    the adapter costs its four rank-r matmuls and nothing else. xd is None when there is no dropout.
    With a bf16/fp16 base and float32 adapters, A and B are cast to the activations' dtype and the
    four matmuls run there (fp32 accumulation), as torch.autocast would; A's and B's gradients are
    returned in float32. Casting the (N, in) activations up instead, as PEFT does, costs a full extra
    pass over them and float32 matmuls. Under create_graph=True the backward recomputes its intermediates from
    the inputs with torch's differentiable ops, so the gradients it returns carry a graph (second derivatives).
    """

    @staticmethod
    def forward(ctx, x, xd, weight, bias, a, b, s, fast):
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        xd2 = x2 if xd is None else xd.reshape(-1, xd.shape[-1])
        ac, bc = a.to(x.dtype), b.to(x.dtype)  # no-ops unless the adapters are float32 over a bf16 base
        pre = _prescaled(x.dtype)
        h = linear(xd2, ac, fast=fast, alpha=s if pre else 1.0)  # (s) xd A^T, (N, r)
        y = base_plus(x2, weight, bias, h, bc, fast, alpha=1.0 if pre else s)  # (N, out)
        # the input itself (not its reshape, made without a graph) and the parameters: for a backward with a graph
        ctx.save_for_backward(x if xd is None else xd, weight, a, b, ac, bc, h)
        ctx.s, ctx.pre, ctx.x_shape, ctx.dropped = s, pre, x.shape, xd is not None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, g):
        xd, weight, a_in, b_in, a, b, h = ctx.saved_tensors
        xd2 = xd.reshape(-1, xd.shape[-1])
        need_x, need_xd, _, need_bias, need_a, need_b, _, _ = ctx.needs_input_grad
        fast = not torch.is_grad_enabled()  # grad mode is on here only under create_graph=True
        if not fast:  # the casts and h were made without a graph: again, from the inputs, for second-order terms
            a, b = a_in.to(xd2.dtype), b_in.to(xd2.dtype)
            h = linear(xd2, a, fast=False, alpha=ctx.s if ctx.pre else 1.0)
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        gh = linear(g2, b.t(), fast=fast, alpha=ctx.s)  # s g B, (N, r)
        # A's and B's gradients come back in the parameters' own dtype (float32 adapters over a bf16 base)
        ga = linear(gh.t(), xd2.t(), fast=fast, out_dtype=a_in.dtype) if need_a else None  # (r, in)
        gb = _b_grad(g2, h, fast, b_in.dtype, 1.0 if ctx.pre else ctx.s) if need_b else None  # (out, r)
        gx = gxd = None
        if need_x:
            gx = linear(g2, weight.t(), fast=fast) if ctx.dropped else grad_plus(g2, weight, gh, a, fast)  # (N, in)
            gx = gx.view(ctx.x_shape)
        if ctx.dropped and need_xd:
            gxd = linear(gh, a.t(), fast=fast).view(ctx.x_shape)
        gbias = g2.sum(0) if need_bias else None
        return gx, gxd, None, gbias, ga, gb, None, None


def _b_grad(g2: torch.Tensor, h: torch.Tensor, fast: bool, dtype: torch.dtype, s: float) -> torch.Tensor:
    """B's gradient s g^T h, (out, r), for the output gradient g2 (N, out) and the saved h (N, r), in ``dtype``.
    oneDNN runs it fastest as (h^T g)^T; elsewhere g^T h is the contiguous (out, r) that .grad takes without a copy."""
    if uses_onednn(h, g2, fast):
        gb = linear(h.t(), g2.t(), fast=fast, out_dtype=dtype).t()
    else:
        gb = linear(g2.t(), h.t(), fast=fast, out_dtype=dtype)
    return gb * s if s != 1 else gb


class FusedDoraLinear(torch.autograd.Function):
    """DoRA (Liu et al. 2024, Eq. 5) for a frozen W: y = (x W^T + s (x A^T) B^T) * m / n + b, where the row norms
    n = ||W + sBA|| are a constant in backprop (Sec. 4.3). Saves one (N, out) buffer, t = x W^T + s x A^T B^T;
    the autograd graph of the same formula keeps W x, t and the scaled output, and walks each of them again.
    No dropout (with dropout the plain path runs PEFT's form). Under create_graph=True the backward recomputes
    its intermediates from the inputs, as LoRA's does.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, m, norm, s, fast):
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        ac, bc = a.to(x.dtype), b.to(x.dtype)  # float32 adapters over a bf16 base run in bf16, as in LoRA's kernel
        pre = _prescaled(x.dtype)
        h = linear(x2, ac, fast=fast, alpha=s if pre else 1.0)  # (s) x A^T, (N, r)
        t = base_plus(x2, weight, None, h, bc, fast, alpha=1.0 if pre else s)  # (N, out)
        # m / n in float32, stored in the activations' dtype by the same kernel
        # (the norm is float32 also for a model cast whole to bf16 / fp16: m / n would be float32, and so y)
        scale = m / norm if m.dtype == norm.dtype == x.dtype else torch.div(m, norm, out=m.new_empty(m.shape, dtype=x.dtype))
        y = torch.addcmul(bias, t, scale) if bias is not None else t * scale
        ctx.save_for_backward(x, weight, a, b, m, norm, ac, bc, h, t, scale)  # x, a, b, m: for a backward with a graph
        ctx.s, ctx.pre, ctx.x_shape = s, pre, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, g):
        x, weight, a_in, b_in, m, norm, a, b, h, t, scale = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        need_x, _, need_bias, need_a, need_b, need_m, _, _, _ = ctx.needs_input_grad
        fast = not torch.is_grad_enabled()  # grad mode is on here only under create_graph=True
        if not fast:  # the casts, h, t and m / n were made without a graph: again, from the inputs
            a, b = a_in.to(x2.dtype), b_in.to(x2.dtype)
            h = linear(x2, a, fast=False, alpha=ctx.s if ctx.pre else 1.0)
            t = linear(x2, weight, fast=False) + linear(h, b, fast=False, alpha=1.0 if ctx.pre else ctx.s)
            scale = (m / norm).to(x2.dtype)
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        gs = g2 * scale  # dL/dt, (N, out)
        gh = linear(gs, b.t(), fast=fast, alpha=ctx.s)  # (N, r)
        ga = linear(gh.t(), x2.t(), fast=fast, out_dtype=a_in.dtype) if need_a else None  # (r, in)
        gb = _b_grad(gs, h, fast, b_in.dtype, 1.0 if ctx.pre else ctx.s) if need_b else None  # (out, r)
        gx = grad_plus(gs, weight, gh, a, fast).view(ctx.x_shape) if need_x else None
        # dy/dm = t / n, (out,), summed in float32 at least; in float32 throughout for float16, whose range the
        # products g t can pass under a GradScaler's loss scale
        gm = None
        if need_m:
            gt = g2.float() * t if g2.dtype == torch.float16 else g2 * t
            gm = torch.sum(gt, 0, dtype=torch.promote_types(g2.dtype, torch.float32)) / norm
        gbias = g2.sum(0) if need_bias else None
        return gx, None, gbias, ga, gb, gm, None, None, None
