//! lm-evaluation-harness's text helpers, exactly as its task utilities define them, as filters for
//! task templates and expressions: `general_detokenize`, `okapi_preprocess`,
//! `lowercase_first_letter` and `strip` (Python's `str.strip`).

use minijinja::{Environment, Value};
use regex::Regex;
use std::sync::LazyLock;

/// Makes the helpers available as filters (`{{ sentence1 | general_detokenize | strip }}`).
pub fn register(env: &mut Environment) {
    env.add_filter("general_detokenize", |s: String| general_detokenize(&s));
    env.add_filter("okapi_preprocess", |v: Value| {
        v.as_str().map_or_else(|| " ".to_string(), okapi_preprocess)
    });
    env.add_filter("lowercase_first_letter", |s: String| {
        lowercase_first_letter(&s)
    });
    env.add_filter("strip", |s: String| py_strip(&s).to_string());
}

/// Python's `str.isspace` for one character (Unicode White_Space and the separators 0x1C–0x1F).
pub fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip()`.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(is_py_space)
}

/// Python's `str.split()`: runs of whitespace separate, no empty pieces.
pub fn py_split(s: &str) -> impl Iterator<Item = &str> {
    s.split(is_py_space).filter(|w| !w.is_empty())
}

/// `lm_eval.utils.general_detokenize` (also paws-x's `utils.general_detokenize`).
pub fn general_detokenize(s: &str) -> String {
    static SPACE_BEFORE: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r" (['.,])").expect("valid regex"));
    let s = s
        .replace(" n't", "n't")
        .replace(" )", ")")
        .replace("( ", "(")
        .replace("\" ", "\"")
        .replace(" \"", "\"");
    SPACE_BEFORE.replace_all(&s, "$1").into_owned()
}

/// `preprocess` of lm-eval's Okapi tasks (arc_multilingual, truthfulqa_multilingual): stripped,
/// " [title]" becomes ". ", bracketed text is removed, double spaces become single ones once.
pub fn okapi_preprocess(s: &str) -> String {
    static BRACKETED: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"\[.*?\]").expect("valid regex"));
    let s = py_strip(s).replace(" [title]", ". ");
    BRACKETED.replace_all(&s, "").replace("  ", " ")
}

/// paws-x's `lowercase_first_letter`: the first character in lower case (Python's full mapping).
pub fn lowercase_first_letter(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detokenizes_like_lm_eval() {
        assert_eq!(
            general_detokenize("Er sagt , es is n't ( so ) \" klar \" ."),
            "Er sagt, es isn't (so)\"klar\"."
        );
    }

    #[test]
    fn okapi_preprocess_removes_brackets_and_titles() {
        assert_eq!(
            okapi_preprocess("  Haus [title] Dach [Bild]  ist rot "),
            "Haus. Dach  ist rot"
        );
    }

    #[test]
    fn lowercases_only_the_first_letter() {
        assert_eq!(lowercase_first_letter("Äpfel Und"), "äpfel Und");
        assert_eq!(lowercase_first_letter(""), "");
    }
}
