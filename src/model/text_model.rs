//! Where the text decoder sits among a checkpoint's modules: alone, as in a causal LM (`model.*`
//! beside `lm_head`), or as the language model of a multimodal checkpoint (Gemma 3 4B and up:
//! `model.language_model.*`, beside a vision tower and projector that Feinschliff leaves on disk).
//! Modules, tensors and adapter keys are named as transformers (and so PEFT) names the modules; a
//! checkpoint or adapter may also spell them as transformers' `save_pretrained` writes them.

/// The text decoder's module path, and the other spellings its names may have on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextModel {
    /// The decoder's module path: `{decoder}.embed_tokens`, `{decoder}.layers.N`, `{decoder}.norm`
    /// (`model`; `model.language_model` in a multimodal model). The LM head is `lm_head`.
    pub decoder: &'static str,
    /// Prefixes of module names with the prefix files may store them under instead (transformers'
    /// `_checkpoint_conversion_mapping`, reversed: `model.language_model.` → `language_model.model.`).
    pub stored_as: &'static [(&'static str, &'static str)],
}

impl TextModel {
    /// A causal LM's: the decoder at `model`, every name stored as the module is named.
    pub const CAUSAL_LM: TextModel = TextModel {
        decoder: "model",
        stored_as: &[],
    };

    /// Whether the checkpoint holds more than the text model (a multimodal one).
    pub fn is_nested(self) -> bool {
        self != Self::CAUSAL_LM
    }

    /// The module path of decoder layer `i`.
    pub fn layer(self, i: usize) -> String {
        format!("{}.layers.{i}", self.decoder)
    }

    /// `name` (a module or tensor of the text model) as transformers names it, then as files may
    /// store it.
    pub fn spellings(self, name: &str) -> Vec<String> {
        let mut out = vec![name.to_string()];
        for (module, stored) in self.stored_as {
            if let Some(rest) = name.strip_prefix(module) {
                out.push(format!("{stored}{rest}"));
            }
        }
        out
    }

    /// The module-based name of a tensor or module `stored` in any spelling, when it belongs to
    /// the text model; None for one outside it (a vision tower's).
    pub fn module_name(self, stored: &str) -> Option<String> {
        for (module, spelled) in self.stored_as {
            if let Some(rest) = stored.strip_prefix(spelled) {
                return Some(format!("{module}{rest}"));
            }
        }
        let inside = stored
            .strip_prefix(self.decoder)
            .is_some_and(|rest| rest.starts_with('.'))
            || stored.starts_with("lm_head.");
        inside.then(|| stored.to_string())
    }
}
