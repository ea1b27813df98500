"""Prefix tuning (Li and Liang, 2021): learned key / value prefixes for every attention layer.

Each layer attends to ``num_virtual_tokens`` extra key / value vectors before the input (Sec. 4.1).
They reach the model through its attention cache: a transformers ``DynamicCache`` pre-filled with the
prefixes, so grouped-query attention works with ``num_key_value_heads`` heads per prefix (PEFT's rule:
``token_dim`` = head_dim * num_key_value_heads). With ``prefix_projection`` the prefixes come from an
MLP over smaller embeddings during training (Sec. 4.3, the reparameterisation). On disk, as in PEFT: one
tensor ``prompt_embeddings`` (num_virtual_tokens, num_layers * 2 * token_dim), the MLP's output.
Decoder-only models (causal LM, sequence classification); encoder-decoder models are refused.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..config import register
from ..inject import Method
from .prompt import PromptEmbedding, PromptLearningConfig, fill_from_model, input_embeddings, prepend_columns


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning settings, field names as in Hugging Face PEFT."""

    encoder_hidden_size: Optional[int] = None  # hidden size of the prefix MLP; token_dim when unset
    prefix_projection: bool = False  # True: prefixes come from an MLP during training


class PrefixEncoder(PromptEmbedding):
    """Prefixes of every layer, (num_virtual_tokens, num_layers * 2 * token_dim), optionally from an MLP."""

    def __init__(self, config: PrefixTuningConfig) -> None:
        width = config.num_layers * 2 * config.token_dim
        project = config.prefix_projection and not config.inference_mode
        start = nn.Embedding(config.num_virtual_tokens, config.token_dim if project else width).weight  # N(0, 1)
        super().__init__(start.detach())
        self.transform: Optional[nn.Sequential] = None
        if project:
            self.transform = nn.Sequential(nn.Linear(config.token_dim, config.encoder_hidden_size), nn.Tanh(),
                                           nn.Linear(config.encoder_hidden_size, width))

    def forward(self) -> torch.Tensor:
        """(num_virtual_tokens, num_layers * 2 * token_dim)."""
        x = self.embedding.weight
        return x if self.transform is None else self.transform(x)

    def prompt_embeddings(self) -> torch.Tensor:
        """The MLP's output (what PEFT saves), or the plain prefixes."""
        return self()

    def use_saved_embeddings(self) -> None:
        """Drop the MLP: a checkpoint holds its output, which becomes the prefixes."""
        if self.transform is not None:
            width = self.transform[-1].out_features
            self.embedding = nn.Embedding(self.embedding.num_embeddings, width).to(self.embedding.weight.device)
            self.transform = None


def cache_argument(model: nn.Module) -> Optional[str]:
    """The name forward takes the attention cache by: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    parameters = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def _check_model(model: nn.Module) -> None:
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ValueError("prefix tuning in peftkit supports decoder-only models; for an encoder-decoder model "
                         "(T5, BART) use prompt tuning or P-tuning")
    if cache_argument(model) is None:
        raise ValueError(f"{type(model).__name__}.forward takes no past_key_values (no attention cache), which "
                         "prefix tuning feeds its prefixes through; use prompt tuning or P-tuning")


class PrefixMethod(Method):
    """Feed per-layer key / value prefixes through the attention cache."""

    mergeable = False  # extra keys / values are no weight update
    acts_on_inputs = True

    def inject(self, model: nn.Module, config: PrefixTuningConfig, adapter_name: str) -> list[str]:
        """Touch no module; check the model has a cache and fill the sizes (GQA: kv heads) as PEFT does."""
        _check_model(model)
        input_embeddings(model)
        fill_from_model(model, config, check_dim=False)
        model_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        kv_heads = getattr(model_config, "num_key_value_heads", None)
        if kv_heads is not None:
            head_dim = getattr(model_config, "head_dim", None) or config.token_dim // config.num_attention_heads
            config.token_dim, config.num_attention_heads = head_dim * kv_heads, kv_heads
        if config.encoder_hidden_size is None:
            config.encoder_hidden_size = config.token_dim
        return []

    def input_module(self, model: nn.Module, config: PrefixTuningConfig, adapter_name: str) -> nn.Module:
        """The prefix module, on the embeddings' device."""
        return PrefixEncoder(config).to(input_embeddings(model).weight.device)

    def run(self, model: nn.Module, module: nn.Module, config: PrefixTuningConfig, inputs: dict, generate: bool):
        """Forward or generate with the prefixes pre-filled in a fresh cache."""
        inputs, cache_name = dict(inputs), cache_argument(model)
        if inputs.get("past_key_values") is not None or inputs.get("cache") is not None:
            raise ValueError("with a prefix adapter the cache holds the prefixes; do not pass one")
        reference = inputs.get("input_ids") if inputs.get("input_ids") is not None else inputs.get("inputs_embeds")
        count = config.num_virtual_tokens
        inputs[cache_name] = prefix_cache(model, module(), config, reference.shape[0])
        if inputs.get("attention_mask") is None:
            inputs["attention_mask"] = torch.ones(reference.shape[:2], dtype=torch.long, device=reference.device)
        prepend_columns(inputs, "attention_mask", 1, count)
        if inputs.get("position_ids") is not None:
            inputs["position_ids"] = inputs["position_ids"] + count  # the prefixes hold positions 0..count-1
        if not generate:
            return model(**inputs)
        # generate skips the input positions the cache already covers: stand-in ids for the prefixes, cut after
        ids = inputs.pop("input_ids")
        stand_in = torch.zeros(ids.shape[0], count, dtype=ids.dtype, device=ids.device)
        return model.generate(input_ids=torch.cat([stand_in, ids], dim=1), **inputs)[:, count:]


def prefix_cache(model: nn.Module, prefixes: torch.Tensor, config: PrefixTuningConfig, batch: int):
    """A DynamicCache holding each layer's (batch, kv_heads, num_virtual_tokens, head_dim) keys and values."""
    from transformers import DynamicCache

    layers, heads = config.num_layers, config.num_attention_heads
    dtype = input_embeddings(model).weight.dtype
    # (n, layers * 2 * token_dim) -> (layers * 2, heads, n, head_dim), PEFT's order: layer-major, key before value
    kv = prefixes.to(dtype).view(config.num_virtual_tokens, layers * 2, heads, -1).permute(1, 2, 0, 3)
    cache = DynamicCache(config=model.config)
    for layer in range(layers):
        keys = kv[2 * layer].unsqueeze(0).expand(batch, -1, -1, -1)
        values = kv[2 * layer + 1].unsqueeze(0).expand(batch, -1, -1, -1)
        cache.update(keys, values, layer)
    return cache


register("PREFIX_TUNING", PrefixTuningConfig, PrefixMethod())
