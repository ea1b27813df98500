"""LoRA layer maths: the fused training kernel, DoRA's norm, conv and embedding deltas."""
import pytest
import torch
from torch import nn

from peftkit import LoraConfig, get_peft_model
from peftkit.layers import new_forward_pass


class Net(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.proj = nn.Linear(12, 10, bias=bias)

    def forward(self, x):
        return self.proj(x)


def _grads(model, x, seed):
    model.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    new_forward_pass()
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    named = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), x.grad, named


def _fused_and_plain(model, layer, x):
    """(output, input grad, parameter grads) through the fused kernel, then through the plain autograd path;
    outputs and input grads checked equal here."""
    assert layer._fusable(x) == "default"
    fused = _grads(model, x, seed=11)
    layer.base_layer.register_forward_hook(lambda mod, inp, out: None)  # a hook forces the plain path
    assert layer._fusable(x) is None
    plain = _grads(model, x, seed=11)
    torch.testing.assert_close(fused[0], plain[0])
    torch.testing.assert_close(fused[1], plain[1])
    return fused, plain


@pytest.mark.parametrize("bias_mode, dropout", [("none", 0.0), ("lora_only", 0.0), ("none", 0.3), ("lora_only", 0.3)])
def test_fused_kernel_matches_the_plain_autograd_path(bias_mode, dropout):
    torch.manual_seed(0)
    model = get_peft_model(Net(bias=True), LoraConfig(r=3, lora_alpha=6, target_modules=["proj"],
                                                      lora_dropout=dropout, bias=bias_mode)).train()
    with torch.no_grad():
        model.base_model.proj.lora_B["default"].normal_()
    layer = model.base_model.proj
    x = torch.randn(2, 5, 12)
    fused, plain = _fused_and_plain(model, layer, x)
    assert fused[2].keys() == plain[2].keys() and len(fused[2]) == (3 if bias_mode == "lora_only" else 2)
    for name in fused[2]:
        torch.testing.assert_close(fused[2][name], plain[2][name], msg=name)


@pytest.mark.parametrize("bias", [True, False])
def test_fused_dora_kernel_matches_the_plain_autograd_path(bias):
    torch.manual_seed(0)
    model = get_peft_model(Net(bias=bias), LoraConfig(r=3, lora_alpha=6, target_modules=["proj"], use_dora=True)).train()
    layer = model.base_model.proj
    with torch.no_grad():
        layer.lora_B["default"].normal_()
        layer.lora_magnitude_vector["default"].mul_(torch.linspace(0.5, 1.5, 10))  # m != ||W + sBA||
    x = torch.randn(2, 5, 12)
    fused, plain = _fused_and_plain(model, layer, x)
    assert fused[2].keys() == plain[2].keys() and len(fused[2]) == 3  # A, B, m
    for name in fused[2]:
        torch.testing.assert_close(fused[2][name], plain[2][name], msg=name)


def test_dora_with_dropout_trains_on_the_plain_path():
    model = get_peft_model(Net(bias=True), LoraConfig(r=3, target_modules=["proj"], use_dora=True, lora_dropout=0.2))
    layer = model.base_model.proj
    x = torch.randn(2, 5, 12)
    assert layer._fusable(x) is None  # PEFT's dropout form needs W x on the undropped input
    model.eval()
    assert layer._fusable(x) == "default"  # no dropout in eval: the kernel serves inference too


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_kernel_over_a_bf16_base_keeps_float32_adapters(dropout):
    """bf16 base, float32 A/B (as PEFT keeps them): the fused path runs the adapter in bf16, like autocast,
    and hands float32 gradients back; it agrees with the plain path (adapter in float32) to bf16 precision."""
    torch.manual_seed(0)
    model = get_peft_model(Net(bias=True).to(torch.bfloat16), LoraConfig(r=3, lora_alpha=6, target_modules=["proj"],
                                                                         lora_dropout=dropout)).train()
    layer = model.base_model.proj
    assert layer.lora_A["default"].dtype == torch.float32
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    x = torch.randn(2, 5, 12, dtype=torch.bfloat16)
    assert layer._fusable(x) == "default"
    fused = _grads(model, x, seed=11)
    layer.base_layer.register_forward_hook(lambda mod, inp, out: None)  # a hook forces the plain path
    plain = _grads(model, x, seed=11)
    assert fused[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in fused[2].values())
    tol = dict(atol=0.05, rtol=0.02)
    torch.testing.assert_close(fused[0].float(), plain[0].float(), **tol)
    torch.testing.assert_close(fused[1].float(), plain[1].float(), **tol)
    for name in fused[2]:
        torch.testing.assert_close(fused[2][name], plain[2][name], msg=name, **tol)


