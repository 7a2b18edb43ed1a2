//! Integration tests, one file per concern.

mod adapter;
mod cli;
mod common;
mod data;
mod eval;
mod export;
mod gradients;
mod parity;
mod recipe;
mod training;
