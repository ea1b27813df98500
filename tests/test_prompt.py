"""Prompt tuning and P-tuning: training, generation with left padding, seq2seq / classification, bad input."""
import json
import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification,
                          T5Config, T5ForConditionalGeneration)

from conftest import randomize_adapters, tiny_llama, train_briefly
from peftkit import PeftModel, PromptEncoderConfig, PromptTuningConfig, get_peft_model

CONFIGS = {
    "prompt-random": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "prompt-vocab": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prompt_tuning_init="SAMPLE_VOCAB"),
    "ptuning-mlp": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16),
    "ptuning-lstm": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=8,
                                        encoder_reparameterization_type="LSTM", encoder_dropout=0.1),
}


@pytest.fixture(params=sorted(CONFIGS))
def config(request):
    return CONFIGS[request.param]


def _left_padded():
    ids = torch.randint(2, 64, (3, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding: rows of different prompt lengths
    mask[2, :4] = 0
    return ids.masked_fill(mask == 0, 0), mask


def test_training_lowers_loss_and_changes_only_prompt(config):
    model = get_peft_model(tiny_llama(), config).train()
    base_before = {n: p.detach().clone() for n, p in model.base_model.named_parameters()}
    prompt_before = {n: p.detach().clone() for n, p in model.prompt_modules.named_parameters()}
    losses = train_briefly(model)
    assert losses[-1] < losses[0] - 0.01
    assert all(torch.equal(p, base_before[n]) for n, p in model.base_model.named_parameters())
    assert all(not torch.equal(p, prompt_before[n]) for n, p in model.prompt_modules.named_parameters())


def test_forward_shapes_and_labels(config):
    model = get_peft_model(tiny_llama(), config)
    ids, mask = _left_padded()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    n = config.num_virtual_tokens
    assert out.logits.shape == (3, 6 + n, 64)
    # virtual tokens get label -100: the loss covers every real token, the first predicted by the last virtual one
    logits = out.logits[:, n - 1:-1].reshape(-1, 64)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(logits, ids.reshape(-1)))


@torch.no_grad()
def _greedy_by_forward(model, ids, mask, steps):
    for _ in range(steps):  # no cache: the whole sequence each step, positions from the mask as generate does
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


def test_generate_matches_manual_greedy_left_padded(config):
    model = get_peft_model(tiny_llama(), config).eval()
    model.generation_config.eos_token_id = None  # tiny_llama's eos (2) would end rows early
    with torch.no_grad():
        for p in model.prompt_modules.parameters():
            p.mul_(3.0)  # virtual tokens that clearly steer the output
    ids, mask = _left_padded()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, _greedy_by_forward(model, ids, mask, 6))
    with model.disable_adapter():
        plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert not torch.equal(plain, out)


def test_t5_virtual_tokens_on_encoder_side(tmp_path):
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                             decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()
    config = PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3)
    model = get_peft_model(t5, config)
    assert config.num_transformer_submodules is None and model.peft_config["default"].num_transformer_submodules == 2
    ids, mask = _left_padded()
    out = model(input_ids=ids, attention_mask=mask, labels=ids[:, :4].contiguous())
    assert out.logits.shape == (3, 4, 64) and out.loss.requires_grad
    prompts = model.prompt_modules["default"]()[:3].unsqueeze(0).expand(3, -1, -1)
    embeds = torch.cat([prompts, t5.get_input_embeddings()(ids)], dim=1)
    full_mask = torch.cat([torch.ones(3, 3, dtype=mask.dtype), mask], dim=1)
    with torch.no_grad():
        expected = t5.generate(inputs_embeds=embeds, attention_mask=full_mask, max_new_tokens=4, do_sample=False)
        got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_sequence_classification_trains_head_and_prompt(kind, tmp_path):
    torch.manual_seed(0)
    if kind == "llama":
        base = LlamaForSequenceClassification(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                                          num_hidden_layers=1, num_attention_heads=4, num_labels=3,
                                                          pad_token_id=0))
    else:
        base = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                        num_attention_heads=4, intermediate_size=48,
                                                        max_position_embeddings=16, num_labels=3))
    model = get_peft_model(base, PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=4, encoder_hidden_size=8))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("modules_to_save" in n for n in trainable) and any("prompt_modules" in n for n in trainable)
    ids = torch.randint(2, 64, (2, 6))
    out = model(input_ids=ids, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3)
    out.loss.backward()
    model.eval()
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="exceed the model's 16 positions") if kind == "bert" else _nothing():
        model(input_ids=torch.randint(2, 64, (1, 13)))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_text_init_from_local_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "classify", "the", "review"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>").save_pretrained(tmp_path)
    config = PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="TEXT", tokenizer_name_or_path=str(tmp_path),
                                prompt_tuning_init_text="classify the review")
    model = get_peft_model(tiny_llama(), config)
    expected = model.base_model.get_input_embeddings().weight[[1, 2, 3, 1, 2]]  # the text repeated to 5 tokens
    torch.testing.assert_close(model.prompt_modules["default"](), expected)


