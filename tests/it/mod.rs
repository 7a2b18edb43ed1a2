//! Integration tests, one file per concern.

mod adapter;
mod attention;
mod charts;
mod chat;
mod chat_templates;
mod cli;
mod common;
mod data;
mod eval;
mod excel;
mod export;
mod families;
mod faults;
mod fuzz;
mod gguf;
#[cfg(feature = "cuda")]
mod gpu;
mod gradients;
mod head_loss;
mod hub_id;
mod hub_server;
mod kv_cache;
mod lm_eval_parity;
mod lm_eval_tasks;
mod lora_linear;
mod matmul;
mod model_config;
mod parity;
mod publish;
mod recipe;
mod special_tokens;
mod train_parity;
mod training;
