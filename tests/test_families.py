"""LoRA on each model family, from tiny random configs built in-process (no downloads).

Every family goes through the same life cycle (``_life_cycle``): unchanged at init, changed once the
adapter is trained or randomised, disable_adapter() gives the base, save + load onto a fresh base
reproduces the outputs, merge_and_unload() matches the unmerged model, and only adapter (and head)
parameters train. Family tests add what is particular to them (layer shapes, heads, generate).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from peftkit import (
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
    LoraConfig,
    PeftModel,
    get_peft_model,
)
from peftkit.layers import AdapterLayer, ModulesToSaveWrapper
from peftkit.methods.lora import LoraLayer

transformers = pytest.importorskip("transformers")

VOCAB = 64
MERGE_TOL = {"atol": 1e-5, "rtol": 1e-4}
EXACT = {"atol": 0.0, "rtol": 0.0}


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: threads cost more than they save


# --- tiny bases -----------------------------------------------------------------------------------
def tiny_llama(seed: int = 0, layers: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_t5(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                                dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return transformers.T5ForConditionalGeneration(cfg).eval()


def _bert_config() -> "transformers.BertConfig":
    return transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=32, num_labels=3,
                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def tiny_bert_seq_cls(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(_bert_config()).eval()


def tiny_bert_token_cls(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return transformers.BertForTokenClassification(_bert_config()).eval()


def tiny_bert_qa(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = _bert_config()
    config.num_labels = 2  # start and end logits
    return transformers.BertForQuestionAnswering(config).eval()


def tiny_bert_encoder(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return transformers.BertModel(_bert_config()).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=32, num_labels=3,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.ViTForImageClassification(cfg).eval()


def tiny_whisper(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.WhisperConfig(vocab_size=VOCAB, num_mel_bins=8, d_model=16, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                     decoder_ffn_dim=32, max_source_positions=8, max_target_positions=16,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                                     dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    return transformers.WhisperForConditionalGeneration(cfg).eval()


class ResBlock(nn.Module):
    """A diffusion-UNet-style residual block: two 3x3 convs and a 1x1 shortcut."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(2, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(2, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, padding_mode="replicate")
        self.conv_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.conv_shortcut(x) + h


class TinyUNet(nn.Module):
    """conv_in -> res block -> strided downsample -> res block -> upsample -> skip-concat block -> conv_out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.down_block = ResBlock(8, 8)
        self.downsample = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.mid_block = ResBlock(16, 16)
        self.up_block = ResBlock(24, 8)
        self.conv_out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h0 = self.down_block(self.conv_in(x))  # (b, 8, 8, 8)
        h1 = self.mid_block(self.downsample(h0))  # (b, 16, 4, 4)
        up = F.interpolate(h1, scale_factor=2.0, mode="nearest")  # (b, 16, 8, 8)
        return self.conv_out(self.up_block(torch.cat([up, h0], dim=1)))


def tiny_unet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyUNet().eval()


# --- inputs ---------------------------------------------------------------------------------------
def _ids(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


IDS = _ids()
DEC_IDS = _ids(seq=5, seed=2)
PIXELS = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
FEATURES = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(4))  # (batch, mel bins, 2 * source positions)


@torch.no_grad()
def run_lm(model: nn.Module) -> torch.Tensor:
    return model(input_ids=IDS).logits


def run_qa(model: nn.Module) -> torch.Tensor:
    out = model(input_ids=IDS)
    return torch.stack([out.start_logits, out.end_logits])


def run_encoder(model: nn.Module) -> torch.Tensor:
    return model(input_ids=IDS).last_hidden_state


@torch.no_grad()
def run_seq2seq(model: nn.Module) -> torch.Tensor:
    return model(input_ids=IDS, decoder_input_ids=DEC_IDS).logits


@torch.no_grad()
def run_vit(model: nn.Module) -> torch.Tensor:
    return model(pixel_values=PIXELS).logits


@torch.no_grad()
def run_unet(model: nn.Module) -> torch.Tensor:
    return model(PIXELS)


@torch.no_grad()
def run_whisper(model: nn.Module) -> torch.Tensor:
    return model(input_features=FEATURES, decoder_input_ids=DEC_IDS).logits


# --- changing the adapter -------------------------------------------------------------------------
def randomize(model: PeftModel, std: float = 0.2, seed: int = 5) -> None:
    """Give every LoRA B of the active adapter random values, so the adapter does something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for name in module.active_adapters:
                    b = module.B[name]
                    b.copy_(torch.randn(b.shape, generator=gen) * std)


