//! The files of `metrics/` against each other and against the code: the README's contract table
//! is well-formed and names the contract's series with the label values the decision code uses;
//! `promtool` accepts the alert rules and their unit tests pass; every alert is tested firing and
//! not firing; the alerts and the dashboard only use series and label values the README lists;
//! every dashboard panel has a title and a query, and every query parses.
//!
//! Needs `promtool` on `PATH` (Debian's `prometheus` package, installed by
//! `scripts/install-deps.sh`). No Ceph, no network.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use rbdfence::fence::decision::{ApproveReason, DenyReason, Outcome};
use rbdfence::fence::driver::Stage;

/// The header line that identifies the contract table in `metrics/README.md`.
pub const TABLE_HEADER: &str = "| series | type | labels | allowed values | meaning |";

/// The placeholder for the crate's version in the allowed values column.
pub const CRATE_VERSION_PLACEHOLDER: &str = "{crate-version}";

/// Labels Prometheus attaches to every scraped series; the README does not list them.
const TARGET_LABELS: [&str; 2] = ["job", "instance"];

/// The suffixes a histogram exports besides its name.
const HISTOGRAM_SUFFIXES: [&str; 3] = ["_bucket", "_sum", "_count"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn parse(cell: &str) -> Option<Kind> {
        match cell {
            "counter" => Some(Kind::Counter),
            "gauge" => Some(Kind::Gauge),
            "histogram" => Some(Kind::Histogram),
            _ => None,
        }
    }
}

/// One row of the contract table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Series {
    /// The name as exported (counters with `_total`, histograms without their suffixes).
    pub name: String,
    pub kind: Kind,
    /// Label names in the table's order, each with its allowed values in the table's order,
    /// placeholders already replaced by their value.
    pub labels: Vec<(String, Vec<String>)>,
    /// The meaning column, as written.
    pub meaning: String,
    /// 1-based line of the row in the README, for messages.
    pub line: usize,
}

impl Series {
    /// The allowed values of `label`, if the series has that label.
    pub fn allowed(&self, label: &str) -> Option<&[String]> {
        self.labels
            .iter()
            .find(|(l, _)| l == label)
            .map(|(_, v)| v.as_slice())
    }
}

/// Parses the metrics contract table of `metrics/README.md` (`readme` is the file's text;
/// `crate_version` replaces the `{crate-version}` placeholder) and checks that every row is
/// well-formed. On failure the error lists every problem found, one per line, each with its
/// README line number.
///
/// The format (the README's "Table format" section says the same):
/// - The table is the one whose header line is exactly
///   `| series | type | labels | allowed values | meaning |` (it must occur once), followed by a
///   separator line of five cells made of `-` and `:`. Each following line starting with `|` is
///   one series; the first line that does not ends the table. Every row has exactly five cells;
///   no cell contains `|`.
/// - series: the exported name in backticks, `rbdfence_` then `[a-z0-9_]`. Counters end in
///   `_total` and nothing else does; histograms do not end in `_bucket`, `_sum` or `_count`.
///   Names, and the names histograms derive, are unique.
/// - type: `counter`, `gauge` or `histogram`.
/// - labels: `—` (em dash) for none, else label names in backticks separated by `, `. A label
///   name matches `[a-z_][a-z0-9_]*`, does not start with `__`, and is not `le`, `quantile`,
///   `job` or `instance`.
/// - allowed values: `—` when there are no labels, else one group per label in the labels'
///   order, separated by `; `, each `label: v1, v2, …`. Values are non-empty, unique within their
///   label, and made of ASCII letters, digits, `.`, `_`, `-`; a value in braces is a placeholder,
///   and the only one is `{crate-version}`.
/// - meaning: non-empty free text.
pub fn parse_metrics_table(readme: &str, crate_version: &str) -> Result<Vec<Series>, String> {
    let lines: Vec<&str> = readme.lines().collect();
    let headers: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.trim() == TABLE_HEADER)
        .map(|(i, _)| i)
        .collect();
    let header = match headers.as_slice() {
        [one] => *one,
        [] => {
            return Err(format!(
                "no line is exactly the table header `{TABLE_HEADER}`"
            ));
        }
        many => {
            let at: Vec<String> = many.iter().map(|i| (i + 1).to_string()).collect();
            return Err(format!(
                "the table header `{TABLE_HEADER}` occurs {} times (lines {}); it must occur once",
                many.len(),
                at.join(", ")
            ));
        }
    };

    let mut errors = Vec::new();
    let separator_ok = lines.get(header + 1).is_some_and(|l| {
        split_cells(l).is_ok_and(|cells| {
            cells.len() == 5
                && cells
                    .iter()
                    .all(|c| c.contains('-') && c.chars().all(|ch| ch == '-' || ch == ':'))
        })
    });
    if !separator_ok {
        errors.push(format!(
            "line {}: expected the table's separator line `|---|---|---|---|---|` after the header",
            header + 2
        ));
    }

    let mut series: Vec<Series> = Vec::new();
    for (index, raw) in lines.iter().enumerate().skip(header + 2) {
        if !raw.trim_start().starts_with('|') {
            break;
        }
        let line = index + 1;
        match parse_row(raw, line, crate_version) {
            Ok(s) => series.push(s),
            Err(mut e) => errors.append(&mut e),
        }
    }
    if series.is_empty() && errors.is_empty() {
        errors.push(format!(
            "line {}: the table has no rows after its header",
            header + 1
        ));
    }

    // Uniqueness over everything the series export, histograms' derived names included.
    let mut exported: BTreeMap<String, usize> = BTreeMap::new();
    for s in &series {
        for name in exported_names(s) {
            if let Some(first) = exported.insert(name.clone(), s.line) {
                errors.push(format!(
                    "line {}: `{name}` is already exported by the series on line {first}",
                    s.line
                ));
            }
        }
    }

    if errors.is_empty() {
        Ok(series)
    } else {
        Err(errors.join("\n"))
    }
}

