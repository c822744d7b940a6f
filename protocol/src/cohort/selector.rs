//! Label selectors, in the language Kubernetes users know:
//! `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k`, `!k`, joined by commas
//! (all must hold). The empty selector matches every device. `!=` and `notin` match
//! a device that lacks the label, as in Kubernetes.
//!
//! Manifests carry the parsed [`Selector`], not the text, so a device never has to
//! agree with the coordinator on parsing.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest label key or value.
pub const MAX_LABEL_LEN: usize = 63;
/// Most requirements in one selector, and most values in one `in` list.
pub const MAX_REQUIREMENTS: usize = 32;
/// Most labels a device announces.
pub const MAX_LABELS: usize = 64;

/// One device label.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Label {
    pub key: String,
    pub value: String,
}

/// A parsed selector: every requirement must hold.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Selector {
    pub requirements: Vec<Requirement>,
}

/// One requirement on one label key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requirement {
    pub key: String,
    pub op: Op,
}

/// The test a requirement applies. Wire order is fixed: only append.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Exists,
    NotExists,
    Eq(String),
    NotEq(String),
    In(Vec<String>),
    NotIn(Vec<String>),
}

/// A selector that does not parse, with the byte offset where it went wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("selector {input:?}, at byte {at}: {message}")]
pub struct SelectorError {
    pub input: String,
    pub at: usize,
    pub message: String,
}

/// Checks a label key: `[A-Za-z0-9]` first, then also `. _ - /`, at most 63 bytes.
pub fn validate_label_key(k: &str) -> Result<(), String> {
    if k.is_empty() {
        return Err("label key is empty".into());
    }
    if k.len() > MAX_LABEL_LEN {
        return Err(format!(
            "label key {k:?} is longer than {MAX_LABEL_LEN} bytes"
        ));
    }
    for (i, c) in k.char_indices() {
        if !(c.is_ascii_alphanumeric() || (i > 0 && matches!(c, '.' | '_' | '-' | '/'))) {
            return Err(format!("label key {k:?} has {c:?} at byte {i}"));
        }
    }
    Ok(())
}

/// Checks a label value: `[A-Za-z0-9._-]*`, at most 63 bytes (may be empty).
pub fn validate_label_value(v: &str) -> Result<(), String> {
    if v.len() > MAX_LABEL_LEN {
        return Err(format!(
            "label value {v:?} is longer than {MAX_LABEL_LEN} bytes"
        ));
    }
    for (i, c) in v.char_indices() {
        if !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
            return Err(format!("label value {v:?} has {c:?} at byte {i}"));
        }
    }
    Ok(())
}

fn label<'a>(labels: &'a [Label], key: &str) -> Option<&'a str> {
    labels
        .iter()
        .find(|l| l.key == key)
        .map(|l| l.value.as_str())
}

impl Requirement {
    /// Whether a device with `labels` satisfies this requirement.
    pub fn matches(&self, labels: &[Label]) -> bool {
        let v = label(labels, &self.key);
        match &self.op {
            Op::Exists => v.is_some(),
            Op::NotExists => v.is_none(),
            Op::Eq(want) => v == Some(want.as_str()),
            Op::NotEq(want) => v != Some(want.as_str()),
            Op::In(set) => v.is_some_and(|v| set.iter().any(|s| s == v)),
            Op::NotIn(set) => !v.is_some_and(|v| set.iter().any(|s| s == v)),
        }
    }
}

impl Selector {
    /// The selector that matches everyone.
    pub fn all() -> Self {
        Selector::default()
    }

    /// Whether a device with `labels` is selected.
    pub fn matches(&self, labels: &[Label]) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Whether every device `other` selects is provably selected by this one
    /// too: each of this selector's requirements is one of `other`'s. (Sound,
    /// not complete: `hw in (a,b)` covers `hw=a` but is not found to.)
    pub fn covers(&self, other: &Selector) -> bool {
        self.requirements
            .iter()
            .all(|r| other.requirements.contains(r))
    }

    /// Checks sizes and charsets (for selectors that arrive decoded, not parsed).
    pub fn validate(&self) -> Result<(), String> {
        if self.requirements.len() > MAX_REQUIREMENTS {
            return Err(format!(
                "selector has more than {MAX_REQUIREMENTS} requirements"
            ));
        }
        for r in &self.requirements {
            validate_label_key(&r.key)?;
            match &r.op {
                Op::Exists | Op::NotExists => {}
                Op::Eq(v) | Op::NotEq(v) => validate_label_value(v)?,
                Op::In(vs) | Op::NotIn(vs) => {
                    if vs.is_empty() || vs.len() > MAX_REQUIREMENTS {
                        return Err(format!(
                            "value list of {:?} must hold 1 to {MAX_REQUIREMENTS} values",
                            r.key
                        ));
                    }
                    vs.iter().try_for_each(|v| validate_label_value(v))?;
                }
            }
        }
        Ok(())
    }