@pytest.mark.parametrize("use_dora", [False, True])
def test_training_under_autocast_takes_the_plain_path(use_dora):
    """torch.autocast casts op by op, which a custom autograd Function would bypass: bf16 activations meeting
    float32 weights inside it. Under autocast the layer runs its plain ops; gradients stay float32."""
    torch.manual_seed(0)
    model = get_peft_model(Net(bias=True), LoraConfig(r=3, target_modules=["proj"], use_dora=use_dora)).train()
    layer = model.base_model.proj
    x = torch.randn(2, 5, 12)
    assert layer._fusable(x) == "default"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer._fusable(x) is None
        out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_lora_delta_formula_and_rslora_scaling():
    torch.manual_seed(0)
    base = Net(bias=False)
    w = base.proj.weight.detach().clone()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["proj"]))
    layer = model.base_model.proj
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    a, b = layer.lora_A["default"].detach(), layer.lora_B["default"].detach()
    x = torch.randn(3, 12)
    assert layer.scaling["default"] == pytest.approx(8 / 2)  # alpha / sqrt(r)
    torch.testing.assert_close(model(x), x @ (w + 4.0 * b @ a).t())


def test_dora_norm_equals_the_explicit_matrix_norm_and_forward_matches_the_paper():
    torch.manual_seed(0)
    base = Net(bias=True)
    w, bias = base.proj.weight.detach().clone(), base.proj.bias.detach().clone()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["proj"]))
    layer = model.base_model.proj
    with torch.no_grad():
        layer.lora_B["default"].normal_()
        layer.lora_magnitude_vector["default"].uniform_(0.5, 2.0)
    a, b = layer.lora_A["default"].detach(), layer.lora_B["default"].detach()
    m = layer.lora_magnitude_vector["default"].detach()
    v = w + 2.0 * b @ a
    torch.testing.assert_close(layer.dora_norm("default"), v.norm(dim=1))
    x = torch.randn(3, 12)
    torch.testing.assert_close(model(x), x @ (m[:, None] * v / v.norm(dim=1, keepdim=True)).t() + bias)