/// The names a series appears under in the exposition.
fn exported_names(s: &Series) -> Vec<String> {
    match s.kind {
        Kind::Histogram => HISTOGRAM_SUFFIXES
            .iter()
            .map(|suffix| format!("{}{suffix}", s.name))
            .chain([s.name.clone()])
            .collect(),
        _ => vec![s.name.clone()],
    }
}

/// The cells of a table line `| a | b |`, trimmed; an error if the line is not one.
fn split_cells(line: &str) -> Result<Vec<&str>, String> {
    let t = line.trim();
    if t.len() < 2 || !t.starts_with('|') || !t.ends_with('|') {
        return Err("a table line must start and end with `|`".to_string());
    }
    Ok(t[1..t.len() - 1].split('|').map(str::trim).collect())
}

fn parse_row(raw: &str, line: usize, crate_version: &str) -> Result<Series, Vec<String>> {
    let err = |msg: String| format!("line {line}: {msg}");
    let cells = split_cells(raw).map_err(|e| vec![err(e)])?;
    let [series, kind, labels, allowed, meaning] = cells.as_slice() else {
        return Err(vec![err(format!(
            "expected 5 cells (series | type | labels | allowed values | meaning), found {} \
             (is there a `|` inside a cell?)",
            cells.len()
        ))]);
    };
    let mut errors = Vec::new();

    // series
    let name = match backticked(series) {
        Some(n) if is_series_name(n) => n.to_string(),
        Some(n) => {
            errors.push(err(format!(
                "series `{n}`: a name is `rbdfence_` followed by lowercase letters, digits and `_`"
            )));
            n.to_string()
        }
        None => {
            errors.push(err(format!(
                "series cell `{series}` must be the name in backticks, like `rbdfence_x_total`"
            )));
            series.to_string()
        }
    };

    // type, and the name rules that depend on it
    let kind = Kind::parse(kind);
    match kind {
        None => errors.push(err(format!(
            "type of `{name}` is `{}`; expected counter, gauge or histogram",
            cells[1]
        ))),
        Some(Kind::Counter) if !name.ends_with("_total") => errors.push(err(format!(
            "counter `{name}` must end in `_total` (the exported name)"
        ))),
        Some(Kind::Gauge | Kind::Histogram) if name.ends_with("_total") => errors.push(err(
            format!("`{name}` ends in `_total` but is not a counter"),
        )),
        Some(Kind::Histogram) if HISTOGRAM_SUFFIXES.iter().any(|s| name.ends_with(s)) => errors
            .push(err(format!(
                "histogram `{name}` must be named without `_bucket`, `_sum` or `_count`"
            ))),
        Some(_) => {}
    }

    // labels
    let mut label_names: Vec<String> = Vec::new();
    if *labels != "—" {
        for part in labels.split(", ") {
            match backticked(part) {
                Some(l) if is_label_name(l) => {
                    if label_names.iter().any(|x| x == l) {
                        errors.push(err(format!("label `{l}` of `{name}` is listed twice")));
                    }
                    label_names.push(l.to_string());
                }
                Some(l) => errors.push(err(format!(
                    "label `{l}` of `{name}`: a label matches [a-z_][a-z0-9_]*, does not start \
                     with `__` and is not le, quantile, job or instance"
                ))),
                None => errors.push(err(format!(
                    "labels cell `{labels}` of `{name}`: write `—` for none, else names in \
                     backticks separated by `, ` (bad part: `{part}`)"
                ))),
            }
        }
    }

    // allowed values
    let mut label_values: Vec<(String, Vec<String>)> = Vec::new();
    if label_names.is_empty() {
        if *allowed != "—" && errors.is_empty() {
            errors.push(err(format!(
                "`{name}` has no labels, so its allowed values cell must be `—`, not `{allowed}`"
            )));
        }
    } else {
        let groups: Vec<&str> = allowed.split("; ").collect();
        if groups.len() != label_names.len() {
            errors.push(err(format!(
                "`{name}` has {} label(s) but its allowed values cell has {} group(s) separated \
                 by `; `: `{allowed}`",
                label_names.len(),
                groups.len()
            )));
        }
        for (group, expected) in groups.iter().zip(&label_names) {
            let Some((label, values)) = group.split_once(": ") else {
                errors.push(err(format!(
                    "allowed values group `{group}` of `{name}` must be `label: v1, v2, …`"
                )));
                continue;
            };
            if label != expected {
                errors.push(err(format!(
                    "allowed values of `{name}` name label `{label}` where the labels column \
                     has `{expected}` (same labels, same order)"
                )));
            }
            let mut seen: Vec<String> = Vec::new();
            for value in values.split(", ") {
                let resolved = if value.starts_with('{') || value.ends_with('}') {
                    if value == CRATE_VERSION_PLACEHOLDER {
                        crate_version.to_string()
                    } else {
                        errors.push(err(format!(
                            "unknown placeholder `{value}` for `{name}` label `{label}`; the only \
                             one is `{CRATE_VERSION_PLACEHOLDER}`"
                        )));
                        continue;
                    }
                } else if is_label_value(value) {
                    value.to_string()
                } else {
                    errors.push(err(format!(
                        "value `{value}` of `{name}` label `{label}`: values are non-empty, made \
                         of letters, digits, `.`, `_`, `-`, and separated by `, `"
                    )));
                    continue;
                };
                if seen.contains(&resolved) {
                    errors.push(err(format!(
                        "value `{value}` of `{name}` label `{label}` is listed twice"
                    )));
                }
                seen.push(resolved);
            }
            label_values.push((expected.clone(), seen));
        }
    }

    if meaning.is_empty() {
        errors.push(err(format!("the meaning of `{name}` is empty")));
    }

    match (errors.is_empty(), kind) {
        (true, Some(kind)) => Ok(Series {
            name,
            kind,
            labels: label_values,
            meaning: meaning.to_string(),
            line,
        }),
        _ => Err(errors),
    }
}

