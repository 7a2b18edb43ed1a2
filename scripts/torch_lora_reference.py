"""PyTorch reference for `feinschliff bench`, on a random Llama of a given shape, timed the same way
(one warm-up, then --steps timed repetitions):

- `--mode train` (default; `bench train`): the same LoRA step with PEFT (r16, alpha 32, all seven
  projections, f32 adapter weights, random tokens, AdamW, gradient clipping 1.0); default batch 4 x 256.
- `--mode score` (`bench score`): forward scoring without gradients (the summed next-token loss of a
  batch of random tokens, under torch.inference_mode()), plain model, no LoRA; default batch 8 x 256.
- `--mode generate`: transformers `model.generate`, greedy (do_sample=False, use_cache=True), --batch
  prompts (default 1) of --prompt-len random tokens (default 32), exactly --new-tokens new tokens
  (default 128; min_new_tokens = max_new_tokens, so EOS never ends a row early). Generated tokens/s is
  batch * new_tokens / time of one generate call (prefill included); ms/token is that time / new_tokens.

    python3 scripts/torch_lora_reference.py --shape smol --batch 8 --seq 512 --dtype bf16 --device cuda
    python3 scripts/torch_lora_reference.py --mode score --shape smol --dtype bf16
    python3 scripts/torch_lora_reference.py --mode generate --shape smol --batch 8 --new-tokens 128

--dtype bf16: train runs the bf16 frozen model under autocast with f32 LoRA weights; score and generate
run the model's weights in bf16. On CPU, torch uses --threads threads (default 2, this machine's cores).

Prints one line: "torch+peft ..." (train) or "torch score|generate ..." with tokens/s, time per step
(per generate call) and peak memory (GPU: torch.cuda.max_memory_allocated and max_memory_reserved, the
latter comparable to Feinschliff's device-wide figure; CPU: the process's peak RSS).
Needs torch and transformers, and peft for train (installed on the GPU machines; for CPU use any venv).
"""
import argparse
import resource
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=False),
    "smol": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}
DEFAULT_BATCH = {"train": 4, "score": 8, "generate": 1}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["train", "score", "generate"], default="train")
    p.add_argument("--shape", choices=SHAPES, default="smol")
    p.add_argument("--batch", type=int, help="sequences per batch (default: 4 train, 8 score, 1 generate)")
    p.add_argument("--seq", type=int, default=256, help="sequence length (train, score)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per row (generate)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row (generate)")
    p.add_argument("--steps", type=int, default=5, help="timed repetitions after one warm-up")
    p.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (CPU only)")
    a = p.parse_args()
    batch = a.batch or DEFAULT_BATCH[a.mode]
    cuda = a.device.startswith("cuda")
    where = a.device
    if not cuda:
        torch.set_num_threads(a.threads)
        where = f"{a.device} ({torch.get_num_threads()} threads)"
    torch.manual_seed(0)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    config = LlamaConfig(**SHAPES[a.shape], max_position_embeddings=4096, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(device=a.device, dtype=dtype)

    if a.mode == "train":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
        for n, param in model.named_parameters():
            if param.requires_grad:
                param.data = param.data.float()  # f32 master weights for the adapters, as Feinschliff keeps them
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
        ids = torch.randint(0, config.vocab_size, (batch, a.seq), device=a.device)

        def step():
            with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=dtype, enabled=a.dtype == "bf16"):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.requires_grad], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    elif a.mode == "score":
        model.eval()
        ids = torch.randint(0, config.vocab_size, (batch, a.seq), device=a.device)

        def step():
            with torch.inference_mode():
                out = model(input_ids=ids, labels=ids)
                out.loss.item()  # the scalar on the host, as the eval harness needs it

    else:
        model.eval()
        ids = torch.randint(0, config.vocab_size, (batch, a.prompt_len), device=a.device)
        mask = torch.ones_like(ids)

        def step():
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1, use_cache=True,
                                     max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                                     pad_token_id=config.eos_token_id)
            assert out.shape == (batch, a.prompt_len + a.new_tokens), out.shape

    step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.time()
    for _ in range(a.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
        peak = (f"GPU memory {torch.cuda.max_memory_allocated() / 1e9:.2f} GB allocated, "
                f"{torch.cuda.max_memory_reserved() / 1e9:.2f} GB reserved")
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9:.2f} GB RSS"
    dt = (time.time() - t) / a.steps
    if a.mode == "train":
        print(f"torch+peft {a.shape} {a.dtype} {where}: batch {batch} x {a.seq}, {a.steps} steps, {dt:.3f} s/step, {batch * a.seq / dt:.0f} tokens/s, peak {peak}")
    elif a.mode == "score":
        print(f"torch score {a.shape} {a.dtype} {where}: batch {batch} x {a.seq}, {a.steps} steps, {dt:.3f} s/step, {batch * a.seq / dt:.0f} tokens/s, peak {peak}")
    else:
        print(f"torch generate {a.shape} {a.dtype} {where}: batch {batch}, prompt {a.prompt_len} + {a.new_tokens} new tokens, "
              f"{a.steps} runs, {dt:.3f} s/run, {dt / a.new_tokens * 1e3:.2f} ms/token, {batch * a.new_tokens / dt:.0f} generated tokens/s, peak {peak}")


if __name__ == "__main__":
    main()