def test_conv_and_embedding_deltas_equal_merged_weights():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(20, 6), nn.Conv1d(6, 8, 3, padding=1))

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.conv = net[0], net[1]

        def forward(self, ids):
            return self.conv(self.emb(ids).transpose(1, 2))

    model = get_peft_model(Wrap(), LoraConfig(r=2, target_modules=["emb", "conv"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name:
                p.normal_()
    ids = torch.randint(0, 20, (2, 7))
    expected = model(ids)
    merged = model.merge_and_unload()
    assert type(merged.conv) is nn.Conv1d and type(merged.emb) is nn.Embedding
    torch.testing.assert_close(merged(ids), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form", ["plain", "a transposed", "b transposed", "both transposed", "bias"])
def test_kernel_gemm_equals_torch_matmul(form, monkeypatch):
    """lora_kernels.linear (oneDNN for float32 on CPU) computes a @ b^T (+ bias) for every operand layout the
    kernels pass it, and falls back to torch's matmul where oneDNN is off."""
    from peftkit.methods import lora_kernels
    if torch.backends.mkldnn.is_available():
        assert lora_kernels._ONEDNN is not None  # the fast path is what these tests exercise
    gen = torch.Generator().manual_seed(0)
    a, b, bias = torch.randn(37, 24, generator=gen), torch.randn(19, 24, generator=gen), torch.randn(19, generator=gen)
    if form in ("a transposed", "both transposed"):
        a = a.t().contiguous().t()
    if form in ("b transposed", "both transposed"):
        b = b.t().contiguous().t()
    want = a @ b.t() + (bias if form == "bias" else 0)
    got = lora_kernels.linear(a, b, bias if form == "bias" else None)
    torch.testing.assert_close(got, want)
    monkeypatch.setattr(lora_kernels, "_ONEDNN", None)
    torch.testing.assert_close(lora_kernels.linear(a, b, bias if form == "bias" else None), want)


def test_kernel_gemm_handles_empty_and_low_precision_inputs():
    from peftkit.methods.lora_kernels import linear
    assert linear(torch.empty(0, 5), torch.randn(3, 5)).shape == (0, 3)
    a, b = torch.randn(4, 6, dtype=torch.bfloat16), torch.randn(2, 6, dtype=torch.bfloat16)
    out = linear(a, b)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, a @ b.t())


@pytest.mark.parametrize("onednn", [True, False])
def test_kernel_gemm_scale_and_output_dtype(onednn, monkeypatch):
    """alpha scales the product (on oneDNN after it, elsewhere as the GEMM's own alpha with beta = 0, the
    uninitialised input never read); out_dtype hands float32 back for bf16 inputs (a cast where the device's
    mm has no out_dtype, which a CPU's has not)."""
    from peftkit.methods import lora_kernels
    from peftkit.methods.lora_kernels import linear
    if not onednn:
        monkeypatch.setattr(lora_kernels, "_ONEDNN", None)
    torch.manual_seed(0)
    a, b = torch.randn(7, 5), torch.randn(3, 5)
    torch.testing.assert_close(linear(a, b, alpha=1.5), 1.5 * (a @ b.t()))
    torch.testing.assert_close(linear(a.t().contiguous().t(), b.t().contiguous().t(), alpha=-2.0), -2 * (a @ b.t()))
    ab, bb = a.bfloat16(), b.bfloat16()
    out = linear(ab, bb, alpha=0.5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), 0.5 * (ab.float() @ bb.float().t()), atol=0.05, rtol=0.02)
    out = linear(ab, bb, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ab.float() @ bb.float().t(), atol=0.05, rtol=0.02)
    assert not lora_kernels._has_out_dtype_mm(torch.device("cpu"), torch.bfloat16, torch.float32)


@pytest.mark.parametrize("prescaled", [True, False])
def test_fused_kernels_first_and_second_derivatives_in_float64(prescaled, monkeypatch):
    """gradcheck and gradgradcheck of both training kernels against finite differences (float64, off oneDNN):
    every input's gradient, and under create_graph=True the second-order terms through x, A, B and m too
    (the backward then rebuilds its intermediates from the inputs, with a graph). Both forms of h: s x A^T, and
    x A^T with s in the GEMMs that read it (what float16 runs)."""
    from peftkit.methods import lora_kernels as k
    monkeypatch.setattr(k, "_prescaled", lambda dtype: prescaled)
    torch.manual_seed(0)
    d = torch.float64
    x = torch.randn(3, 4, 5, dtype=d, requires_grad=True)
    w = torch.randn(6, 5, dtype=d)
    bias, m = torch.randn(6, dtype=d, requires_grad=True), torch.rand(6, dtype=d).add_(0.5).requires_grad_(True)
    a, b = torch.randn(2, 5, dtype=d, requires_grad=True), torch.randn(6, 2, dtype=d, requires_grad=True)
    norm = torch.rand(6, dtype=d).add_(0.5)
    cases = [(lambda x, a, b, bias: k.FusedLoraLinear.apply(x, None, w, bias, a, b, 1.7, True), (x, a, b, bias)),
             (lambda x, a, b: k.FusedLoraLinear.apply(x, x * 1.3, w, None, a, b, 1.7, True), (x, a, b)),  # dropout
             (lambda x, a, b, m, bias: k.FusedDoraLinear.apply(x, w, bias, a, b, m, norm, 1.7, True), (x, a, b, m, bias))]
    for fn, inputs in cases:
        assert torch.autograd.gradcheck(fn, inputs)
        assert torch.autograd.gradgradcheck(fn, inputs)


def test_fused_kernels_keep_float16_in_range_with_a_large_scale():
    """float16 keeps x A^T unscaled and applies s in the GEMMs that read it: s x A^T alone would overflow here
    (300 * 0.1 * 20 * 200 = 120,000 > 65,504) where the output itself (~240) is in range."""
    from peftkit.methods.lora_kernels import FusedDoraLinear, FusedLoraLinear
    x = torch.full((2, 20), 300.0, dtype=torch.float16, requires_grad=True)
    w = torch.zeros(3, 20, dtype=torch.float16)
    a = torch.full((2, 20), 0.1, requires_grad=True)
    b = torch.full((3, 2), 1e-3, requires_grad=True)
    want = 2 * 300 * 0.1 * 20 * 200 * 1e-3  # 240 per output
    out = FusedLoraLinear.apply(x, None, w, None, a, b, 200.0, True)
    torch.testing.assert_close(out.float(), torch.full((2, 3), want), rtol=2e-3, atol=0)
    out.sum().backward()
    assert torch.isfinite(b.grad).all() and torch.isfinite(a.grad).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(b.grad, torch.full((3, 2), 2 * 200 * 300 * 0.1 * 20.0), rtol=2e-3, atol=0)
    m, norm = torch.ones(3, requires_grad=True), torch.ones(3)
    out = FusedDoraLinear.apply(x.detach(), w, None, a, b, m, norm, 200.0, True)
    torch.testing.assert_close(out.float(), torch.full((2, 3), want), rtol=2e-3, atol=0)



@pytest.mark.parametrize("path", ["fused", "plain", "dora"])
def test_float16_base_takes_adapter_gradients_past_its_range(path):
    """A float16 base with float32 adapters (the default), under a loss scale as a GradScaler's: A's and B's
    gradients sum over every token, past float16's 65,504, where the activations' gradients stay in range. They
    were inf (float16 GEMMs, then a cast; DoRA's magnitude gradient from float16 products); PEFT's are finite.
    Against the same model in float64."""
    import copy
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 8, bias=False))
    nn.init.constant_(net[0].weight, 3.0 if path == "dora" else 0.01)
    model = get_peft_model(net, LoraConfig(r=2, lora_alpha=32, target_modules=["0"], use_dora=path == "dora"))
    layer = model.base_model[0]
    with torch.no_grad():
        layer.lora_A["default"].fill_(0.05)
        layer.lora_B["default"].fill_(0.05)
    if path == "plain":
        layer.base_layer.register_forward_hook(lambda mod, inp, out: None)  # a hook forces the plain path
    wide = copy.deepcopy(model).double()
    model.base_model.half()
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    x, g = torch.ones(64, 64), torch.full((64, 8), 500.0)
    assert layer._fusable(x.half()) == (None if path == "plain" else "default")
    model(x.half()).backward(g.half())
    wide(x.double()).backward(g.double())
    for (name, p), q in zip(model.named_parameters(), wide.parameters()):
        if p.requires_grad:
            assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().max() > 65504  # past float16's range: the case in question
            torch.testing.assert_close(p.grad.double(), q.grad, rtol=2e-2, atol=0)


