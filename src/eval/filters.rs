//! Post-processing of generations before they are scored: lm-evaluation-harness's filter
//! pipelines (`filter_list`). Each named pipeline turns the raw generation into the response its
//! metrics see; metrics are reported per pipeline as `<metric>,<name>`.

use anyhow::{anyhow, Result};
use regex::Regex;
use serde::{Deserialize, Serialize};

use super::functions::py_strip;

/// One named pipeline of a task (`[[task.filter]]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterPipeline {
    pub name: String,
    pub steps: Vec<FilterStep>,
}

/// One step, named by lm-eval's `function`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "function", rename_all = "snake_case", deny_unknown_fields)]
pub enum FilterStep {
    /// lm-eval's `regex` filter: Python's `re.findall`, the match at `group_select` (negative
    /// counts from the end); of a match with several groups its first non-empty group; stripped.
    /// No match gives `fallback`.
    Regex {
        regex_pattern: String,
        #[serde(default)]
        group_select: i64,
        #[serde(default = "default_fallback")]
        fallback: String,
    },
    /// lm-eval's `remove_whitespace`: leading and trailing whitespace removed.
    RemoveWhitespace,
}

fn default_fallback() -> String {
    "[invalid]".into()
}

impl FilterPipeline {
    /// Checks that every step can run (regexes compile), naming the step on errors.
    pub fn validate(&self) -> Result<()> {
        self.compiled().map(|_| ())
    }

    /// The pipeline with its regexes compiled, to apply to many generations.
    pub fn compiled(&self) -> Result<CompiledPipeline> {
        let steps = self
            .steps
            .iter()
            .map(|step| match step {
                FilterStep::Regex {
                    regex_pattern,
                    group_select,
                    fallback,
                } => Regex::new(regex_pattern)
                    .map(|re| CompiledStep::Regex {
                        re,
                        group_select: *group_select,
                        fallback: fallback.clone(),
                    })
                    .map_err(|e| {
                        anyhow!(
                            "filter `{}`: regex_pattern `{regex_pattern}` is not a valid regex: {e}",
                            self.name
                        )
                    }),
                FilterStep::RemoveWhitespace => Ok(CompiledStep::RemoveWhitespace),
            })
            .collect::<Result<_>>()?;
        Ok(CompiledPipeline {
            name: self.name.clone(),
            steps,
        })
    }
}

/// A pipeline ready to apply.
pub struct CompiledPipeline {
    pub name: String,
    steps: Vec<CompiledStep>,
}

enum CompiledStep {
    Regex {
        re: Regex,
        group_select: i64,
        fallback: String,
    },
    RemoveWhitespace,
}

impl CompiledPipeline {
    /// The response the metrics see for one generation.
    pub fn apply(&self, generation: &str) -> String {
        self.steps
            .iter()
            .fold(generation.to_string(), |text, step| match step {
                CompiledStep::Regex {
                    re,
                    group_select,
                    fallback,
                } => regex_select(re, &text, *group_select).unwrap_or_else(|| fallback.clone()),
                CompiledStep::RemoveWhitespace => py_strip(&text).to_string(),
            })
    }
}

/// What one `re.findall` item is: the whole match (no groups), the one group, or all groups.
fn findall(re: &Regex, text: &str) -> Vec<Vec<String>> {
    let groups = re.captures_len() - 1;
    re.captures_iter(text)
        .map(|caps| {
            let group = |i: usize| caps.get(i).map_or("", |m| m.as_str()).to_string();
            match groups {
                0 => vec![group(0)],
                _ => (1..=groups).map(group).collect(),
            }
        })
        .collect()
}

/// lm-eval's RegexFilter on one response; `None` where it returns the fallback.
fn regex_select(re: &Regex, text: &str, group_select: i64) -> Option<String> {
    let items = findall(re, text);
    let index = if group_select < 0 {
        items
            .len()
            .checked_sub(group_select.unsigned_abs() as usize)?
    } else {
        group_select as usize
    };
    let item = items.get(index)?;
    let chosen = if item.len() == 1 {
        item[0].as_str()
    } else {
        item.iter().find(|g| !g.is_empty())?.as_str()
    };
    Some(py_strip(chosen).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flexible_extract() -> CompiledPipeline {
        FilterPipeline {
            name: "flexible-extract".into(),
            steps: vec![FilterStep::Regex {
                regex_pattern: "(-?[$0-9.,]{2,})|(-?[0-9]+)".into(),
                group_select: -1,
                fallback: default_fallback(),
            }],
        }
        .compiled()
        .unwrap()
    }

    #[test]
    fn takes_the_last_number() {
        let f = flexible_extract();
        assert_eq!(f.apply("Erst 12, dann 7"), "7");
        assert_eq!(f.apply("Es sind $1,234.50."), "$1,234.50.");
        assert_eq!(f.apply("keine Zahl"), "[invalid]");
    }

    #[test]
    fn a_bad_regex_names_the_filter() {
        let bad = FilterPipeline {
            name: "x".into(),
            steps: vec![FilterStep::Regex {
                regex_pattern: "(".into(),
                group_select: 0,
                fallback: default_fallback(),
            }],
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("filter `x`"));
    }
}
