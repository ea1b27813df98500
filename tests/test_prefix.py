"""Prefix tuning: training, generation through the cache with left padding, grouped-query attention, bad input."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification, T5Config, T5ForConditionalGeneration

from conftest import tiny_llama, train_briefly
from peftkit import PeftModel, PrefixTuningConfig, get_peft_model
from test_prompt import _greedy_by_forward, _left_padded

CONFIGS = {
    "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "prefix-projection": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True,
                                            encoder_hidden_size=16),
}


@pytest.fixture(params=sorted(CONFIGS))
def config(request):
    return CONFIGS[request.param]


def test_sizes_follow_grouped_query_attention(config):
    model = get_peft_model(tiny_llama(), config)  # 4 query heads, 2 kv heads of size 8
    filled = model.peft_config["default"]
    assert (filled.num_attention_heads, filled.token_dim, filled.num_layers) == (2, 16, 2)
    assert model.prompt_modules["default"]().shape == (filled.num_virtual_tokens, 2 * 2 * 16)


def test_training_lowers_loss_and_changes_only_prefix(config):
    model = get_peft_model(tiny_llama(), config).train()
    base_before = {n: p.detach().clone() for n, p in model.base_model.named_parameters()}
    losses = train_briefly(model)
    assert losses[-1] < losses[0] - 0.01
    assert all(torch.equal(p, base_before[n]) for n, p in model.base_model.named_parameters())


def _steered(config):
    """A prefix model in eval mode whose prefixes clearly steer the output, with no eos to end rows early."""
    model = get_peft_model(tiny_llama(), config).eval()
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        for p in model.prompt_modules.parameters():
            p.mul_(3.0)
    return model


def test_generate_matches_manual_greedy_left_padded(config):
    model = _steered(config)
    ids, mask = _left_padded()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, _greedy_by_forward(model, ids, mask, 6))
    with model.disable_adapter():
        plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert not torch.equal(plain, out)


def test_sequence_classification(tmp_path):
    torch.manual_seed(0)
    base = LlamaForSequenceClassification(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                                      num_hidden_layers=1, num_attention_heads=4,
                                                      num_key_value_heads=1, num_labels=3, pad_token_id=0))
    model = get_peft_model(base, PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2))
    ids = torch.randint(2, 64, (2, 5))
    out = model(input_ids=ids, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3)
    out.loss.backward()
    model.save_pretrained(tmp_path)


def test_loaded_projection_is_prefixes(tmp_path):
    model = get_peft_model(tiny_llama(), CONFIGS["prefix-projection"])
    ids = torch.randint(0, 64, (2, 5))
    expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert loaded.prompt_modules["default"].transform is None
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


def test_bad_models_fail_at_get_peft_model():
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1,
                                             num_decoder_layers=2, num_heads=4))
    with pytest.raises(ValueError, match="decoder has 2 layers"):
        get_peft_model(t5, PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=2))

    class NoCache(torch.nn.Module):
        config = tiny_llama().config

        def forward(self, input_ids):
            return input_ids

    with pytest.raises(ValueError, match="no attention cache"):
        get_peft_model(NoCache(), PrefixTuningConfig(num_virtual_tokens=2))


# --- encoder-decoder (T5): prefixes in the decoder's self-attention cache, as in PEFT ---------------------------
def tiny_t5(init: float = 5.0) -> T5ForConditionalGeneration:
    """A 2 + 2 layer T5; the larger default init gives varied greedy outputs (seed picked so rows differ)."""
    torch.manual_seed(3)
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                      initializer_factor=init)
    return T5ForConditionalGeneration(config).eval()


T5_CONFIGS = {
    "prefix": dict(num_virtual_tokens=3),
    "prefix-projection": dict(num_virtual_tokens=2, prefix_projection=True, encoder_hidden_size=16),
}


@pytest.mark.parametrize("name", sorted(T5_CONFIGS))
def test_t5_training_lowers_loss_and_changes_only_prefix(name):
    model = get_peft_model(tiny_t5(init=1.0), PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", **T5_CONFIGS[name]))
    model.train()
    filled = model.peft_config["default"]
    assert filled.num_transformer_submodules == 2
    assert model.prompt_modules["default"]().shape == (filled.num_virtual_tokens, 2 * 2 * 32)  # as PEFT saves it
    base_before = {n: p.detach().clone() for n, p in model.base_model.named_parameters()}
    prefix_before = {n: p.detach().clone() for n, p in model.prompt_modules.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(2, 64, (4, 7), generator=gen), torch.randint(2, 64, (4, 5), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-1)
    losses = []
    for _ in range(10):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.01
    assert all(torch.equal(p, base_before[n]) for n, p in model.base_model.named_parameters())
    assert all(not torch.equal(p, prefix_before[n]) for n, p in model.prompt_modules.named_parameters())


def test_t5_decoder_mask_and_decoder_ids_agree_with_labels():
    model = get_peft_model(tiny_t5(), PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3)).eval()
    ids, labels = torch.randint(2, 64, (2, 6)), torch.randint(2, 64, (2, 4))
    with torch.no_grad():
        by_labels = model(input_ids=ids, labels=labels).logits
        decoder_ids = model.base_model.prepare_decoder_input_ids_from_labels(labels=labels)
        by_ids = model(input_ids=ids, decoder_input_ids=decoder_ids, decoder_attention_mask=torch.ones_like(labels))
        with model.disable_adapter():
            plain = model(input_ids=ids, labels=labels).logits
    torch.testing.assert_close(by_ids.logits, by_labels)
    assert not torch.allclose(plain, by_labels)


def _greedy_seq2seq_by_forward(model, ids, mask, steps):
    decoder = torch.zeros(ids.shape[0], 1, dtype=torch.long)  # decoder_start_token_id
    for _ in range(steps):  # no cache: the whole decoder sequence each step
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
        decoder = torch.cat([decoder, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return decoder


@pytest.mark.parametrize("name", sorted(T5_CONFIGS))
def test_t5_generate_matches_manual_greedy_padded(name):
    model = get_peft_model(tiny_t5(), PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", **T5_CONFIGS[name])).eval()
    model.generation_config.eos_token_id = None  # run every row the full length
    ids = torch.randint(2, 64, (3, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # rows of different prompt lengths, padded
    mask[2, -4:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        assert torch.equal(out, _greedy_seq2seq_by_forward(model, ids, mask, 6))
        with model.disable_adapter():
            plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert out.shape == plain.shape == (3, 7)
    assert not torch.equal(plain, out)



def test_max_length_counts_the_callers_tokens_only(config):
    """The prefixes' stand-in ids are not the caller's: max_length / min_length count the caller's prompt and the new
    tokens, as in PEFT (a 6-token prompt with max_length=11 got 1 new token; max_length=9 raised)."""
    model = _steered(config)
    ids, mask = _left_padded()
    kw = dict(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0)
    greedy = model.generate(max_new_tokens=5, **kw)
    assert torch.equal(model.generate(max_length=ids.shape[1] + 5, **kw), greedy)
    assert model.generate(max_length=ids.shape[1] + 2, **kw).shape == (3, ids.shape[1] + 2)
    model.generation_config.eos_token_id = int(greedy[0, ids.shape[1]])  # stops at once, unless min_length holds
    held = model.generate(input_ids=ids[:1], min_length=ids.shape[1] + 3, max_new_tokens=5, do_sample=False)
    assert held.shape[1] >= ids.shape[1] + 3


def test_t5_max_length_counts_the_decoder_tokens_only():
    """Encoder-decoder: the decoder's prefix stand-ins are not counted in max_length either (PEFT: 9 decoder tokens
    for max_length=9; it gave 4 with 5 virtual tokens)."""
    model = get_peft_model(tiny_t5(), PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=5)).eval()
    model.generation_config.eos_token_id = None
    ids = torch.randint(2, 64, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_length=9, do_sample=False)
        by_new = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    assert out.shape == (2, 9)
    assert torch.equal(out, by_new)

@pytest.mark.parametrize("projection", [False, True])
def test_zero_init_weights_as_peft(projection):
    config = PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=2, init_weights="zero",
                                prefix_projection=projection)
    model = get_peft_model(tiny_t5(), config)
    assert torch.count_nonzero(model.prompt_modules["default"]()) == 0
    with pytest.raises(ValueError, match="init_weights"):
        PrefixTuningConfig(num_virtual_tokens=2, init_weights="gaussian")


def test_generate_with_several_returned_sequences_and_beams(config):
    """generate expands each row (beams, returned sequences) but not the cache it is given: the prefix cache is
    built with that many rows. Sampling with top_k=1 is greedy, so 3 returned rows equal the greedy row 3 times."""
    model = _steered(config)
    ids, mask = _left_padded()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0)
    greedy = model.generate(do_sample=False, **kw)
    sampled = model.generate(do_sample=True, top_k=1, num_return_sequences=3, **kw)
    assert torch.equal(sampled, greedy.repeat_interleave(3, dim=0))
    beams = model.generate(do_sample=False, num_beams=2, num_return_sequences=2, **kw)
    assert beams.shape == (2 * ids.shape[0], greedy.shape[1])


def test_generate_refuses_what_the_prefix_cache_cannot_serve():
    """Without a cache generate would re-run the stand-in ids onto the prefix cache each step (wrong tokens, no
    error); inputs_embeds have no stand-in ids. Both are refused."""
    model = get_peft_model(tiny_llama(), CONFIGS["prefix"]).eval()
    ids, mask = _left_padded()
    with pytest.raises(ValueError, match="use_cache=True"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, use_cache=False)
    with pytest.raises(ValueError, match="takes input_ids"):
        model.generate(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask, max_new_tokens=2)


def test_input_beyond_a_learned_position_table_gets_a_clear_error():
    """GPT-2's learned positions: the prefixes take the first ones, so input + prefixes must fit the table."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=8))
    model = get_peft_model(gpt2, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    assert model(input_ids=torch.randint(2, 64, (2, 4))).logits.shape == (2, 4, 64)  # 4 + 4 fits
    with pytest.raises(ValueError, match="5 tokens \\+ 4 prefix positions exceed the model's 8 positions"):
        model(input_ids=torch.randint(2, 64, (2, 5)))


def test_generate_can_return_a_dict_with_scores(config):
    """return_dict_in_generate=True: the output object's sequences are cut of the stand-in prefix ids as the plain
    tensor is, and its scores cover the generated tokens (decoder-only and T5)."""
    model = _steered(config)
    ids, mask = _left_padded()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    plain = model.generate(**kw)
    out = model.generate(return_dict_in_generate=True, output_scores=True, **kw)
    assert torch.equal(out.sequences, plain) and len(out.scores) == 5
    t5 = get_peft_model(tiny_t5(), PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3)).eval()
    t5.generation_config.eos_token_id = None
    with torch.no_grad():
        plain = t5.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        out = t5.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                          return_dict_in_generate=True, output_scores=True)
    assert torch.equal(out.sequences, plain) and len(out.scores) == 4


