//! A job's log in the browser: a window of it (the tail by default, never the whole
//! file), split into step sections, plus live updates over server-sent events that
//! resume from a byte offset (`Last-Event-ID`) and the raw file.

use super::ansi::{escape_into, render_line, Style};
use super::{PageError, Ui};
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use slate_core::{JobId, JobState, StepRecord};
use std::convert::Infallible;
use std::fmt::Write;
use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

/// How much of a log one page shows: enough to read, small enough for any browser.
pub const WINDOW: u64 = 64 << 10;

/// Line numbers are counted from the start of the file only up to this offset (pool log
/// caps are around this size); further in, lines are anchored by byte offset so a huge
/// log still opens in milliseconds.
pub const COUNT_LINES_MAX: u64 = 64 << 20;

/// Largest chunk one live event carries.
const EVENT_CHUNK: usize = 64 << 10;

/// A contiguous part of a log, starting and (unless cut) ending at a line boundary.
#[derive(Debug)]
pub struct Window {
    pub start: u64,
    pub end: u64,
    /// The file's length when it was read.
    pub len: u64,
    /// Number of the window's first line, when known.
    pub first_line: Option<u64>,
    pub bytes: Vec<u8>,
}

/// Read the window starting at `start` (the tail when `None`). With `whole_lines`, a
/// trailing line without its newline is left out (a live follower will send it).
pub async fn read_window(
    path: std::path::PathBuf,
    start: Option<u64>,
    whole_lines: bool,
) -> std::io::Result<Window> {
    tokio::task::spawn_blocking(move || read_window_blocking(&path, start, whole_lines))
        .await
        .map_err(std::io::Error::other)?
}

fn read_window_blocking(
    path: &std::path::Path,
    start: Option<u64>,
    whole_lines: bool,
) -> std::io::Result<Window> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Window {
                start: 0,
                end: 0,
                len: 0,
                first_line: Some(1),
                bytes: Vec::new(),
            })
        }
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let (want_start, want_end) = match start {
        None => (len.saturating_sub(WINDOW), len),
        Some(s) => {
            let s = s.min(len);
            (s, (s + WINDOW).min(len))
        }
    };
    // One byte before the start tells whether the start is already a line start.
    let read_from = want_start.saturating_sub(1);
    f.seek(SeekFrom::Start(read_from))?;
    let mut buf = Vec::with_capacity((want_end - read_from) as usize);
    (&mut f).take(want_end - read_from).read_to_end(&mut buf)?;
    let mut skip = 0usize;
    if want_start > 0 {
        // Begin after the first newline at or after want_start - 1, unless the window
        // holds no newline at all (one enormous line): then cut it.
        if let Some(p) = buf.iter().position(|&b| b == b'\n') {
            skip = p + 1;
        } else {
            skip = 1;
        }
    }
    let mut bytes = buf.split_off(skip.min(buf.len()));
    let start = read_from + skip as u64;
    let cut_tail = want_end < len || whole_lines;
    if cut_tail {
        if let Some(p) = bytes.iter().rposition(|&b| b == b'\n') {
            bytes.truncate(p + 1);
        } else if whole_lines && want_end == len && (bytes.len() as u64) < WINDOW {
            bytes.clear();
        }
    }
    let end = start + bytes.len() as u64;
    let first_line = if start == 0 {
        Some(1)
    } else if start <= COUNT_LINES_MAX {
        f.seek(SeekFrom::Start(0))?;
        let mut n = 1u64;
        let mut left = start;
        let mut chunk = vec![0u8; 1 << 20];
        while left > 0 {
            let want = (chunk.len() as u64).min(left) as usize;
            let got = f.read(&mut chunk[..want])?;
            if got == 0 {
                break;
            }
            n += chunk[..got].iter().filter(|&&b| b == b'\n').count() as u64;
            left -= got as u64;
        }
        Some(n)
    } else {
        None
    };
    Ok(Window {
        start,
        end,
        len,
        first_line,
        bytes,
    })
}

/// `step NAME: rest` of a slate note (`==> step NAME: …`), as the runner writes them.
fn step_note(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix("==> step ")?;
    rest.split_once(": ")
}

/// Whether the rest of a step note is the runner's end note (`ok in 1.20s`, …).
fn is_end_note(rest: &str) -> bool {
    let Some((word, secs)) = rest.rsplit_once(" in ") else {
        return false;
    };
    let timed = secs
        .strip_suffix('s')
        .is_some_and(|n| n.parse::<f64>().is_ok());
    timed
        && (word == "ok"
            || word.starts_with("failed")
            || word.starts_with("killed by signal")
            || word.starts_with("timed out")
            || word == "could not be started")
}

