"""Tiny models built from configs in-process: no downloads."""
import contextlib

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, layers: int = 2, bias: bool = False) -> LlamaForCausalLM:
    """A 2-layer Llama with grouped-query attention, random weights, fixed seed (projection biases with ``bias``)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attention_bias=bias, mlp_bias=bias)
    return LlamaForCausalLM(config).eval()


def randomize_adapters(model, std: float = 0.2, seed: int = 1) -> None:
    """Give every adapter tensor random values (LoRA's B starts at zero, which would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "ia3_l" in name:
                centre = 1.0 if "magnitude" in name or "ia3_l" in name else 0.0  # scales (DoRA m, IA3 l) sit near 1
                param.copy_(torch.randn(param.shape, generator=gen) * std + centre)
            elif ".adapter_down." in name or ".adapter_up." in name or ".selective_values." in name:  # start at 0
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def train_briefly(model, steps: int = 10, lr: float = 1e-1) -> list[float]:
    """A few AdamW steps of causal-LM loss on a fixed random batch; the losses."""
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def ids():
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))


def _leave_threads(n: int) -> None:
    """Stands in for torch.set_num_threads while one_thread() holds."""


@contextlib.contextmanager
def one_thread():
    """Run torch on one thread (run_job asks for every core; on a shared 2-core machine tiny ops then wait on
    each other's threads, ~20 ms each instead of ~50 us)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    original = torch.set_num_threads
    torch.set_num_threads = _leave_threads
    try:
        yield
    finally:
        torch.set_num_threads = original
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single_thread():
    """A module marked ``pytestmark = pytest.mark.usefixtures("single_thread")`` runs on one torch thread."""
    with one_thread():
        yield
