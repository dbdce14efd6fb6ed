//! ANSI colour sequences (SGR) in log output rendered as escaped HTML spans.
//!
//! Only SGR (`ESC [ … m`) becomes markup; every other escape sequence is dropped, and
//! every byte of text is HTML-escaped, so a log line can never inject markup.

use std::fmt::Write;

/// The graphic state carried from one line to the next, as a terminal does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Style {
    bold: bool,
    dim: bool,
    italic: bool,
    underline: bool,
    fg: Option<Colour>,
    bg: Option<Colour>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Colour {
    /// The 16 basic colours (0–15), styled by CSS classes.
    Basic(u8),
    /// 256-colour palette index above 15, or a 24-bit colour.
    Rgb(u8, u8, u8),
}

impl Style {
    fn is_plain(&self) -> bool {
        *self == Style::default()
    }

    fn apply(&mut self, params: &[u16]) {
        if params.is_empty() {
            *self = Style::default();
            return;
        }
        let mut i = 0;
        while i < params.len() {
            let p = params[i];
            match p {
                0 => *self = Style::default(),
                1 => self.bold = true,
                2 => self.dim = true,
                3 => self.italic = true,
                4 => self.underline = true,
                22 => {
                    self.bold = false;
                    self.dim = false;
                }
                23 => self.italic = false,
                24 => self.underline = false,
                30..=37 => self.fg = Some(Colour::Basic((p - 30) as u8)),
                90..=97 => self.fg = Some(Colour::Basic((p - 90 + 8) as u8)),
                39 => self.fg = None,
                40..=47 => self.bg = Some(Colour::Basic((p - 40) as u8)),
                100..=107 => self.bg = Some(Colour::Basic((p - 100 + 8) as u8)),
                49 => self.bg = None,
                38 | 48 => {
                    let (colour, used) = extended(&params[i + 1..]);
                    if p == 38 {
                        self.fg = colour;
                    } else {
                        self.bg = colour;
                    }
                    i += used;
                }
                _ => {}
            }
            i += 1;
        }
    }

    fn open(&self, out: &mut String) {
        let mut class = String::new();
        let mut style = String::new();
        if self.bold {
            class.push_str(" b");
        }
        if self.dim {
            class.push_str(" d");
        }
        if self.italic {
            class.push_str(" i");
        }
        if self.underline {
            class.push_str(" u");
        }
        match self.fg {
            Some(Colour::Basic(n)) => {
                let _ = write!(class, " f{n}");
            }
            Some(Colour::Rgb(r, g, b)) => {
                let _ = write!(style, "color:#{r:02x}{g:02x}{b:02x};");
            }
            None => {}
        }
        match self.bg {
            Some(Colour::Basic(n)) => {
                let _ = write!(class, " g{n}");
            }
            Some(Colour::Rgb(r, g, b)) => {
                let _ = write!(style, "background:#{r:02x}{g:02x}{b:02x};");
            }
            None => {}
        }
        // Class names and colours are generated here from numbers, never from the log.
        out.push_str("<span");
        if !class.is_empty() {
            let _ = write!(out, " class=\"{}\"", &class[1..]);
        }
        if !style.is_empty() {
            let _ = write!(out, " style=\"{style}\"");
        }
        out.push('>');
    }
}

/// `5;n` or `2;r;g;b` after a 38/48; returns the colour and how many params it used.
fn extended(rest: &[u16]) -> (Option<Colour>, usize) {
    match rest {
        [5, n, ..] => {
            let n = (*n).min(255) as u8;
            (Some(palette(n)), 2)
        }
        [2, r, g, b, ..] => (
            Some(Colour::Rgb(
                (*r).min(255) as u8,
                (*g).min(255) as u8,
                (*b).min(255) as u8,
            )),
            4,
        ),
        _ => (None, rest.len()),
    }
}

