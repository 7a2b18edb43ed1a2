//! The export stage: a merged full model in Hugging Face layout, and model cards. Entry point:
//! [`merge`] for `feinschliff export --merge`; [`card::write`] for any adapter or export folder.

pub mod card;
pub mod html;
pub mod merged;

pub use merged::{copy_adapter, locate_base, merge, MergeOptions};
