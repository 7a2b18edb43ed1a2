#!/usr/bin/env python3
"""Loads GGUF files that `feinschliff export --merge --format gguf` wrote in llama.cpp (through
llama-cpp-python) and compares what llama.cpp makes of them with Feinschliff's own reading of the
same merged model in Hugging Face layout:

- the token ids of a text (llama.cpp's tokenizer rebuilt from the GGUF metadata against the
  tokenizer.json of the merged model, as `feinschliff model inspect --text` tokenizes it);
- the logits of every position, max |difference| against the f32 logits of the merged model.

    scripts/llama_cpp_gguf_check.py REFERENCE.safetensors TEXT MODEL.gguf [MODEL.gguf ...]

REFERENCE.safetensors comes from `feinschliff model inspect MODEL --text TEXT --logits-out
REFERENCE.safetensors` (input_ids I64 [seq], logits F32 [seq, vocab]), where MODEL is the merged
model in Hugging Face layout (f32: the quantisation error shows too) or the GGUF file itself (how
Feinschliff reads it: then only llama.cpp's own rounding differs). Needs `pip install
llama-cpp-python numpy safetensors` (it compiles llama.cpp). CI does not run this; it is the
check that llama.cpp, not only gguf-py, reads what Feinschliff writes. Exits 1 when the ids
differ or the logits differ by more than --atol (default: 1e-2 for f16 files, else 0.5).
"""
import argparse
import sys

import numpy as np
from llama_cpp import Llama
from safetensors.numpy import load_file


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reference")
    ap.add_argument("text")
    ap.add_argument("gguf", nargs="+")
    ap.add_argument("--atol", type=float, default=None)
    args = ap.parse_args()
    ref = load_file(args.reference)
    ids = [int(i) for i in ref["input_ids"].reshape(-1)]
    want = ref["logits"].reshape(len(ids), -1)
    failed = False
    for path in args.gguf:
        llm = Llama(model_path=path, logits_all=True, n_ctx=max(64, len(ids)), n_threads=2,
                    verbose=False)
        tokens = llm.tokenize(args.text.encode("utf-8"), add_bos=ids[:1] == [llm.token_bos()],
                              special=False)
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)], dtype=np.float32)
        diff = float(np.abs(got - want).max())
        atol = args.atol if args.atol is not None else (1e-2 if path.endswith("-f16.gguf") else 0.5)
        agree = int((got.argmax(-1) == want.argmax(-1)).sum())
        ok_ids = tokens == ids
        ok = ok_ids and diff <= atol
        failed |= not ok
        print(f"{path}: ids {'equal' if ok_ids else f'DIFFER: {tokens} vs {ids}'}; "
              f"max |logits - f32 reference| {diff:.3e} (atol {atol}); argmax agrees at "
              f"{agree}/{len(ids)} positions -> {'ok' if ok else 'FAILED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