/// The text between one pair of backticks that make up the whole cell part.
fn backticked(s: &str) -> Option<&str> {
    let inner = s.strip_prefix('`')?.strip_suffix('`')?;
    (!inner.is_empty() && !inner.contains('`')).then_some(inner)
}

fn is_series_name(n: &str) -> bool {
    n.strip_prefix("rbdfence_").is_some_and(|rest| {
        !rest.is_empty()
            && rest
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    })
}

fn is_label_name(l: &str) -> bool {
    let mut chars = l.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !l.starts_with("__")
        && !["le", "quantile", "job", "instance"].contains(&l)
}

fn is_label_value(v: &str) -> bool {
    !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn contract() -> Vec<Series> {
    parse_metrics_table(&read("metrics/README.md"), env!("CARGO_PKG_VERSION"))
        .unwrap_or_else(|e| panic!("metrics/README.md: the contract table is malformed:\n{e}"))
}

/// Runs promtool in the crate root; panics with its output unless it succeeds.
fn promtool(args: &[&str], dir: &Path) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `promtool {}`: {e}. promtool comes with Debian's `prometheus` \
                 package (scripts/install-deps.sh installs it)",
                args.join(" ")
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "`promtool {}` failed ({}):\n{text}",
        args.join(" "),
        out.status
    );
    text
}

/// A reference to a series in PromQL-ish text: the name and its label matchers.
#[derive(Debug)]
struct Ref {
    name: String,
    /// (label, operator, value)
    matchers: Vec<(String, String, String)>,
}

/// Every `rbdfence_*` name in `text` (not preceded by a name character) with the label matchers
/// written right after it. Escaped quotes (`\"`, as inside YAML or JSON strings) count as quotes.
fn scan_refs(text: &str) -> Result<Vec<Ref>, String> {
    let text = &text.replace("\\\"", "\"");
    let bytes = text.as_bytes();
    let is_name_char = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut refs = Vec::new();
    let mut i = 0;
    while let Some(pos) = text[i..].find("rbdfence_") {
        let start = i + pos;
        if start > 0 && is_name_char(bytes[start - 1]) {
            i = start + 1;
            continue;
        }
        let mut end = start;
        while end < bytes.len() && is_name_char(bytes[end]) {
            end += 1;
        }
        let name = text[start..end].to_string();
        let mut matchers = Vec::new();
        if bytes.get(end) == Some(&b'{') {
            let close = text[end..]
                .find('}')
                .map(|p| end + p)
                .ok_or_else(|| format!("`{name}{{`: no closing `}}`"))?;
            matchers = parse_matchers(&text[end + 1..close])
                .map_err(|e| format!("`{}`: {e}", &text[start..=close]))?;
            end = close + 1;
        }
        refs.push(Ref { name, matchers });
        i = end;
    }
    Ok(refs)
}

