"""LoRA adapter arithmetic: every combination type against its formula, computed here from the sources' A / B /
scaling; rsLoRA and rank_pattern sources; negation; refusals; save / reload; PEFT as an oracle."""
from __future__ import annotations

import math

import pytest
import torch

import peftkit
from peftkit import IA3Config, LoraConfig, get_peft_model
from peftkit.methods import lora_arith
from conftest import randomize_adapters, tiny_llama

Q = "model.layers.0.self_attn.q_proj"
K = "model.layers.1.self_attn.k_proj"


def two_adapters(cfg_b: LoraConfig | None = None, seed: int = 1) -> peftkit.PeftModel:
    """Adapters "a" (r 4, alpha 8, q/v) and "b" (by default r 4, alpha 16, rsLoRA, q/k) with random factors."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), "a")
    model.add_adapter("b", cfg_b or LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj"]))
    randomize_adapters(model, seed=seed)
    return model


def parts(model, path: str, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    layer = model.base_model.get_submodule(path)
    return layer.lora_A[name].detach(), layer.lora_B[name].detach(), layer.scaling[name]


def delta(model, path: str, name: str) -> torch.Tensor:
    return model.base_model.get_submodule(path).delta_weight(name).detach()


def top_fraction(t: torch.Tensor, density: float) -> torch.Tensor:
    """t with all but its int(density * numel) largest-magnitude entries zeroed (by sorting, not topk)."""
    k = int(density * t.numel())
    order = t.abs().flatten().argsort(descending=True)
    keep = torch.zeros(t.numel())
    keep[order[:k]] = 1
    return t * keep.view(t.shape)


def ties_by_hand(ts: list[torch.Tensor], ws: list[float], density: float, method: str) -> torch.Tensor:
    """TIES written out: trim, elect the sign from the unweighted trimmed tensors, mean of weighted agreeing ones."""
    trimmed = [top_fraction(t, density) for t in ts]
    votes = sum(trimmed) if method == "total" else sum(t.sign() for t in trimmed)
    sign = torch.where(votes >= 0, 1.0, -1.0)
    agree = [(t.sign() == sign).float() for t in trimmed]
    return sum(w * t * m for w, t, m in zip(ws, trimmed, agree)) / sum(agree).clamp(min=1)


# --- pure functions ------------------------------------------------------------------------------------
def test_magnitude_mask_keeps_exactly_the_top_fraction():
    t = torch.randn(12, 10, generator=torch.Generator().manual_seed(0))
    mask = lora_arith.magnitude_mask(t, 0.3)
    assert int(mask.sum()) == 36
    assert t[mask].abs().min() > t[~mask].abs().max()
    assert lora_arith.magnitude_mask(t, 1.0).all()


def test_random_prune_is_seeded_and_rescaled():
    t = torch.randn(100, 100, generator=torch.Generator().manual_seed(0))
    one = lora_arith.random_prune(t, 0.25, torch.Generator().manual_seed(7))
    two = lora_arith.random_prune(t, 0.25, torch.Generator().manual_seed(7))
    other = lora_arith.random_prune(t, 0.25, torch.Generator().manual_seed(8))
    assert torch.equal(one, two) and not torch.equal(one, other)
    kept = one != 0
    assert torch.allclose(one[kept], t[kept] / 0.25)
    assert abs(kept.float().mean().item() - 0.25) < 0.02
    torch.manual_seed(3)  # generator=None draws from the global RNG, as PEFT does
    g1 = lora_arith.random_prune(t, 0.5)
    torch.manual_seed(3)
    assert torch.equal(g1, lora_arith.random_prune(t, 0.5))


def test_majority_sign_total_vs_frequency():
    stacked = torch.tensor([[3.0, 1.0], [-1.0, -2.0], [-1.0, 0.5]])  # column 0: sum +1 but two of three negative
    assert lora_arith.majority_sign(stacked, "total").tolist() == [1.0, -1.0]
    assert lora_arith.majority_sign(stacked, "frequency").tolist() == [-1.0, 1.0]
    with pytest.raises(ValueError, match="majority_sign_method"):
        lora_arith.majority_sign(stacked, "mean")


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_merge_matches_hand_computation(method):
    gen = torch.Generator().manual_seed(1)
    ts = [torch.randn(6, 5, generator=gen) for _ in range(3)]
    got = lora_arith.merge_tensors(ts, [0.7, -1.2, 0.4], "ties", 0.6, method)
    assert torch.allclose(got, ties_by_hand(ts, [0.7, -1.2, 0.4], 0.6, method), atol=1e-6)


def test_svd_factors_are_the_best_low_rank_approximation():
    m = torch.randn(9, 7, generator=torch.Generator().manual_seed(2))
    b, a = lora_arith.svd_factors(m, 3)
    assert b.shape == (9, 3) and a.shape == (3, 7)
    s = torch.linalg.svdvals(m)
    # Eckart-Young: the Frobenius error of the best rank-3 approximation is the norm of the dropped singular values
    assert math.isclose(torch.linalg.norm(m - b @ a).item(), s[3:].norm().item(), rel_tol=1e-4)
    b, a = lora_arith.svd_factors(m, 50)  # rank above min(out, in): exact
    assert torch.allclose(b @ a, m, atol=1e-5)
    b, a = lora_arith.svd_factors(m, 3, clamp=0.8)
    hi = torch.quantile(torch.cat([x.flatten() for x in lora_arith.svd_factors(m, 3)]), 0.8)
    assert b.abs().max() <= hi + 1e-6 and a.abs().max() <= hi + 1e-6


# --- each combination type on a model, against the formula ----------------------------------------------
def test_cat_is_exact_weighted_sum_with_rslora_and_ranks_stacked():
    model = two_adapters()
    model.add_weighted_adapter(["a", "b"], [0.6, -1.5], "c", "cat")
    a_a, b_a, s_a = parts(model, Q, "a")
    a_b, b_b, s_b = parts(model, Q, "b")
    assert s_a == 2.0 and s_b == 16 / math.sqrt(4)  # rsLoRA: alpha / sqrt(r)
    expected = 0.6 * s_a * b_a @ a_a - 1.5 * s_b * b_b @ a_b
    assert torch.allclose(delta(model, Q, "c"), expected, atol=1e-5)
    assert parts(model, Q, "c")[0].shape[0] == 8 and parts(model, K, "c")[0].shape[0] == 4
    config = model.peft_config["c"]
    assert (config.r, config.lora_alpha, config.use_rslora) == (4, 4, False)
    assert config.rank_pattern == {"q_proj": 8} == config.alpha_pattern
    assert config.target_modules == ["k_proj", "q_proj", "v_proj"]


@pytest.mark.parametrize("weights", [[0.6, -1.5], [1.0, 2.0]])
def test_linear_combines_factors_with_signed_square_roots(weights):
    model = two_adapters()
    model.add_weighted_adapter(["a", "b"], weights, "c", "linear")
    (a_a, b_a, s_a), (a_b, b_b, s_b) = parts(model, Q, "a"), parts(model, Q, "b")
    ws = [weights[0] * s_a, weights[1] * s_b]
    new_a = sum(math.copysign(math.sqrt(abs(w)), w) * a for w, a in zip(ws, [a_a, a_b]))
    new_b = sum(math.sqrt(abs(w)) * b for w, b in zip(ws, [b_a, b_b]))
    assert torch.allclose(delta(model, Q, "c"), new_b @ new_a, atol=1e-5)
    # a module only "b" holds: exactly w * s * B A
    a_k, b_k, s_k = parts(model, K, "b")
    assert torch.allclose(delta(model, K, "c"), weights[1] * s_k * b_k @ a_k, atol=1e-5)


def test_svd_truncates_the_weighted_delta_sum():
    model = two_adapters()
    model.add_weighted_adapter(["a", "b"], [0.6, -1.5], "full", "svd", svd_rank=8)  # 8 >= 4 + 4: exact
    model.add_weighted_adapter(["a", "b"], [0.6, -1.5], "low", "svd", svd_rank=3)
    target = 0.6 * delta(model, Q, "a") - 1.5 * delta(model, Q, "b")
    assert torch.allclose(delta(model, Q, "full"), target, atol=1e-5)
    low = delta(model, Q, "low")
    assert torch.linalg.matrix_rank(low) == 3
    dropped = torch.linalg.svdvals(target)[3:].norm().item()
    assert math.isclose(torch.linalg.norm(target - low).item(), dropped, rel_tol=1e-4)
    model.add_weighted_adapter(["a", "b"], [0.6, -1.5], "dflt", "svd")  # default rank: the largest source rank
    assert parts(model, Q, "dflt")[0].shape[0] == 4


@pytest.mark.parametrize("kind", ["linear", "svd"])
def test_negation_gives_minus_the_delta(kind):
    model = two_adapters()
    model.add_weighted_adapter(["a"], [-1.0], "neg", kind)
    model.add_weighted_adapter(["a", "b"], [-1.0, 0.0], "neg2", kind, svd_rank=8)
    for name in ("neg", "neg2"):
        assert torch.allclose(delta(model, Q, name), -delta(model, Q, "a"), atol=1e-5)


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_and_magnitude_prune_on_factors(method):
    model = two_adapters()
    weights, density = [0.6, -1.5], 0.5
    model.add_weighted_adapter(["a", "b"], weights, "t", "ties", density=density, majority_sign_method=method)
    model.add_weighted_adapter(["a", "b"], weights, "m", "magnitude_prune", density=density)
    (a_a, b_a, s_a), (a_b, b_b, s_b) = parts(model, Q, "a"), parts(model, Q, "b")
    ws = [weights[0] * s_a, weights[1] * s_b]
    wa = [math.copysign(math.sqrt(abs(w)), w) for w in ws]
    wb = [math.sqrt(abs(w)) for w in ws]
    ties_a, ties_b = ties_by_hand([a_a, a_b], wa, density, method), ties_by_hand([b_a, b_b], wb, density, method)
    assert torch.allclose(delta(model, Q, "t"), ties_b @ ties_a, atol=1e-5)
    mp_a = sum(w * top_fraction(a, density) for w, a in zip(wa, [a_a, a_b]))
    mp_b = sum(w * top_fraction(b, density) for w, b in zip(wb, [b_a, b_b]))
    assert torch.allclose(delta(model, Q, "m"), mp_b @ mp_a, atol=1e-5)


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_svd_variants_prune_the_deltas(method):
    model = two_adapters()
    weights, density = [0.6, -1.5], 0.4
    model.add_weighted_adapter(["a", "b"], weights, "t", "ties_svd", svd_rank=32, density=density,
                               majority_sign_method=method)
    model.add_weighted_adapter(["a", "b"], weights, "m", "magnitude_prune_svd", svd_rank=32, density=density)
    d = [delta(model, Q, "a"), delta(model, Q, "b")]
    assert torch.allclose(delta(model, Q, "t"), ties_by_hand(d, weights, density, method), atol=1e-5)
    expected_m = sum(w * top_fraction(x, density) for w, x in zip(weights, d))
    assert torch.allclose(delta(model, Q, "m"), expected_m, atol=1e-5)


def test_dare_is_seeded_and_reduces_to_its_base_merge_at_density_one():
    model = two_adapters()
    kw = dict(density=0.5, svd_rank=32)
    for name, seed in (("x", 5), ("y", 5), ("z", 6)):
        model.add_weighted_adapter(["a", "b"], [0.6, -1.5], name, "dare_linear_svd", generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(delta(model, Q, "x"), delta(model, Q, "y"))
    assert not torch.allclose(delta(model, Q, "x"), delta(model, Q, "z"))
    # the same masks by hand: the generator draws A's mask of "a", then of "b" (sources in order)
    gen = torch.Generator().manual_seed(5)
    d = [delta(model, Q, "a"), delta(model, Q, "b")]
    dropped = [x * torch.bernoulli(torch.full_like(x, 0.5), generator=gen) / 0.5 for x in d]
    assert torch.allclose(delta(model, Q, "x"), 0.6 * dropped[0] - 1.5 * dropped[1], atol=1e-5)
    model.add_weighted_adapter(["a", "b"], [0.6, -1.5], "dl", "dare_linear", density=1.0)
    model.add_weighted_adapter(["a", "b"], [0.6, -1.5], "li", "linear")
    model.add_weighted_adapter(["a", "b"], [0.6, -1.5], "dt", "dare_ties_svd", density=1.0, svd_rank=32)
    model.add_weighted_adapter(["a", "b"], [0.6, -1.5], "ts", "ties_svd", density=1.0, svd_rank=32)
    assert torch.allclose(delta(model, Q, "dl"), delta(model, Q, "li"), atol=1e-6)
    assert torch.allclose(delta(model, Q, "dt"), delta(model, Q, "ts"), atol=1e-5)


def test_rank_and_alpha_patterns_enter_through_their_scalings():
    cfg_b = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], rank_pattern={"k_proj": 2},
                       alpha_pattern={r"layers\.0\.self_attn\.q_proj": 3})
    model = two_adapters(cfg_b)
    assert parts(model, Q, "b")[2] == 3 / 4 and parts(model, K, "b")[0].shape[0] == 2
    model.add_weighted_adapter(["a", "b"], [1.0, 2.0], "c", "cat")
    (a_a, b_a, _), (a_b, b_b, _) = parts(model, Q, "a"), parts(model, Q, "b")
    assert torch.allclose(delta(model, Q, "c"), 2.0 * b_a @ a_a + 2.0 * 0.75 * b_b @ a_b, atol=1e-5)
    config = model.peft_config["c"]
    # two modules each at ranks 8 (q), 2 (k), 4 (v): r is the larger on a tie, the others go to rank_pattern
    assert config.r == 8 and config.rank_pattern == {"k_proj": 2, "v_proj": 4} == config.alpha_pattern
    model.add_adapter("k4", LoraConfig(r=4, target_modules=["k_proj"]))
    with pytest.raises(ValueError, match="needs equal ranks"):
        model.add_weighted_adapter(["b", "k4"], [1.0, 1.0], "bad", "ties", density=0.5)
    model.add_weighted_adapter(["b", "k4"], [1.0, 1.0], "ok", "svd")  # svd handles different ranks
    assert parts(model, K, "ok")[0].shape[0] == 4


def test_refusals_are_clear():
    model = two_adapters()
    cases = [
        (dict(adapters=["a", "nope"]), "no adapter named 'nope'"),
        (dict(weights=[1.0]), "one per adapter"),
        (dict(combination_type="mean"), "is not one of"),
        (dict(combination_type="ties"), "needs density"),
        (dict(combination_type="ties", density=0.0), r"density must be in \(0, 1\]"),
        (dict(combination_type="dare_linear", density=1.5), r"density must be in \(0, 1\]"),
        (dict(adapter_name="a"), "already exists"),
    ]
    for overrides, message in cases:
        kw = dict(adapters=["a", "b"], weights=[1.0, 1.0], adapter_name="new") | overrides
        with pytest.raises(ValueError, match=message):
            model.add_weighted_adapter(**kw)
    model.add_adapter("ia3", IA3Config(target_modules=["o_proj", "down_proj"], feedforward_modules=["down_proj"]))
    with pytest.raises(ValueError, match=r"is a LORA adapter; add_weighted_adapter combines adapters of one kind \(LoRA"):
        model.add_weighted_adapter(["a", "ia3"], [1.0, 1.0], "new")
    model.add_adapter("dora", LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="uses DoRA"):
        model.add_weighted_adapter(["a", "dora"], [1.0, 1.0], "new")
    assert "new" not in model.peft_config


def test_combined_adapter_saves_and_reloads_in_peftkit_and_peft(tmp_path, ids):
    peft = pytest.importorskip("peft")
    cfg_b = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj"], rank_pattern={"k_proj": 2})
    model = two_adapters(cfg_b)
    model.add_weighted_adapter(["a", "b"], [0.6, -1.5], "c", "cat")
    model.set_adapter("c")
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with model.disable_adapter():
            assert not torch.allclose(model(input_ids=ids).logits, want, atol=1e-4)
    model.save_pretrained(str(tmp_path), selected_adapters=["c"])
    ours = peftkit.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "c"))
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "c"))
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, want, atol=1e-5)
        assert torch.allclose(theirs(input_ids=ids).logits, want, atol=1e-5)


# --- PEFT as the oracle ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,extra", [("linear", {}), ("cat", {}), ("svd", {}), ("svd", {"svd_rank": 2}),
                                        ("ties", {"density": 0.5}), ("magnitude_prune", {"density": 0.3}),
                                        ("ties_svd", {"density": 0.5, "majority_sign_method": "frequency"})])
def test_matches_peft_add_weighted_adapter(tmp_path, kind, extra):
    peft = pytest.importorskip("peft")
    cfg_b = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj"])  # PEFT: no rsLoRA / patterns here
    model = two_adapters(cfg_b)
    model.save_pretrained(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"), adapter_name="a")
    theirs.load_adapter(str(tmp_path / "b"), adapter_name="b")
    model.add_weighted_adapter(["a", "b"], [0.7, -1.3], "c", kind, **extra)
    theirs.add_weighted_adapter(["a", "b"], [0.7, -1.3], "c", kind, **extra)
    for path in (Q, K, "model.layers.1.self_attn.v_proj"):
        ref = theirs.base_model.model.get_submodule(path).get_delta_weight("c").detach()
        assert torch.allclose(delta(model, path, "c"), ref, atol=1e-5), path


def test_embedding_and_conv_layers_combine_in_their_own_layouts():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["embed_tokens"]), "a")
    model.add_adapter("b", LoraConfig(r=3, lora_alpha=6, target_modules=["embed_tokens"]))
    conv = get_peft_model(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), LoraConfig(r=2, target_modules=["0"]), "a")
    conv.add_adapter("b", LoraConfig(r=3, lora_alpha=6, target_modules=["0"]))
    for m, path in ((model, "model.embed_tokens"), (conv, "0")):
        randomize_adapters(m)
        m.add_weighted_adapter(["a", "b"], [0.5, -2.0], "cat", "cat")
        m.add_weighted_adapter(["a", "b"], [0.5, -2.0], "svd", "svd", svd_rank=5)
        target = 0.5 * delta(m, path, "a") - 2.0 * delta(m, path, "b")
        assert torch.allclose(delta(m, path, "cat"), target, atol=1e-5)
        assert torch.allclose(delta(m, path, "svd"), target, atol=1e-4)
