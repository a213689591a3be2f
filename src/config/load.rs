//! Loading: file text and environment overrides to a `Config`, every problem located and
//! named with the nearest valid key.

use super::schema::{all_key_paths, schema};
use super::*;

// ---------------------------------------------------------------------------------------------
// Loading: file text + environment overrides -> Config, with every problem located.

/// Where a configuration problem comes from.
#[derive(Debug, Clone)]
pub enum Origin {
    Line { file: String, line: usize },
    Env(String),
    File(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Line { file, line } => write!(f, "{file}:{line}"),
            Origin::Env(var) => write!(f, "environment variable {var}"),
            Origin::File(file) => write!(f, "{file}"),
        }
    }
}

/// All problems found in a configuration, one per line when displayed.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(f, "invalid configuration ({n} problem{}):", if n == 1 { "" } else { "s" })?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

pub struct Loaded {
    pub config: Config,
    /// Keys of Polars on-premises that are set but not implemented here yet.
    pub warnings: Vec<String>,
}

/// Reads `path` and applies `PC_CUBLET__*` overrides from `env`.
pub fn load_file(path: &Path, env: impl IntoIterator<Item = (String, String)>) -> Result<Loaded, ConfigErrors> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigErrors(vec![format!("cannot read configuration file {name}: {e}")]))?;
    load_str(&text, &name, env)
}

pub fn load_str(
    text: &str,
    file: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Loaded, ConfigErrors> {
    let original =
        toml_edit::Document::parse(text.to_string()).map_err(|e| ConfigErrors(vec![syntax_error(file, text, &e)]))?;
    let original_spans = key_spans(&original);
    let mut doc = original.clone().into_mut();

    let mut env_keys: BTreeMap<Vec<String>, String> = BTreeMap::new();
    let mut errors = Vec::new();
    for (var, raw) in env {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else { continue };
        let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
        if path.iter().any(|s| s.is_empty()) {
            errors.push(format!("environment variable {var}: empty key segment; write {ENV_PREFIX}section__key"));
            continue;
        }
        if let Err(e) = set_path(&mut doc, &path, env_value(&raw)) {
            errors.push(format!("environment variable {var}: {e}"));
            continue;
        }
        env_keys.insert(path, var);
    }

    let origin_of = |path: &[String]| -> Origin {
        if let Some(var) = env_keys.get(path) {
            return Origin::Env(var.clone());
        }
        // The key itself or the nearest enclosing key that appears in the file.
        for len in (1..=path.len()).rev() {
            if let Some(span) = original_spans.get(&path[..len]) {
                return Origin::Line { file: file.to_string(), line: line_of(text, span.start) };
            }
        }
        Origin::File(file.to_string())
    };

    // Deserialize; on each error, record it, drop the offending key and try again, so that one
    // run reports every unknown key and wrong value rather than only the first.
    let config = loop {
        let rendered = doc.to_string();
        match toml_edit::de::from_str::<Config>(&rendered) {
            Ok(config) => break config,
            Err(e) => {
                let reparsed = toml_edit::Document::parse(rendered.clone()).expect("rendered TOML parses");
                let spans = key_spans(&reparsed);
                let at = e.span().map(|s| s.start);
                let path = at.and_then(|offset| innermost_key_at(&spans, offset));
                let Some(path) = path else {
                    errors.push(format!("{file}: {}", e.message()));
                    break Config::default();
                };
                let dotted = path.join(".");
                let origin = origin_of(&path);
                let message = e.message();
                if let Some(unknown) = message.strip_prefix("unknown field `").and_then(|m| m.split('`').next()) {
                    errors.push(format!("{origin}: unknown key `{dotted}`{}", suggestion(&path, unknown)));
                } else {
                    errors.push(format!("{origin}: `{dotted}`: {message}"));
                }
                if !remove_path(&mut doc, &path) || errors.len() > 100 {
                    break Config::default();
                }
            }
        }
    };
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    let warnings = not_yet_implemented(&config);
    Ok(Loaded { config, warnings })
}

fn syntax_error(file: &str, text: &str, e: &toml_edit::TomlError) -> String {
    let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(1);
    format!("{file}:{line}: TOML syntax error: {}", e.message())
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|b| *b == b'\n').count() + 1
}