@pytest.mark.parametrize("change", ["parametrized magnitude", "parametrized A", "pruned B", "bias set to None"])
def test_forward_finds_tensors_moved_out_of_parameters(change):
    """The forward reads the layers' tensors from ``_parameters`` for speed; torch.nn.utils.parametrize / prune (or
    a bias deleted and set to None) move them out. A parametrized DoRA magnitude ran as plain LoRA (4.6 off, no
    magnitude gradient); the others raised KeyError. An identity change must leave output and gradients alone."""
    import torch.nn.utils.parametrize as parametrize
    import torch.nn.utils.prune as prune

    class Identity(nn.Module):
        def forward(self, t):
            return t

    def build():
        torch.manual_seed(0)
        model = get_peft_model(Net(bias=True), LoraConfig(r=3, target_modules=["proj"], init_lora_weights=False,
                                                          use_dora=change == "parametrized magnitude")).train()
        with torch.no_grad():
            for m in model.base_model.proj.lora_magnitude_vector.values():
                m.mul_(torch.linspace(0.5, 2.0, 10))
        return model

    x = torch.randn(4, 12)
    reference = build()
    expected = reference(x)
    expected.sum().backward()
    model = build()
    layer = model.base_model.proj
    if change == "parametrized magnitude":
        parametrize.register_parametrization(layer.lora_magnitude_vector, "default", Identity())
    elif change == "parametrized A":
        parametrize.register_parametrization(layer.lora_A, "default", Identity())
    elif change == "pruned B":
        prune.random_unstructured(layer.lora_B, "default", 0.0)
    else:
        del layer.base_layer.bias
        layer.base_layer.bias = None
        expected = expected - reference.base_model.proj.base_layer.bias
    out = model(x)
    torch.testing.assert_close(out, expected.detach())
    out.sum().backward()
    if change == "parametrized magnitude":
        grad = layer.lora_magnitude_vector.parametrizations.default.original.grad
        torch.testing.assert_close(grad, reference.base_model.proj.lora_magnitude_vector["default"].grad)