def test_a_model_without_token_inputs_gets_a_clear_error():
    """Whisper reads input_features: prefix tuning (which needs token inputs) says so, not an AttributeError."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    whisper = WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=64, num_mel_bins=8, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=16,
        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1))
    model = get_peft_model(whisper, PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=2)).eval()
    features = torch.randn(1, 8, 32)
    with pytest.raises(ValueError, match="prefix tuning runs on token inputs: pass input_ids or inputs_embeds"):
        model(input_features=features, decoder_input_ids=torch.tensor([[1, 5]]))


@pytest.mark.parametrize("num_layers", [1, 5])
def test_num_layers_that_do_not_fit_the_model_are_refused_at_wrap(num_layers):
    """The wrap used to succeed and the first forward failed deep inside attention (IndexError / shape error)."""
    model = tiny_llama()
    with pytest.raises(ValueError, match=f"num_layers={num_layers} but the model has 2 layers"):
        get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=4, num_layers=num_layers, task_type="CAUSAL_LM"))
    assert not any("prefix" in n for n, _ in model.named_modules())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_training_under_gradient_checkpointing_is_refused_with_the_reason(family):
    """transformers turns the cache off under checkpointing in training, and the prefixes live in the cache: the
    forward failed with a bare shape error (as it does in PEFT). Without grad it runs (GPT-2 drops the cache under
    the flag whatever the grad mode: the flag is off for such a call, and back after)."""
    from test_families import tiny_gpt2

    base = tiny_llama() if family == "llama" else tiny_gpt2()
    model = get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(ValueError, match="train prefix tuning without gradient checkpointing"):
        model.train()(input_ids=ids, labels=ids)
    with torch.no_grad():  # inference keeps its cache (transformers drops it only with grad on): runs
        want = model.eval()(input_ids=ids).logits
        torch.testing.assert_close(model.train()(input_ids=ids).logits, want)  # sampling mid-training
        assert model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0).shape == (2, 7)
    assert model.base_model.is_gradient_checkpointing
