//! The `feinschliff` command line: parses arguments and calls one entry point per command.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

use feinschliff::model::new::Size;

/// Tensors are large, short-lived allocations: mimalloc keeps freed pages for reuse where the
/// system allocator returns them to the kernel and pays a page fault per page on the next one.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h (15 in v3, which libmimalloc-sys builds, as in v2): how
/// long freed memory stays mapped; -1 = always.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

#[derive(Parser)]
#[command(
    name = "feinschliff",
    version,
    about = "LoRA fine-tuning of open LLMs, driven by a TOML recipe"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune with LoRA as the recipe says; writes a PEFT adapter.
    Train {
        recipe: PathBuf,
        /// Override a recipe value, e.g. --set train.lr=1e-4 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Replace an existing output folder, or start over where an interrupted run left
        /// checkpoints.
        #[arg(long)]
        force: bool,
        /// Continue the interrupted run of this recipe from its latest checkpoint, exactly.
        #[arg(long, conflicts_with = "force")]
        resume: bool,
    },
    /// Create or inspect checkpoints.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Talk to a model (and adapter) through its chat template: one turn per line until end of
    /// input, or one `--prompt`.
    Chat {
        /// Base model folder (Hugging Face layout) or Hub repo id.
        #[arg(long)]
        model: String,
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// A system message before the conversation.
        #[arg(long)]
        system: Option<String>,
        /// Answer this prompt once and exit; `-` reads it from stdin.
        #[arg(long)]
        prompt: Option<String>,
        /// Answer each turn with the base model, then with the adapted one.
        #[arg(long)]
        compare: bool,
        /// 0 is greedy decoding.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        /// 0 keeps every token.
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 1.0)]
        repetition_penalty: f64,
        #[arg(long, default_value_t = 256)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Score a model (and adapter) on an evaluation suite; exits non-zero when a gate fails.
    Eval {
        /// Base model folder (Hugging Face layout) or Hub repo id.
        #[arg(long)]
        model: String,
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long)]
        suite: PathBuf,
        /// Only these tasks (comma-separated).
        #[arg(long, value_delimiter = ',')]
        tasks: Vec<String>,
        /// At most N documents per task.
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long)]
        out: PathBuf,
        /// A results.json to compare against (max_drop gates, deltas in report.md).
        #[arg(long)]
        baseline: Option<PathBuf>,
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long)]
        force: bool,
    },
    /// Write base + adapter as one full model (`--merge`), or copy an adapter with its model card.
    Export {
        #[arg(long)]
        adapter: PathBuf,
        /// Merge the adapter into the base weights.
        #[arg(long)]
        merge: bool,
        /// Base model (default: the adapter's base_model_name_or_path).
        #[arg(long)]
        base: Option<String>,
        #[arg(long)]
        out: PathBuf,
        /// Weights dtype of the merged model (default: the base checkpoint's).
        #[arg(long, value_parser = ["f32", "bf16", "f16"])]
        dtype: Option<String>,
        /// Largest safetensors shard, e.g. 5GB, 500MB.
        #[arg(long, default_value = "5GB")]
        max_shard_size: String,
        /// Accept a --base whose name differs from the adapter's base_model_name_or_path.
        #[arg(long)]
        any_base: bool,
        /// Where to compute the merge: auto, cpu or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long)]
        force: bool,
        /// The merged model as Hugging Face safetensors or as one GGUF file for llama.cpp.
        #[arg(long, value_parser = ["safetensors", "gguf"], default_value = "safetensors")]
        format: String,
        /// Weights of a GGUF export.
        #[arg(long, value_enum, default_value = "f16")]
        quant: feinschliff::model::gguf::Quant,
    },
    /// Upload an adapter or merged model folder to the Hugging Face Hub in one commit.
    Publish {
        dir: PathBuf,
        /// Target repository, `org/name`.
        #[arg(long)]
        repo: String,
        #[arg(long)]
        private: bool,
        /// Branch to commit to (created when missing).
        #[arg(long)]
        revision: Option<String>,
        /// Open a pull request instead of committing to the branch.
        #[arg(long)]
        create_pr: bool,
        /// Upload even when files name the base by a local folder or hold a local path (needs --private).
        #[arg(long)]
        allow_local_base: bool,
        /// List what would be uploaded (after the same checks), upload nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Look at what the recipe's data becomes.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Measure speed and memory.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Write a random-initialised checkpoint in Hugging Face layout (deterministic for a seed).
    New {
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(feinschliff::model::families::writable()))]
        arch: String,
        #[arg(long, value_enum, default_value = "tiny")]
        size: Size,
        /// Width of each attention head, when it is not hidden size / heads (Mistral-Nemo's, 128
        /// with hidden 5120 and 32 heads, is less; many Qwen3 sizes' is more).
        #[arg(long)]
        head_dim: Option<usize>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing folder.
        #[arg(long)]
        force: bool,
    },
    /// Show family, shapes, parameter count and dtype; optionally write the logits of a text.
    Inspect {
        dir: PathBuf,
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Text whose logits are written with --logits-out.
        #[arg(long, requires = "logits_out")]
        text: Option<String>,
        /// safetensors file for `logits` [seq, vocab] and `input_ids`.
        #[arg(long, requires = "text")]
        logits_out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Rows read and dropped, token lengths, truncation, packing, and rendered samples with the
    /// trained part marked.
    Inspect {
        recipe: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Rendered samples to show.
        #[arg(long, default_value_t = 3)]
        samples: usize,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// LoRA train step (r16 on all 7 projections; default batch 4 x 256): tokens/s, step time, peak RSS.
    Train {
        #[command(flatten)]
        shape: BenchArgs,
    },
    /// Data pipeline (Polars load, chat template, tokenize, mask, pack) on synthetic chats: rows/s.
    Data {
        /// Model whose tokenizer and chat template are used (e.g. one made by `model new`).
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value_t = 200_000)]
        rows: usize,
    },
    /// Forward scoring without gradients (default batch 8 x 256), as the eval harness runs it.
    Score {
        #[command(flatten)]
        shape: BenchArgs,
    },
    /// Products with a bf16 weight on each kernel this CPU runs (AMX, AVX512_BF16, f32): GFLOP/s.
    Kernels,
    /// Greedy generation with the KV cache (default batch 1, prompt of --seq tokens): generated tokens/s.
    Generate {
        #[command(flatten)]
        shape: BenchArgs,
        /// Tokens generated per row.
        #[arg(long, default_value_t = 128)]
        new_tokens: usize,
    },
}