def test_kernel_gemm_out_dtype_gating(monkeypatch):
    """The float32-output GEMM runs only where a check on the device found it (never on a CPU, whose mm has no
    out_dtype), and not in a backward that builds a graph (fast=False: that overload has no derivative); a bias
    with alpha is refused rather than scaled on one backend and not on the other."""
    from peftkit.methods import lora_kernels as k
    a, b = torch.randn(4, 6, dtype=torch.bfloat16), torch.randn(2, 6, dtype=torch.bfloat16)
    assert not k._has_out_dtype_mm(torch.device("cpu"), torch.bfloat16, torch.float32)
    assert not k._try_out_dtype_mm(torch.device("cpu"), torch.bfloat16, torch.float32)  # runs the check; CPU lacks it
    calls = []
    real_mm = torch.mm

    def mm_with_out_dtype(x, y, out_dtype=None):  # what CUDA's torch has
        calls.append(out_dtype)
        return real_mm(x.to(out_dtype), y.to(out_dtype)) if out_dtype is not None else real_mm(x, y)

    monkeypatch.setattr(torch, "mm", mm_with_out_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the check turns autocast off for its own reference
        assert k._try_out_dtype_mm(torch.device("cpu"), torch.bfloat16, torch.float32)
    monkeypatch.setattr(k, "_has_out_dtype_mm", lambda *args: True)
    calls.clear()
    assert k.linear(a, b, out_dtype=torch.float32).dtype == torch.float32 and calls == [torch.float32]
    calls.clear()
    assert k.linear(a, b, fast=False, out_dtype=torch.float32).dtype == torch.float32 and calls == []
    with pytest.raises(ValueError, match="alpha"):
        k.linear(a, b, torch.zeros(2, dtype=torch.bfloat16), alpha=2.0)


def test_fused_kernel_b_gradient_is_contiguous_off_onednn():
    """Off oneDNN (here a bf16 base), B's gradient is computed as the contiguous (out, r) that .grad keeps as
    is, not a transposed view AccumulateGrad would copy; it equals the autograd graph's."""
    from peftkit.methods.lora_kernels import FusedLoraLinear
    torch.manual_seed(0)
    x = torch.randn(6, 8, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(5, 8, dtype=torch.bfloat16)
    a = torch.randn(2, 8, requires_grad=True)
    b = torch.randn(5, 2, requires_grad=True)
    got = torch.autograd.grad(FusedLoraLinear.apply(x, None, w, None, a, b, 1.5, True).square().sum(), (x, a, b))
    assert got[2].is_contiguous() and got[2].dtype == torch.float32  # as the kernel returned it
    ref = x.float() @ w.float().t() + 1.5 * (x.float() @ a.t()) @ b.t()
    for g, r in zip(got, torch.autograd.grad(ref.square().sum(), (x, a, b))):
        torch.testing.assert_close(g.float(), r.float(), atol=0.5, rtol=0.03)


def test_kernel_uses_onednn_under_autograd_only(monkeypatch):
    """Training (grad enabled) runs the kernel's GEMMs through oneDNN; inference keeps torch's matmul, so a
    B = 0 adapter leaves the base output bit-identical."""
    from peftkit.methods import lora_kernels
    calls = []

    def counting(a, b, bias, *args):
        calls.append(a.shape)
        return (torch.addmm(bias, a, b.t()) if bias is not None else a @ b.t())

    monkeypatch.setattr(lora_kernels, "_ONEDNN", counting)
    base = Net(bias=True)
    x = torch.randn(3, 4, 12)
    with torch.no_grad():
        want = base(x)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["proj"]))
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=0.0, rtol=0.0)
    assert calls == []
    model(x.requires_grad_()).sum().backward()
    assert len(calls) == 6  # forward: base and x A^T; backward: g B, A's grad, B's grad, g W


