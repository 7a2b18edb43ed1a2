//! The model core's import graph has no cycles: no module under `src/model` imports a module that
//! imports it back (directly or through others). Imports are the paths a file names with
//! `super::`, `crate::` or, in a `mod.rs`, one of its own submodules; each resolves to the deepest
//! module it reaches. The kernels under `model::kernels` import nothing else of the model.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Module = Vec<String>;

/// Every module under `dir` (a path in `src`), with the text of its file.
fn modules(src: &Path, dir: &Path, out: &mut BTreeMap<Module, String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            modules(src, &path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix(src).unwrap().with_extension("");
            let mut module: Module = rel.iter().map(|s| s.to_string_lossy().into()).collect();
            if module.last().is_some_and(|m| m == "mod") {
                module.pop();
            }
            out.insert(module, std::fs::read_to_string(&path).unwrap());
        }
    }
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

fn skip_space(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && s[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// The paths of a use tree (or a plain path) starting at `i`: `a::b`, `a::{b, c::d}`.
fn use_tree(s: &[u8], mut i: usize) -> Vec<Vec<String>> {
    let mut prefix = Vec::new();
    loop {
        i = skip_space(s, i);
        if s.get(i) == Some(&b'{') {
            let mut paths = Vec::new();
            let (mut depth, mut start) = (0, i + 1);
            for j in i..s.len() {
                match s[j] {
                    b'{' => depth += 1,
                    b'}' | b',' if depth == 1 => {
                        for p in use_tree(s, start) {
                            paths.push([prefix.clone(), p].concat());
                        }
                        start = j + 1;
                        if s[j] == b'}' {
                            return paths;
                        }
                    }
                    b'}' => depth -= 1,
                    _ => {}
                }
            }
            return paths;
        }
        let start = i;
        while i < s.len() && is_ident(s[i]) {
            i += 1;
        }
        if start == i {
            return vec![prefix];
        }
        prefix.push(String::from_utf8_lossy(&s[start..i]).into_owned());
        if !s[i..].starts_with(b"::") {
            return vec![prefix];
        }
        i += 2;
    }
}

/// The modules `module` (file text `text`) imports, other than itself.
fn imports(module: &Module, text: &str, all: &BTreeMap<Module, String>) -> BTreeSet<Module> {
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let s = code.as_bytes();
    let children: BTreeSet<&str> = all
        .keys()
        .filter(|m| m.len() == module.len() + 1 && m.starts_with(module))
        .map(|m| m.last().unwrap().as_str())
        .collect();
    let mut out = BTreeSet::new();
    for i in 0..s.len() {
        if i > 0 && (is_ident(s[i - 1]) || s[i - 1] == b':') {
            continue;
        }
        let (mut base, mut at) = (module.clone(), i);
        if s[i..].starts_with(b"super::") {
            while s[at..].starts_with(b"super::") {
                base.pop();
                at += "super::".len();
            }
        } else if s[i..].starts_with(b"crate::") {
            base.clear();
            at += "crate::".len();
        } else {
            let end = (i..s.len()).find(|&j| !is_ident(s[j])).unwrap_or(s.len());
            let word = std::str::from_utf8(&s[i..end]).unwrap();
            if !children.contains(word) || !s[end..].starts_with(b"::") {
                continue;
            }
        }
        for path in use_tree(s, at) {
            let full = [base.clone(), path].concat();
            let reached = (1..=full.len())
                .rev()
                .map(|k| full[..k].to_vec())
                .find(|m| all.contains_key(m));
            if let Some(m) = reached.filter(|m| m != module && m[0] == "model") {
                out.insert(m);
            }
        }
    }
    out
}

/// Whether `to` is reachable from `from` in `graph`.
fn reaches(graph: &BTreeMap<Module, BTreeSet<Module>>, from: &Module, to: &Module) -> bool {
    let mut seen = BTreeSet::new();
    let mut stack = vec![from.clone()];
    while let Some(m) = stack.pop() {
        if &m == to {
            return true;
        }
        if seen.insert(m.clone()) {
            stack.extend(graph.get(&m).into_iter().flatten().cloned());
        }
    }
    false
}

#[test]
fn the_model_core_has_no_import_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = BTreeMap::new();
    modules(&src, &src.join("model"), &mut all);
    assert!(
        all.len() > 20,
        "found only {} modules under src/model",
        all.len()
    );
    let graph: BTreeMap<Module, BTreeSet<Module>> = all
        .iter()
        .map(|(m, text)| (m.clone(), imports(m, text, &all)))
        .collect();
    let mut cycles = Vec::new();
    for (module, deps) in &graph {
        for dep in deps {
            if reaches(&graph, dep, module) {
                cycles.push(format!(
                    "{} -> {} -> ... -> back",
                    module.join("::"),
                    dep.join("::")
                ));
            }
        }
    }
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
    // The kernels are a leaf: they know no model.
    let leaf = ["model".to_string(), "kernels".to_string()];
    let reaching_up: Vec<String> = graph
        .iter()
        .filter(|(m, _)| m.starts_with(&leaf))
        .flat_map(|(m, deps)| deps.iter().map(move |d| (m, d)))
        .filter(|(_, d)| !d.starts_with(&leaf))
        .map(|(m, d)| format!("{} imports {}", m.join("::"), d.join("::")))
        .collect();
    assert!(reaching_up.is_empty(), "{}", reaching_up.join("\n"));
}

#[test]
fn the_cycle_check_sees_use_trees_and_child_paths() {
    let mut all = BTreeMap::new();
    for m in ["model", "model::a", "model::b", "model::b::c"] {
        all.insert(
            m.split("::").map(String::from).collect::<Module>(),
            String::new(),
        );
    }
    let module: Module = vec!["model".into(), "b".into()];
    let text = "use super::{a::X, b::c::Y};\n// super::a is a comment\nfn f() { c::g(); }";
    let found: Vec<String> = imports(&module, text, &all)
        .into_iter()
        .map(|m| m.join("::"))
        .collect();
    assert_eq!(found, ["model::a", "model::b::c"]);
}