/// xterm's 256-colour palette.
fn palette(n: u8) -> Colour {
    match n {
        0..=15 => Colour::Basic(n),
        16..=231 => {
            let n = n - 16;
            let level = |v: u8| if v == 0 { 0 } else { 55 + v * 40 };
            Colour::Rgb(level(n / 36), level((n / 6) % 6), level(n % 6))
        }
        _ => {
            let v = 8 + (n - 232) * 10;
            Colour::Rgb(v, v, v)
        }
    }
}

/// Append `text` HTML-escaped (also safe inside attribute values).
pub fn escape_into(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Other control characters would only garble the page.
            c if c.is_control() && c != '\t' => {}
            c => out.push(c),
        }
    }
}

/// Render one line (without its newline) to escaped HTML, updating `style`.
///
/// A carriage return inside a line (progress bars) keeps only what was written after
/// the last one, as a terminal would show it.
pub fn render_line(line: &str, style: &mut Style, out: &mut String) {
    let line = line.strip_suffix('\r').unwrap_or(line);
    let line = match line.rfind('\r') {
        Some(i) => &line[i + 1..],
        None => line,
    };
    let mut open = false;
    if !style.is_plain() {
        style.open(out);
        open = true;
    }
    let mut rest = line;
    while let Some(esc) = rest.find('\x1b') {
        escape_into(out, &rest[..esc]);
        let seq = &rest[esc + 1..];
        let consumed = if let Some(csi) = seq.strip_prefix('[') {
            // CSI: parameter bytes 0x30–0x3F, intermediates 0x20–0x2F, one final byte.
            let end = csi
                .bytes()
                .position(|b| (0x40..=0x7e).contains(&b))
                .map(|p| p + 1);
            match end {
                Some(end) => {
                    if csi.as_bytes()[end - 1] == b'm' {
                        let params: Vec<u16> = csi[..end - 1]
                            .split([';', ':'])
                            .map(|p| p.parse::<u16>().unwrap_or(0))
                            .collect();
                        let params = if csi[..end - 1].is_empty() {
                            Vec::new()
                        } else {
                            params
                        };
                        if open {
                            out.push_str("</span>");
                            open = false;
                        }
                        style.apply(&params);
                        if !style.is_plain() {
                            style.open(out);
                            open = true;
                        }
                    }
                    1 + end
                }
                None => seq.len(),
            }
        } else if let Some(osc) = seq.strip_prefix(']') {
            // OSC (window titles, hyperlinks): up to BEL or ST; dropped.
            match osc.find(['\x07', '\x1b']) {
                Some(p) => 1 + p + if osc[p..].starts_with("\x1b\\") { 2 } else { 1 },
                None => seq.len(),
            }
        } else {
            seq.chars().next().map(char::len_utf8).unwrap_or(0)
        };
        rest = &seq[consumed.min(seq.len())..];
    }
    escape_into(out, rest);
    if open {
        out.push_str("</span>");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(s: &str) -> String {
        let mut out = String::new();
        render_line(s, &mut Style::default(), &mut out);
        out
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(
            render("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
    }

    #[test]
    fn colours_and_reset() {
        assert_eq!(
            render("a \x1b[1;31mred\x1b[0m b"),
            "a <span class=\"b f1\">red</span> b"
        );
        assert_eq!(
            render("\x1b[38;5;196mx\x1b[m"),
            "<span style=\"color:#ff0000;\">x</span>"
        );
        assert_eq!(render("\x1b[2Kclear\x1b]0;title\x07"), "clear");
    }

    #[test]
    fn style_carries_over_lines_and_cr_keeps_the_last_write() {
        let mut st = Style::default();
        let mut out = String::new();
        render_line("\x1b[32mgreen", &mut st, &mut out);
        out.clear();
        render_line("still", &mut st, &mut out);
        assert_eq!(out, "<span class=\"f2\">still</span>");
        assert_eq!(render("10%\r50%\r100%\r"), "100%");
    }
}