@pytest.mark.parametrize("dora", [False, True])
def test_fused_kernels_support_double_backward(dora):
    """create_graph=True (gradient penalties, Hessian-vector products): the fused kernels' backward runs torch's
    differentiable matmuls then, and second derivatives equal the plain autograd path's."""
    torch.manual_seed(0)
    model = get_peft_model(Net(bias=True), LoraConfig(r=3, target_modules=["proj"], use_dora=dora,
                                                      init_lora_weights=False))
    layer = model.base_model.proj
    x = torch.randn(2, 5, 12)

    def second_order():
        a, b = layer.lora_A["default"], layer.lora_B["default"]
        loss = (model(x) ** 2).sum()
        (ga,) = torch.autograd.grad(loss, a, create_graph=True)
        (gb,) = torch.autograd.grad(ga.pow(2).sum(), b)
        return ga.detach(), gb

    assert layer._fusable(x) == "default"
    fused = second_order()
    layer.base_layer.register_forward_hook(lambda mod, inp, out: None)
    plain = second_order()
    assert plain[1].abs().max() > 0
    # the forward ran oneDNN, the plain path MKL: float32 rounding, amplified by the squares (values ~1e2)
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused[1], plain[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("p, native", [(0.1, False), (0.5, False), (0.1, True)])
def test_dropout_supports_double_backward(p, native, monkeypatch):
    """Through the dropout's own backward too (drawn positions at small p, a bool mask above): with one mask
    fixed by the seed, the second derivative matches the same mask applied by hand."""
    from peftkit import layers
    from peftkit.layers import new_forward_pass
    monkeypatch.setattr(layers, "_native_dropout", lambda x: native)  # native: the GPU's torch.native_dropout
    model = get_peft_model(Net(bias=True), LoraConfig(r=3, target_modules=["proj"], lora_dropout=p,
                                                      init_lora_weights=False)).train()
    layer = model.base_model.proj
    x = torch.randn(2, 5, 12, requires_grad=True)
    torch.manual_seed(4)
    new_forward_pass()
    out = model(x)
    (gx,) = torch.autograd.grad((out ** 2).sum(), x, create_graph=True)
    (gb,) = torch.autograd.grad(gx.pow(2).sum(), layer.lora_B["default"])
    # the same mask by hand: dropped entries are where the dropped input is zero and x is not
    a, b, s = layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"]
    torch.manual_seed(4)
    from peftkit.layers import shared_dropout
    new_forward_pass()
    keep = (shared_dropout(x.detach(), p) != 0).float() / (1 - p)
    x2 = x.detach().clone().requires_grad_(True)
    out2 = layer.base_layer(x2) + s * (x2 * keep) @ a.t() @ b.t()
    (gx2,) = torch.autograd.grad((out2 ** 2).sum(), x2, create_graph=True)
    (gb2,) = torch.autograd.grad(gx2.pow(2).sum(), b)
    assert gb.abs().max() > 0
    torch.testing.assert_close(gx, gx2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gb, gb2, rtol=1e-4, atol=1e-4)


def test_orthogonal_init_starts_at_the_base_and_eva_loads_only_from_a_saved_adapter(tmp_path):
    import json

    from peftkit import LoraConfig, PeftModel, get_peft_model
    from conftest import tiny_llama

    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    base = tiny_llama()
    with torch.no_grad():
        expected = base(ids).logits
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, init_lora_weights="orthogonal", target_modules=["q_proj", "v_proj"]))
    layer = model.base_model.model.layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    assert a.abs().min() > 0 and b.abs().sum() > 0 and (b @ a).abs().max() < 1e-6  # B A = 0 with neither zero
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="even rank"):
        get_peft_model(tiny_llama(), LoraConfig(r=3, init_lora_weights="orthogonal", target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="'eva'.*from_pretrained"):
        get_peft_model(tiny_llama(), LoraConfig(r=4, init_lora_weights="eva", target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="rewrite the base weights"):
        LoraConfig(init_lora_weights="pissa")
    with torch.no_grad():
        b.normal_()
        out = model(ids).logits
    model.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(config, init_lora_weights="eva")))
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))  # an EVA adapter as PEFT saves it
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, out)


