//! The crate's module graph: no cycle between top-level modules, a leaf
//! layer (`base`) that imports nothing from the rest of the crate, and a
//! `metrics` module that knows no domain type.
//!
//! The graph is read from the source: every `crate::<module>` path in
//! `src/` (in `use` items and inline paths, test code included) is an edge
//! from the top-level module of the file to `<module>`. A cycle means the
//! modules cannot be understood, tested or moved one at a time; this test
//! names the cycle, so the edge that closed it can be turned around (a
//! type moved down, a hook passed in).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Edges allowed although they close a cycle, each with the reason. Empty:
/// the graph is acyclic. Add one only with a reason and an issue to remove
/// it; any edge not listed that closes a cycle fails the test.
const ALLOWED_CYCLE_EDGES: &[(&str, &str, &str)] = &[];

/// What the leaf layer and `metrics` may import.
const LEAF: &str = "base";
const METRICS_MAY_IMPORT: &[&str] = &["base"];

type Graph = BTreeMap<String, BTreeSet<String>>;

/// Top-level modules declared in `lib.rs` (`pub mod x;`), and the names
/// `lib.rs` re-exports from one of them (`pub use base::{naming, time};`),
/// mapped to the module that holds them.
fn modules(lib: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in lib.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("pub mod ").or(line.strip_prefix("mod ")) {
            let name = rest.trim_end_matches(';').trim();
            out.insert(name.to_owned(), name.to_owned());
        } else if let Some(rest) = line.strip_prefix("pub use ") {
            let rest = rest.trim_end_matches(';');
            if let Some((from, names)) = rest.split_once("::") {
                let names = names.trim_start_matches('{').trim_end_matches('}');
                for n in names.split(',') {
                    let n = n.trim();
                    let alias = n.rsplit(" as ").next().unwrap_or(n).trim();
                    out.insert(alias.to_owned(), from.trim().to_owned());
                }
            }
        }
    }
    out
}

/// The source without comments (line comments, doc comments, block
/// comments) and without the contents of string literals, so that a
/// `crate::` in prose or in a message is not an edge.
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if b[i] == b'r' && (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#')) {
            // Raw string: r"..." or r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push('r');
                i += 1;
                continue;
            }
            j += 1;
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            while j < b.len() && !b[j..].starts_with(&close) {
                j += 1;
            }
            out.push_str("\"\"");
            i = j + close.len();
        } else if b[i] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                if b[j] == b'\\' {
                    j += 1;
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j + 1;
        } else if b[i] == b'\'' && b.get(i + 2) == Some(&b'\'') {
            // A char literal like '"' (a lifetime never has a closing quote
            // two bytes on).
            out.push_str("' '");
            i += 3;
        } else if b[i] == b'\'' && b.get(i + 1) == Some(&b'\\') {
            let mut j = i + 2;
            while j < b.len() && b[j] != b'\'' {
                j += 1;
            }
            out.push_str("' '");
            i = j + 1;
        } else {
            // Multi-byte UTF-8 is copied byte by byte through chars.
            let ch = src[i..].chars().next().unwrap_or(' ');
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// The first path segments after every `crate::` in `code`: `crate::a::b`
/// gives `a`, `crate::{a::x, b}` gives `a` and `b`.
fn crate_refs(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        // `$crate::` and `mycrate::` are not this crate's root.
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        let rest_trim = rest.trim_start();
        if let Some(group) = rest_trim.strip_prefix('{') {
            // Top-level items of the group, up to its closing brace.
            let mut depth = 1;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            rest = &group[i..];
                            break;
                        }
                    }
                    ',' if depth == 1 => item_start = true,
                    _ if depth == 1 && item_start && (c.is_alphabetic() || c == '_') => {
                        out.insert(ident(&group[i..]));
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest_trim));
        }
    }
    out
}

