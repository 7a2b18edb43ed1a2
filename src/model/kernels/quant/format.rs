//! The block formats a frozen weight can be held in, and their names in recipes.

use candle_core::quantized::GgmlDType;
use candle_core::DType;
use serde::{Deserialize, Serialize};

/// A block format for frozen weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Quantization {
    /// llama.cpp's Q4_0: 32 values, f16 scale d, value = (code − 8)·d; 4.5 bits per value.
    Q4_0,
    /// llama.cpp's Q8_0: 32 values, f16 scale d, value = code·d; 8.5 bits per value.
    Q8_0,
    /// bitsandbytes' NF4: 64 values, f32 absmax, value = NF4 code book[code]·absmax; 4.5 bits.
    Nf4,
}

impl Quantization {
    pub const ALL: [Quantization; 3] = [Self::Q4_0, Self::Q8_0, Self::Nf4];

    pub fn name(self) -> &'static str {
        match self {
            Self::Q4_0 => "q4_0",
            Self::Q8_0 => "q8_0",
            Self::Nf4 => "nf4",
        }
    }

    /// Values per block (each row of a weight is cut into whole blocks).
    pub fn block(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q8_0 => 32,
            Self::Nf4 => 64,
        }
    }

    pub(super) fn bits(self) -> usize {
        match self {
            Self::Q4_0 | Self::Nf4 => 4,
            Self::Q8_0 => 8,
        }
    }

    /// Bytes of codes per block.
    pub(super) fn code_bytes(self) -> usize {
        self.block() * self.bits() / 8
    }

    pub(super) fn scale_dtype(self) -> DType {
        match self {
            Self::Q4_0 | Self::Q8_0 => DType::F16,
            Self::Nf4 => DType::F32,
        }
    }

    /// The format of a GGUF storage type whose blocks products use as they are.
    pub fn of_gguf(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }
}

impl std::fmt::Display for Quantization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Quantization {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|q| q.name() == s)
            .ok_or_else(|| format!("`{s}` is not a quantization: use q4_0, q8_0 or nf4"))
    }
}

/// As the recipe's `[model] quantize` reads it.
impl TryFrom<String> for Quantization {
    type Error = String;

    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse().map_err(|e| format!("[model] quantize: {e}"))
    }
}

impl From<Quantization> for String {
    fn from(q: Quantization) -> String {
        q.name().to_string()
    }
}
