//! The pages, as maud templates: every interpolated value is HTML-escaped unless it is
//! wrapped in `PreEscaped`, which only the log renderer's own (escaping) output is.

use super::auth::{self, Viewer};
use super::charts::{self, Series};
use super::logview::{self, WINDOW};
use super::{human_ms, PageError, Ui};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, Utc};
use maud::{html, Markup, PreEscaped, DOCTYPE};
use serde::Deserialize;
use slate_core::{Build, BuildId, Job, JobId, JobState, Trigger};
use slate_store::BuildFilter;
use std::collections::BTreeMap;

/// Builds per page.
pub const PAGE_SIZE: u32 = 50;

/// How many recent builds the charts look at.
const CHART_BUILDS: u32 = 200;

fn page(m: Markup) -> Response {
    Html(m.into_string()).into_response()
}

fn layout(title: &str, v: &Viewer, live_script: bool, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · slate" }
                link rel="stylesheet" href="/assets/style.css";
                @if live_script { script src="/assets/live.js" defer {} }
            }
            body {
                header.top {
                    a.brand href="/" { "slate" }
                    nav {
                        a href="/" { "Builds" }
                        a href="/pools" { "Pools" }
                        a href="/images" { "Images" }
                    }
                    div.who {
                        @if let (Some(p), Some(csrf)) = (&v.principal, &v.csrf) {
                            span.user { (p.name) }
                            form.inline method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(csrf);
                                button.link type="submit" { "Log out" }
                            }
                        } @else {
                            a href="/login" { "Log in" }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

pub fn error_page(status: StatusCode, msg: &str) -> Html<String> {
    Html(
        layout(
            status.canonical_reason().unwrap_or("error"),
            &Viewer::default(),
            false,
            html! { h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) } p { (msg) } },
        )
        .into_string(),
    )
}

pub fn login_page(v: &Viewer, csrf: &str, next: &str, error: Option<&str>) -> Html<String> {
    Html(
        layout(
            "Log in",
            v,
            false,
            html! {
                h1 { "Log in" }
                @if let Some(e) = error { p.error { (e) } }
                p.muted { "Use an API token (" code { "slate token create NAME" } ")." }
                form.login method="post" action="/login" {
                    input type="hidden" name="csrf" value=(csrf);
                    input type="hidden" name="next" value=(next);
                    label { "Token " input type="password" name="token" autocomplete="current-password" required; }
                    button type="submit" { "Log in" }
                }
            },
        )
        .into_string(),
    )
}

fn badge(state: JobState) -> Markup {
    html! { span class={ "badge s-" (state.as_str()) } { (state.as_str()) } }
}

fn time(t: DateTime<Utc>) -> Markup {
    html! { time datetime=(t.to_rfc3339()) { (t.format("%Y-%m-%d %H:%M:%S")) } }
}

fn short(sha: &str) -> &str {
    sha.get(..10).unwrap_or(sha)
}

/// What the build is of: PR number and title, or the pushed / submitted branch.
fn subject(b: &Build) -> Markup {
    match &b.change.trigger {
        Trigger::PullRequest { number, title, .. } => html! {
            span.pr { "PR #" (number) } " " span.title { (title) }
            " " span.branch { (b.change.head_ref) }
        },
        Trigger::Push { branch } => html! { "push " span.branch { (branch) } },
        Trigger::Manual { branch } => html! { "submit " span.branch { (branch) } },
    }
}

/// From the first job's start to the last one's end (or now, while any runs).
fn build_duration(jobs: &[Job]) -> Option<i64> {
    let start = jobs.iter().filter_map(|j| j.started_at).min()?;
    let end = if jobs.iter().all(|j| j.state.is_terminal()) {
        jobs.iter().filter_map(|j| j.finished_at).max()?
    } else {
        Utc::now()
    };
    Some((end - start).num_milliseconds())
}

fn job_duration(j: &Job) -> Option<i64> {
    let s = j.started_at?;
    let e = if j.state.is_terminal() {
        j.finished_at?
    } else {
        Utc::now()
    };
    Some((e - s).num_milliseconds())
}

#[derive(Debug, Default, Deserialize)]
pub struct BuildsQuery {
    pub repo: Option<String>,
    pub state: Option<String>,
    pub pr: Option<String>,
    pub page: Option<u32>,
}

fn nonempty(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// `GET /`: builds, newest first, a page at a time.
pub async fn builds(
    State(ui): State<Ui>,
    headers: HeaderMap,
    Query(q): Query<BuildsQuery>,
) -> Result<Response, PageError> {
    let v = auth::viewer(&ui, &headers);
    let page_no = q.page.unwrap_or(1).max(1);
    let repo = nonempty(&q.repo).map(str::to_string);
    let state = nonempty(&q.state).and_then(JobState::parse);
    let pr_text = nonempty(&q.pr);
    let pr = pr_text.and_then(|p| p.trim_start_matches('#').parse::<u64>().ok());
    let bad_pr = pr_text.is_some() && pr.is_none();
    let filter = BuildFilter {
        repo: repo.clone(),
        pr,
        // One more than a page tells whether there is an older page.
        limit: PAGE_SIZE + 1,
        offset: (page_no - 1).saturating_mul(PAGE_SIZE),
    };
    let mut list = if bad_pr {
        Vec::new()
    } else {
        match state {
            Some(s) => ui.app.store.list_builds_with_job_state(&filter, s).await?,
            None => ui.app.store.list_builds(&filter).await?,
        }
    };
    let more = list.len() > PAGE_SIZE as usize;
    list.truncate(PAGE_SIZE as usize);
    let mut rows = Vec::with_capacity(list.len());
    for b in list {
        let jobs = ui.app.store.jobs_of_build(b.id).await?;
        rows.push((b, jobs));
    }
    let link = |p: u32| {
        let mut s = format!("/?page={p}");
        for (k, val) in [
            ("repo", nonempty(&q.repo)),
            ("state", nonempty(&q.state)),
            ("pr", pr_text),
        ] {
            if let Some(val) = val {
                s.push_str(&format!("&{k}={}", auth::pct(val)));
            }
        }
        s
    };
    let repos: Vec<&str> = ui
        .app
        .config
        .repos
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    let body = html! {
        h1 { "Builds" }
        form.filters method="get" action="/" {
            label { "Repository "
                select name="repo" {
                    option value="" { "any" }
                    @for r in &repos {
                        option value=(r) selected[repo.as_deref() == Some(*r)] { (r) }
                    }
                    @if let Some(r) = &repo {
                        @if !repos.contains(&r.as_str()) { option value=(r) selected { (r) } }
                    }
                }
            }
            label { "Job state "
                select name="state" {
                    option value="" { "any" }
                    @for s in JobState::ALL {
                        option value=(s.as_str()) selected[state == Some(s)] { (s.as_str()) }
                    }
                }
            }
            label { "PR " input type="text" name="pr" size="6" value=(pr_text.unwrap_or("")); }
            button type="submit" { "Filter" }
            @if repo.is_some() || state.is_some() || pr_text.is_some() { " " a href="/" { "clear" } }
        }
        @if bad_pr { p.error { "not a pull request number: " (pr_text.unwrap_or("")) } }
        @if rows.is_empty() {
            p.muted { "No builds." }
        } @else {
            table.builds {
                thead { tr { th { "#" } th { "repository" } th { "change" } th { "head" } th { "author" } th { "jobs" } th { "duration" } th { "created" } } }
                tbody {
                    @for (b, jobs) in &rows {
                        tr {
                            td { a href={ "/builds/" (b.id.0) } { (b.id.0) } }
                            td { (b.change.repo) }
                            td.subject { (subject(b)) }
                            td { code { (short(&b.change.head_sha)) } }
                            td { (b.change.author) }
                            td.jobs {
                                @for j in jobs {
                                    a class={ "badge s-" (j.state.as_str()) } href={ "/jobs/" (j.id.0) } title={ (j.pool) ": " (j.state.as_str()) } {
                                        (j.pool) " " (j.state.as_str())
                                    }
                                }
                            }
                            td { (build_duration(jobs).map(human_ms).unwrap_or_else(|| "—".into())) }
                            td { (time(b.created_at)) }
                        }
                    }
                }
            }
        }
        nav.pager {
            @if page_no > 1 { a rel="prev" href=(link(page_no - 1)) { "← newer" } }
            span { "page " (page_no) }
            @if more { a rel="next" href=(link(page_no + 1)) { "older →" } }
        }
    };
    Ok(page(layout("Builds", &v, false, body)))
}

fn csrf_field(v: &Viewer) -> Markup {
    html! { @if let Some(c) = &v.csrf { input type="hidden" name="csrf" value=(c); } }
}

/// `GET /builds/{id}`.
pub async fn build(
    State(ui): State<Ui>,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Result<Response, PageError> {
    let v = auth::viewer(&ui, &headers);
    let b = ui.app.store.get_build(BuildId(id)).await?;
    let jobs = ui.app.store.jobs_of_build(b.id).await?;
    let active = jobs.iter().any(|j| !j.state.is_terminal());
    let body = html! {
        h1 { "Build #" (b.id.0) " " small { (b.change.repo) } }
        (build_facts(&b))
        div.actions {
            @if v.principal.is_some() {
                @if active {
                    form.inline method="post" action={ "/builds/" (b.id.0) "/cancel" } {
                        (csrf_field(&v)) button type="submit" { "Cancel build" }
                    }
                }
                @if b.checkout_sha.is_some() {
                    form.inline method="post" action={ "/builds/" (b.id.0) "/rebuild" } {
                        (csrf_field(&v)) button type="submit" { "Rebuild" }
                    }
                }
            } @else {
                a href=(auth::login_url(&format!("/builds/{}", b.id.0))) { "Log in" } " to cancel or rebuild."
            }
        }
        h2 { "Jobs" }
        table.jobs {
            thead { tr { th { "job" } th { "pool" } th { "state" } th { "reason" } th { "attempt" } th { "queue wait" } th { "duration" } } }
            tbody {
                @for j in &jobs {
                    tr {
                        td { a href={ "/jobs/" (j.id.0) } { "#" (j.id.0) } }
                        td { (j.pool) }
                        td { (badge(j.state)) }
                        td { (j.reason.as_deref().unwrap_or("")) }
                        td { (j.attempt) }
                        td { (j.started_at.map(|s| human_ms((s - j.created_at).num_milliseconds())).unwrap_or_else(|| "—".into())) }
                        td { (job_duration(j).map(human_ms).unwrap_or_else(|| "—".into())) }
                    }
                }
            }
        }
    };
    Ok(page(layout(&format!("Build #{}", b.id.0), &v, false, body)))
}

fn build_facts(b: &Build) -> Markup {
    html! {
        dl.facts {
            dt { "change" } dd { (subject(b)) }
            dt { "head" } dd { code { (b.change.head_sha) } }
            @if let Some(c) = &b.checkout_sha { dt { "checkout" } dd { code { (c) } } }
            @if let Some(base) = &b.change.base_ref { dt { "base" } dd { span.branch { (base) } } }
            dt { "author" } dd { (b.change.author) }
            dt { "pipeline" } dd { (b.pipeline) }
            dt { "created" } dd { (time(b.created_at)) }
        }
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct JobQuery {
    /// Byte offset of the log window; the tail when absent.
    pub start: Option<u64>,
}

/// `GET /jobs/{id}`: the job, its steps and a window of its log (the tail by default).
pub async fn job(
    State(ui): State<Ui>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Query(q): Query<JobQuery>,
) -> Result<Response, PageError> {
    let v = auth::viewer(&ui, &headers);
    let id = JobId(id);
    let j = ui.app.store.get_job(id).await?;
    let b = ui.app.store.get_build(j.build_id).await?;
    let steps = ui.app.store.steps_of_job(id).await?;
    let writing = ui
        .app
        .logs
        .subscribe(id)
        .is_some_and(|rx| !rx.borrow().finished);
    let live = !j.state.is_terminal() || writing;
    let win = logview::read_window(ui.app.logs.path(id), q.start, live).await?;
    let at_end = q.start.is_none() || win.start + WINDOW >= win.len;
    let follow = live && at_end;
    let (log_html, first_fail) = logview::render_sections(&win, &steps, follow);
    let failed_step = steps
        .iter()
        .filter(|s| matches!(s.outcome.as_deref(), Some("failed" | "timed_out")))
        .min_by_key(|s| s.index);
    let lines_shown = win.bytes.iter().filter(|&&b| b == b'\n').count() as u64
        + u64::from(!win.bytes.is_empty() && !win.bytes.ends_with(b"\n"));
    let next_line = win.first_line.map(|n| n + lines_shown);
    let here = format!("/jobs/{}", id.0);
    let body = html! {
        h1 {
            "Job #" (id.0) " " small { (j.pool) } " "
            span #job-state class={ "badge s-" (j.state.as_str()) } { (j.state.as_str()) }
        }
        @if let Some(r) = &j.reason { p.reason #job-reason { (r) } } @else { p.reason #job-reason {} }
        dl.facts {
            dt { "build" } dd { a href={ "/builds/" (b.id.0) } { "#" (b.id.0) } " " (b.change.repo) }
            dt { "change" } dd { (subject(&b)) }
            dt { "head" } dd { code { (b.change.head_sha) } }
            dt { "attempt" } dd { (j.attempt) }
            dt { "created" } dd { (time(j.created_at)) }
            @if let Some(s) = j.started_at {
                dt { "started" } dd { (time(s)) " (queue wait " (human_ms((s - j.created_at).num_milliseconds())) ")" }
            }
            @if let Some(f) = j.finished_at { dt { "finished" } dd { (time(f)) } }
            @if let Some(d) = job_duration(&j) { dt { "duration" } dd { (human_ms(d)) } }
        }
        div.actions {
            @if !j.state.is_terminal() {
                @if v.principal.is_some() {
                    form.inline #cancel-form method="post" action={ (here) "/cancel" } {
                        (csrf_field(&v)) button #cancel type="submit" { "Cancel job" }
                    }
                } @else {
                    a href=(auth::login_url(&here)) { "Log in" } " to cancel."
                }
            }
        }
        h2 { "Steps" }
        div #steps {
            @if steps.is_empty() { p.muted { "No steps yet." } } @else {
                table.steps {
                    thead { tr { th { "#" } th { "step" } th { "outcome" } th { "exit code" } th { "duration" } } }
                    tbody {
                        @for s in &steps {
                            tr class={ "o-" (s.outcome.as_deref().unwrap_or("running")) } {
                                td { (s.index + 1) }
                                td { a href={ "#step-" (s.index) } { (s.name) } }
                                td { (s.outcome.as_deref().unwrap_or("running")) }
                                td { (s.exit_code.map(|c| c.to_string()).unwrap_or_else(|| "—".into())) }
                                td { (match (s.started_at, s.finished_at) {
                                    (Some(a), Some(e)) => human_ms((e - a).num_milliseconds()),
                                    (Some(a), None) => format!("{} so far", human_ms((Utc::now() - a).num_milliseconds())),
                                    _ => "—".into(),
                                }) }
                            }
                        }
                    }
                }
            }
        }
        @if let Some(s) = failed_step {
            p.jump {
                @if let Some(anchor) = &first_fail {
                    a #jump-failure href={ "#" (anchor) } { "Jump to the first failing step: " (s.name) }
                } @else {
                    "The first failing step, " (s.name) ", began before this part of the log: "
                    a href={ (here) "?start=0" } { "from the start" }
                }
            }
        }
        h2 #log-title { "Log" }
        p.logbar {
            (format_bytes(win.end - win.start)) " of " (format_bytes(win.len)) " shown · "
            a href={ (here) "/log.txt" } { "raw" } " · "
            a href={ (here) "/log.txt?download=1" } { "download" }
            @if win.start > 0 {
                " · " a #load-earlier href={ (here) "?start=" (win.start.saturating_sub(WINDOW)) "#log-title" } { "load earlier" }
            }
            @if !at_end {
                " · " a href={ (here) "?start=" (win.end) "#log-title" } { "later" }
                " · " a href=(here) { "end" }
            }
        }
        div #log.log
            data-job=(id.0)
            data-follow=(if follow { "1" } else { "0" })
            data-offset=(win.end)
            data-next-line=(next_line.map(|n| n.to_string()).unwrap_or_default()) {
            (PreEscaped(log_html))
        }
        p #live-status.muted { @if follow { "following the log live (needs JavaScript; reload otherwise)" } }
    };
    Ok(page(layout(&format!("Job #{}", id.0), &v, true, body)))
}

fn format_bytes(n: u64) -> String {
    if n < 10 << 10 {
        format!("{n} B")
    } else if n < 10 << 20 {
        format!("{} KiB", n >> 10)
    } else if n < 10 << 30 {
        format!("{} MiB", n >> 20)
    } else {
        format!("{} GiB", n >> 30)
    }
}

/// (time, milliseconds) points of a chart series.
type Points = Vec<(DateTime<Utc>, i64)>;

/// `GET /pools`: capacity and load per pool, and charts of recent jobs.
pub async fn pools(State(ui): State<Ui>, headers: HeaderMap) -> Result<Response, PageError> {
    let v = auth::viewer(&ui, &headers);
    let app = &ui.app;
    let active = app.store.jobs_in_states(JobState::active()).await?;
    let count = |pool: &str, states: &[JobState]| {
        active
            .iter()
            .filter(|j| j.pool == pool && states.contains(&j.state))
            .count()
    };
    // Recent builds' finished jobs, for the charts.
    let recent = app
        .store
        .list_builds(&BuildFilter {
            limit: CHART_BUILDS,
            ..Default::default()
        })
        .await?;
    let mut durations: BTreeMap<String, BTreeMap<String, Points>> = BTreeMap::new();
    let mut waits: BTreeMap<String, Points> = BTreeMap::new();
    for b in &recent {
        for j in app.store.jobs_of_build(b.id).await? {
            if let Some(s) = j.started_at {
                waits
                    .entry(j.pool.clone())
                    .or_default()
                    .push((s, (s - j.created_at).num_milliseconds()));
            }
            if let (Some(s), Some(f), true) = (j.started_at, j.finished_at, j.state.is_terminal()) {
                durations
                    .entry(b.pipeline.clone())
                    .or_default()
                    .entry(j.pool.clone())
                    .or_default()
                    .push((f, (f - s).num_milliseconds()));
            }
        }
    }
    let body = html! {
        h1 { "Pools" }
        table.pools {
            thead { tr { th { "pool" } th { "provider" } th { "capacity" } th { "running" } th { "provisioning" } th { "queued" } th { "warm" } th { "image" } } }
            tbody {
                @for p in &app.config.pools {
                    tr {
                        td { (p.name) }
                        td { (format!("{:?}", p.provider).to_lowercase()) }
                        td { (p.max_jobs) }
                        td { (count(&p.name, &[JobState::Running])) }
                        td { (count(&p.name, &[JobState::Provisioning])) }
                        td { (count(&p.name, &[JobState::Queued])) }
                        td.muted { "—" }
                        td { code { (p.image.display()) } }
                    }
                }
            }
        }
        p.muted { "Warm workers, image versions and provisioning times appear here once pools keep them." }
        h2 { "Job duration" }
        p.muted { "Finished jobs of the last " (CHART_BUILDS) " builds, per pipeline, one series per pool." }
        @if durations.is_empty() { p.muted { "No finished jobs yet." } }
        @for (pipeline, per_pool) in &durations {
            (charts::durations(&format!("pipeline {pipeline}"), &per_pool.iter().map(|(pool, pts)| Series { name: pool.clone(), points: pts.clone() }).collect::<Vec<_>>()))
        }
        h2 { "Queue wait" }
        p.muted { "From enqueue to start, per pool." }
        (charts::durations("queue wait", &waits.iter().map(|(pool, pts)| Series { name: pool.clone(), points: pts.clone() }).collect::<Vec<_>>()))
    };
    Ok(page(layout("Pools", &v, false, body)))
}

/// `GET /images`: the images pools boot from (versions and rebuilds come with image
/// management).
pub async fn images(State(ui): State<Ui>, headers: HeaderMap) -> Result<Response, PageError> {
    let v = auth::viewer(&ui, &headers);
    let mut by_image: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for p in &ui.app.config.pools {
        by_image
            .entry(p.image.display().to_string())
            .or_default()
            .push(&p.name);
    }
    let body = html! {
        h1 { "Images" }
        table.images {
            thead { tr { th { "image" } th { "used by pools" } th { "version" } th { "last rebuild" } } }
            tbody {
                @for (image, pools) in &by_image {
                    tr {
                        td { code { (image) } }
                        td { (pools.join(", ")) }
                        td.muted { "—" }
                        td.muted { "—" }
                    }
                }
            }
        }
        p.muted { "Versions, sizes and rebuild results appear here once images are built by slate." }
    };
    Ok(page(layout("Images", &v, false, body)))
}
