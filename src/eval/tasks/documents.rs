//! Document preparation before prompting, lm-eval's `process_docs`: a task's `keep` expression
//! drops documents, then its `process_docs` steps rewrite fields, each an expression (with
//! lm-eval's text helpers as filters) over the document as rewritten so far.

use anyhow::{anyhow, bail, Result};
use minijinja::{Environment, Expression, Value};

use super::Doc;
use crate::eval::functions;
use crate::eval::suite::TaskConfig;

/// A task's `keep` and `process_docs`, compiled.
pub struct Processor<'env> {
    keep: Option<Expression<'env, 'env>>,
    steps: Vec<(&'env str, Expression<'env, 'env>)>,
}

/// The environment expressions are compiled in: Jinja's builtins, Python's string methods and
/// lm-eval's helpers.
pub fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    functions::register(&mut env);
    env
}

impl<'env> Processor<'env> {
    /// Compiles the task's expressions; a syntax error names the key.
    pub fn new(env: &'env Environment<'static>, task: &'env TaskConfig) -> Result<Self> {
        let keep = task
            .keep
            .as_deref()
            .map(|k| {
                env.compile_expression(k)
                    .map_err(|e| anyhow!("`keep` is not a valid expression: {e}"))
            })
            .transpose()?;
        let steps = task
            .process_docs
            .iter()
            .map(|step| {
                env.compile_expression(&step.to)
                    .map(|e| (step.set.as_str(), e))
                    .map_err(|e| {
                        anyhow!(
                            "process_docs step setting `{}`: `{}` is not a valid expression: {e}",
                            step.set,
                            step.to
                        )
                    })
            })
            .collect::<Result<_>>()?;
        Ok(Self { keep, steps })
    }

    /// The documents that are kept, rewritten; an error names the document (1-based).
    pub fn apply(&self, docs: Vec<Doc>) -> Result<Vec<Doc>> {
        if self.keep.is_none() && self.steps.is_empty() {
            return Ok(docs);
        }
        let mut out = Vec::with_capacity(docs.len());
        for (i, mut doc) in docs.into_iter().enumerate() {
            let at = |e: &dyn std::fmt::Display| anyhow!("document {}: {e}", i + 1);
            if let Some(keep) = &self.keep {
                if !keep
                    .eval(Value::from(minijinja::value::Serde(&doc)))
                    .map_err(|e| at(&e))?
                    .is_true()
                {
                    continue;
                }
            }
            for (field, expression) in &self.steps {
                let value = expression
                    .eval(Value::from(minijinja::value::Serde(&doc)))
                    .map_err(|e| at(&format!("process_docs `{field}`: {e}")))?;
                let value = serde_json::to_value(&value).map_err(|e| at(&e))?;
                match doc.as_object_mut() {
                    Some(fields) => fields.insert(field.to_string(), value),
                    None => bail!("document {} is not a record with fields", i + 1),
                };
            }
            out.push(doc);
        }
        Ok(out)
    }
}

/// Checks that the task's expressions compile.
pub fn check(task: &TaskConfig) -> Result<()> {
    let env = environment();
    Processor::new(&env, task).map(|_| ())
}

/// The task's documents after `keep` and `process_docs`.
pub fn prepare(task: &TaskConfig, docs: Vec<Doc>) -> Result<Vec<Doc>> {
    let env = environment();
    Processor::new(&env, task)?.apply(docs)
}
