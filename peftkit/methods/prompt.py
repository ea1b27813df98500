"""Prompt tuning (Lester et al., 2021) and P-tuning (Liu et al., 2021): learned virtual tokens.

Both prepend ``num_virtual_tokens`` embeddings to the input embeddings and leave the base model's
weights alone. Prompt tuning learns the embeddings directly (Lester et al., Sec. 2); P-tuning produces
them with a small prompt encoder, an MLP or a bidirectional LSTM + MLP (Liu et al., Sec. 3.2). The
per-adapter module lives in ``PeftModel.prompt_modules``, outside the base model.

On disk, as in Hugging Face PEFT, an adapter is one tensor ``prompt_embeddings``
(num_virtual_tokens * num_transformer_submodules, token_dim): the encoder's OUTPUT for P-tuning, so a
loaded P-tuning adapter is plain embeddings (its encoder is not saved).
"""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..config import PeftConfig, register, saved_module_names
from ..inject import Method

INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")
ENCODERS = ("MLP", "LSTM")
# model.config attributes PEFT reads for each shared field, first found wins (_prepare_prompt_learning_config)
_FROM_MODEL = {
    "num_layers": ("num_hidden_layers", "num_layers", "n_layer"),
    "token_dim": ("hidden_size", "n_embd", "d_model"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
}
_POSITION_TABLES = ("position_embeddings", "wpe", "embed_positions")  # learned absolute positions: a hard limit


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields every prompt method shares; unset model sizes are read from ``model.config`` at injection."""

    num_virtual_tokens: Optional[int] = None  # how many virtual tokens are prepended
    token_dim: Optional[int] = None  # hidden size of the base model's input embeddings
    num_transformer_submodules: Optional[int] = None  # 2 for SEQ_2_SEQ_LM (PEFT's layout), else 1
    num_attention_heads: Optional[int] = None  # recorded as PEFT does (prefix tuning uses it)
    num_layers: Optional[int] = None  # recorded as PEFT does (prefix tuning uses it)
    modules_to_save: Optional[list[str]] = None  # modules trained in full and saved, e.g. a new head

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        self.modules_to_save = saved_module_names(self.modules_to_save)

    @property
    def total_virtual_tokens(self) -> int:
        """Rows of the saved embeddings: PEFT keeps one block per transformer submodule."""
        return self.num_virtual_tokens * (self.num_transformer_submodules or 1)


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning settings, field names as in Hugging Face PEFT."""

    prompt_tuning_init: str = "RANDOM"  # RANDOM (N(0, 1)), TEXT (embeddings of init text), SAMPLE_VOCAB
    prompt_tuning_init_text: Optional[str] = None  # the text for TEXT
    tokenizer_name_or_path: Optional[str] = None  # a LOCAL tokenizer directory for TEXT (no downloads)
    tokenizer_kwargs: Optional[dict] = None  # passed to AutoTokenizer.from_pretrained for TEXT

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prompt_tuning_init = getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)  # PEFT's enum
        if self.prompt_tuning_init not in INITS:
            raise ValueError(f"prompt_tuning_init must be one of {INITS}, got {self.prompt_tuning_init!r}")
        text_missing = not self.tokenizer_name_or_path or self.prompt_tuning_init_text is None
        if self.prompt_tuning_init == "TEXT" and text_missing:
            raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text and tokenizer_name_or_path "
                             "(a local tokenizer directory)")
        if self.tokenizer_kwargs and self.prompt_tuning_init != "TEXT":
            raise ValueError("tokenizer_kwargs only apply with prompt_tuning_init='TEXT'")


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning settings, field names as in Hugging Face PEFT."""

    encoder_reparameterization_type: str = "MLP"  # MLP (always 2 hidden layers, as PEFT) or LSTM
    encoder_hidden_size: Optional[int] = None  # hidden size of the encoder; token_dim when unset
    encoder_num_layers: int = 2  # LSTM layers (the MLP ignores it, as in PEFT)
    encoder_dropout: float = 0.0  # dropout between LSTM layers

    def __post_init__(self) -> None:
        super().__post_init__()
        kind = getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type)
        if kind not in ENCODERS:
            raise ValueError(f"encoder_reparameterization_type must be one of {ENCODERS}, got {kind!r}")
        self.encoder_reparameterization_type = kind
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout}")


class PromptEmbedding(nn.Module):
    """Prompt tuning's module: the virtual-token embeddings themselves."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.embedding = nn.Embedding(*weight.shape)
        with torch.no_grad():
            self.embedding.weight.copy_(weight)

    def forward(self) -> torch.Tensor:
        """The virtual tokens, (total_virtual_tokens, token_dim)."""
        return self.embedding.weight

    def prompt_embeddings(self) -> torch.Tensor:
        """The tensor saved under PEFT's ``prompt_embeddings`` key."""
        return self.embedding.weight

    def use_saved_embeddings(self) -> None:
        """Nothing to drop: the embeddings are what is saved."""

    def holds_encoder(self) -> bool:
        """Whether the saved tensor is an encoder's output (which loading would put in place of the encoder)."""
        return False