def train(model: PeftModel, loss_fn, steps: int = 3, lr: float = 2e-2) -> None:
    """A few AdamW steps on ``loss_fn(model)`` over the trainable parameters."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model).backward()
        opt.step()
    model.eval()


def seq_cls_loss(model: nn.Module) -> torch.Tensor:
    return model(input_ids=IDS, labels=torch.tensor([0, 2])).loss


def token_cls_loss(model: nn.Module) -> torch.Tensor:
    labels = torch.arange(IDS.numel()).view_as(IDS) % 3
    return model(input_ids=IDS, labels=labels).loss


def qa_loss(model: nn.Module) -> torch.Tensor:
    return model(input_ids=IDS, start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([3, 4])).loss


def vit_loss(model: nn.Module) -> torch.Tensor:
    return model(pixel_values=PIXELS, labels=torch.tensor([1, 2])).loss


def unet_loss(model: nn.Module) -> torch.Tensor:
    return F.mse_loss(model(PIXELS), torch.zeros_like(PIXELS))


# --- shared checks --------------------------------------------------------------------------------
def trainable(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def assert_only_adapter_trains(model: PeftModel, heads: tuple[str, ...] = ()) -> None:
    names = trainable(model)
    lora = [n for n, _ in model.named_parameters() if ".lora_" in n]
    head = [n for n in names if ".modules_to_save.default." in n]
    assert lora and set(lora) <= set(names), "every LoRA tensor must train"
    assert set(names) == set(lora) | set(head), f"non-adapter parameters train: {sorted(set(names) - set(lora))}"
    assert sorted({n.split(".modules_to_save.")[0].split(".")[-1] for n in head}) == sorted(heads)


def _life_cycle(make_base, config: LoraConfig, run, tmp_path, change=randomize, heads=(), fresh_head=False):
    """The checks every family must pass; returns (merged model, output with the adapter)."""
    base = make_base()
    pristine = copy.deepcopy(base)
    base_out = run(base)
    model = get_peft_model(base, config)

    torch.testing.assert_close(run(model), base_out, **EXACT)  # B = 0: not a bit changes
    assert_only_adapter_trains(model, heads)

    change(model)
    out = run(model)
    assert (out - base_out).abs().max() > 1e-3, "the adapter has no effect on the output"
    with model.disable_adapter():
        torch.testing.assert_close(run(model), base_out, **EXACT)
    torch.testing.assert_close(run(model), out, **EXACT)  # enabled again after the block

    model.save_pretrained(str(tmp_path / "adapter"))
    fresh = copy.deepcopy(pristine)
    if fresh_head:  # a fresh head, as from_pretrained of a base checkpoint would give: the saved one must win
        for head in heads:
            for p in fresh.get_submodule(head).parameters():
                nn.init.normal_(p, std=1.0)
        assert (run(fresh) - base_out).abs().max() > 1e-3
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))
    torch.testing.assert_close(run(loaded), out, **EXACT)
    assert trainable(loaded) == [], "an adapter loaded for inference must be frozen"

    merged = model.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    assert type(merged) is type(pristine)
    torch.testing.assert_close(run(merged), out, **MERGE_TOL)
    return merged, out


# --- families -------------------------------------------------------------------------------------
def test_llama_causal_lm(tmp_path):
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                   "o_proj", "gate_proj", "down_proj"])
    _life_cycle(tiny_llama, config, run_lm, tmp_path)
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert saved["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (4, 32)
    assert saved["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (16, 4)
    assert saved["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"].shape == (8, 4)  # GQA: 1 kv head
    assert len(saved) == 2 * 6 * 2


GEN = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}


@pytest.mark.parametrize("make_base, config", [
    (tiny_llama, LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "up_proj"])),
    (tiny_t5, LoraConfig(task_type="SEQ_2_SEQ_LM", target_modules=["q", "k", "v", "o", "wi", "wo"])),
], ids=["llama", "t5"])
def test_generate_with_adapter_equals_merged(make_base, config):
    model = get_peft_model(make_base(), config)
    randomize(model, std=1.0)
    with model.disable_adapter():
        base_tokens = model.generate(input_ids=IDS, **GEN)
    tokens = model.generate(input_ids=IDS, **GEN)
    assert tokens.shape[1] >= 8 and not torch.equal(tokens, base_tokens), "the adapter should change greedy tokens"
    merged = model.merge_and_unload()
    assert torch.equal(merged.generate(input_ids=IDS, **GEN), tokens)


def test_t5_seq2seq(tmp_path):
    config = LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, target_modules=None)  # T5 default: q, v
    merged, _ = _life_cycle(tiny_t5, config, run_seq2seq, tmp_path)
    saved_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(saved_config["target_modules"]) == ["q", "v"]
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    # encoder self-attn, decoder self-attn and cross-attn: 2 + 2 * 2 attention blocks, q and v, A and B
    assert len(saved) == 6 * 2 * 2
    assert "base_model.model.decoder.block.1.layer.1.EncDecAttention.q.lora_A.weight" in saved


@pytest.mark.parametrize("make_base, task_type, loss", [
    (tiny_bert_seq_cls, "SEQ_CLS", seq_cls_loss),
    (tiny_bert_token_cls, "TOKEN_CLS", token_cls_loss),
], ids=["seq_cls", "token_cls"])
def test_bert_classification_head_trains_and_is_saved(tmp_path, make_base, task_type, loss):
    config = LoraConfig(task_type=task_type, r=4)  # BERT default targets: query, value
    original_head = copy.deepcopy(make_base().classifier.state_dict())

    def change(model):
        train(model, loss)
        head = model.base_model.classifier
        assert isinstance(head, ModulesToSaveWrapper)
        assert not torch.equal(head.modules_to_save["default"].weight, original_head["weight"]), "head did not train"
        assert torch.equal(head.base_layer.weight, original_head["weight"]), "the original head must stay intact"

    merged, _ = _life_cycle(make_base, config, run_lm, tmp_path, change=change, heads=("classifier",),
                            fresh_head=True)
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert saved["base_model.model.classifier.weight"].shape == (3, 16)
    assert "base_model.model.classifier.bias" in saved
    assert not torch.equal(saved["base_model.model.classifier.weight"], original_head["weight"])
    saved_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    # PEFT records both head names it looks for; only "classifier" exists in BERT
    assert saved_config["modules_to_save"] == ["classifier", "score"] and saved_config["task_type"] == task_type
    assert sorted(saved_config["target_modules"]) == ["query", "value"]
    assert isinstance(merged.classifier, nn.Linear)  # the trained copy replaces the wrapper
    assert not torch.equal(merged.classifier.weight, original_head["weight"])


def test_gpt2_conv1d(tmp_path):
    config = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["c_attn", "c_fc"])
    merged, _ = _life_cycle(tiny_gpt2, config, run_lm, tmp_path)
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    # PEFT's layout for Conv1D: A (r, in), B (out, r), although Conv1D stores its weight as (in, out)
    assert saved["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 16)
    assert saved["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (48, 4)
    assert saved["base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight"].shape == (64, 4)
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert merged.transformer.h[0].attn.c_attn.weight.shape == (16, 48)


def _vit_qv() -> list[str]:
    # transformers < 5 calls ViT's projections query / value, transformers >= 5 q_proj / v_proj
    names = {n.rsplit(".", 1)[-1] for n, _ in tiny_vit().named_modules()}
    return ["query", "value"] if "query" in names else ["q_proj", "v_proj"]


def test_vit_image_classification(tmp_path):
    qv = _vit_qv()
    config = LoraConfig(r=4, target_modules=qv, modules_to_save=["classifier"])
    merged, _ = _life_cycle(tiny_vit, config, run_vit, tmp_path, change=lambda m: train(m, vit_loss),
                            heads=("classifier",), fresh_head=True)
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert sum(k.endswith(f".{qv[0]}.lora_A.weight") for k in saved) == 2  # one per layer
    assert sum(k.endswith(f".{qv[1]}.lora_B.weight") for k in saved) == 2
    assert len(saved) == 2 * 2 * 2 + 2  # + the head's weight and bias
    assert saved["base_model.model.classifier.weight"].shape == (3, 16)
    assert type(merged.classifier) is nn.Linear


def test_vit_default_targets():
    model = get_peft_model(tiny_vit(), LoraConfig(r=4))  # no target_modules: the ViT default
    wrapped = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraLayer)})
    assert wrapped == sorted(_vit_qv())
    assert len([m for m in model.modules() if isinstance(m, LoraLayer)]) == 4


def test_conv2d_unet(tmp_path):
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["conv1", "conv2", "conv_shortcut", "downsample"])
    base = tiny_unet()
    model = get_peft_model(copy.deepcopy(base), config)
    layer = model.base_model.mid_block.conv2
    assert isinstance(layer, LoraLayer)
    assert layer.lora_A["default"].shape == (4, 16, 3, 3)  # A carries the base kernel
    assert layer.lora_B["default"].shape == (16, 4, 1, 1)  # B is a 1x1 conv
    assert model.base_model.up_block.conv_shortcut.lora_A["default"].shape == (4, 24, 1, 1)
    assert not isinstance(model.base_model.conv_in, LoraLayer)

    _life_cycle(tiny_unet, config, run_unet, tmp_path, change=lambda m: train(m, unet_loss))
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert saved["base_model.model.downsample.lora_A.weight"].shape == (4, 8, 3, 3)
    assert len(saved) == (3 * 3 + 1) * 2  # 3 blocks x (conv1, conv2, shortcut) + downsample; A and B


def test_whisper_conditional_generation(tmp_path):
    # q/v projections plus the encoder's first Conv1d (kernel 3)
    config = LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, target_modules=["q_proj", "v_proj", "encoder.conv1"])
    merged, out = _life_cycle(tiny_whisper, config, run_whisper, tmp_path)
    assert out.shape == (2, DEC_IDS.shape[1], VOCAB)
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert saved["base_model.model.model.encoder.conv1.lora_A.weight"].shape == (4, 8, 3)
    assert saved["base_model.model.model.encoder.conv1.lora_B.weight"].shape == (16, 4, 1)
    assert "base_model.model.model.decoder.layers.0.encoder_attn.q_proj.lora_B.weight" in saved
    assert "base_model.model.model.encoder.conv2.lora_A.weight" not in saved


# --- AutoPeftModelFor* ----------------------------------------------------------------------------
_TASKS = {AutoPeftModelForCausalLM: "CAUSAL_LM", AutoPeftModelForSeq2SeqLM: "SEQ_2_SEQ_LM",
          AutoPeftModelForSequenceClassification: "SEQ_CLS", AutoPeftModelForTokenClassification: "TOKEN_CLS",
          AutoPeftModelForQuestionAnswering: "QUESTION_ANS", AutoPeftModelForFeatureExtraction: "FEATURE_EXTRACTION"}


@pytest.mark.parametrize("auto_cls, make_base, run, loss", [
    (AutoPeftModelForCausalLM, tiny_llama, run_lm, None),
    (AutoPeftModelForSeq2SeqLM, tiny_t5, run_seq2seq, None),
    (AutoPeftModelForSequenceClassification, tiny_bert_seq_cls, run_lm, seq_cls_loss),
    (AutoPeftModelForTokenClassification, tiny_bert_token_cls, run_lm, token_cls_loss),
    (AutoPeftModelForQuestionAnswering, tiny_bert_qa, run_qa, qa_loss),  # PEFT trains and saves qa_outputs
    (AutoPeftModelForFeatureExtraction, tiny_bert_encoder, run_encoder, None),
], ids=["causal_lm", "seq2seq_lm", "seq_cls", "token_cls", "question_ans", "feature_extraction"])
def test_auto_peft_model_loads_base_and_adapter(tmp_path, auto_cls, make_base, run, loss):
    base_dir = str(tmp_path / "base")
    make_base().save_pretrained(base_dir)
    auto_base = getattr(transformers, auto_cls.auto_class_name)
    model = get_peft_model(auto_base.from_pretrained(base_dir).eval(), LoraConfig(r=4, task_type=_TASKS[auto_cls]))
    if loss is None:
        randomize(model)
    else:
        train(model, loss)  # trains the head too: the Auto class must restore it from the adapter
    out = run(model)
    model.save_pretrained(str(tmp_path / "adapter"))
    saved_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved_config["base_model_name_or_path"] == base_dir

    loaded = auto_cls.from_pretrained(str(tmp_path / "adapter"))
    assert isinstance(loaded, PeftModel) and type(loaded.base_model) is type(model.base_model)
    torch.testing.assert_close(run(loaded), out, **EXACT)
    with loaded.disable_adapter():
        assert (run(loaded) - out).abs().max() > 1e-3
    if loss is not None:  # the trained head came from the adapter, the base checkpoint's head is kept aside
        head_name = "qa_outputs" if auto_cls is AutoPeftModelForQuestionAnswering else "classifier"
        head = getattr(loaded.base_model, head_name)
        assert isinstance(head, ModulesToSaveWrapper)
        trained = getattr(model.base_model, head_name).modules_to_save["default"].weight
        assert torch.equal(head.modules_to_save["default"].weight, trained)
        assert not torch.equal(head.base_layer.weight, trained)


def test_auto_peft_model_refuses_an_adapter_of_another_task(tmp_path):
    base = tiny_llama()
    base.save_pretrained(str(tmp_path / "base"))
    model = get_peft_model(base, LoraConfig(r=4, task_type="CAUSAL_LM", base_model_name_or_path=str(tmp_path / "base")))
    model.save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match="holds a CAUSAL_LM adapter; AutoPeftModelForSequenceClassification loads SEQ_CLS"):
        AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "adapter"))
    untyped = get_peft_model(tiny_llama(), LoraConfig(r=4, base_model_name_or_path=str(tmp_path / "base")))
    untyped.save_pretrained(str(tmp_path / "untyped"))  # no task_type recorded: taken as it is
    assert isinstance(AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "untyped")), PeftModel)


def test_auto_peft_model_with_base_path_set_in_config(tmp_path):
    # a base built in memory has no _name_or_path: the user sets base_model_name_or_path
    base = tiny_llama()
    base.save_pretrained(str(tmp_path / "base"))
    config = LoraConfig(r=4, task_type="CAUSAL_LM", base_model_name_or_path=str(tmp_path / "base"))
    model = get_peft_model(base, config)
    randomize(model)
    model.save_pretrained(str(tmp_path / "adapter"))
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    torch.testing.assert_close(run_lm(loaded), run_lm(model), **EXACT)


def test_auto_peft_model_takes_the_base_loading_options_of_a_saved_head_and_tokenizer(tmp_path):
    """A 3-class adapter over a base saved with 2 labels could not load (no num_labels; now read off the saved head),
    an adapter saved with a tokenizer that added tokens failed on the embedding shape (the base now grows to it, as
    in PEFT), and torch_dtype (the older name of dtype) / subfolder were TypeErrors."""
    from transformers import LlamaForSequenceClassification

    import train_tiny

    tiny_llama().save_pretrained(str(tmp_path / "base"))
    three = LlamaForSequenceClassification.from_pretrained(str(tmp_path / "base"), num_labels=3)
    three.config.pad_token_id = 0
    classifier = get_peft_model(three, LoraConfig(r=2, target_modules=["q_proj"], task_type="SEQ_CLS"), "tri")
    randomize(classifier)
    classifier.save_pretrained(str(tmp_path / "cls"))  # an adapter not named "default": in the subfolder "tri"
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "cls"), subfolder="tri",
                                                                   torch_dtype=torch.float64)
    ids = torch.randint(1, 60, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, classifier(input_ids=ids).logits.double())
    two = LlamaForSequenceClassification.from_pretrained(str(tmp_path / "base"), num_labels=2)
    two.save_pretrained(str(tmp_path / "two"))  # a classifier base of another size: the saved head replaces its own
    config_path = tmp_path / "cls" / "tri" / "adapter_config.json"
    config_path.write_text(config_path.read_text().replace(str(tmp_path / "base"), str(tmp_path / "two")))
    assert str(tmp_path / "two") in config_path.read_text()
    on_two = AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "cls"), subfolder="tri")
    with torch.no_grad():
        torch.testing.assert_close(on_two(input_ids=ids).logits, classifier(input_ids=ids).logits, **EXACT)
    tok = train_tiny.tokenizer()
    tok.add_tokens([f"<new{i}>" for i in range(tiny_llama().config.vocab_size + 3 - len(tok))])  # 3 past the base
    grown = tiny_llama()
    grown.resize_token_embeddings(len(tok))
    lm = get_peft_model(grown, LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"], task_type="CAUSAL_LM",
                                          base_model_name_or_path=str(tmp_path / "base")))
    randomize(lm)
    lm.save_pretrained(str(tmp_path / "lm"))
    tok.save_pretrained(str(tmp_path / "lm"))
    reloaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "lm"))
    new_ids = torch.tensor([[1, len(tok) - 1, len(tok) - 2, 3]])
    with torch.no_grad():  # (the output head's rows of the new tokens are fresh in each base: their logits differ)
        torch.testing.assert_close(reloaded(input_ids=new_ids).logits[..., :64], lm(input_ids=new_ids).logits[..., :64],
                                   **EXACT)


def test_auto_peft_model_names_a_base_directory_that_is_gone(tmp_path):
    """base_model_name_or_path pointing at a local directory that no longer exists: an error that says where the
    path came from and what to do (transformers took it for a malformed hub id)."""
    import shutil

    base = tiny_llama()
    base.save_pretrained(str(tmp_path / "base"))
    model = get_peft_model(base, LoraConfig(r=4, task_type="CAUSAL_LM", base_model_name_or_path=str(tmp_path / "base")))
    model.save_pretrained(str(tmp_path / "adapter"))
    shutil.rmtree(tmp_path / "base")
    with pytest.raises(FileNotFoundError, match=r"base_model_name_or_path.*does not exist.*PeftModel.from_pretrained"):
        AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))


def test_auto_peft_model_expands_a_home_relative_base_path(tmp_path, monkeypatch):
    """A base saved as "~/base": expanded before transformers sees it (it takes "~/..." for a malformed hub id)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    base = tiny_llama()
    base.save_pretrained(str(tmp_path / "base"))
    model = get_peft_model(base, LoraConfig(r=4, task_type="CAUSAL_LM", base_model_name_or_path="~/base"))
    randomize(model)
    model.save_pretrained(str(tmp_path / "adapter"))
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    torch.testing.assert_close(run_lm(loaded), run_lm(model), **EXACT)