fn ident(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// Edges between top-level modules of the crate in `src`.
fn graph(src: &Path) -> Graph {
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let modules = modules(&lib);
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut g = Graph::new();
    for f in files {
        let rel = f.strip_prefix(src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let top = first.trim_end_matches(".rs").to_owned();
        // lib.rs declares the modules; main.rs is the binary (a client of
        // the library, not part of its graph).
        if top == "lib" || top == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let node = g.entry(top.clone()).or_default();
        for r in crate_refs(&code_only(&text)) {
            if let Some(target) = modules.get(&r) {
                if *target != top {
                    node.insert(target.clone());
                }
            }
        }
    }
    g
}

/// One cycle of `g` (as a path that starts and ends at the same module),
/// ignoring `allowed` edges; `None` when `g` is acyclic.
fn find_cycle(g: &Graph, allowed: &[(&str, &str, &str)]) -> Option<Vec<String>> {
    fn visit(
        g: &Graph,
        allowed: &[(&str, &str, &str)],
        n: &str,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_owned(), 1);
        stack.push(n.to_owned());
        for m in g.get(n).into_iter().flatten() {
            if allowed.iter().any(|(a, b, _)| *a == n && *b == m) {
                continue;
            }
            match state.get(m.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|s| s == m).unwrap();
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(m.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(g, allowed, m, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in g.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            let mut stack = Vec::new();
            if let Some(c) = visit(g, allowed, n, &mut state, &mut stack) {
                return Some(c);
            }
        }
    }
    None
}

fn render(g: &Graph) -> String {
    g.iter()
        .map(|(a, bs)| {
            let bs: Vec<&str> = bs.iter().map(String::as_str).collect();
            format!("{a} -> {}\n", bs.join(" "))
        })
        .collect()
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn top_level_modules_form_no_cycle() {
    let g = graph(&src());
    assert!(
        g.len() > 10,
        "the graph should hold every top-level module:\n{}",
        render(&g)
    );
    if let Some(cycle) = find_cycle(&g, ALLOWED_CYCLE_EDGES) {
        panic!(
            "import cycle between top-level modules: {}\nturn one edge around (move the shared type down into base/, or pass a hook in).\nall edges:\n{}",
            cycle.join(" -> "),
            render(&g)
        );
    }
    // An allowed edge that no longer exists must be removed from the list.
    for (a, b, why) in ALLOWED_CYCLE_EDGES {
        assert!(
            g.get(*a).is_some_and(|bs| bs.contains(*b)),
            "allowed edge {a} -> {b} ({why}) is gone: remove it from the list"
        );
    }
}

#[test]
fn the_leaf_layer_imports_nothing_from_the_crate() {
    let g = graph(&src());
    let leaf = g.get(LEAF).expect("src/base exists");
    assert!(
        leaf.is_empty(),
        "{LEAF} must import nothing from the rest of the crate, but imports {leaf:?}"
    );
}

#[test]
fn metrics_knows_no_domain_type() {
    let g = graph(&src());
    let imports = g.get("metrics").expect("src/metrics exists");
    let extra: Vec<&String> = imports
        .iter()
        .filter(|m| !METRICS_MAY_IMPORT.contains(&m.as_str()))
        .collect();
    assert!(
        extra.is_empty(),
        "metrics imports {extra:?}: components hand it plain values or register a collector"
    );
}

/// The checker itself: it must see edges in every form the crate writes
/// them, and report a cycle it is shown.
#[test]
fn the_checker_finds_edges_and_cycles() {
    let code = code_only(
        "use crate::{a::X, b::{Y, Z}};\n// crate::commented\nfn f() { crate::c::g(\"crate::quoted\"); let _ = '\"'; crate :: d::h(); }\n/* crate::block */ use $crate::e; use crate::f as _;",
    );
    let refs = crate_refs(&code);
    let want: BTreeSet<String> = ["a", "b", "c", "f"].iter().map(|s| s.to_string()).collect();
    // `crate :: d` (spaces) is not how rustfmt writes a path; not counted.
    assert_eq!(refs, want, "{code}");

    let mut g = Graph::new();
    g.entry("x".into()).or_default().insert("y".into());
    g.entry("y".into()).or_default().insert("z".into());
    g.entry("z".into()).or_default();
    assert_eq!(find_cycle(&g, &[]), None);
    g.entry("z".into()).or_default().insert("x".into());
    let cycle = find_cycle(&g, &[]).expect("the cycle x -> y -> z -> x");
    assert_eq!(cycle.first(), cycle.last());
    assert_eq!(cycle.len(), 4, "{cycle:?}");
    assert_eq!(find_cycle(&g, &[("z", "x", "test")]), None);

    let m = modules("pub mod base;\npub mod acl;\npub use base::{naming, time};\n");
    assert_eq!(m.get("naming").map(String::as_str), Some("base"));
    assert_eq!(m.get("acl").map(String::as_str), Some("acl"));
}