struct Section {
    /// Step name, or `None` for slate's own notes before the first step.
    step: Option<String>,
    /// The section started before the window (only its end is shown).
    continued: bool,
    closed: bool,
    lines: Vec<(u64, String)>,
}

/// One rendered log line. Ids are `L<n>` with a line number, else `O<byte offset>`.
fn line_html(out: &mut String, text: &str, offset: u64, number: Option<u64>, style: &mut Style) {
    let note = text.starts_with("==> ");
    out.push_str("<div class=\"l");
    if note {
        out.push_str(" note");
    }
    out.push('"');
    match number {
        Some(n) => {
            let _ = write!(out, " id=\"L{n}\"");
        }
        None => {
            let _ = write!(out, " id=\"O{offset}\"");
        }
    }
    let _ = write!(out, " data-o=\"{offset}\"");
    if let Some((name, _)) = step_note(text) {
        out.push_str(" data-stepnote=\"");
        escape_into(out, name);
        out.push('"');
    }
    out.push_str("><a class=\"n\" href=\"#");
    match number {
        Some(n) => {
            let _ = write!(out, "L{n}\">{n}</a>");
        }
        None => {
            let _ = write!(out, "O{offset}\" title=\"byte {offset}\">¶</a>");
        }
    }
    out.push_str("<span class=\"t\">");
    render_line(text, style, out);
    out.push_str("</span></div>");
}

/// Split bytes at `offset` into `(offset of line, line)` pairs.
fn lines_of(bytes: &[u8], offset: u64) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut at = offset;
    // Offsets are counted on the raw bytes, so a lossy replacement cannot shift them.
    let mut raw_at = 0usize;
    for raw in bytes.split_inclusive(|&b| b == b'\n') {
        let line = String::from_utf8_lossy(raw);
        let line = line.strip_suffix('\n').unwrap_or(&line).to_string();
        out.push((at, line));
        at += raw.len() as u64;
        raw_at += raw.len();
    }
    debug_assert_eq!(raw_at, bytes.len());
    out
}

/// The log window as HTML sections: one `<details>` per step, closed when the step
/// succeeded, open otherwise; returns the HTML and the id of the first failing step's
/// section, if it is in the window.
pub fn render_sections(win: &Window, steps: &[StepRecord], live: bool) -> (String, Option<String>) {
    let mut sections: Vec<Section> = Vec::new();
    for (offset, line) in lines_of(&win.bytes, win.start) {
        if let Some((name, rest)) = step_note(&line) {
            let ends_current = sections
                .last()
                .is_some_and(|s| !s.closed && s.step.as_deref() == Some(name));
            if ends_current {
                let s = sections.last_mut().expect("checked");
                s.lines.push((offset, line.clone()));
                s.closed = true;
                continue;
            }
            // An end note with nothing open: the window began inside this step.
            let continued = sections.iter().all(|s| s.step.is_none()) && is_end_note(rest);
            if continued {
                let name = name.to_string();
                let s = match sections.last_mut() {
                    Some(s) if s.step.is_none() => s,
                    _ => {
                        sections.push(Section {
                            step: None,
                            continued: true,
                            closed: false,
                            lines: Vec::new(),
                        });
                        sections.last_mut().expect("pushed")
                    }
                };
                s.step = Some(name);
                s.continued = true;
                s.lines.push((offset, line.clone()));
                s.closed = true;
                continue;
            }
            sections.push(Section {
                step: Some(name.to_string()),
                continued: false,
                closed: false,
                lines: vec![(offset, line.clone())],
            });
            continue;
        }
        match sections.last_mut() {
            Some(s) if !s.closed => s.lines.push((offset, line)),
            _ => sections.push(Section {
                step: None,
                continued: win.start > 0 && sections.is_empty(),
                closed: false,
                lines: vec![(offset, line)],
            }),
        }
    }

    // The latest section of a name is the current attempt's: it gets the step's id.
    let mut last_of: std::collections::HashMap<&str, usize> = Default::default();
    for (i, s) in sections.iter().enumerate() {
        if let Some(n) = &s.step {
            last_of.insert(n.as_str(), i);
        }
    }
    let mut first_failure: Option<(u32, String)> = None;
    let mut html = String::with_capacity(win.bytes.len() * 2 + 256);
    let mut style = Style::default();
    let mut number = win.first_line;
    let last_index = sections.len().saturating_sub(1);
    for (i, s) in sections.iter().enumerate() {
        let record = s.step.as_deref().and_then(|n| {
            if last_of.get(n) == Some(&i) {
                steps.iter().find(|r| r.name == n)
            } else {
                None
            }
        });
        let outcome = record.and_then(|r| r.outcome.as_deref());
        let failed = matches!(outcome, Some("failed" | "timed_out"));
        let ok = matches!(outcome, Some("ok" | "skipped"));
        let id = record.map(|r| format!("step-{}", r.index));
        if failed {
            if let (Some(r), Some(id)) = (record, &id) {
                if first_failure.as_ref().is_none_or(|(idx, _)| r.index < *idx) {
                    first_failure = Some((r.index, id.clone()));
                }
            }
        }
        let is_live_tail = live && i == last_index && !s.closed;
        match &s.step {
            Some(name) => {
                html.push_str("<details class=\"sec step");
                html.push_str(match outcome {
                    Some("ok") => " ok",
                    Some("failed" | "timed_out") => " failed",
                    Some("allowed_failure") => " allowed",
                    _ => "",
                });
                html.push('"');
                if let Some(id) = &id {
                    let _ = write!(html, " id=\"{id}\"");
                }
                html.push_str(" data-name=\"");
                escape_into(&mut html, name);
                html.push('"');
                if is_live_tail {
                    html.push_str(" data-live=\"1\"");
                }
                // Successful steps start collapsed; everything else is open.
                if !ok || is_live_tail {
                    html.push_str(" open");
                }
                html.push_str("><summary>");
                if s.continued {
                    html.push_str("… ");
                }
                html.push_str("step <b>");
                escape_into(&mut html, name);
                html.push_str("</b>");
                if let Some(r) = record {
                    html.push_str(" <span class=\"outcome\">");
                    escape_into(&mut html, r.outcome.as_deref().unwrap_or("running"));
                    if let Some(c) = r.exit_code {
                        let _ = write!(html, ", exit {c}");
                    }
                    if let (Some(a), Some(b)) = (r.started_at, r.finished_at) {
                        html.push_str(", ");
                        html.push_str(&super::human_ms((b - a).num_milliseconds()));
                    }
                    html.push_str("</span>");
                }
                html.push_str("</summary>");
            }
            None => {
                html.push_str("<div class=\"sec pre\"");
                if is_live_tail {
                    html.push_str(" data-live=\"1\"");
                }
                html.push('>');
            }
        }
        for (offset, line) in &s.lines {
            line_html(&mut html, line, *offset, number, &mut style);
            number = number.map(|n| n + 1);
        }
        html.push_str(if s.step.is_some() {
            "</details>"
        } else {
            "</div>"
        });
    }
    (html, first_failure.map(|(_, id)| id))
}

