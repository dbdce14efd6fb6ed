//! Locating problems in TOML text: line and column of a byte offset, and the dotted key
//! a parser error points at. Shared by `slate.toml` and image recipes.

use std::ops::Range;

/// 1-based line and column of byte offset `pos`.
pub fn line_col(text: &str, pos: usize) -> (usize, usize) {
    let pos = pos.min(text.len());
    let before = &text[..pos];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    (line, col)
}

/// Best-effort dotted key for a TOML parser error: the enclosing table header plus the
/// key the span sits on (or whose value it sits in).
pub fn key_at(text: &str, span: &Range<usize>) -> String {
    let start = span.start.min(text.len());
    let line_start = text[..start].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line_end = text[start..]
        .find('\n')
        .map(|i| start + i)
        .unwrap_or(text.len());
    let line = &text[line_start..line_end];
    let upto = &text[line_start..start];
    let span_text = text[start..span.end.min(text.len()).max(start)].trim();
    let key = if !span_text.is_empty()
        && !span_text.starts_with('[')
        && !span_text.starts_with('{')
        && !span_text.starts_with('"')
        && !upto.trim_end().ends_with('=')
    {
        // The span is a key itself (e.g. an unknown field).
        span_text.to_string()
    } else if let Some(eq) = upto.rfind('=') {
        upto[..eq]
            .trim_end()
            .rsplit(|c: char| c == '{' || c == ',' || c.is_whitespace())
            .next()
            .unwrap_or("")
            .to_string()
    } else {
        line.split('=').next().unwrap_or("").trim().to_string()
    };
    let header = text[..line_start]
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('['))
        .map(|l| l.trim().trim_matches(|c| c == '[' || c == ']').to_string());
    match (header, key.is_empty()) {
        (Some(h), false) if !line.trim_start().starts_with('[') => format!("{h}.{key}"),
        (Some(h), true) => h,
        (_, _) => key,
    }
}