# --- offloaded / dispatched bases -----------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_on_disk(tmp_path_factory):
    """A saved 4-layer Llama base, an adapter for it, and the adapter's logits on the in-memory base."""
    root = tmp_path_factory.mktemp("offload")
    base = tiny_llama(layers=4)
    base.save_pretrained(str(root / "base"))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"]))
    randomize(model)
    model.save_pretrained(str(root / "adapter"))
    size = sum(p.numel() * p.element_size() for p in base.parameters())
    with model.disable_adapter():
        base_out = run_lm(model)
    return root, run_lm(model), base_out, size


def _offloaded_llama(root, size: int) -> nn.Module:
    # room for about half the weights: the embeddings and a layer or so stay on CPU, the rest goes to disk
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(root / "base"), device_map="auto", max_memory={"cpu": size // 2}, offload_folder=str(root / "offload"))


def test_adapter_on_disk_offloaded_base(llama_on_disk):
    root, out, base_out, size = llama_on_disk
    base = _offloaded_llama(root, size)
    placed = set(base.hf_device_map.values())
    assert placed == {"cpu", "disk"}, base.hf_device_map
    assert any(p.device.type == "meta" for p in base.parameters())

    model = PeftModel.from_pretrained(base, str(root / "adapter"))
    lora = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    assert len(lora) == 4 * 3 * 2 + 2
    assert all(p.device.type == "cpu" for p in lora.values()), "adapter tensors must live on the execution device"
    torch.testing.assert_close(run_lm(model), out, **MERGE_TOL)
    with model.disable_adapter():
        torch.testing.assert_close(run_lm(model), base_out, **MERGE_TOL)

    # merging into a weight that lives on disk (a meta placeholder here) would be lost: refused, nothing changed
    with pytest.raises(ValueError, match="offloaded"):
        model.merge_and_unload()
    assert len([m for m in model.modules() if isinstance(m, LoraLayer)]) == 4 * 3 + 1
    torch.testing.assert_close(run_lm(model), out, **MERGE_TOL)


def test_new_adapter_on_disk_offloaded_base(llama_on_disk):
    root, _, base_out, size = llama_on_disk
    model = get_peft_model(_offloaded_llama(root, size), LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    assert all(p.device.type == "cpu" for n, p in model.named_parameters() if ".lora_" in n)
    torch.testing.assert_close(run_lm(model), base_out, **MERGE_TOL)
    randomize(model)
    assert (run_lm(model) - base_out).abs().max() > 1e-3


@pytest.mark.parametrize("device_map, max_memory", [
    ("auto", {"cpu": "1GiB"}),
    ({"": "cpu"}, None),
    (None, {"cpu": 10**9}),
], ids=["auto", "dict", "max_memory_only"])
def test_from_pretrained_with_device_map_on_cpu(llama_on_disk, device_map, max_memory):
    root, out, _, _ = llama_on_disk
    model = PeftModel.from_pretrained(tiny_llama(layers=4), str(root / "adapter"), device_map=device_map,
                                      max_memory=max_memory)
    assert set(model.hf_device_map.values()) == {"cpu"}
    torch.testing.assert_close(run_lm(model), out, **EXACT)


def test_from_pretrained_with_device_map_on_offloaded_base(llama_on_disk):
    root, out, _, size = llama_on_disk
    base = _offloaded_llama(root, size)
    before = dict(base.hf_device_map)
    model = PeftModel.from_pretrained(base, str(root / "adapter"), device_map="auto", max_memory={"cpu": size // 2})
    assert base.hf_device_map == before  # already placed: left where transformers put it
    torch.testing.assert_close(run_lm(model), out, **MERGE_TOL)


def test_from_pretrained_refuses_a_map_that_needs_disk_and_leaves_the_base_intact(llama_on_disk):
    # PeftModel.from_pretrained has no offload folder: a max_memory that pushes layers to disk is refused
    root, _, base_out, size = llama_on_disk
    base = tiny_llama(layers=4)
    with pytest.raises(ValueError, match="offload"):
        PeftModel.from_pretrained(base, str(root / "adapter"), device_map="auto", max_memory={"cpu": size // 2})
    assert not any(isinstance(m, AdapterLayer) for m in base.modules()), "a failed load must unwrap the base"
    assert all(p.requires_grad for p in base.parameters())
    torch.testing.assert_close(run_lm(base), base_out, **EXACT)


def test_from_pretrained_keeps_an_explicit_map_and_takes_base_model_keys(llama_on_disk):
    """A device_map dict is used as given, also beside max_memory (which only plans "auto" and the like), and
    its keys may name the base model's modules, as transformers' hf_device_map does."""
    root, out, _, _ = llama_on_disk
    model = PeftModel.from_pretrained(tiny_llama(layers=4), str(root / "adapter"), device_map={"": "cpu"},
                                      max_memory={"cpu": 100})  # planned, 100 bytes would send everything to disk
    torch.testing.assert_close(run_lm(model), out, **EXACT)
    model = PeftModel.from_pretrained(tiny_llama(layers=4), str(root / "adapter"),
                                      device_map={"model": "cpu", "lm_head": "cpu"})
    assert model.hf_device_map == {"base_model.model": "cpu", "base_model.lm_head": "cpu"}
    torch.testing.assert_close(run_lm(model), out, **EXACT)


def _intact(base, base_out):
    assert not any(isinstance(m, AdapterLayer) for m in base.modules()), "a failed load must unwrap the base"
    assert not any("_hf_hook" in m.__dict__ for m in base.modules()), "no accelerate hook may stay behind"
    assert all(p.device.type == "cpu" for p in base.parameters())
    torch.testing.assert_close(run_lm(base), base_out, **EXACT)


def test_from_pretrained_refuses_a_device_this_machine_lacks_before_anything_moves(llama_on_disk):
    root, _, base_out, _ = llama_on_disk
    base = tiny_llama(layers=4)
    dm = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
          "lm_head": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    with pytest.raises(ValueError, match="CUDA device"):
        PeftModel.from_pretrained(base, str(root / "adapter"), device_map=dm)
    _intact(base, base_out)
    with pytest.raises(ValueError, match="not a device"):
        PeftModel.from_pretrained(base, str(root / "adapter"), device_map={"": "tpu:x"})
    _intact(base, base_out)
    with pytest.raises(ValueError, match="offload folder"):
        PeftModel.from_pretrained(base, str(root / "adapter"), device_map="disk")
    _intact(base, base_out)


def test_from_pretrained_undoes_a_dispatch_that_fails_part_way(llama_on_disk, monkeypatch):
    """Out of memory half-way through accelerate's dispatch: its hooks come off and the base is as it was."""
    import accelerate
    from accelerate.hooks import ModelHook, add_hook_to_module

    root, _, base_out, _ = llama_on_disk
    base = tiny_llama(layers=4)

    def failing_dispatch(model, device_map, **kwargs):
        add_hook_to_module(model.base_model.model.embed_tokens, ModelHook())
        add_hook_to_module(model.base_model.model.layers[0], ModelHook())
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(accelerate, "dispatch_model", failing_dispatch)
    with pytest.raises(RuntimeError, match="out of memory"):
        PeftModel.from_pretrained(base, str(root / "adapter"), device_map="auto")
    _intact(base, base_out)


def test_from_pretrained_refuses_to_offload_adapter_weights_beside_a_gpu(llama_on_disk, monkeypatch):
    """With a GPU in the map, "cpu" entries are offloaded: accelerate would hook the adapter containers too,
    whose forward never runs, leaving their tensors on 'meta'. Refused, naming the way that works."""
    from peftkit import persist

    root, _, base_out, _ = llama_on_disk
    monkeypatch.setattr(persist, "_check_device", lambda device: None)  # as on a machine with a GPU
    base = tiny_llama(layers=4)
    dm = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.layers.2": 0,
          "model.layers.3": 0, "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0}
    with pytest.raises(ValueError, match=r"offloads \['base_model.model.layers.1'\].*adapter weights"):
        PeftModel.from_pretrained(base, str(root / "adapter"), device_map=dm)
    _intact(base, base_out)


def test_dora_on_an_offloaded_base_is_refused_clearly(llama_on_disk):
    root, _, _, size = llama_on_disk
    base = _offloaded_llama(root, size)
    with pytest.raises(ValueError, match="use_dora needs .* offloaded"):
        get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], use_dora=True))


@pytest.mark.parametrize("device_map", ["cpu", torch.device("cpu")])
def test_from_pretrained_with_a_single_device(llama_on_disk, device_map):
    root, out, _, _ = llama_on_disk
    model = PeftModel.from_pretrained(tiny_llama(layers=4), str(root / "adapter"), device_map=device_map)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    torch.testing.assert_close(run_lm(model), out, **EXACT)


@pytest.mark.parametrize("family", ["vit", "whisper"])
@pytest.mark.parametrize("when", ["before", "after", "after-activation"])
def test_reentrant_gradient_checkpointing_reaches_the_adapters(family, when):
    """Reentrant checkpointing backpropagates through a block only if its inputs require grad; with a frozen base
    nothing before the first block does. Enabled on the base before wrapping, or on the PeftModel after, the
    embeddings' output is made to require grad (as PEFT does for the first case): the adapters get the gradients
    they get without checkpointing. unload takes that hook off again."""
    build, inputs = {"vit": (tiny_vit, lambda: {"pixel_values": PIXELS, "labels": torch.tensor([0, 1])}),
                     "whisper": (tiny_whisper, lambda: {"input_features": FEATURES, "decoder_input_ids": DEC_IDS,
                                                        "labels": DEC_IDS})}[family]

    def grads(checkpointing: bool) -> dict:
        base = build().train()
        kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": True}}
        if checkpointing and when == "before":
            base.gradient_checkpointing_enable(**kwargs)
        model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj", "query", "value"]))
        randomize(model)
        model.train()
        if checkpointing and when == "after":
            model.gradient_checkpointing_enable(**kwargs)
        if checkpointing and when == "after-activation":  # transformers 5's name, the one its Trainer calls
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
        with torch.enable_grad():
            model(**inputs()).loss.backward()
        out = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        if checkpointing:
            plain = model.unload()
            assert not getattr(plain, "_require_grads_hooks", None)
        return out

    expected, got = grads(False), grads(True)
    assert expected.keys() == got.keys() and len(got) > 0
    for name, grad in expected.items():
        assert got[name] is not None, name
        torch.testing.assert_close(got[name], grad, atol=1e-6, rtol=1e-5, msg=name)