/// Lines rendered for a live event (numbers and sections are the script's job).
fn render_event_lines(bytes: &[u8], offset: u64) -> String {
    let mut html = String::with_capacity(bytes.len() * 2);
    let mut style = Style::default();
    for (o, line) in lines_of(bytes, offset) {
        line_html(&mut html, &line, o, None, &mut style);
    }
    // Live lines carry no id: the script numbers them after the page's last line.
    html.replace(" id=\"O", " data-id=\"O")
}

#[derive(Debug, Deserialize)]
pub struct EventsQuery {
    pub offset: Option<u64>,
}

/// `GET /jobs/{id}/events`: server-sent events from the log store. `log` events carry
/// rendered lines and have the byte offset after them as their id, so a reconnecting
/// browser (`Last-Event-ID`) resumes exactly there; `state` events carry job state
/// changes; `done` ends the stream once the job is terminal and its log complete.
pub async fn events(
    State(ui): State<Ui>,
    Path(id): Path<i64>,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> Result<Response, PageError> {
    let id = JobId(id);
    let job = ui.app.store.get_job(id).await?;
    let offset = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .or(q.offset)
        .unwrap_or(0);
    tracing::debug!(job.id = id.0, offset, "live log follower connected");
    struct St {
        ui: Ui,
        id: JobId,
        offset: u64,
        state: JobState,
        done: bool,
    }
    let st = St {
        ui,
        id,
        offset,
        state: job.state,
        done: false,
    };
    let stream = futures::stream::unfold(st, |mut st| async move {
        loop {
            if st.done {
                return None;
            }
            let logs = &st.ui.app.logs;
            let chunk = logs
                .read_at(st.id, st.offset, EVENT_CHUNK)
                .await
                .unwrap_or_default();
            // Whole lines only, unless one line fills a chunk by itself.
            let cut = match chunk.iter().rposition(|&b| b == b'\n') {
                Some(p) => p + 1,
                None if chunk.len() == EVENT_CHUNK => chunk.len(),
                None => 0,
            };
            if cut > 0 {
                let html = render_event_lines(&chunk[..cut], st.offset);
                st.offset += cut as u64;
                let ev = Event::default()
                    .event("log")
                    .id(st.offset.to_string())
                    .data(html);
                return Some((Ok::<_, Infallible>(ev), st));
            }
            let rx = logs.subscribe(st.id);
            let writer_done = rx.as_ref().map(|r| r.borrow().finished).unwrap_or(true);
            let job = match st.ui.app.store.get_job(st.id).await {
                Ok(j) => j,
                Err(_) => return None,
            };
            if job.state != st.state {
                st.state = job.state;
                let data = serde_json::json!({"state": job.state, "reason": job.reason});
                return Some((
                    Ok(Event::default().event("state").data(data.to_string())),
                    st,
                ));
            }
            if job.state.is_terminal() && writer_done {
                // The last line may lack its newline: send it, then say done.
                let rest = logs
                    .read_at(st.id, st.offset, EVENT_CHUNK)
                    .await
                    .unwrap_or_default();
                if !rest.is_empty() {
                    let html = render_event_lines(&rest, st.offset);
                    st.offset += rest.len() as u64;
                    let ev = Event::default()
                        .event("log")
                        .id(st.offset.to_string())
                        .data(html);
                    return Some((Ok(ev), st));
                }
                st.done = true;
                let data = serde_json::json!({"state": job.state, "reason": job.reason});
                return Some((
                    Ok(Event::default().event("done").data(data.to_string())),
                    st,
                ));
            }
            match rx {
                Some(mut rx) => {
                    let _ = tokio::time::timeout(Duration::from_millis(1000), rx.changed()).await;
                }
                None => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

#[derive(Debug, Deserialize)]
pub struct RawQuery {
    pub download: Option<String>,
}

/// `GET /jobs/{id}/log.txt`: the whole log as plain text, streamed from disk.
pub async fn raw(
    State(ui): State<Ui>,
    Path(id): Path<i64>,
    Query(q): Query<RawQuery>,
) -> Result<Response, PageError> {
    let id = JobId(id);
    ui.app.store.get_job(id).await?;
    let path = ui.app.logs.path(id);
    let body = match tokio::fs::File::open(&path).await {
        Ok(f) => Body::from_stream(tokio_util::io::ReaderStream::with_capacity(f, 64 << 10)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Body::empty(),
        Err(e) => return Err(PageError::Io(e)),
    };
    let mut resp = (
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response();
    if q.download.is_some() {
        let v = format!("attachment; filename=\"slate-job-{}.log\"", id.0);
        if let Ok(v) = v.parse() {
            resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
        }
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_notes() {
        assert!(is_end_note("ok in 1.20s"));
        assert!(is_end_note("failed with exit code 2 in 0.01s"));
        assert!(!is_end_note("make -j4"));
        assert!(!is_end_note("sleep in 5"));
    }

    #[test]
    fn tail_window_starts_at_a_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.log");
        let mut text = String::new();
        for i in 0..20000 {
            text.push_str(&format!("line {i}\n"));
        }
        std::fs::write(&p, &text).unwrap();
        let w = read_window_blocking(&p, None, false).unwrap();
        assert_eq!(w.end, text.len() as u64);
        assert!(w.bytes.len() as u64 <= WINDOW);
        let s = String::from_utf8(w.bytes.clone()).unwrap();
        assert!(s.starts_with("line "), "{}", &s[..20]);
        let first: u64 = s[5..s.find('\n').unwrap()].parse().unwrap();
        assert_eq!(w.first_line, Some(first + 1));
    }

    #[test]
    fn sections_collapse_successful_steps() {
        let log = "==> provisioning\n==> step a: echo a\na\n==> step a: ok in 0.01s\n\
                   ==> step b: false\n==> step b: failed with exit code 1 in 0.01s\n";
        let win = Window {
            start: 0,
            end: log.len() as u64,
            len: log.len() as u64,
            first_line: Some(1),
            bytes: log.as_bytes().to_vec(),
        };
        let rec = |i: u32, n: &str, o: &str| StepRecord {
            job_id: JobId(1),
            index: i,
            name: n.into(),
            started_at: None,
            finished_at: None,
            exit_code: Some(if o == "ok" { 0 } else { 1 }),
            outcome: Some(o.into()),
        };
        let (html, fail) =
            render_sections(&win, &[rec(0, "a", "ok"), rec(1, "b", "failed")], false);
        assert_eq!(fail.as_deref(), Some("step-1"));
        assert!(html.contains("<details class=\"sec step ok\" id=\"step-0\" data-name=\"a\">"));
        assert!(html.contains("id=\"step-1\" data-name=\"b\" open>"));
        assert!(html.contains("id=\"L6\""));
    }
}