/// `a="x", b=~"y|z"` → [(a, =, x), (b, =~, y|z)].
fn parse_matchers(inner: &str) -> Result<Vec<(String, String, String)>, String> {
    let mut out = Vec::new();
    let mut rest = inner.trim();
    while !rest.is_empty() {
        let name_len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let label = &rest[..name_len];
        if label.is_empty() {
            return Err(format!("expected a label name at `{rest}`"));
        }
        rest = rest[name_len..].trim_start();
        let op = ["=~", "!~", "!=", "="]
            .into_iter()
            .find(|op| rest.starts_with(op))
            .ok_or_else(|| format!("expected =, !=, =~ or !~ after `{label}`"))?;
        rest = rest[op.len()..].trim_start();
        let body = rest
            .strip_prefix('"')
            .ok_or_else(|| format!("expected a double-quoted value after `{label}{op}`"))?;
        let close = body
            .find('"')
            .ok_or_else(|| format!("unterminated value after `{label}{op}`"))?;
        out.push((label.to_string(), op.to_string(), body[..close].to_string()));
        rest = body[close + 1..].trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
    Ok(out)
}

/// Checks the references against the contract: the name is a series (or a histogram's
/// derived name), each matched label is one of its labels (or a target label, or `le` on
/// `_bucket`), and each literal value is allowed. Regex matchers are checked when they are a
/// plain alternation of values; Grafana variables (`$…`) are left alone.
fn check_refs(refs: &[Ref], series: &[Series], file: &str) -> Vec<String> {
    let mut problems = Vec::new();
    for r in refs {
        let found = series.iter().find_map(|s| {
            if r.name == s.name {
                return Some((s, ""));
            }
            if s.kind == Kind::Histogram {
                for suffix in HISTOGRAM_SUFFIXES {
                    if r.name.strip_suffix(suffix) == Some(s.name.as_str()) {
                        return Some((s, suffix));
                    }
                }
            }
            None
        });
        let Some((s, suffix)) = found else {
            problems.push(format!(
                "{file}: `{}` is not a series of metrics/README.md (histograms may add _bucket, \
                 _sum or _count; counters need _total)",
                r.name
            ));
            continue;
        };
        for (label, op, value) in &r.matchers {
            if TARGET_LABELS.contains(&label.as_str()) {
                continue;
            }
            if label == "le" && suffix == "_bucket" {
                if op == "=" && value != "+Inf" && value.parse::<f64>().is_err() {
                    problems.push(format!(
                        "{file}: `{}{{le=\"{value}\"}}`: le must be a number or +Inf",
                        r.name
                    ));
                }
                continue;
            }
            let Some(allowed) = s.allowed(label) else {
                problems.push(format!(
                    "{file}: `{}` has no label `{label}` in metrics/README.md",
                    r.name
                ));
                continue;
            };
            let literal = matches!(op.as_str(), "=" | "!=");
            let plain_alternation = value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '|'));
            let values: Vec<&str> = if literal {
                vec![value.as_str()]
            } else if plain_alternation {
                value.split('|').collect()
            } else {
                continue;
            };
            for v in values {
                if !allowed.iter().any(|a| a == v) {
                    problems.push(format!(
                        "{file}: `{}{{{label}{op}\"{value}\"}}`: `{v}` is not an allowed value of \
                         `{label}` (allowed: {})",
                        r.name,
                        allowed.join(", ")
                    ));
                }
            }
        }
    }
    problems
}

/// Labels named in `by (...)` / `without (...)` clauses that no series of the contract has.
fn check_grouping(text: &str, series: &[Series], file: &str) -> Vec<String> {
    let known: BTreeSet<&str> = series
        .iter()
        .flat_map(|s| s.labels.iter().map(|(l, _)| l.as_str()))
        .chain(TARGET_LABELS)
        .chain(["le"])
        .collect();
    let mut problems = Vec::new();
    for keyword in ["by", "without"] {
        let mut i = 0;
        while let Some(pos) = text[i..].find(keyword) {
            let start = i + pos;
            i = start + keyword.len();
            let before_ok = start == 0
                || !text.as_bytes()[start - 1].is_ascii_alphanumeric()
                    && text.as_bytes()[start - 1] != b'_';
            let rest = text[i..].trim_start();
            if !before_ok || !rest.starts_with('(') {
                continue;
            }
            let Some(close) = rest.find(')') else {
                continue;
            };
            for label in rest[1..close].split(',').map(str::trim) {
                if !label.is_empty() && !known.contains(label) {
                    problems.push(format!(
                        "{file}: `{keyword} ({})` groups by `{label}`, a label no series of \
                         metrics/README.md has",
                        &rest[1..close]
                    ));
                }
            }
        }
    }
    problems
}