    /// Parses the selector language.
    pub fn parse(input: &str) -> Result<Self, SelectorError> {
        let mut p = Parser { s: input, pos: 0 };
        let mut requirements = Vec::new();
        p.ws();
        if p.at_end() {
            return Ok(Selector { requirements });
        }
        loop {
            requirements.push(p.requirement()?);
            if requirements.len() > MAX_REQUIREMENTS {
                return Err(p.err(format!("more than {MAX_REQUIREMENTS} requirements")));
            }
            p.ws();
            if p.at_end() {
                break;
            }
            p.expect(',')?;
            p.ws();
        }
        let sel = Selector { requirements };
        sel.validate().map_err(|m| p.err(m))?;
        Ok(sel)
    }
}

impl std::str::FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, SelectorError> {
        Selector::parse(s)
    }
}

impl fmt::Display for Selector {
    /// The canonical text form; parsing it gives the same selector back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match &r.op {
                Op::Exists => write!(f, "{}", r.key)?,
                Op::NotExists => write!(f, "!{}", r.key)?,
                Op::Eq(v) => write!(f, "{}={v}", r.key)?,
                Op::NotEq(v) => write!(f, "{}!={v}", r.key)?,
                Op::In(vs) => write!(f, "{} in ({})", r.key, vs.join(","))?,
                Op::NotIn(vs) => write!(f, "{} notin ({})", r.key, vs.join(","))?,
            }
        }
        Ok(())
    }
}

