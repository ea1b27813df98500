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


def test_generate_matches_manual_greedy_left_padded(config):
    model = get_peft_model(tiny_llama(), config).eval()
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        for p in model.prompt_modules.parameters():
            p.mul_(3.0)
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
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4))
    with pytest.raises(ValueError, match="decoder-only"):
        get_peft_model(t5, PrefixTuningConfig(num_virtual_tokens=2))

    class NoCache(torch.nn.Module):
        config = tiny_llama().config

        def forward(self, input_ids):
            return input_ids

    with pytest.raises(ValueError, match="no attention cache"):
        get_peft_model(NoCache(), PrefixTuningConfig(num_virtual_tokens=2))