/// Span of every key (the whole `key = value` stretch) by its path.
fn key_spans(doc: &toml_edit::Document<String>) -> BTreeMap<Vec<String>, Range<usize>> {
    fn walk(table: &dyn toml_edit::TableLike, prefix: &[String], out: &mut BTreeMap<Vec<String>, Range<usize>>) {
        for (k, item) in table.iter() {
            let mut path = prefix.to_vec();
            path.push(k.to_string());
            let key_span = table.get_key_value(k).and_then(|(key, _)| key.span());
            let item_span = match item {
                toml_edit::Item::Value(v) => v.span(),
                toml_edit::Item::Table(t) => t.span(),
                _ => None,
            };
            let span = match (key_span, item_span) {
                (Some(a), Some(b)) => a.start.min(b.start)..a.end.max(b.end),
                (a, b) => match a.or(b) {
                    Some(s) => s,
                    None => continue,
                },
            };
            out.insert(path.clone(), span);
            if let Some(inner) = item.as_table_like() {
                walk(inner, &path, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(doc.as_table(), &[], &mut out);
    out
}

fn innermost_key_at(spans: &BTreeMap<Vec<String>, Range<usize>>, offset: usize) -> Option<Vec<String>> {
    spans
        .iter()
        .filter(|(_, span)| span.start <= offset && offset < span.end.max(span.start + 1))
        .max_by_key(|(path, _)| path.len())
        .map(|(path, _)| path.clone())
}

fn remove_path(doc: &mut toml_edit::DocumentMut, path: &[String]) -> bool {
    let (last, parents) = path.split_last().expect("non-empty path");
    let mut table: &mut dyn toml_edit::TableLike = doc.as_table_mut();
    for p in parents {
        match table.get_mut(p).and_then(|i| i.as_table_like_mut()) {
            Some(t) => table = t,
            None => return false,
        }
    }
    table.remove(last).is_some()
}

fn set_path(doc: &mut toml_edit::DocumentMut, path: &[String], value: toml_edit::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().expect("non-empty path");
    let mut table: &mut dyn toml_edit::TableLike = doc.as_table_mut();
    for (i, p) in parents.iter().enumerate() {
        let entry = table.entry(p).or_insert(toml_edit::table());
        match entry.as_table_like_mut() {
            Some(t) => table = t,
            None => return Err(format!("`{}` is a value, not a table", path[..=i].join("."))),
        }
    }
    table.insert(last, toml_edit::Item::Value(value));
    Ok(())
}

/// An override's value: a TOML value if it reads as one (`true`, `5`, `{ port = 4005 }`),
/// else the text itself (`10s`, `127.0.0.1:4005`).
fn env_value(raw: &str) -> toml_edit::Value {
    raw.parse::<toml_edit::Value>().unwrap_or_else(|_| toml_edit::Value::from(raw))
}

/// " (did you mean `x`?)" for an unknown key at `path`: a sibling with a similar name, or the
/// same name elsewhere in the schema.
fn suggestion(path: &[String], unknown: &str) -> String {
    let parent = &path[..path.len() - 1];
    let mut section = Some(schema());
    for p in parent {
        section = section.and_then(|s| (s.child)(p));
    }
    let siblings = section.map(|s| s.fields).unwrap_or_default();
    let best = siblings
        .iter()
        .map(|f| (strsim::jaro_winkler(f, unknown), *f))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0));
    if let Some((_, name)) = best {
        let mut full = parent.to_vec();
        full.push(name.to_string());
        return format!("; did you mean `{}`?", full.join("."));
    }
    if let Some(elsewhere) = all_key_paths().into_iter().find(|p| p.rsplit('.').next() == Some(unknown)) {
        return format!("; `{unknown}` belongs at `{elsewhere}`");
    }
    if siblings.is_empty() { String::new() } else { format!("; valid keys here: {}", siblings.join(", ")) }
}

/// Real Polars on-premises keys that are set in this configuration but have no effect yet.
/// Each later capability removes its keys from this list.
fn not_yet_implemented(c: &Config) -> Vec<String> {
    let mut keys: Vec<&str> = Vec::new();
    let mut check = |set: bool, key: &'static str| {
        if set {
            keys.push(key)
        }
    };
    check(c.license.is_some(), "license");
    check(c.cpu_reserved.is_some(), "cpu_reserved");
    let s = &c.scheduler;
    check(!s.anonymous_result_location.is_local(), "scheduler.anonymous_result_location");
    keys.into_iter().map(|k| format!("`{k}` is accepted but not implemented yet; it has no effect")).collect()
}
