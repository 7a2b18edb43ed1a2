//! Feinschliff: adapt open LLMs to a domain and to German with LoRA, prove it with evaluations,
//! publish the result. Stages flow one way: recipe → data → model + LoRA → train (→ eval → export).

pub mod bench;
pub mod bench_kernels;
pub mod bench_throughput;
pub mod chat;
pub mod data;
pub mod device;
pub mod eval;
pub mod export;
pub mod failure;
pub mod fsutil;
pub mod hub;
pub mod model;
pub mod pipeline;
pub mod progress;
pub mod publish;
pub mod raster;
pub mod recipe;
pub mod secrets;
pub mod train;