class PromptEncoder(PromptEmbedding):
    """P-tuning's module: embeddings fed through an MLP or a bidirectional LSTM + MLP (PEFT's layout)."""

    def __init__(self, weight: torch.Tensor, config: PromptEncoderConfig) -> None:
        super().__init__(weight)
        dim, hidden = config.token_dim, config.encoder_hidden_size or config.token_dim
        self.lstm_head: Optional[nn.LSTM] = None
        self.mlp_head: Optional[nn.Sequential] = None
        if config.inference_mode:
            return  # a loaded adapter is its saved embeddings; PEFT builds no encoder then either
        if config.encoder_reparameterization_type == "LSTM":
            self.lstm_head = nn.LSTM(dim, hidden, num_layers=config.encoder_num_layers, dropout=config.encoder_dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))

    def forward(self) -> torch.Tensor:
        """The encoder's output, (total_virtual_tokens, token_dim)."""
        x = self.embedding.weight
        if self.lstm_head is not None:
            x = self.lstm_head(x.unsqueeze(0))[0].squeeze(0)  # (tokens, 2 * hidden)
        return x if self.mlp_head is None else self.mlp_head(x)

    def prompt_embeddings(self) -> torch.Tensor:
        """The encoder's output (what PEFT saves), or the plain embeddings once the encoder is dropped."""
        return self()

    def use_saved_embeddings(self) -> None:
        """Drop the encoder: a checkpoint holds its output, which goes straight into the embeddings."""
        self.lstm_head = None
        self.mlp_head = None

    def holds_encoder(self) -> bool:
        return self.mlp_head is not None or self.lstm_head is not None


def model_setting(model: nn.Module, field: str):
    """The model config's value for a prompt config ``field`` (num_layers, token_dim, num_attention_heads) under
    any of its names (_FROM_MODEL), or None."""
    model_config = getattr(model, "config", None)
    model_config = getattr(model_config, "text_config", None) or model_config
    return next((getattr(model_config, n) for n in _FROM_MODEL[field] if getattr(model_config, n, None) is not None),
                None)


def fill_from_model(model: nn.Module, config: PromptLearningConfig, check_dim: bool = True) -> None:
    """Fill unset sizes from ``model.config`` as PEFT does; check the config fits the model."""
    for field in _FROM_MODEL:
        if getattr(config, field) is None:
            found = model_setting(model, field)
            if found is None:
                raise ValueError(f"cannot read {field} from the model's config; set {field} in the prompt config")
            setattr(config, field, found)
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if config.task_type == "SEQ_2_SEQ_LM" else 1
    if config.num_transformer_submodules != 1 and not getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"num_transformer_submodules={config.num_transformer_submodules} is for encoder-decoder models "
                         "(SEQ_2_SEQ_LM); this model has one stack: leave it unset (or 1)")
    embeddings = input_embeddings(model)
    if check_dim and embeddings.weight.shape[1] != config.token_dim:
        raise ValueError(f"token_dim={config.token_dim} but the model's input embeddings have size "
                         f"{embeddings.weight.shape[1]}; leave token_dim unset to take it from the model")
    limit = position_limit(model)
    if limit is not None and config.num_virtual_tokens >= limit:
        raise ValueError(f"num_virtual_tokens={config.num_virtual_tokens} leaves no room in the model's "
                         f"{limit} positions; use fewer virtual tokens")


def input_embeddings(model: nn.Module) -> nn.Module:
    """The model's token embedding table (an nn.Embedding, or another adapter's wrapper of one, e.g. LoRA on
    embed_tokens: called, it gives the embeddings with that adapter's state), or a clear error."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if not isinstance(getattr(embeddings, "base_layer", embeddings), nn.Embedding):
        raise ValueError(f"{type(model).__name__} has no token input embeddings (get_input_embeddings() gives "
                         f"{type(embeddings).__name__}); prompt methods prepend to those, so they cannot apply")
    return embeddings


def position_limit(model: nn.Module) -> Optional[int]:
    """Rows of a learned absolute position table (BERT, GPT-2, OPT); None for relative / rotary positions."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in _POSITION_TABLES:
            return module.num_embeddings
    return None