/// The text of a YAML file without its full-line comments.
fn without_comment_lines(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read("metrics/grafana-dashboard.json"))
        .unwrap_or_else(|e| panic!("metrics/grafana-dashboard.json is not valid JSON: {e}"))
}

/// Every panel of the dashboard, those nested in rows included.
fn panels(dash: &serde_json::Value) -> Vec<&serde_json::Value> {
    fn walk<'a>(list: &'a [serde_json::Value], out: &mut Vec<&'a serde_json::Value>) {
        for p in list {
            out.push(p);
            if let Some(nested) = p.get("panels").and_then(|n| n.as_array()) {
                walk(nested, out);
            }
        }
    }
    let list = dash
        .get("panels")
        .and_then(|p| p.as_array())
        .unwrap_or_else(|| panic!("metrics/grafana-dashboard.json has no `panels` array"));
    let mut out = Vec::new();
    walk(list, &mut out);
    out
}

/// (panel title, refId, expr) of every target, and the queries of the template variables.
fn dashboard_queries(dash: &serde_json::Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for p in panels(dash) {
        let title = p["title"].as_str().unwrap_or("?").to_string();
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = t["expr"].as_str() {
                let ref_id = t["refId"].as_str().unwrap_or("?").to_string();
                out.push((title.clone(), ref_id, expr.to_string()));
            }
        }
    }
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        let query = v["query"]["query"].as_str().or_else(|| v["query"].as_str());
        if v["type"] == "query"
            && let Some(q) = query
        {
            let name = v["name"].as_str().unwrap_or("?");
            out.push((
                format!("variable ${name}"),
                "query".to_string(),
                q.to_string(),
            ));
        }
    }
    out
}