def test_text_init_never_downloads_and_loads_without_its_tokenizer(tmp_path, monkeypatch):
    # a PEFT adapter trained with TEXT init names a tokenizer by hub id (or a directory of the training machine):
    # loading it used to build the init again, which went to the hub; the saved values replace the init anyway
    import transformers

    model = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=3))
    randomize_adapters(model)
    ids = torch.randint(0, 64, (2, 5))
    expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    saved.update(prompt_tuning_init="TEXT", prompt_tuning_init_text="Classify this:",
                 tokenizer_name_or_path="some-org/not-a-local-tokenizer")
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    calls = []

    def no_tokenizer(*args, **kwargs):
        calls.append(kwargs)
        raise OSError("not here")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_tokenizer)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert calls == []
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
    config = PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi",
                    tokenizer_name_or_path="some-org/not-a-local-tokenizer")
    with pytest.raises(ValueError, match="not a local tokenizer directory"):
        get_peft_model(tiny_llama(), config)
    assert calls[-1]["local_files_only"] is True


def test_loaded_ptuning_is_embeddings_and_trains(tmp_path):
    model = get_peft_model(tiny_llama(), CONFIGS["ptuning-mlp"])
    ids = torch.randint(0, 64, (2, 5))
    expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    module = loaded.prompt_modules["default"]
    assert module.mlp_head is None and module.embedding.weight.requires_grad
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


def test_prompt_adapters_switch_delete_and_refuse_mixing():
    model = get_peft_model(tiny_llama(), CONFIGS["prompt-random"])
    model.add_adapter("other", CONFIGS["ptuning-mlp"])
    with pytest.raises(ValueError, match="runs alone"):
        model.set_adapter(["default", "other"])
    ids = torch.randint(0, 64, (1, 5))
    first = model(input_ids=ids).logits
    model.set_adapter("other")
    assert not torch.allclose(model(input_ids=ids).logits, first)
    model.delete_adapter("other")
    assert list(model.prompt_modules) == ["default"] and model.active_adapter == "default"
    assert isinstance(model.unload(), torch.nn.Module) and len(model.prompt_modules) == 0


def test_bad_configs_fail_at_get_peft_model():
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer"):
        PromptTuningConfig()
    with pytest.raises(ValueError, match="tokenizer_name_or_path"):
        PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT")
    with pytest.raises(ValueError, match="encoder_reparameterization_type"):
        PromptEncoderConfig(num_virtual_tokens=2, encoder_reparameterization_type="GRU")
    bert = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=4, intermediate_size=48,
                                                    max_position_embeddings=16))
    with pytest.raises(ValueError, match="leaves no room in the model's 16 positions"):
        get_peft_model(bert, PromptTuningConfig(num_virtual_tokens=16))
    with pytest.raises(ValueError, match="token_dim=8"):
        get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=2, token_dim=8))

    class NoEmbeddings(torch.nn.Module):
        config = tiny_llama().config

        def forward(self, x):
            return x

    with pytest.raises(ValueError, match="has no token input embeddings"):
        get_peft_model(NoEmbeddings(), PromptTuningConfig(num_virtual_tokens=2))


def test_generate_returns_the_prompt_once_per_returned_sequence():
    """With num_return_sequences, each returned row starts with its own input row (as PEFT returns them)."""
    model = get_peft_model(tiny_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    model.generation_config.eos_token_id = None
    ids, mask = _left_padded()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0)
    greedy = model.generate(do_sample=False, **kw)
    sampled = model.generate(do_sample=True, top_k=1, num_return_sequences=3, **kw)
    assert torch.equal(sampled, greedy.repeat_interleave(3, dim=0))



