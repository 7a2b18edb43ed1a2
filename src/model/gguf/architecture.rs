//! Which llama.cpp architectures map to which transformers `model_type`s, and how each stores
//! its tensors.

/// llama.cpp's architectures and the transformers `model_type`s written as each; a file is read
/// as the first of them.
pub(super) const ARCHITECTURES: &[(&str, &[&str])] = &[
    ("llama", &["llama", "mistral"]),
    ("qwen2", &["qwen2"]),
    ("qwen3", &["qwen3"]),
];

/// The `model_type` a file of llama.cpp architecture `arch` loads as.
pub(super) fn model_type_of(arch: &str) -> Option<&'static str> {
    ARCHITECTURES
        .iter()
        .find(|(a, _)| *a == arch)
        .map(|(_, types)| types[0])
}

/// The llama.cpp architecture a model of `model_type` is written as.
pub(super) fn architecture_of(model_type: &str) -> Option<&'static str> {
    ARCHITECTURES
        .iter()
        .find(|(_, types)| types.contains(&model_type))
        .map(|(a, _)| *a)
}

/// Whether llama.cpp permutes the Q/K rows of architecture `arch` (the Llama architecture only:
/// its RoPE pairs adjacent values).
pub(super) fn permutes_qk(arch: &str) -> bool {
    arch == "llama"
}