/// Alert names defined in alerts.yml, in order.
fn alert_names(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(|n| n.trim().to_string())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// (a) the README table

#[test]
fn readme_table_parses_and_every_row_is_well_formed() {
    let series = contract();
    for s in &series {
        assert!(
            !s.meaning.trim().is_empty(),
            "metrics/README.md line {}: `{}` has no meaning",
            s.line,
            s.name
        );
        for (label, values) in &s.labels {
            assert!(
                !values.is_empty(),
                "metrics/README.md line {}: `{}` label `{label}` lists no values",
                s.line,
                s.name
            );
        }
    }
    let readme = read("metrics/README.md");
    assert!(
        readme.contains("never from free text"),
        "metrics/README.md must say that label values come from fixed sets, never from free text"
    );
}

#[test]
fn readme_parser_reports_format_errors_clearly() {
    let good = format!(
        "intro\n\n{TABLE_HEADER}\n|---|---|---|---|---|\n\
         | `rbdfence_a_total` | counter | `x`, `y` | x: p, q; y: r | A. |\n\
         | `rbdfence_b_seconds` | histogram | — | — | B. |\n\
         | `rbdfence_info` | gauge | `version` | version: {CRATE_VERSION_PLACEHOLDER} | C. |\n\
         \nafter\n"
    );
    let parsed = parse_metrics_table(&good, "9.9.9").unwrap();
    assert_eq!(parsed.len(), 3);
    assert_eq!(parsed[0].allowed("y").unwrap(), ["r"]);
    assert_eq!(parsed[1].kind, Kind::Histogram);
    assert_eq!(parsed[2].allowed("version").unwrap(), ["9.9.9"]);

    let cases: [(&str, &str); 10] = [
        (
            "| rbdfence_a_total | counter | — | — | A. |",
            "in backticks",
        ),
        (
            "| `rbdfence_a` | counter | — | — | A. |",
            "must end in `_total`",
        ),
        (
            "| `rbdfence_a_total` | gauge | — | — | A. |",
            "is not a counter",
        ),
        (
            "| `rbdfence_a_count` | histogram | — | — | A. |",
            "without `_bucket`",
        ),
        (
            "| `rbdfence_a` | summary | — | — | A. |",
            "expected counter, gauge or histogram",
        ),
        (
            "| `rbdfence_a_total` | counter | `x` | x: p,q | A. |",
            "value `p,q`",
        ),
        (
            "| `rbdfence_a_total` | counter | `x`, `y` | x: p | A. |",
            "2 label(s)",
        ),
        (
            "| `rbdfence_a_total` | counter | `x` | y: p | A. |",
            "name label `y`",
        ),
        (
            "| `rbdfence_a_total` | counter | `le` | le: 1 | A. |",
            "label `le`",
        ),
        (
            "| `rbdfence_a_total` | counter | — | — |",
            "expected 5 cells",
        ),
    ];
    for (row, expected) in cases {
        let text = format!("{TABLE_HEADER}\n|---|---|---|---|---|\n{row}\n");
        let err = parse_metrics_table(&text, "0.1.0").expect_err(row);
        assert!(
            err.contains(expected) && err.contains("line 3"),
            "row {row:?}: expected an error mentioning {expected:?} on line 3, got:\n{err}"
        );
    }
    let err = parse_metrics_table("no table here", "0.1.0").unwrap_err();
    assert!(err.contains("no line is exactly the table header"), "{err}");
    let twice = format!("{TABLE_HEADER}\n|---|\n\n{TABLE_HEADER}\n");
    let err = parse_metrics_table(&twice, "0.1.0").unwrap_err();
    assert!(err.contains("occurs 2 times"), "{err}");
}

#[test]
fn readme_lists_the_contract_series_with_the_codes_label_values() {
    let series = contract();
    // The names, types and labels of shared CONTRACT.md (and the HTTP counter): renaming one is
    // a breaking change for dashboards and alerts.
    let expected: [(&str, Kind, &[&str]); 10] = [
        ("rbdfence_fence_outcomes_total", Kind::Counter, &["outcome"]),
        (
            "rbdfence_fence_decisions_total",
            Kind::Counter,
            &["decision", "reason"],
        ),
        ("rbdfence_fence_duration_seconds", Kind::Histogram, &[]),
        (
            "rbdfence_fence_stage_duration_seconds",
            Kind::Histogram,
            &["stage"],
        ),
        (
            "rbdfence_ceph_calls_total",
            Kind::Counter,
            &["op", "result"],
        ),
        ("rbdfence_ssh_sessions_total", Kind::Counter, &["result"]),
        ("rbdfence_blocklist_entries", Kind::Gauge, &[]),
        ("rbdfence_ceph_connected", Kind::Gauge, &[]),
        ("rbdfence_build_info", Kind::Gauge, &["version"]),
        (
            "rbdfence_http_requests_total",
            Kind::Counter,
            &["route", "status"],
        ),
    ];
    let by_name: BTreeMap<&str, &Series> = series.iter().map(|s| (s.name.as_str(), s)).collect();
    for (name, kind, labels) in expected {
        let s = by_name
            .get(name)
            .unwrap_or_else(|| panic!("metrics/README.md does not list the contract's `{name}`"));
        assert_eq!(
            s.kind, kind,
            "metrics/README.md line {}: type of `{name}`",
            s.line
        );
        let got: Vec<&str> = s.labels.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(
            got, labels,
            "metrics/README.md line {}: labels of `{name}`",
            s.line
        );
    }

    let set = |values: &[String]| values.iter().cloned().collect::<BTreeSet<_>>();
    let outcomes = by_name["rbdfence_fence_outcomes_total"];
    let code: BTreeSet<String> = Outcome::ALL
        .iter()
        .map(|o| o.as_str().to_string())
        .collect();
    assert_eq!(
        set(outcomes.allowed("outcome").unwrap()),
        code,
        "metrics/README.md line {}: outcome values differ from fence::decision::Outcome",
        outcomes.line
    );
    let decisions = by_name["rbdfence_fence_decisions_total"];
    assert_eq!(
        set(decisions.allowed("decision").unwrap()),
        BTreeSet::from(["approve".to_string(), "deny".to_string()]),
        "metrics/README.md line {}: decision values",
        decisions.line
    );
    let code: BTreeSet<String> = ApproveReason::ALL
        .iter()
        .map(|r| r.as_str())
        .chain(DenyReason::ALL.iter().map(|r| r.as_str()))
        .map(str::to_string)
        .collect();
    assert_eq!(
        set(decisions.allowed("reason").unwrap()),
        code,
        "metrics/README.md line {}: reason values differ from fence::decision's ApproveReason \
         and DenyReason",
        decisions.line
    );
    let stages = by_name["rbdfence_fence_stage_duration_seconds"];
    let code: BTreeSet<String> = Stage::ALL.iter().map(|s| s.as_str().to_string()).collect();
    assert_eq!(
        set(stages.allowed("stage").unwrap()),
        code,
        "metrics/README.md line {}: stage values differ from fence::driver::Stage",
        stages.line
    );
    let build = by_name["rbdfence_build_info"];
    assert_eq!(
        build.allowed("version").unwrap(),
        [env!("CARGO_PKG_VERSION")],
        "metrics/README.md line {}: build_info's version must be {CRATE_VERSION_PLACEHOLDER}",
        build.line
    );
}

#[test]
fn reference_checks_catch_unknown_names_labels_and_values() {
    let table = format!(
        "{TABLE_HEADER}\n|---|---|---|---|---|\n\
         | `rbdfence_a_total` | counter | `x` | x: p, q | A. |\n\
         | `rbdfence_h_seconds` | histogram | — | — | H. |\n"
    );
    let series = parse_metrics_table(&table, "0.1.0").unwrap();
    let good = r#"sum by (x, le, instance) (rate(rbdfence_a_total{job="j",x=~"p|q"}[5m]))
        + rbdfence_h_seconds_bucket{le="+Inf"} + rbdfence_h_seconds_count \
        + rbdfence_a_total{x=\"p\"}"#;
    let refs = scan_refs(good).unwrap();
    assert_eq!(refs.len(), 4, "{refs:?}");
    assert_eq!(check_refs(&refs, &series, "good"), Vec::<String>::new());
    assert_eq!(check_grouping(good, &series, "good"), Vec::<String>::new());

    let bad = r#"rbdfence_a{x="p"} + rbdfence_a_total{x="r"} + rbdfence_a_total{y="p"}
        + rbdfence_a_total{x=~"p|z"} + rbdfence_h_seconds_total + sum by (z) (rbdfence_a_total)"#;
    let problems = check_refs(&scan_refs(bad).unwrap(), &series, "bad").join("\n");
    for expected in [
        "`rbdfence_a` is not a series",
        "`r` is not an allowed value of `x`",
        "has no label `y`",
        "`z` is not an allowed value of `x`",
        "`rbdfence_h_seconds_total` is not a series",
    ] {
        assert!(
            problems.contains(expected),
            "expected {expected:?} in:\n{problems}"
        );
    }
    let grouping = check_grouping(bad, &series, "bad").join("\n");
    assert!(grouping.contains("groups by `z`"), "{grouping}");
    assert!(scan_refs(r#"rbdfence_a_total{x="p""#).is_err());
}

// ---------------------------------------------------------------------------------------------
// (b) promtool

#[test]
fn promtool_accepts_the_rules_and_their_unit_tests_pass() {
    let out = promtool(&["check", "rules", "metrics/alerts.yml"], &root());
    assert!(out.contains("SUCCESS"), "promtool check rules:\n{out}");
    let out = promtool(&["test", "rules", "metrics/alerts_test.yml"], &root());
    assert!(out.contains("SUCCESS"), "promtool test rules:\n{out}");
}

#[test]
fn every_alert_is_tested_firing_and_not_firing_and_is_annotated() {
    let rules = read("metrics/alerts.yml");
    let names = alert_names(&rules);
    assert!(!names.is_empty(), "metrics/alerts.yml defines no alert");
    assert!(
        rules.contains("- name: rbdfence"),
        "metrics/alerts.yml: the rule group must be named rbdfence"
    );

    // Each rule's block, from its `- alert:` line to the next one.
    let blocks: Vec<&str> = rules.split("- alert:").skip(1).collect();
    for (name, block) in names.iter().zip(&blocks) {
        for key in ["severity:", "summary:", "description:"] {
            assert!(
                block.contains(key),
                "metrics/alerts.yml: alert {name} has no `{key}`"
            );
        }
    }

    let tests = read("metrics/alerts_test.yml");
    let mut firing: BTreeSet<String> = BTreeSet::new();
    let mut quiet: BTreeSet<String> = BTreeSet::new();
    let lines: Vec<&str> = tests.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        let Some(name) = l.trim().strip_prefix("alertname:") else {
            continue;
        };
        let name = name.trim().to_string();
        assert!(
            names.contains(&name),
            "metrics/alerts_test.yml line {}: tests alert `{name}`, which alerts.yml does not define",
            i + 1
        );
        let exp = lines[i + 1..]
            .iter()
            .find_map(|l| l.trim().strip_prefix("exp_alerts:"))
            .unwrap_or_else(|| {
                panic!(
                    "metrics/alerts_test.yml line {}: no exp_alerts after alertname",
                    i + 1
                )
            });
        if exp.trim() == "[]" {
            quiet.insert(name);
        } else {
            firing.insert(name);
        }
    }
    for name in &names {
        assert!(
            firing.contains(name),
            "metrics/alerts_test.yml has no case where {name} fires"
        );
        assert!(
            quiet.contains(name),
            "metrics/alerts_test.yml has no case where {name} does not fire"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// (c) names and label values used by the alerts and the dashboard

#[test]
fn alerts_use_only_contract_series_and_label_values() {
    let series = contract();
    let mut problems = Vec::new();
    for file in ["metrics/alerts.yml", "metrics/alerts_test.yml"] {
        let text = without_comment_lines(&read(file));
        let refs = scan_refs(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        if file.ends_with("alerts.yml") {
            assert!(!refs.is_empty(), "{file} references no rbdfence_* series");
        }
        problems.extend(check_refs(&refs, &series, file));
        problems.extend(check_grouping(&text, &series, file));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn dashboard_uses_only_contract_series_and_shows_each_of_them() {
    let series = contract();
    let dash = dashboard();
    let file = "metrics/grafana-dashboard.json";
    let mut problems = Vec::new();
    let mut used: BTreeSet<String> = BTreeSet::new();

    // Names anywhere in the file (titles, descriptions), then the queries with their matchers.
    let raw = read(file);
    let refs = scan_refs(&raw).unwrap_or_else(|e| panic!("{file}: {e}"));
    problems.extend(check_refs(
        &refs
            .into_iter()
            .map(|r| Ref {
                name: r.name,
                matchers: Vec::new(),
            })
            .collect::<Vec<_>>(),
        &series,
        file,
    ));
    for (panel, ref_id, expr) in dashboard_queries(&dash) {
        let where_ = format!("{file} panel {panel:?} query {ref_id}");
        let refs = scan_refs(&expr).unwrap_or_else(|e| panic!("{where_}: {e}"));
        for r in &refs {
            for s in &series {
                if exported_names(s).contains(&r.name) {
                    used.insert(s.name.clone());
                }
            }
        }
        problems.extend(check_refs(&refs, &series, &where_));
        problems.extend(check_grouping(&expr, &series, &where_));
    }
    for s in &series {
        if !used.contains(&s.name) {
            problems.push(format!(
                "{file}: no panel queries `{}` (README line {})",
                s.name, s.line
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// (d) the dashboard's shape

#[test]
fn dashboard_parses_and_every_panel_has_a_title_and_a_query() {
    let dash = dashboard();
    let file = "metrics/grafana-dashboard.json";
    for key in ["title", "uid"] {
        assert!(
            dash[key].as_str().is_some_and(|s| !s.is_empty()),
            "{file}: no `{key}`"
        );
    }
    assert!(
        dash["schemaVersion"].as_u64().is_some(),
        "{file}: no numeric `schemaVersion`"
    );
    let has_ds_input = dash["__inputs"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|i| i["name"] == "DS_PROMETHEUS");
    let has_ds_variable = dash["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|v| v["type"] == "datasource" && v["query"] == "prometheus");
    assert!(
        has_ds_input || has_ds_variable,
        "{file}: needs a DS_PROMETHEUS input or a Prometheus datasource variable"
    );

    let all = panels(&dash);
    assert!(!all.is_empty(), "{file}: no panels");
    for (i, p) in all.iter().enumerate() {
        let title = p["title"].as_str().unwrap_or("");
        assert!(
            !title.trim().is_empty(),
            "{file}: panel #{i} (id {}) has no title",
            p["id"]
        );
        if p["type"] == "row" {
            continue;
        }
        let exprs: Vec<&str> = p["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["expr"].as_str())
            .filter(|e| !e.trim().is_empty())
            .collect();
        assert!(
            !exprs.is_empty(),
            "{file}: panel {title:?} has no target with an expr"
        );
    }
}

#[test]
fn dashboard_queries_are_valid_promql() {
    // promtool parses PromQL in recording rules; Grafana's variables become plain values first.
    let dash = dashboard();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (n, (panel, ref_id, expr)) in dashboard_queries(&dash).iter().enumerate() {
        let concrete = expr
            .replace("$__rate_interval", "5m")
            .replace("$__interval", "1m")
            .replace("$__range", "1h")
            .replace("$instance", ".*");
        assert!(
            !concrete.contains('$') || concrete.starts_with("label_values("),
            "metrics/grafana-dashboard.json panel {panel:?} query {ref_id}: unknown variable \
             in {expr:?}"
        );
        if concrete.starts_with("label_values(") {
            continue; // Grafana's own function, not PromQL
        }
        // A JSON string is a valid YAML double-quoted scalar.
        let quoted = serde_json::to_string(&concrete).unwrap();
        rules.push_str(&format!(
            "      - record: dashboard:query_{n}\n        expr: {quoted}\n        labels:\n          \
             source: {:?}\n",
            format!("{panel} / {ref_id}")
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dashboard.rules.yml"), &rules).unwrap();
    let out = promtool(&["check", "rules", "dashboard.rules.yml"], dir.path());
    assert!(
        out.contains("SUCCESS"),
        "promtool check rules:\n{out}\nrules:\n{rules}"
    );
}
