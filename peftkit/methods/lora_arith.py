"""LoRA adapter arithmetic: combine named LoRA adapters into a new one (Hugging Face PEFT's semantics).

Per wrapped module, with source adapters i (factors A_i (r_i, in), B_i (out, r_i), scaling s_i) and weights w_i:

- ``cat``: A = [w_1 s_1 A_1; w_2 s_2 A_2; ...] (ranks stacked), B = [B_1, B_2, ...]; exactly sum_i w_i s_i B_i A_i.
- ``linear`` / ``ties`` / ``dare_*`` / ``magnitude_prune`` (equal ranks): the merge runs on the factors, A with
  weights sign(w_i s_i) sqrt|w_i s_i| and B with sqrt|w_i s_i|, so B A is a (rough) weighted combination.
- ``svd`` and ``*_svd``: the merge runs on the delta weights s_i B_i A_i, then a truncated SVD gives the new
  factors (rank ``svd_rank``, else the largest source rank at that module).

The new adapter has scaling 1 everywhere (lora_alpha = r, no rsLoRA), so sources with rsLoRA or per-module
rank_pattern / alpha_pattern enter through their real scalings. Merges: TIES (Yadav et al. 2023, Sec. 3:
trim, elect sign, disjoint mean), DARE (Yu et al. 2023, Sec. 3: random drop with rescale 1 / density).
As in PEFT, one source adapter is always combined with ``linear`` (which is exact for one adapter), and DARE
draws from ``generator`` (or torch's global RNG when None: seed it for reproducible results).
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from typing import Optional

import torch

from ..inject import _wrapper_prefixes, adapter_layers, block_wrappers, name_matches, plain_name
from .lora import LoraConfig, LoraLayer

COMBINATIONS = ("svd", "linear", "cat", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
SIGN_METHODS = ("total", "frequency")


# --- merges of task tensors (pure functions) ---------------------------------------------------------
def magnitude_mask(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Bool mask keeping the int(density * numel) entries of largest magnitude."""
    k = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel(), dtype=torch.bool, device=tensor.device)
    mask[tensor.abs().flatten().topk(k).indices] = True
    return mask.view(tensor.shape)