def initial_embeddings(model: nn.Module, config: PromptLearningConfig) -> torch.Tensor:
    """(total_virtual_tokens, token_dim) float32 start values, as PEFT's PromptEmbedding makes them."""
    total, table = config.total_virtual_tokens, input_embeddings(model)
    words = getattr(table, "base_layer", table)  # the base table (not another adapter's wrapper), as PEFT reads
    init = getattr(config, "prompt_tuning_init", "RANDOM")
    if init != "RANDOM" and getattr(config, "_from_saved", False):  # the saved values replace these: no tokenizer
        return torch.zeros(total, config.token_dim)  # (which may exist only where the adapter was trained)
    if init == "RANDOM":
        return nn.Embedding(total, config.token_dim).weight.detach()  # N(0, 1), nn.Embedding's default
    if init == "SAMPLE_VOCAB":
        ids = torch.randint(0, words.num_embeddings, (total,), device=words.weight.device)
    else:
        ids = torch.tensor(_text_ids(config, total), device=words.weight.device)
    return words(ids).detach().float().cpu()


def _text_ids(config: PromptTuningConfig, total: int) -> list[int]:
    # the init text's tokens repeated / cut to fill every virtual token (PEFT's rule)
    from transformers import AutoTokenizer

    kwargs = {**(config.tokenizer_kwargs or {}), "local_files_only": True}  # never a download
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    except OSError as err:
        raise ValueError(f"prompt_tuning_init='TEXT' reads the tokenizer from tokenizer_name_or_path="
                         f"{config.tokenizer_name_or_path!r}, which is not a local tokenizer directory (peftkit does not "
                         "download): save the tokenizer there (tokenizer.save_pretrained(dir)) and pass that "
                         "directory") from err
    ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
    if not ids:
        raise ValueError("prompt_tuning_init_text tokenises to nothing; give a non-empty text")
    return (ids * math.ceil(total / len(ids)))[:total]