/// The model shape, batch and dtype a benchmark runs.
#[derive(clap::Args)]
struct BenchArgs {
    #[arg(long, default_value = "llama", value_parser = clap::builder::PossibleValuesParser::new(feinschliff::model::families::writable()))]
    arch: String,
    #[arg(long, value_enum, default_value = "tiny")]
    size: Size,
    /// Sequences per batch (default: 4 for train, 8 for score, 1 for generate).
    #[arg(long)]
    batch: Option<usize>,
    /// Tokens per sequence (generate: prompt tokens).
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Compute dtype of the frozen weights.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    dtype: String,
    /// Hold the projection weights quantized, as `[model] quantize` does: q4_0, q8_0 or nf4.
    #[arg(long)]
    quantize: Option<feinschliff::model::kernels::quant::Quantization>,
    /// Timed steps (after one warm-up); default 20 for tiny, 3 otherwise.
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long, default_value = "auto")]
    device: String,
    /// Recompute layer activations in the backward pass (train only).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Train and score: the share of each row's positions with a label, the rest being context
    /// without loss, as in chat data trained on its answers (the LM head runs on labelled positions
    /// only).
    #[arg(long, default_value_t = 1.0, value_parser = parse_fraction)]
    trained_fraction: f64,
}

/// A number in (0, 1] for `--trained-fraction`.
fn parse_fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(f) if f > 0.0 && f <= 1.0 => Ok(f),
        _ => Err(format!("`{text}` is not a share in (0, 1], e.g. 0.5")),
    }
}

impl BenchArgs {
    fn spec(&self, default_batch: usize) -> feinschliff::bench::BenchSpec {
        feinschliff::bench::BenchSpec {
            arch: self.arch.clone(),
            size: self.size,
            batch: self.batch.unwrap_or(default_batch),
            seq: self.seq,
            dtype: dtype_of(&self.dtype),
            quantize: self.quantize,
            steps: self
                .steps
                .unwrap_or(if self.size == Size::Tiny { 20 } else { 3 }),
            gradient_checkpointing: self.gradient_checkpointing,
            trained_fraction: self.trained_fraction,
        }
    }
}

