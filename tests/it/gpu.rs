//! The CUDA build against the CPU (compiled with `--features cuda` only; where no GPU answers it
//! prints why and passes): the same tiny model and adapter, trained three steps on each device, give
//! the same losses, gradient norms and adapter weights — with and without gradient checkpointing,
//! and on a quantized base (q4_0, q8_0, nf4: decoded on the GPU) —; a bf16 run on the GPU follows
//! the f32 one, and runs with dropout repeat exactly.

use candle_core::{DType, Device};
use feinschliff::data::{Batch, Example};
use feinschliff::model::kernels::quant::Quantization;
use feinschliff::model::new::{config_json, random_weights, Size};
use feinschliff::model::weights::Weights;
use feinschliff::model::{adapter, CausalLm, ModelConfig};
use feinschliff::train::optim::{AdamW, AdamWParams};
use feinschliff::train::step::optimizer_step;

/// Losses, gradient norms and final adapter weights of a run.
type Run = (Vec<f64>, Vec<f64>, Vec<Vec<f32>>);

/// [`Run`] of three train steps on `device`, the projections held in `quantize` when given.
fn train_three_steps(
    device: &Device,
    dtype: DType,
    quantize: Option<Quantization>,
    checkpointing: bool,
    dropout: f64,
) -> Run {
    let shape = Size::Tiny.shape();
    let config = ModelConfig::from_json(&config_json("qwen2", &shape, false).unwrap()).unwrap();
    let weights = Weights::from_tensors(
        random_weights("qwen2", &shape, false, 5).unwrap(),
        dtype,
        device,
    );
    let mut lm = CausalLm::load_quantized(config, &weights, device, quantize).unwrap();
    let lora_config = super::common::all_linear_lora(4, 8.0, dropout);
    adapter::attach(&mut lm, &lora_config, 9).unwrap();
    lm.gradient_checkpointing = checkpointing;
    let examples: Vec<Example> = (0..4)
        .map(|k| {
            let ids: Vec<u32> = (0..40 + 7 * k)
                .map(|i| (i * 37 + k * 11) as u32 % 1000)
                .collect();
            Example::single(ids.clone(), ids.iter().map(|&t| t as i64).collect())
        })
        .collect();
    let refs: Vec<&Example> = examples.iter().collect();
    let batches = [
        Batch::pad(&refs[..2], 0, device).unwrap(),
        Batch::pad(&refs[2..], 0, device).unwrap(),
    ];
    let trainable = adapter::trainable(&lm);
    let params = AdamWParams::default();
    let mut opt = AdamW::new(trainable.iter().map(|(_, v)| v.clone()).collect(), params).unwrap();
    let (mut losses, mut norms) = (Vec::new(), Vec::new());
    for step in 0..3 {
        let o =
            optimizer_step(&lm, &trainable, &mut opt, &batches, 1e-2, 1.0, step, false).unwrap();
        losses.push(o.loss);
        norms.push(o.grad_norm);
    }
    let values = trainable
        .iter()
        .map(|(_, v)| {
            v.as_tensor()
                .to_device(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect();
    (losses, norms, values)
}

fn relative(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

/// The GPU, or None (and a line saying why the test skips) where none answers.
fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped: no GPU answers ({e})");
            None
        }
    }
}

/// Asserts that two runs' losses and gradient norms agree to 1e-4 (relative) and their adapter
/// weights to 1e-4 (absolute); `what` names the case in the message.
fn assert_same_run(
    what: &str,
    (losses, norms, values): &Run,
    (cpu_losses, cpu_norms, cpu_values): &Run,
) {
    for (a, b) in losses
        .iter()
        .zip(cpu_losses)
        .chain(norms.iter().zip(cpu_norms))
    {
        assert!(relative(*a, *b) < 1e-4, "{what}: GPU {a} vs CPU {b}");
    }
    let worst = values
        .iter()
        .flatten()
        .zip(cpu_values.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "{what}: adapter weights differ by {worst}");
}

#[test]
fn cuda_training_matches_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let cpu = train_three_steps(&Device::Cpu, DType::F32, None, false, 0.0);
    for checkpointing in [false, true] {
        let run = train_three_steps(&gpu, DType::F32, None, checkpointing, 0.0);
        assert_same_run(&format!("checkpointing {checkpointing}"), &run, &cpu);
    }
    let (bf16_losses, _, _) = train_three_steps(&gpu, DType::BF16, None, false, 0.0);
    for (a, b) in bf16_losses.iter().zip(&cpu.0) {
        assert!(relative(*a, *b) < 0.05, "bf16 loss {a} vs f32 {b}");
    }
    // Dropout masks come from the GPU's generator, reseeded per module and step: a run repeats.
    let first = train_three_steps(&gpu, DType::F32, None, false, 0.1);
    let again = train_three_steps(&gpu, DType::F32, None, false, 0.1);
    assert_eq!(first.0, again.0, "GPU dropout runs differ");
    assert_ne!(first.0, cpu.0, "dropout changed nothing");
}

/// A quantized base decodes to the same values on both devices: in f32 the runs agree as dense
/// ones do (with gradient checkpointing, a quantized base's default), and a bf16 run on the GPU
/// follows the CPU's f32 one.
#[test]
fn cuda_quantized_training_matches_the_cpu() {
    let Some(gpu) = gpu() else { return };
    for format in Quantization::ALL {
        let cpu = train_three_steps(&Device::Cpu, DType::F32, Some(format), true, 0.0);
        let run = train_three_steps(&gpu, DType::F32, Some(format), true, 0.0);
        assert_same_run(format.name(), &run, &cpu);
        let (bf16_losses, _, _) = train_three_steps(&gpu, DType::BF16, Some(format), true, 0.0);
        for (a, b) in bf16_losses.iter().zip(&cpu.0) {
            assert!(
                relative(*a, *b) < 0.05,
                "{}: bf16 loss {a} vs f32 {b}",
                format.name()
            );
        }
    }
}