def random_prune(tensor: torch.Tensor, density: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and rescale the kept ones by 1 / density."""
    keep = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * keep / density


def majority_sign(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """TIES' elected sign per entry (+1 / -1, ties go to +1) of tensors stacked on dim 0.

    "total": the sign of the sum; "frequency": the sign held by more tensors.
    """
    if method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, got {method!r}")
    votes = stacked.sum(0) if method == "total" else stacked.sign().sum(0)
    return torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0 of the entries where ``agree`` holds (0 where none does)."""
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def merge_tensors(tensors: list[torch.Tensor], weights: list[float], kind: str, density: Optional[float] = None,
                  sign_method: str = "total", generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Combine same-shape task tensors: kind is linear, ties, dare_linear, dare_ties or magnitude_prune.

    As in PEFT, pruning (and TIES' sign election) acts on the unweighted tensors; weights apply after.
    """
    if kind in ("ties", "magnitude_prune"):
        tensors = [t * magnitude_mask(t, density) for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [random_prune(t, density, generator) for t in tensors]
    elif kind != "linear":
        raise ValueError(f"unknown merge {kind!r}")
    stacked = torch.stack(tensors)  # (n, *shape)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * (stacked.dim() - 1))
    if kind in ("ties", "dare_ties"):
        agree = stacked.sign() == majority_sign(stacked, sign_method)
        return disjoint_mean(stacked * w, agree)
    return (stacked * w).sum(0)


def svd_factors(delta: torch.Tensor, rank: int, clamp: Optional[float] = None,
                full_matrices: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(B (out, r), A (r, in)) with B A the best rank-r approximation of ``delta`` (out, in).

    ``clamp`` (a quantile in (0, 1]) clips both factors' entries to +-that quantile of their values.
    """
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=full_matrices)
    rank = min(rank, s.shape[0])
    b, a = u[:, :rank] * s[:rank], vh[:rank]  # (out, r), (r, in)
    if clamp is not None:
        hi = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-hi, hi), a.clamp(-hi, hi)
    return b, a


# --- one wrapped module ------------------------------------------------------------------------------
@dataclasses.dataclass
class Options:
    """The knobs of add_weighted_adapter that reach each module."""

    combination: str
    svd_rank: Optional[int] = None
    svd_clamp: Optional[float] = None
    svd_full_matrices: bool = True
    density: Optional[float] = None
    sign_method: str = "total"
    generator: Optional[torch.Generator] = None


def combine_layer(layer: LoraLayer, path: str, held: list[tuple[str, float]],
                  opts: Options) -> tuple[torch.Tensor, torch.Tensor]:
    """The new (A, B) for one module from the (adapter, weight) pairs it holds, in the layer's A/B shapes."""
    a_list = [layer.A[n].detach().float() for n, _ in held]  # (r_i, in, *kernel)
    b_list = [layer.B[n].detach().float() for n, _ in held]  # (out, r_i, *ones)
    ws = [w * layer.scaling[n] for n, w in held]
    kind = opts.combination
    if kind == "cat":
        return torch.cat([w * a for w, a in zip(ws, a_list)]), torch.cat(b_list, 1)
    if kind.endswith("svd"):
        deltas = [layer.scaling[n] * (b.flatten(1) @ a.flatten(1)) for (n, _), a, b in zip(held, a_list, b_list)]
        merged = merge_tensors(deltas, [w for _, w in held], _task_kind(kind), opts.density, opts.sign_method,
                               opts.generator)  # (out, in * kernel)
        rank = opts.svd_rank or max(a.shape[0] for a in a_list)
        b, a = svd_factors(merged, rank, opts.svd_clamp, opts.svd_full_matrices)
        r = a.shape[0]
        return a.reshape(r, *a_list[0].shape[1:]), b.reshape(b.shape[0], r, *b_list[0].shape[2:])
    ranks = sorted({a.shape[0] for a in a_list})
    if len(ranks) > 1:
        raise ValueError(f"combination_type {kind!r} needs equal ranks, but at {path!r} the adapters have ranks "
                         f"{[a.shape[0] for a in a_list]} ({[n for n, _ in held]}); use 'cat' or an SVD type "
                         "('svd', 'ties_svd', ...), which handle different ranks")
    # the sign goes on A only, so B A carries sign(w s) |w s| (PEFT's convention, negation included)
    wa = [math.copysign(math.sqrt(abs(w)), w) for w in ws]
    wb = [math.sqrt(abs(w)) for w in ws]
    args = (opts.density, opts.sign_method, opts.generator)
    return merge_tensors(a_list, wa, kind, *args), merge_tensors(b_list, wb, kind, *args)


def _task_kind(combination: str) -> str:
    # "svd" merges deltas linearly; "ties_svd" -> "ties", ...
    return "linear" if combination == "svd" else combination[: -len("_svd")]


# --- the whole model ---------------------------------------------------------------------------------
def add_weighted_adapter(model, adapters: list[str], weights: list[float], adapter_name: str,
                         opts: Options) -> None:
    """Add ``adapter_name`` to the PeftModel ``model``: ``adapters`` combined with ``weights`` as ``opts`` says.
    The sources are LoRA adapters of ``model``, checked as such by PeftModel.add_weighted_adapter."""
    _check(model, adapters, weights, opts)
    if len(adapters) == 1:  # PEFT's rule; linear is exact for a single adapter
        opts = dataclasses.replace(opts, combination="linear")
    factors = {}  # module path -> (A, B)
    with torch.no_grad():
        for path, layer in adapter_layers(model.base_model):
            held = [(n, float(w)) for n, w in zip(adapters, weights) if isinstance(layer, LoraLayer) and n in layer.A]
            if held:
                factors[path] = combine_layer(layer, path, held, opts)
    model.add_adapter(adapter_name, _new_config(model, adapters, {p: a.shape[0] for p, (a, _) in factors.items()}))
    with torch.no_grad():
        for path, (a, b) in factors.items():
            layer = model.base_model.get_submodule(path)
            layer.A[adapter_name].copy_(a)
            layer.B[adapter_name].copy_(b)


def _check(model, adapters: list[str], weights: list[float], opts: Options) -> None:
    # LoRA's own refusals, before any work (PeftModel.add_weighted_adapter checked what every method shares)
    for name in adapters:
        if model.peft_config[name].use_dora:
            raise ValueError(f"adapter {name!r} uses DoRA, whose magnitude vector does not combine linearly; "
                             "add_weighted_adapter supports plain LoRA adapters")
    _check_options(opts)


def _check_options(opts: Options) -> None:
    if opts.combination not in COMBINATIONS:
        raise ValueError(f"combination_type {opts.combination!r} is not one of {COMBINATIONS}")
    prunes = any(k in opts.combination for k in ("ties", "dare", "magnitude_prune"))
    if prunes and opts.density is None:
        raise ValueError(f"combination_type {opts.combination!r} needs density, the fraction of entries kept, in (0, 1]")
    if opts.density is not None and not 0 < opts.density <= 1:
        raise ValueError(f"density must be in (0, 1] (the fraction of entries kept), got {opts.density}")
    if opts.sign_method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, got {opts.sign_method!r}")
    if opts.svd_rank is not None and (not isinstance(opts.svd_rank, int) or opts.svd_rank <= 0):
        raise ValueError(f"svd_rank must be a positive integer or None, got {opts.svd_rank!r}")
    if opts.svd_clamp is not None and not 0 < opts.svd_clamp <= 1:
        raise ValueError(f"svd_clamp is a quantile in (0, 1], got {opts.svd_clamp}")


def _new_config(model, adapters: list[str], ranks: dict[str, int]) -> LoraConfig:
    # scaling 1 everywhere: alpha = rank per module, no rsLoRA; modules whose rank differs go to rank_pattern
    blocks = block_wrappers(model.base_model)
    ranks = {plain_name(path, blocks): rank for path, rank in ranks.items()}  # named as on a plain base
    counts = Counter(ranks.values())
    r = max(counts, key=lambda rank: (counts[rank], rank))  # the most common rank (the larger on a tie)
    pattern = module_pattern(ranks, r)
    return dataclasses.replace(
        model.peft_config[adapters[0]], r=r, lora_alpha=r, use_rslora=False, rank_pattern=pattern,
        alpha_pattern=dict(pattern), target_modules=_targets(model, sorted(ranks)), exclude_modules=None,
        layers_to_transform=None, layers_pattern=None, modules_to_save=None, bias="none", init_lora_weights=True)


def module_pattern(values: dict[str, float], default: float) -> dict[str, float]:
    """A rank_pattern / alpha_pattern giving each module path its value where it differs from ``default``.

    Keyed by the leaf name ("k_proj") where every listed module of that name has one value, else by the
    escaped full path.
    """
    by_leaf: dict[str, set] = {}
    for path, value in values.items():
        by_leaf.setdefault(path.rsplit(".", 1)[-1], set()).add(value)
    pattern = {}
    for path, value in values.items():
        leaf = path.rsplit(".", 1)[-1]
        if value != default:
            pattern[re.escape(leaf) if len(by_leaf[leaf]) == 1 else re.escape(path)] = value
    return pattern


def _targets(model, paths: list[str]) -> list[str]:
    # the leaf names ("q_proj") when they pick exactly these modules, else the full paths; named as on a plain
    # base (no bottleneck adapter's base_layer), so the result reloads there
    blocks = block_wrappers(model.base_model)
    paths = sorted({plain_name(p, blocks) for p in paths})
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    inside = _wrapper_prefixes(model.base_model)
    picked = {plain_name(n, blocks) for n, m in model.base_model.named_modules()
              if n and not n.startswith(inside) and not getattr(m, "wraps_block", False) and name_matches(n, leaves)}
    return leaves if picked == set(paths) else paths