class PromptMethod(Method):
    """Prepend virtual tokens to the input embeddings (encoder side for seq2seq models)."""

    mergeable = False  # no weight update equals extra tokens
    acts_on_inputs = True

    def inject(self, model: nn.Module, config: PromptLearningConfig, adapter_name: str) -> list[str]:
        """Touch no module of the base model; check the config fits it and fill its sizes."""
        fill_from_model(model, config)
        if isinstance(config, PromptEncoderConfig) and config.encoder_hidden_size is None:
            config.encoder_hidden_size = config.token_dim  # recorded, so PEFT can rebuild the encoder
        return []

    def input_module(self, model: nn.Module, config: PromptLearningConfig, adapter_name: str) -> nn.Module:
        """The virtual tokens' module, on the embeddings' device."""
        weight = initial_embeddings(model, config)
        if isinstance(config, PromptEncoderConfig):
            module = PromptEncoder(weight, config)
        else:
            module = PromptEmbedding(weight)
        return module.to(input_embeddings(model).weight.device)

    def run(self, model: nn.Module, module: nn.Module, config: PromptLearningConfig, inputs: dict, generate: bool):
        """Forward or generate with the virtual tokens prepended to the inputs."""
        ids = inputs.get("input_ids")
        inputs = with_virtual_tokens(model, module(), config.num_virtual_tokens, inputs, config.task_type)
        if not generate:
            return model(**inputs)
        if getattr(model.config, "is_encoder_decoder", False):
            return model.generate(**inputs)  # the virtual tokens are the encoder's: no generated length changes
        out = model.generate(**lengths_past(inputs, model, config.num_virtual_tokens))
        if ids is None:
            return out
        # from inputs_embeds, generate returns only new tokens; PEFT returns both (each prompt once per returned row)
        return map_sequences(out, lambda seq: torch.cat([ids.repeat_interleave(seq.shape[0] // ids.shape[0], dim=0),
                                                         seq], dim=1))


def lengths_past(inputs: dict, model: nn.Module, count: int) -> dict:
    """generate's ``inputs`` with a set max_length / min_length (in the call, in a generation_config passed, or in
    the model's own) moved past ``count`` positions that generate is given ahead of the caller's tokens (virtual
    tokens, prefix stand-ins): these lengths count the caller's tokens and the new ones, as in PEFT.
    max_new_tokens / min_new_tokens, which take precedence, and transformers' defaults need nothing. A length from
    a generation_config passed is moved in a copy of it (beside it, a keyword is deprecated in transformers).
    (Before transformers 5, whose GenerationConfig leaves lengths unset, a config's max_length of 20 was the
    default: there only the call's own values count as set, as transformers took them.)"""
    inputs = dict(inputs)
    passed = inputs.get("generation_config")
    configs = [passed, getattr(model, "generation_config", None)] if _lengths_unset_by_default() else []
    moved = None  # the copy of ``passed``, where a length came from it
    for key, new_key in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
        value, source = _generation_setting(inputs, configs, key)
        if not value or _generation_setting(inputs, configs, new_key)[0] is not None:
            continue
        if source is passed:
            moved = copy.deepcopy(passed) if moved is None else moved
            setattr(moved, key, value + count)
        else:
            inputs[key] = value + count
    if moved is not None:
        inputs["generation_config"] = moved
    return inputs


@functools.lru_cache(maxsize=None)
def _lengths_unset_by_default() -> bool:
    """Whether transformers' GenerationConfig leaves max_length unset (transformers 5) rather than at 20."""
    from transformers import GenerationConfig

    return GenerationConfig().max_length is None


def _generation_setting(call: dict, configs: list, key: str) -> tuple:
    """(value, the config it came from) of one generation setting: the call's own, None included (transformers lets
    it override the configs'), else the first config that sets it; (None, None) where none does."""
    if key in call:
        return call[key], call
    for config in configs:
        if config is not None and getattr(config, key, None) is not None:
            return getattr(config, key), config
    return None, None


def map_sequences(out, edit):
    """``generate``'s output with ``edit`` applied to its token ids: the tensor itself, or the ``sequences`` of the
    output object it returns with return_dict_in_generate=True (scores and the rest cover generated tokens only)."""
    if isinstance(out, torch.Tensor):
        return edit(out)
    out.sequences = edit(out.sequences)
    return out


def with_virtual_tokens(model: nn.Module, prompts: torch.Tensor, count: int, inputs: dict,
                        task_type: Optional[str] = None) -> dict:
    """``inputs`` with ``prompts[:count]`` before the token embeddings, and masks / labels / positions to match.
    Token-level labels (integer, one per input token; never for a SEQ_CLS task, whose multi-label targets may
    happen to have the sequence's length) get -100 for the virtual tokens."""
    inputs = dict(inputs)
    ids = inputs.pop("input_ids", None)
    embeds = inputs.pop("inputs_embeds", None)
    if embeds is None:
        if ids is None:
            raise ValueError("pass input_ids or inputs_embeds")
        embeds = input_embeddings(model)(ids)  # (batch, seq, dim)
    batch, seq = embeds.shape[:2]
    limit = position_limit(model)
    if limit is not None and count + seq > limit:
        raise ValueError(f"{seq} tokens + {count} virtual tokens exceed the model's {limit} positions; "
                         "shorten the input")
    # expanded, then cast: the batch's gradients are summed in the prompts' float32, as in PEFT (cast first, they
    # were summed in a bf16 base's dtype: ~2e-3 off)
    virtual = prompts[:count].unsqueeze(0).expand(batch, -1, -1).to(embeds.dtype)  # (batch, count, dim)
    inputs["inputs_embeds"] = torch.cat([virtual, embeds], dim=1)
    prepend_columns(inputs, "attention_mask", 1, count)
    if not getattr(model.config, "is_encoder_decoder", False):  # seq2seq: labels / positions belong to the decoder
        prepend_columns(inputs, "token_type_ids", 0, count)
        labels = inputs.get("labels")
        if (labels is not None and labels.dim() >= 2 and labels.shape[1] == seq and not labels.is_floating_point()
                and task_type != "SEQ_CLS"):  # token-level labels
            prepend_columns(inputs, "labels", -100, count)
        positions = inputs.get("position_ids")
        if positions is not None:  # virtual tokens take 0..count-1, the input moves up by count
            start = torch.arange(count, device=positions.device).expand(positions.shape[0], -1)
            inputs["position_ids"] = torch.cat([start, positions + count], dim=1)
    return inputs


def prepend_columns(inputs: dict, key: str, value: int, count: int) -> None:
    """Prepend ``count`` columns of ``value`` to the (batch, seq, ...) tensor ``inputs[key]``, if given."""
    tensor = inputs.get(key)
    if tensor is not None:
        pad = torch.full((tensor.shape[0], count, *tensor.shape[2:]), value, dtype=tensor.dtype, device=tensor.device)
        inputs[key] = torch.cat([pad, tensor], dim=1)


register("PROMPT_TUNING", PromptTuningConfig, PromptMethod())
register("P_TUNING", PromptEncoderConfig, PromptMethod())