@pytest.mark.parametrize("where", ["call", "generation_config", "model"])
def test_max_and_min_length_count_the_callers_tokens_only(config, where):
    """max_length / min_length are the caller's prompt + new tokens, as in PEFT and transformers: generate, given
    the virtual tokens as input, counted them too (a 6-token prompt with max_length=11 got 1 new token, not 5).
    Set in the call, in a GenerationConfig passed, or on the model's own generation_config."""
    from transformers import GenerationConfig
    model = get_peft_model(tiny_llama(), config).eval()
    model.generation_config.eos_token_id = None
    ids, mask = _left_padded()
    kw = dict(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        greedy = model.generate(max_new_tokens=5, **kw)
        if where == "call":
            out = model.generate(max_length=ids.shape[1] + 5, **kw)
        elif where == "generation_config":
            out = model.generate(generation_config=GenerationConfig(max_length=ids.shape[1] + 5), **kw)
        else:
            model.generation_config.max_length = ids.shape[1] + 5
            out = model.generate(**kw)
    assert out.shape == (3, ids.shape[1] + 5)
    assert torch.equal(out, greedy)
    # min_length: with the first greedy token as eos, generation stops at once unless min_length holds it off
    model.generation_config.max_length = None
    model.generation_config.eos_token_id = int(greedy[0, ids.shape[1]])
    with torch.no_grad():
        short = model.generate(input_ids=ids[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
        held = model.generate(input_ids=ids[:1], min_length=ids.shape[1] + 3, max_new_tokens=5, do_sample=False,
                              pad_token_id=0)
    assert short.shape[1] == ids.shape[1] + 1
    assert held.shape[1] >= ids.shape[1] + 3


def test_lengths_follow_transformers_precedence():
    """The call's max_new_tokens=None overrides the model's max_new_tokens, so the call's max_length holds (it went
    to the model's 3 new tokens); a GenerationConfig passed is moved in a copy, with no keyword beside it (which
    transformers logs as deprecated), and the caller's object is left as it was."""
    import logging

    from transformers import GenerationConfig
    model = get_peft_model(tiny_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    model.generation_config.eos_token_id = None
    ids, mask = _left_padded()
    kw = dict(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0)
    model.generation_config.max_new_tokens = 3
    with torch.no_grad():
        assert model.generate(max_length=ids.shape[1] + 5, max_new_tokens=None, **kw).shape == (3, ids.shape[1] + 5)
        model.generation_config.max_new_tokens = None
        config = GenerationConfig(max_length=ids.shape[1] + 2, do_sample=False, pad_token_id=0)
        logged = []
        handler = logging.Handler()
        handler.emit = lambda record: logged.append(record.getMessage())
        hf_logger = logging.getLogger("transformers")  # transformers' loggers do not propagate to the root
        hf_logger.addHandler(handler)
        try:
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        finally:
            hf_logger.removeHandler(handler)
    assert out.shape == (3, ids.shape[1] + 2) and config.max_length == ids.shape[1] + 2
    assert not [line for line in logged if "deprecated" in line]

def test_multi_label_targets_of_the_sequences_length_are_not_taken_for_token_labels():
    """A multi-label classifier whose num_labels equals the input length: its (batch, num_labels) float targets are
    per sequence, not per token, and get no -100 columns; the loss is the BCE of the logits."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=32, num_labels=5,
                        problem_type="multi_label_classification")
    model = get_peft_model(BertForSequenceClassification(config),
                           PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3)).eval()
    ids = torch.randint(2, 64, (2, 5))
    targets = torch.randint(0, 2, (2, 5)).float()
    out = model(input_ids=ids, labels=targets)
    torch.testing.assert_close(out.loss, torch.nn.functional.binary_cross_entropy_with_logits(out.logits, targets))


def test_generate_can_return_a_dict_with_scores():
    """return_dict_in_generate=True: the prompt goes before the output object's sequences as before the tensor."""
    model = get_peft_model(tiny_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    model.generation_config.eos_token_id = None
    ids, mask = _left_padded()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0, do_sample=False)
    plain = model.generate(**kw)
    out = model.generate(return_dict_in_generate=True, output_scores=True, **kw)
    assert torch.equal(out.sequences, plain) and len(out.scores) == 4 and plain.shape[1] == ids.shape[1] + 4


def test_a_prompt_adapter_beside_a_lora_adapter_on_the_embeddings(tmp_path):
    """LoRA on embed_tokens wraps the embedding table; a prompt adapter next to it (either load order) still finds
    the table and gives what it gives alone (it was refused, or failed at every call)."""
    from peftkit import LoraConfig, PeftModel, PromptTuningConfig

    prompt = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"), "p")
    prompt.save_pretrained(str(tmp_path))
    lora = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]), "e")
    randomize_adapters(lora)
    lora.save_pretrained(str(tmp_path))
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        want = prompt(input_ids=ids).logits
        for first, second in (("p", "e"), ("e", "p")):
            model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / first), adapter_name=first)
            model.load_adapter(str(tmp_path / second), second)
            model.set_adapter("p")
            torch.testing.assert_close(model(input_ids=ids).logits, want)
            model.set_adapter("e")
            assert not torch.allclose(model(input_ids=ids).logits[:, -1], want[:, -1], atol=1e-3)


def test_a_p_tuning_encoder_follows_the_models_mode():
    """Made over a model in eval mode, the encoder's dropout is off (it was created in train mode)."""
    model = get_peft_model(tiny_llama().eval(), PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_reparameterization_type="LSTM", encoder_num_layers=2,
        encoder_dropout=0.5))
    assert not model.training and not any(m.training for m in model.prompt_modules.modules())
    ids = torch.arange(6)[None]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
