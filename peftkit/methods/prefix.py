"""Prefix tuning (Li and Liang, 2021): learned key / value prefixes for every attention layer.

Each layer attends to ``num_virtual_tokens`` extra key / value vectors before the input (Sec. 4.1).
They reach the model through its attention cache: a transformers ``DynamicCache`` pre-filled with the
prefixes, so grouped-query attention works with ``num_key_value_heads`` heads per prefix (PEFT's rule:
``token_dim`` = head_dim * num_key_value_heads). With ``prefix_projection`` the prefixes come from an
MLP over smaller embeddings during training (Sec. 4.3, the reparameterisation). On disk, as in PEFT: one
tensor ``prompt_embeddings`` (num_virtual_tokens, num_layers * 2 * token_dim), the MLP's output.
Decoder-only models (causal LM, sequence classification) and encoder-decoder models (T5, BART). For the
latter PEFT's behaviour is kept: the encoder sees no prefix, the decoder's self-attention does (an
``EncoderDecoderCache`` whose cross-attention half starts empty, so cross-attention sees the encoder only).
The on-disk layout is the same as for a decoder-only model (PEFT builds the cross-attention copy it then
discards from the same rows).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..config import register
from ..inject import Method
from ..layers import checkpointing
from .prompt import (PromptEmbedding, PromptLearningConfig, fill_from_model, input_embeddings, lengths_past,
                     map_sequences, model_setting, position_limit, prepend_columns)


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning settings, field names as in Hugging Face PEFT."""

    init_weights: Optional[str] = None  # None: random prefixes; "zero": zero prefixes (the MLP's last layer zero)
    encoder_hidden_size: Optional[int] = None  # hidden size of the prefix MLP; token_dim when unset
    prefix_projection: bool = False  # True: prefixes come from an MLP during training

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None (random) or 'zero', got {self.init_weights!r}")


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
        if config.init_weights == "zero":  # PEFT zeroes what produces the prefixes: the table or the MLP's output layer
            for param in (self.embedding if self.transform is None else self.transform[-1]).parameters():
                nn.init.zeros_(param)

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

    def holds_encoder(self) -> bool:
        return self.transform is not None


NO_CHECKPOINTING = ("prefix tuning feeds its prefixes through the attention cache, which transformers turns off under "
                    "gradient checkpointing in training; train prefix tuning without gradient checkpointing (its "
                    "trained values are small: prompt tuning or LoRA take checkpointing)")


@contextlib.contextmanager
def _checkpointing_off(model: nn.Module):
    """transformers' per-module gradient_checkpointing flags off within the block, back as they were after."""
    flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in flagged:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in flagged:
            m.gradient_checkpointing = True


