//! The module layers, enforced: a top-level module may use (`crate::…`) modules of its own
//! layer or below, never above, and the uses between modules form no cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every top-level module and its layer, from the bottom (0) up.
const LAYERS: &[(&str, usize)] = &[
    // Foundation: configuration, the worker protocol, text, chat templates, readiness.
    ("config", 0),
    ("logging", 0),
    ("protocol", 0),
    ("text", 0),
    ("chat_template", 0),
    // Structured output: user constraints as one llguidance grammar; tools, their prompt,
    // grammar and output parsers.
    ("constraint", 0),
    ("tools", 0),
    ("readiness", 0),
    // Engine: the worker's supervision and queue, and the metrics they feed.
    ("metrics", 1),
    ("engine", 1),
    // Requests: the served model, validation, generation; errors as HTTP answers.
    ("error", 2),
    ("served_model", 2),
    ("validation", 2),
    ("generation", 2),
    // API schemas (each API's wire types, mapped onto requests) and the job service.
    ("openai", 3),
    ("tgi", 3),
    ("jobs", 3),
    // What every route handler shares.
    ("state", 4),
    // Route handlers and process wiring.
    ("api", 5),
    ("startup", 5),
    ("lifecycle", 5),
    ("server", 5),
];

/// Files that are not part of a module: the crate root and this checker.
const NOT_CHECKED: &[&str] = &["main.rs", "layers_tests.rs"];

type Edges = BTreeSet<(String, String)>;

/// The source without comments (a `//` inside a string literal is kept).
fn strip_comments(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    for line in source.lines() {
        let mut in_string = false;
        let mut escaped = false;
        let mut previous = ' ';
        let mut end = line.len();
        for (i, c) in line.char_indices() {
            if in_string {
                match c {
                    _ if escaped => escaped = false,
                    '\\' => escaped = true,
                    '"' => in_string = false,
                    _ => {}
                }
            } else if c == '"' && previous != '\'' {
                in_string = true;
            } else if c == '/' && previous == '/' {
                end = i - 1;
                break;
            }
            previous = c;
        }
        out.push_str(&line[..end]);
        out.push('\n');
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

fn leading_ident(text: &str) -> String {
    text.trim_start()
        .chars()
        .take_while(|&c| is_ident(c))
        .collect()
}

/// The top-level modules a source uses through `crate::name` or `crate::{name, …}`.
fn crate_references(source: &str) -> BTreeSet<String> {
    let source = strip_comments(source);
    let mut found = BTreeSet::new();
    for (at, _) in source.match_indices("crate::") {
        if source[..at]
            .chars()
            .next_back()
            .is_some_and(|c| is_ident(c) || c == '$')
        {
            continue;
        }
        let rest = &source[at + "crate::".len()..];
        match rest.strip_prefix('{') {
            Some(group) => {
                let mut depth = 0usize;
                let mut item_start = 0;
                for (i, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => {
                            found.insert(leading_ident(&group[item_start..i]));
                            break;
                        }
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            found.insert(leading_ident(&group[item_start..i]));
                            item_start = i + 1;
                        }
                        _ => {}
                    }
                }
            }
            None => {
                found.insert(leading_ident(rest));
            }
        }
    }
    found.remove("");
    found
}

/// `super::` that climbs out of a top-level module, which `crate_references` would miss.
fn climbs_out(top_level_file: bool, source: &str) -> bool {
    let source = strip_comments(source);
    if source.contains("super::super::") {
        return true;
    }
    // In `src/x.rs` or `src/x/mod.rs`, `super` is the crate root until an inline module opens.
    top_level_file
        && source
            .lines()
            .take_while(|line| !(line.trim_start().starts_with("mod ") && line.contains('{')))
            .any(|line| line.contains("super::"))
}

/// Uses that go up a layer, as (from, to).
fn upward(layers: &[(&str, usize)], edges: &Edges) -> Vec<(String, String)> {
    let layer: BTreeMap<&str, usize> = layers.iter().copied().collect();
    edges
        .iter()
        .filter(|(from, to)| layer[from.as_str()] < layer[to.as_str()])
        .cloned()
        .collect()
}