def _dora_and_plain():
    """One Linear holding a DoRA adapter ("dora", magnitude unlike ||W + sBA||, as trained) and a plain one."""
    torch.manual_seed(0)
    model = get_peft_model(Net(bias=True), LoraConfig(r=2, target_modules=["proj"], use_dora=True,
                                                      init_lora_weights=False), adapter_name="dora")
    model.add_adapter("plain", LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False))
    layer = model.base_model.proj
    with torch.no_grad():
        layer.lora_magnitude_vector["dora"].mul_(torch.linspace(0.5, 2.0, 10))
    model.set_adapter(["dora", "plain"])
    return model.eval(), layer


def test_dora_beside_a_merged_plain_adapter_keeps_its_norm_over_the_base_alone():
    """Merging a plain adapter writes the base weight in place (through .data, which leaves its version counter
    alone). An active DoRA adapter left unmerged still normalises over the base weight alone, as with both unmerged:
    its cached ||W||^2 must be recomputed (a stale one mixed the old ||W||^2 with the new W: zero rows, inf outputs),
    and from W0, not from W0 + the plain delta (which moved the output by ~1e-2)."""
    model, layer = _dora_and_plain()
    x = torch.randn(4, 12)
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        unmerged = model(x)
    model.merge_adapter(["plain"])
    assert not torch.equal(layer.base_layer.weight, w0)
    expected = torch.linalg.norm(w0 + layer.scaling["dora"] * layer.lora_B["dora"] @ layer.lora_A["dora"], dim=1)
    torch.testing.assert_close(layer.dora_norm("dora"), expected)
    torch.testing.assert_close(layer.pure_weight(), w0)
    with torch.no_grad():
        out = model(x)
        v = w0 + layer.scaling["dora"] * layer.lora_B["dora"] @ layer.lora_A["dora"]
        by_hand = x @ ((layer.lora_magnitude_vector["dora"] / torch.linalg.norm(v, dim=1))[:, None] * v).t()
    torch.testing.assert_close(out, by_hand + x @ layer.delta_weight("plain").t() + layer.base_layer.bias)
    torch.testing.assert_close(out, unmerged)


@pytest.mark.parametrize("order", [["dora", "plain"], ["plain", "dora"]])
@pytest.mark.parametrize("calls", ["one", "two"])
def test_merging_dora_and_plain_together_equals_the_unmerged_forward(order, calls):
    """The forward normalises DoRA's W + sBA over the base weight alone; each merge adds its delta relative to that
    base, so merges in either order, in one call or two, equal the unmerged forward (in two calls, plain first,
    the DoRA merge used to normalise over W + the plain delta); merge_and_unload then gives the same outputs."""
    model, layer = _dora_and_plain()
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(4, 12)
    with torch.no_grad():
        expected = model(x)
        for names in ([order] if calls == "one" else [[n] for n in order]):
            layer.merge(names)
        assert layer.merged_adapters == order
        torch.testing.assert_close(model(x), expected)
        layer.unmerge([order[0]])  # the older merge first, under the newer one
        torch.testing.assert_close(model(x), expected)
        layer.unmerge()
        torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(x), expected)
        torch.testing.assert_close(model.merge_and_unload()(x), expected)


