#!/usr/bin/env bash
# Times lm-evaluation-harness' HF backend on Belebele German (deu_Latn) against a local model folder,
# fully offline: the reference beside `feinschliff eval` with the `belebele_de` task of
# evals/german.toml (same prompt, choices, target and metrics).
#
#   scripts/lm_eval_belebele_reference.sh MODEL_DIR LIMIT [BATCH]
#
# runs (from scripts/lm_eval_tasks, with HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1)
#
#   $LM_EVAL_PYTHON -m lm_eval run --model hf --model_args pretrained=MODEL_DIR,dtype=$LM_EVAL_DTYPE \
#     --include_path scripts/lm_eval_tasks --tasks belebele_deu_Latn_local --limit LIMIT \
#     --batch_size BATCH --device $LM_EVAL_DEVICE --output_path <tmp>
#
# and prints lm-eval's output, then one line: the wall time of that command (process start, model
# load, dataset load and scoring), lm-eval's own total_evaluation_time_seconds, and acc / acc_norm.
# LIMIT is lm-eval's --limit (the first LIMIT questions; 900 in all); BATCH defaults to 8 (as
# evals/german.toml's batch_size).
#
# Environment:
#   LM_EVAL_PYTHON  the Python with lm_eval, torch and transformers installed (default python3;
#                   e.g. a venv's bin/python).
#   LM_EVAL_DEVICE  default cpu.     LM_EVAL_DTYPE  default float32.
#   BELEBELE_JSONL  another copy of the data (default: shared/benchmarks/belebele-de/
#                   deu_Latn.flat.jsonl beside the repository, as in evals/mirror/mirror.toml).
# The task is scripts/lm_eval_tasks/belebele_deu_Latn_local.yaml: lm-eval's belebele_deu_Latn with
# the data read from the local JSONL instead of the Hub (see its header).
set -euo pipefail
usage="usage: scripts/lm_eval_belebele_reference.sh MODEL_DIR LIMIT [BATCH]"
model="${1:?$usage}"
limit="${2:?$usage}"
batch="${3:-8}"
[ -d "$model" ] || { echo "no model folder: $model" >&2; exit 2; }
model="$(cd "$model" && pwd)"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tasks="$here/lm_eval_tasks"
task=belebele_deu_Latn_local
LM_EVAL_PYTHON="${LM_EVAL_PYTHON:-python3}"
device="${LM_EVAL_DEVICE:-cpu}"
dtype="${LM_EVAL_DTYPE:-float32}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
if [ -n "${BELEBELE_JSONL:-}" ]; then
  data="$(cd "$(dirname "$BELEBELE_JSONL")" && pwd)/$(basename "$BELEBELE_JSONL")"
  [ -f "$data" ] || { echo "no data file: $data" >&2; exit 2; }
  mkdir "$out/tasks"
  sed "s|^    test: .*|    test: $data|" "$tasks/$task.yaml" > "$out/tasks/$task.yaml"
  tasks="$out/tasks"
fi
[ -f "$tasks/../../../shared/benchmarks/belebele-de/deu_Latn.flat.jsonl" ] || [ -n "${BELEBELE_JSONL:-}" ] \
  || { echo "no data: $tasks/../../../shared/benchmarks/belebele-de/deu_Latn.flat.jsonl (set BELEBELE_JSONL)" >&2; exit 2; }

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
cmd=("$LM_EVAL_PYTHON" -m lm_eval run --model hf --model_args "pretrained=$model,dtype=$dtype"
  --include_path "$tasks" --tasks "$task" --limit "$limit" --batch_size "$batch" --device "$device"
  --output_path "$out/results")
echo "+ (cd $tasks && ${cmd[*]})"
start=$(date +%s.%N)
(cd "$tasks" && "${cmd[@]}")
end=$(date +%s.%N)

"$LM_EVAL_PYTHON" - "$out/results" "$task" "$start" "$end" "$limit" "$batch" "$device" "$dtype" "$model" <<'EOF'
import glob, json, os, sys
results_dir, task, start, end, limit, batch, device, dtype, model = sys.argv[1:]
files = sorted(glob.glob(os.path.join(results_dir, "**", "results_*.json"), recursive=True), key=os.path.getmtime)
if not files:
    sys.exit(f"lm-eval wrote no results under {results_dir}")
r = json.load(open(files[-1]))
m = r["results"][task]
n = r.get("n-samples", {}).get(task, {}).get("effective", limit)
evaluation = r.get("total_evaluation_time_seconds")
evaluation = f"{float(evaluation):.1f} s" if evaluation is not None else "n/a"
print(f"lm-eval {task} {os.path.basename(model)} {dtype} {device}: {n} questions, batch {batch}, "
      f"wall {float(end) - float(start):.1f} s (lm-eval evaluation {evaluation}), "
      f"acc {m['acc,none']:.4f} ± {m['acc_stderr,none']:.4f}, acc_norm {m['acc_norm,none']:.4f} ± {m['acc_norm_stderr,none']:.4f}")
EOF