/// A cycle among the uses, as the modules along it.
fn find_cycle(edges: &Edges) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &Edges,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for (_, to) in edges.iter().filter(|(from, _)| from == node) {
            if let Some(cycle) = visit(to, edges, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    edges
        .iter()
        .find_map(|(from, _)| visit(from, edges, &mut Vec::new(), &mut done))
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    let entries = std::fs::read_dir(dir).expect("src is readable");
    for path in entries.map(|entry| entry.expect("a directory entry").path()) {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

/// The uses between top-level modules in `src/`, and the files that climb out with `super`.
fn crate_edges() -> (Edges, Vec<String>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut edges = Edges::new();
    let mut climbing = Vec::new();
    for path in files {
        let relative = path.strip_prefix(&src).expect("under src");
        let name = relative.to_string_lossy().into_owned();
        if NOT_CHECKED.contains(&name.as_str()) {
            continue;
        }
        let first = relative.components().next().expect("a component");
        let module = first.as_os_str().to_string_lossy();
        let module = module.trim_end_matches(".rs").to_string();
        let source = std::fs::read_to_string(&path).expect("a readable source");
        let depth = relative.components().count();
        let top_level_file = depth == 1 || (depth == 2 && name.ends_with("/mod.rs"));
        if climbs_out(top_level_file, &source) {
            climbing.push(name.clone());
        }
        for used in crate_references(&source) {
            if used != module {
                edges.insert((module.clone(), used));
            }
        }
    }
    (edges, climbing)
}

#[test]
fn every_module_has_a_layer() {
    let root = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/main.rs"))
        .expect("main.rs");
    let declared: BTreeSet<&str> = root
        .lines()
        .filter_map(|line| line.trim_start_matches("pub ").strip_prefix("mod "))
        .map(|rest| rest.trim_end_matches(';'))
        .filter(|name| !NOT_CHECKED.contains(&format!("{name}.rs").as_str()))
        .collect();
    let layered: BTreeSet<&str> = LAYERS.iter().map(|&(name, _)| name).collect();
    assert_eq!(declared, layered, "modules in main.rs against LAYERS");
}

#[test]
fn modules_use_only_their_layer_and_below_without_cycles() {
    let (edges, climbing) = crate_edges();
    let layered: BTreeSet<&str> = LAYERS.iter().map(|&(name, _)| name).collect();
    for (from, to) in &edges {
        assert!(layered.contains(from.as_str()), "{from} has no layer");
        assert!(
            layered.contains(to.as_str()),
            "{from} uses crate::{to}, no module"
        );
    }
    assert_eq!(
        upward(LAYERS, &edges),
        Vec::new(),
        "uses that go up a layer"
    );
    assert_eq!(find_cycle(&edges), None, "a cycle between modules");
    assert_eq!(
        climbing,
        Vec::<String>::new(),
        "use crate::… instead of super::"
    );
}

#[test]
fn the_checker_can_fail() {
    let source = "//! Mentions `crate::api` in a comment only.\n\
        use crate::{config::Config, engine::{Engine, Params}};\n\
        pub use crate::text::TextTokenizer; // crate::state in a comment\n\
        fn f() { let url = \"http://x\"; crate::metrics::touch(url); }\n\
        macro_rules! m { () => { $crate::ignored::x() } }\n";
    let found: Vec<String> = crate_references(source).into_iter().collect();
    assert_eq!(found, ["config", "engine", "metrics", "text"]);

    let edge = |from: &str, to: &str| (from.to_string(), to.to_string());
    let layers = [("low", 0), ("high", 1)];
    let edges: Edges = [edge("high", "low"), edge("low", "high")].into();
    assert_eq!(upward(&layers, &edges), vec![edge("low", "high")]);
    assert!(find_cycle(&edges).is_some());
    let chain: Edges = [edge("a", "b"), edge("b", "c"), edge("a", "c")].into();
    assert_eq!(find_cycle(&chain), None);
    let ring: Edges = [edge("a", "b"), edge("b", "c"), edge("c", "a")].into();
    assert_eq!(find_cycle(&ring).map(|cycle| cycle.len()), Some(4));

    assert!(climbs_out(true, "use super::helpers;\n"));
    assert!(!climbs_out(true, "mod tests {\n    use super::*;\n}\n"));
    assert!(climbs_out(false, "use super::super::api;\n"));
}
