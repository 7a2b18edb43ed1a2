"""PyTorch + PEFT reference for `feinschliff bench train`: the same LoRA step (r16, alpha 32, all seven
projections, random tokens, AdamW) on a random Llama of a given shape, timed the same way.

    python3 scripts/torch_lora_reference.py --shape smol --batch 8 --seq 512 --dtype bf16 --device cuda

Prints one line: tokens/s, step time and peak memory (GPU: torch.cuda.max_memory_allocated and
max_memory_reserved, the latter comparable to Feinschliff's device-wide figure; CPU: RSS).
Needs torch, transformers and peft (installed on the GPU machines; for CPU use any venv).
"""
import argparse
import resource
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=False),
    "smol": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=SHAPES, default="smol")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    config = LlamaConfig(**SHAPES[a.shape], max_position_embeddings=4096, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(device=a.device, dtype=dtype)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    for n, param in model.named_parameters():
        if param.requires_grad:
            param.data = param.data.float()  # f32 master weights for the adapters, as Feinschliff keeps them
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (a.batch, a.seq), device=a.device)

    def step():
        with torch.autocast(device_type="cuda" if a.device.startswith("cuda") else "cpu", dtype=dtype, enabled=a.dtype == "bf16"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.time()
    for _ in range(a.steps):
        step()
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = (f"GPU memory {torch.cuda.max_memory_allocated() / 1e9:.2f} GB allocated, "
                f"{torch.cuda.max_memory_reserved() / 1e9:.2f} GB reserved")
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9:.2f} GB RSS"
    dt = (time.time() - t) / a.steps
    print(f"torch+peft {a.shape} {a.dtype} {a.device}: batch {a.batch} x {a.seq}, {dt:.3f} s/step, {a.batch * a.seq / dt:.0f} tokens/s, peak {peak}")


if __name__ == "__main__":
    main()