struct Parser<'a> {
    s: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn err(&self, message: impl Into<String>) -> SelectorError {
        SelectorError {
            input: self.s.to_string(),
            at: self.pos,
            message: message.into(),
        }
    }

    fn rest(&self) -> &str {
        &self.s[self.pos..]
    }

    fn at_end(&self) -> bool {
        self.pos >= self.s.len()
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn ws(&mut self) {
        while self.peek().is_some_and(|c| c == ' ' || c == '\t') {
            self.pos += 1;
        }
    }

    fn expect(&mut self, c: char) -> Result<(), SelectorError> {
        match self.peek() {
            Some(got) if got == c => {
                self.pos += c.len_utf8();
                Ok(())
            }
            Some(got) => Err(self.err(format!("expected {c:?}, found {got:?}"))),
            None => Err(self.err(format!("expected {c:?}, found the end"))),
        }
    }

    fn word(&mut self, is_key: bool) -> &str {
        let start = self.pos;
        while let Some(c) = self.peek() {
            let ok =
                c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') || (is_key && c == '/');
            if !ok {
                break;
            }
            self.pos += 1;
        }
        &self.s[start..self.pos]
    }

    fn key(&mut self) -> Result<String, SelectorError> {
        let start = self.pos;
        let k = self.word(true).to_string();
        if k.is_empty() {
            return Err(match self.peek() {
                Some(c) => self.err(format!("expected a label key, found {c:?}")),
                None => self.err("expected a label key, found the end"),
            });
        }
        validate_label_key(&k).map_err(|m| SelectorError {
            input: self.s.to_string(),
            at: start,
            message: m,
        })?;
        Ok(k)
    }

    fn value(&mut self) -> Result<String, SelectorError> {
        let start = self.pos;
        let v = self.word(false).to_string();
        validate_label_value(&v).map_err(|m| SelectorError {
            input: self.s.to_string(),
            at: start,
            message: m,
        })?;
        Ok(v)
    }

    fn requirement(&mut self) -> Result<Requirement, SelectorError> {
        if self.peek() == Some('!') {
            self.pos += 1;
            self.ws();
            let key = self.key()?;
            return Ok(Requirement {
                key,
                op: Op::NotExists,
            });
        }
        let key = self.key()?;
        self.ws();
        let rest = self.rest();
        if rest.starts_with("!=") {
            self.pos += 2;
            self.ws();
            let v = self.value()?;
            return Ok(Requirement {
                key,
                op: Op::NotEq(v),
            });
        }
        if rest.starts_with("==") || rest.starts_with('=') {
            self.pos += if rest.starts_with("==") { 2 } else { 1 };
            self.ws();
            let v = self.value()?;
            return Ok(Requirement { key, op: Op::Eq(v) });
        }
        for (kw, negated) in [("notin", true), ("in", false)] {
            let after = rest.get(kw.len()..kw.len() + 1);
            if rest.starts_with(kw) && matches!(after, Some(" ") | Some("\t") | Some("(")) {
                self.pos += kw.len();
                self.ws();
                let values = self.value_list()?;
                let op = if negated {
                    Op::NotIn(values)
                } else {
                    Op::In(values)
                };
                return Ok(Requirement { key, op });
            }
        }
        if self.at_end() || self.peek() == Some(',') {
            return Ok(Requirement {
                key,
                op: Op::Exists,
            });
        }
        let found = self.peek().map(|c| format!("{c:?}")).unwrap_or_default();
        Err(self.err(format!(
            "expected '=', '!=', 'in', 'notin', ',' or the end after key {key:?}, found {found}"
        )))
    }

    fn value_list(&mut self) -> Result<Vec<String>, SelectorError> {
        self.expect('(')?;
        let mut values = Vec::new();
        loop {
            self.ws();
            let start = self.pos;
            let v = self.value()?;
            if v.is_empty() {
                self.pos = start;
                return Err(self.err("expected a value"));
            }
            values.push(v);
            if values.len() > MAX_REQUIREMENTS {
                return Err(self.err(format!("more than {MAX_REQUIREMENTS} values")));
            }
            self.ws();
            match self.peek() {
                Some(',') => self.pos += 1,
                Some(')') => {
                    self.pos += 1;
                    return Ok(values);
                }
                Some(c) => return Err(self.err(format!("expected ',' or ')', found {c:?}"))),
                None => return Err(self.err("expected ')', found the end")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Vec<Label> {
        pairs
            .iter()
            .map(|(k, v)| Label {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect()
    }

    #[test]
    fn selector_eval_table() {
        let dev = labels(&[("hw", "rev3"), ("region", "eu"), ("beta", "")]);
        let table: &[(&str, bool)] = &[
            ("", true),
            ("hw=rev3", true),
            ("hw==rev3", true),
            ("hw=rev2", false),
            ("hw!=rev2", true),
            ("hw!=rev3", false),
            ("missing!=x", true),
            ("region in (eu,us)", true),
            ("region in (us)", false),
            ("region notin (us, apac)", true),
            ("region notin (eu)", false),
            ("missing notin (eu)", true),
            ("missing in (eu)", false),
            ("beta", true),
            ("!beta", false),
            ("!missing", true),
            ("missing", false),
            ("hw=rev3,region in (eu,us),!missing", true),
            ("hw=rev3 , region=us", false),
            ("beta=", true),
            ("example.com/tier=gold", false),
        ];
        for (text, want) in table {
            let s = Selector::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert_eq!(s.matches(&dev), *want, "{text:?}");
        }
    }

    #[test]
    fn selector_parse_errors_say_where() {
        let table: &[(&str, usize, &str)] = &[
            ("hw=rev3,", 8, "expected a label key"),
            ("=x", 0, "expected a label key"),
            ("hw=rev3 region=eu", 8, "expected ','"),
            ("region in eu", 10, "expected '('"),
            ("region in (eu", 13, "expected ')'"),
            ("region in ()", 11, "expected a value"),
            ("region in (eu;us)", 13, "expected ',' or ')'"),
            ("hw=re/v3", 5, "expected ','"),
            ("hw>3", 2, "expected '='"),
            ("-hw", 0, "has '-' at byte 0"),
            ("hw=é", 3, "expected ','"),
        ];
        for (text, at, msg) in table {
            let e = Selector::parse(text).expect_err(text);
            assert_eq!(e.at, *at, "{text:?}: {e}");
            assert!(e.message.contains(msg), "{text:?}: {e}");
        }
    }

    #[test]
    fn selector_display_round_trips() {
        for text in [
            "",
            "a",
            "!a",
            "a=b",
            "a!=b",
            "a in (x,y)",
            "a notin (x)",
            "a,b=c,!d",
        ] {
            let s = Selector::parse(text).unwrap();
            assert_eq!(s.to_string(), *text);
            assert_eq!(Selector::parse(&s.to_string()).unwrap(), s);
        }
    }

    #[test]
    fn selector_limits() {
        let many = (0..33)
            .map(|i| format!("k{i}"))
            .collect::<Vec<_>>()
            .join(",");
        assert!(Selector::parse(&many).is_err());
        let long = format!("{}=x", "k".repeat(64));
        assert!(Selector::parse(&long).is_err());
    }

    #[test]
    fn selector_covers_only_what_it_provably_selects() {
        let p = |s: &str| Selector::parse(s).unwrap();
        assert!(Selector::all().covers(&p("hw=a,region in (eu)")));
        assert!(p("hw=a").covers(&p("hw=a,region=eu")));
        assert!(p("hw=a").covers(&p("hw=a")));
        assert!(!p("hw=a,region=eu").covers(&p("hw=a")));
        assert!(!p("hw=a").covers(&Selector::all()));
        assert!(!p("hw=b").covers(&p("hw=a")));
    }
}