def cache_argument(model: nn.Module) -> Optional[str]:
    """The name forward takes the attention cache by: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    parameters = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def is_encoder_decoder(model: nn.Module) -> bool:
    """True for T5 / BART-like models (the prefixes go to the decoder)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _check_model(model: nn.Module) -> None:
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
        _check_decoder_layers(model, config)
        return []

    def input_module(self, model: nn.Module, config: PrefixTuningConfig, adapter_name: str) -> nn.Module:
        """The prefix module, on the embeddings' device."""
        return PrefixEncoder(config).to(input_embeddings(model).weight.device)

    def run(self, model: nn.Module, module: nn.Module, config: PrefixTuningConfig, inputs: dict, generate: bool):
        """Forward or generate with the prefixes pre-filled in a fresh cache."""
        if model.training and checkpointing(model):
            if torch.is_grad_enabled():  # transformers drops the cache, where the prefixes live
                raise ValueError(NO_CHECKPOINTING)
            # without grad nothing is checkpointed anyway; some models (GPT-2) drop the cache under the flag whatever
            # the grad mode, so the flag is off for this call (a no-grad forward or generate mid-training)
            with _checkpointing_off(model):
                return self._run(model, module, config, inputs, generate)
        return self._run(model, module, config, inputs, generate)

    def _run(self, model: nn.Module, module: nn.Module, config: PrefixTuningConfig, inputs: dict, generate: bool):
        inputs, cache_name = dict(inputs), cache_argument(model)
        if inputs.get("past_key_values") is not None or inputs.get("cache") is not None:
            raise ValueError("with a prefix adapter the cache holds the prefixes; do not pass one")
        reference = inputs.get("input_ids") if inputs.get("input_ids") is not None else inputs.get("inputs_embeds")
        if reference is None:  # e.g. Whisper's input_features, ViT's pixel_values
            raise ValueError(f"prefix tuning runs on token inputs: pass input_ids or inputs_embeds (got "
                             f"{sorted(k for k, v in inputs.items() if v is not None)}); for other inputs use LoRA or IA3")
        count = config.num_virtual_tokens
        limit = None if is_encoder_decoder(model) else position_limit(model)
        if limit is not None and count + reference.shape[1] > limit:  # the prefixes hold positions 0..count-1
            raise ValueError(f"{reference.shape[1]} tokens + {count} prefix positions exceed the model's {limit} "
                             "positions; shorten the input")
        rows = reference.shape[0] * (_generate_rows(model, inputs) if generate else 1)
        inputs[cache_name] = prefix_cache(model, module(), config, rows)
        if is_encoder_decoder(model):
            return _run_seq2seq(model, inputs, count, generate)
        if generate and inputs.get("attention_mask") is None:
            # generate would build a mask from the ids, and a pad id equal to the stand-ins' 0 would hide the prefixes
            inputs["attention_mask"] = torch.ones(reference.shape[:2], dtype=torch.long, device=reference.device)
        # without a mask the model's causal mask already covers the cached prefixes; an all-ones mask would only
        # send transformers down its slower padding-mask path (as PEFT, which also passes None on)
        prepend_columns(inputs, "attention_mask", 1, count)
        if inputs.get("position_ids") is not None:
            inputs["position_ids"] = inputs["position_ids"] + count  # the prefixes hold positions 0..count-1
        if not generate:
            return model(**inputs)
        # generate skips the input positions the cache already covers: stand-in ids for the prefixes, cut after
        ids = inputs.pop("input_ids")
        stand_in = torch.zeros(ids.shape[0], count, dtype=ids.dtype, device=ids.device)
        return map_sequences(model.generate(input_ids=torch.cat([stand_in, ids], dim=1),
                                            **lengths_past(inputs, model, count)), lambda seq: seq[:, count:])


def prefix_cache(model: nn.Module, prefixes: torch.Tensor, config: PrefixTuningConfig, batch: int):
    """A DynamicCache holding each layer's (batch, kv_heads, num_virtual_tokens, head_dim) keys and values.

    For an encoder-decoder model that cache is the decoder's self-attention half of an EncoderDecoderCache.
    """
    from transformers import DynamicCache

    layers, heads = config.num_layers, config.num_attention_heads
    dtype = input_embeddings(model).weight.dtype
    # (n, layers * 2 * token_dim) -> (layers * 2, heads, n, head_dim), PEFT's order: layer-major, key before value
    kv = prefixes.view(config.num_virtual_tokens, layers * 2, heads, -1).permute(1, 2, 0, 3)
    # PEFT reads (self key, self value, cross key, cross value) per layer for seq2seq (num_transformer_submodules=2)
    # from the rows repeated twice, so layer l's self-attention key is row 2 * submodules * l modulo the row count
    step = 2 * (config.num_transformer_submodules or 1)
    cache = DynamicCache(config=model.config)
    for layer in range(layers):
        row = (step * layer) % (2 * layers)
        # expanded, then cast to the model's dtype: the batch's gradients are summed in float32, as in PEFT
        keys = kv[row].unsqueeze(0).expand(batch, -1, -1, -1).to(dtype)
        values = kv[row + 1].unsqueeze(0).expand(batch, -1, -1, -1).to(dtype)
        cache.update(keys, values, layer)
    if is_encoder_decoder(model):
        from transformers import EncoderDecoderCache

        # cross-attention starts empty (is_updated False): it computes keys / values from the encoder, as in PEFT
        return EncoderDecoderCache(cache, DynamicCache(config=model.config))
    return cache


