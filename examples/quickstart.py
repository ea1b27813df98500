"""Quick start: LoRA on a small Llama-style model, trained, saved, reloaded and merged, offline.

Run:  python examples/quickstart.py [--out out/quickstart]
It builds a 4-layer Llama from a config (random weights, nothing downloaded), teaches a LoRA adapter
to continue a fixed token pattern, saves it in Hugging Face PEFT's format, loads it back onto a
fresh base, and checks the merged model gives the same logits.
"""
import argparse
import os
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peftkit import LoraConfig, PeftModel, get_peft_model


def make_base() -> LlamaForCausalLM:
    """A small Llama (4 layers, hidden 128) with fixed random weights."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/quickstart")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    torch.manual_seed(0)
    batch = (torch.arange(32).repeat(8, 1) * 7 + torch.arange(8)[:, None]) % 256  # (8, 32) arithmetic sequences

    model = get_peft_model(make_base(), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    model.print_trainable_parameters()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    start = time.perf_counter()
    model.train()
    for step in range(args.steps):
        loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 20 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.3f}")
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f}s")

    model.eval()
    model.save_pretrained(args.out)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"saved adapter to {args.out} ({size / 1e6:.2f} MB): {sorted(os.listdir(args.out))}")

    reloaded = PeftModel.from_pretrained(make_base(), args.out)
    with torch.no_grad():
        adapted = reloaded(batch).logits
        merged = reloaded.merge_and_unload()(batch).logits
    print(f"reloaded vs merged max |diff|: {(adapted - merged).abs().max().item():.2e}")
    assert torch.allclose(adapted, merged, atol=1e-4)


if __name__ == "__main__":
    main()