fn dtype_of(name: &str) -> candle_core::DType {
    match name {
        "bf16" => candle_core::DType::BF16,
        "f16" => candle_core::DType::F16,
        _ => candle_core::DType::F32,
    }
}

fn main() {
    // Keep freed pages for the next tensor instead of returning them to the kernel: each new
    // page would otherwise be faulted in and zeroed again (a third of a train step on CPU).
    // SAFETY: sets a process-wide allocator option before any threads start.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(|| feinschliff::secrets::RedactedStderr)
        .without_time()
        .init();
    feinschliff::secrets::redact_panics();
    // Usage errors exit with 2 (clap's own code), as bad input does.
    let cli = Cli::parse();
    if let Err(e) = on_worker_thread(|| run(cli)) {
        eprintln!("error: {}", feinschliff::secrets::redact(&format!("{e:#}")));
        std::process::exit(feinschliff::failure::exit_code(&e));
    }
}

/// Runs `job` on a thread of rayon's global pool (sized as rayon sizes it, with a main thread's
/// stack), so that the kernels' parallel loops start from a worker: the calling thread takes
/// part and wakes only the others, where from outside the pool every loop wakes all of them and
/// puts the caller to sleep. Decoding runs hundreds of small parallel products per token.
fn on_worker_thread<T: Send>(job: impl FnOnce() -> T + Send) -> T {
    // A pool already built (none is, this early) keeps its threads; the job then runs there.
    let _ = rayon::ThreadPoolBuilder::new()
        .stack_size(64 << 20)
        .build_global();
    rayon::join(job, || ()).0
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train {
            recipe,
            overrides,
            force,
            resume,
        } => {
            let recipe = feinschliff::recipe::Recipe::load(&recipe, &overrides)?;
            let options = feinschliff::train::RunOptions { force, resume };
            let s = feinschliff::pipeline::run(&recipe, options)?;
            let val = s
                .val_loss
                .map(|v| format!(", validation loss {v:.4}"))
                .unwrap_or_default();
            let peak = s.peak_memory.map(|p| format!(", {p}")).unwrap_or_default();
            println!(
                "trained {} steps: loss {:.4} -> {:.4}{val}, {:.0} tokens/s{peak}; adapter in {}",
                s.steps,
                s.first_loss,
                s.last_loss,
                s.tokens_per_s,
                s.output.display()
            );
        }
        Command::Model {
            command:
                ModelCommand::New {
                    arch,
                    size,
                    head_dim,
                    seed,
                    out,
                    force,
                },
        } => {
            feinschliff::model::new::create(&arch, size, head_dim, seed, &out, force)?;
            println!(
                "wrote {arch} {size:?} checkpoint (seed {seed}) to {}",
                out.display()
            );
        }
        Command::Model {
            command:
                ModelCommand::Inspect {
                    dir,
                    adapter,
                    text,
                    logits_out,
                },
        } => {
            let model = feinschliff::model::inspect::load(&dir, adapter.as_deref())?;
            print!("{}", feinschliff::model::inspect::summary(&model)?);
            if let (Some(text), Some(out)) = (text, logits_out) {
                feinschliff::model::inspect::write_logits(&model, &text, &out)?;
                println!("logits written to {}", out.display());
            }
        }
        Command::Chat {
            model,
            adapter,
            system,
            prompt,
            compare,
            temperature,
            top_p,
            top_k,
            repetition_penalty,
            max_new_tokens,
            seed,
            device,
        } => {
            if !(0.0..=1.0).contains(&top_p) || top_p == 0.0 {
                anyhow::bail!("--top-p must be in (0, 1], got {top_p}");
            }
            if temperature < 0.0 || repetition_penalty <= 0.0 {
                anyhow::bail!("--temperature must be >= 0 and --repetition-penalty > 0");
            }
            let opts = feinschliff::chat::ChatOptions {
                model,
                adapter,
                system,
                prompt,
                compare,
                sampling: feinschliff::chat::sampling::SamplingOptions {
                    temperature,
                    top_k,
                    top_p,
                    repetition_penalty,
                    seed,
                },
                max_new_tokens,
                device,
            };
            let stdin = std::io::stdin();
            feinschliff::chat::run(&opts, &mut stdin.lock(), &mut std::io::stdout().lock())?;
        }
        Command::Eval {
            model,
            adapter,
            suite,
            tasks,
            limit,
            out,
            baseline,
            device,
            force,
        } => {
            let opts = feinschliff::eval::EvalOptions {
                model,
                adapter,
                suite,
                tasks,
                limit,
                out,
                baseline,
                device,
                force,
            };
            let outcome = feinschliff::eval::run(&opts)?;
            println!("reports in {}", outcome.out.display());
            let failures = outcome.failures();
            if !failures.is_empty() {
                return Err(anyhow::anyhow!("{}", failures.join("\n"))
                    .context(feinschliff::failure::Failure::GateMissed));
            }
        }
        Command::Export {
            adapter,
            merge,
            base,
            out,
            dtype,
            max_shard_size,
            any_base,
            device,
            force,
            format,
            quant,
        } => {
            let dtype = dtype.as_deref().map(dtype_of);
            let format = match format.as_str() {
                "gguf" if !merge => anyhow::bail!("--format gguf needs --merge"),
                "gguf" => feinschliff::export::merged::Format::Gguf(quant),
                _ => feinschliff::export::merged::Format::Safetensors,
            };
            let max_shard_bytes = feinschliff::export::merged::parse_size(&max_shard_size)?;
            let located = feinschliff::export::locate_base(&adapter, base.as_deref(), any_base)?;
            let opts = feinschliff::export::MergeOptions {
                adapter,
                out,
                dtype,
                max_shard_bytes,
                device,
                force,
                format,
            };
            let written = if merge {
                feinschliff::export::merge(&opts, &located)?
            } else {
                feinschliff::export::copy_adapter(&opts, &located)?
            };
            println!("wrote {}", written.display());
        }
        Command::Publish {
            dir,
            repo,
            private,
            revision,
            create_pr,
            allow_local_base,
            dry_run,
        } => {
            let opts = feinschliff::publish::PublishOptions {
                dir,
                repo,
                private,
                revision,
                create_pr,
                allow_local_base,
                dry_run,
            };
            let outcome = feinschliff::publish::run(&opts)?;
            for (path, size) in &outcome.files {
                println!("{size:>12}  {path}");
            }
            if opts.dry_run {
                println!(
                    "dry run: {} files would be uploaded to {} (\"{}\")",
                    outcome.files.len(),
                    opts.repo,
                    outcome.commit_message
                );
            } else {
                println!("uploaded {} files to {}", outcome.files.len(), opts.repo);
                if let Some(url) = outcome.pr_url.or(outcome.commit_url) {
                    println!("{url}");
                }
            }
        }
        Command::Data {
            command:
                DataCommand::Inspect {
                    recipe,
                    overrides,
                    samples,
                },
        } => {
            let recipe = feinschliff::recipe::Recipe::load(&recipe, &overrides)?;
            print!("{}", feinschliff::data::inspect::run(&recipe, samples)?);
        }
        Command::Bench {
            command: BenchCommand::Train { shape },
        } => {
            let device = feinschliff::device::open(&shape.device)?;
            println!("{}", feinschliff::bench::train(&shape.spec(4), &device)?);
        }
        Command::Bench {
            command: BenchCommand::Data { model, rows },
        } => {
            println!("{}", feinschliff::bench::data(&model, rows)?);
        }
        Command::Bench {
            command: BenchCommand::Score { shape },
        } => {
            let device = feinschliff::device::open(&shape.device)?;
            println!("{}", feinschliff::bench::score(&shape.spec(8), &device)?);
        }
        Command::Bench {
            command: BenchCommand::Kernels,
        } => {
            print!("{}", feinschliff::bench_kernels::run()?);
        }
        Command::Bench {
            command: BenchCommand::Generate { shape, new_tokens },
        } => {
            let device = feinschliff::device::open(&shape.device)?;
            let spec = shape.spec(1);
            println!(
                "{}",
                feinschliff::bench::generate(&spec, new_tokens, &device)?
            );
        }
    }
    Ok(())
}