def _check_decoder_layers(model: nn.Module, config: PrefixTuningConfig) -> None:
    # num_layers comes from the encoder's count (PEFT's rule); the prefixes are the decoder's, so they must agree
    decoder = next((getattr(model.config, n) for n in ("num_decoder_layers", "decoder_layers")
                    if getattr(model.config, n, None) is not None), None)
    if is_encoder_decoder(model) and decoder is not None and decoder != config.num_layers:
        raise ValueError(f"prefix tuning has num_layers={config.num_layers} but the decoder has {decoder} layers; "
                         f"set num_layers={decoder} in the PrefixTuningConfig")
    layers = model_setting(model, "num_layers")
    if not is_encoder_decoder(model) and layers is not None and layers != config.num_layers:
        raise ValueError(f"prefix tuning has num_layers={config.num_layers} but the model has {layers} layers, each "
                         f"of which takes a prefix; set num_layers={layers} or leave it unset to take it from the model")


def _generate_rows(model: nn.Module, inputs: dict) -> int:
    """How many rows generate makes of each input row (beams, returned sequences): the prefix cache, which generate
    does not expand, is built with that many rows (every row holds the same prefixes).

    Refused first: generate without a cache (it would re-run the whole sequence each step, stand-in ids included,
    onto the same prefix cache: wrong tokens, no error), and decoder-only inputs_embeds (no stand-in ids)."""
    config = inputs.get("generation_config") or model.generation_config
    if inputs.get("use_cache", getattr(config, "use_cache", True)) is False:
        raise ValueError("prefix tuning feeds its prefixes through the attention cache: generate with use_cache=True "
                         "(the default)")
    if not is_encoder_decoder(model) and inputs.get("input_ids") is None:
        raise ValueError("prefix tuning's generate takes input_ids (inputs_embeds work in the forward pass)")
    beams = inputs.get("num_beams") or getattr(config, "num_beams", 1) or 1
    returned = inputs.get("num_return_sequences") or getattr(config, "num_return_sequences", 1) or 1
    return max(int(beams), int(returned))


def _run_seq2seq(model: nn.Module, inputs: dict, count: int, generate: bool):
    """Encoder-decoder forward / generate: the encoder inputs stay as they are, the decoder's cache holds prefixes."""
    if not generate:
        prepend_columns(inputs, "decoder_attention_mask", 1, count)
        return model(**inputs)
    # as for decoder-only generate: stand-in decoder ids (the start token) for the cached prefix positions, cut after
    start = model.generation_config.decoder_start_token_id
    start = model.config.decoder_start_token_id if start is None else start
    reference = inputs["input_ids"] if inputs.get("input_ids") is not None else inputs["inputs_embeds"]
    ids = inputs.pop("decoder_input_ids", None)
    if ids is None:
        ids = torch.full((reference.shape[0], 1), start, dtype=torch.long, device=reference.device)
    if inputs.get("decoder_attention_mask") is None:  # generate skips the cached positions only given a decoder mask
        inputs["decoder_attention_mask"] = torch.ones_like(ids)
    prepend_columns(inputs, "decoder_attention_mask", 1, count)
    stand_in = torch.full((ids.shape[0], count), start, dtype=ids.dtype, device=ids.device)
    return map_sequences(model.generate(decoder_input_ids=torch.cat([stand_in, ids], dim=1),
                                        **lengths_past(inputs, model, count)), lambda seq: seq[:, count:])


register("PREFIX_TUNING", PrefixTuningConfig, PrefixMethod())
