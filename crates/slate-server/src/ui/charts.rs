//! Small SVG charts rendered on the server: values over time, one series per line.

use super::human_ms;
use chrono::{DateTime, Utc};
use maud::{html, Markup};

const W: f64 = 560.0;
const H: f64 = 160.0;
const PAD_L: f64 = 56.0;
const PAD_R: f64 = 8.0;
const PAD_T: f64 = 10.0;
const PAD_B: f64 = 22.0;

/// A series: points of (time, milliseconds).
pub struct Series {
    pub name: String,
    pub points: Vec<(DateTime<Utc>, i64)>,
}

/// Colours for series, by position (CSS classes c0…c5).
const CLASSES: usize = 6;

/// A scatter-and-line chart of durations over time; empty series show a note instead.
pub fn durations(title: &str, series: &[Series]) -> Markup {
    let all: Vec<&(DateTime<Utc>, i64)> = series.iter().flat_map(|s| s.points.iter()).collect();
    if all.is_empty() {
        return html! {
            figure.chart {
                figcaption { (title) }
                p.muted { "no finished jobs yet" }
            }
        };
    }
    let t0 = all.iter().map(|p| p.0).min().expect("non-empty");
    let t1 = all.iter().map(|p| p.0).max().expect("non-empty");
    let span = (t1 - t0).num_milliseconds().max(1) as f64;
    let vmax = all.iter().map(|p| p.1).max().unwrap_or(0).max(1) as f64;
    let x = |t: DateTime<Utc>| {
        if t1 == t0 {
            PAD_L + (W - PAD_L - PAD_R) / 2.0
        } else {
            PAD_L + (t - t0).num_milliseconds() as f64 / span * (W - PAD_L - PAD_R)
        }
    };
    let y = |v: i64| H - PAD_B - (v.max(0) as f64 / vmax) * (H - PAD_T - PAD_B);
    html! {
        figure.chart {
            figcaption { (title) }
            svg viewBox={ "0 0 " (W) " " (H) } width=(W) height=(H) role="img" aria-label=(title) {
                line.axis x1=(PAD_L) y1=(H - PAD_B) x2=(W - PAD_R) y2=(H - PAD_B) {}
                line.axis x1=(PAD_L) y1=(PAD_T) x2=(PAD_L) y2=(H - PAD_B) {}
                text.lbl x=(PAD_L - 4.0) y=(PAD_T + 8.0) text-anchor="end" { (human_ms(vmax as i64)) }
                text.lbl x=(PAD_L - 4.0) y=(H - PAD_B) text-anchor="end" { "0" }
                text.lbl x=(PAD_L) y=(H - 6.0) { (t0.format("%Y-%m-%d %H:%M")) }
                text.lbl x=(W - PAD_R) y=(H - 6.0) text-anchor="end" { (t1.format("%Y-%m-%d %H:%M")) }
                @for (i, s) in series.iter().enumerate() {
                    @let class = format!("s c{}", i % CLASSES);
                    @let pts = sorted(&s.points);
                    @let path = pts.iter().map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v))).collect::<Vec<_>>().join(" ");
                    polyline class=(class) points=(path) {}
                    @for (t, v) in &pts {
                        circle class=(class) cx=(format!("{:.1}", x(*t))) cy=(format!("{:.1}", y(*v))) r="2.5" {
                            title { (s.name) ": " (human_ms(*v)) " at " (t.format("%Y-%m-%d %H:%M:%S")) }
                        }
                    }
                }
            }
            @if series.len() > 1 || !series[0].name.is_empty() {
                ul.legend {
                    @for (i, s) in series.iter().enumerate() {
                        li { span class=(format!("sw c{}", i % CLASSES)) {} (s.name) }
                    }
                }
            }
        }
    }
}

fn sorted(points: &[(DateTime<Utc>, i64)]) -> Vec<(DateTime<Utc>, i64)> {
    let mut v = points.to_vec();
    v.sort();
    v
}