def test_two_dora_adapters_on_one_layer_merge_exactly():
    """Two active DoRA adapters: each rescales over the base alone in the forward; merged one after the other the
    second used to normalise over the first's rescaled weight (~1e-2 off)."""
    torch.manual_seed(0)
    model = get_peft_model(Net(bias=True), LoraConfig(r=2, target_modules=["proj"], use_dora=True,
                                                      init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=3, target_modules=["proj"], use_dora=True, init_lora_weights=False))
    layer = model.base_model.proj
    with torch.no_grad():
        layer.lora_magnitude_vector["a"].mul_(torch.linspace(0.5, 2.0, 10))
        layer.lora_magnitude_vector["b"].mul_(torch.linspace(1.5, 0.7, 10))
    model.set_adapter(["a", "b"])
    model.eval()
    x = torch.randn(4, 12)
    with torch.no_grad():
        expected = model(x)
        model.merge_adapter(["a"])
        torch.testing.assert_close(model(x), expected)  # b unmerged beside a merged
        model.merge_adapter(["b"])
        torch.testing.assert_close(model(x), expected)
        torch.testing.assert_close(model.merge_and_unload()(x), expected)


def test_disable_block_and_deleting_a_merged_dora_adapter_keep_the_other_merge():
    """Merges made one at a time (plain, then DoRA over it) come back in that order after disable_adapter; deleting
    the DoRA adapter under a later plain merge leaves exactly W + the plain delta."""
    model, layer = _dora_and_plain()
    w0 = layer.base_layer.weight.detach().clone()
    model.merge_adapter(["plain"])
    model.merge_adapter(["dora"])
    merged = layer.base_layer.weight.detach().clone()
    with model.disable_adapter():
        torch.testing.assert_close(layer.base_layer.weight, w0)
    torch.testing.assert_close(layer.base_layer.weight, merged)
    assert layer.merged_adapters == ["plain", "dora"]

    model, layer = _dora_and_plain()
    w0, plain = layer.base_layer.weight.detach().clone(), layer.delta_weight("plain").detach()
    model.merge_adapter(["dora"])
    model.merge_adapter(["plain"])
    model.delete_adapter("dora")
    assert layer.merged_adapters == ["plain"]
    torch.testing.assert_close(layer.base_layer.weight, w0 + plain)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dora_on_a_model_cast_whole_to_half_precision(dtype):
    """model.to(bf16 / fp16) casts DoRA's magnitude too, while the row norm is computed in float32: the layer must
    still return the activations' dtype (a float32 m / n made q_proj float32, and Llama's attention refused it)."""
    from conftest import randomize_adapters, tiny_llama

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, std=0.05)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    expected = model(input_ids=ids).logits
    model.to(dtype).train()
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == dtype
    torch.testing.assert_close(out.logits.float(), expected, atol=0.1, rtol=0.05)
    out.loss.backward()
    magnitude = next(p for n, p in model.named_parameters() if "lora_magnitude_vector" in n)
    assert magnitude.grad.dtype == dtype and torch.isfinite(magnitude.grad).all() and magnitude.grad.abs().sum() > 0


def test_an_accelerate_hook_on_the_base_layer_takes_the_plain_path():
    """accelerate's offload hooks (device_map with CPU / disk offload) move weights in a pre-forward the fused
    kernel would bypass: a base layer carrying one runs through its own forward."""
    from accelerate.hooks import ModelHook, add_hook_to_module
    model = get_peft_model(Net(bias=True), LoraConfig(r=3, target_modules=["proj"]))
    layer = model.base_model.proj
    x = torch.randn(2, 5, 12)
    assert layer._fusable(x) == "default"
    add_hook_to_module(layer.base_layer, ModelHook())
    assert layer._fusable(x) is None


def test_inductor_compiles_the_training_kernels_on_the_cpu():
    """Inductor lowers oneDNN's linear only for frozen constant weights: under torch.compile the kernels take torch's
    matmul (they failed to compile with an InductorError), and the compiled gradients equal eager ones."""
    from conftest import tiny_llama
    from peftkit.methods import lora_kernels

    a, b = torch.randn(4, 8), torch.randn(3, 8)
    assert lora_kernels.uses_onednn(a, b) == (lora_kernels._ONEDNN is not None and torch.backends.mkldnn.enabled)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    grads = []
    for compiled in (False, True):
        model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "down_proj"])).train()
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(1))
        run = torch.compile(model.base_model, backend="inductor") if compiled else model.base_model
        run(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for eager, comp in zip(*grads):
        torch.testing.assert_close(comp, eager, atol=1e-5, rtol=1e-4)
