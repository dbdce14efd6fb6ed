//! Who may act: API tokens (stored as sha256 only) as `Authorization: Bearer` for the
//! API and as logins for the UI; in-memory sessions behind an HttpOnly, SameSite=Strict
//! cookie; a per-session CSRF token checked on every form post.

use super::{pages, PageError, Ui};
use crate::app::App;
use axum::body::Bytes;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use slate_store::{Store, StoreError};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

pub const SESSION_COOKIE: &str = "slate_session";
/// Double-submit cookie for the login form (there is no session yet to hold its token).
pub const LOGIN_COOKIE: &str = "slate_login";
/// How long a login lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Prefix of every token, so a leaked one is recognisable in a scanner.
pub const TOKEN_PREFIX: &str = "slate_";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("authentication required: send Authorization: Bearer <token>")]
    Missing,
    #[error("invalid token")]
    Invalid,
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// An authenticated caller: the API token it used (directly or to log in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub token_id: i64,
    pub name: String,
}

/// `n` random bytes, hex-encoded.
pub fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    getrandom::getrandom(&mut buf).expect("the OS random number generator works");
    hex::encode(buf)
}

/// The stored form of a token: hex sha256 of its text.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Create an API token named `name`: returns its id and its text, which is shown once
/// and never stored (`slate token create NAME`).
pub async fn create_token(store: &dyn Store, name: &str) -> Result<(i64, String), StoreError> {
    let token = format!("{TOKEN_PREFIX}{}", random_hex(32));
    let id = store.create_api_token(name, &hash_token(&token)).await?;
    tracing::info!(token.id = id, token.name = name, "api token created");
    Ok((id, token))
}

/// The principal a token stands for, if it is one of ours.
pub async fn check_token(store: &dyn Store, token: &str) -> Result<Option<Principal>, StoreError> {
    let token = token.trim();
    if token.is_empty() {
        return Ok(None);
    }
    // The lookup is by hash, so response timing says nothing about stored secrets.
    Ok(store
        .find_api_token(&hash_token(token))
        .await?
        .map(|(token_id, name)| Principal { token_id, name }))
}

/// The caller named by an `Authorization: Bearer` header.
pub async fn bearer(app: &App, headers: &HeaderMap) -> Result<Principal, AuthError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or(AuthError::Missing)?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or(AuthError::Missing)?;
    match check_token(app.store.as_ref(), token).await? {
        Some(p) => Ok(p),
        None => {
            tracing::warn!("api request with an unknown bearer token");
            Err(AuthError::Invalid)
        }
    }
}

struct Session {
    principal: Principal,
    csrf: String,
    expires: Instant,
}

/// Logged-in browsers, in memory: a restart logs everyone out, which is acceptable for
/// an operator's UI and keeps session secrets off the disk.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    /// A new session: returns its id (the cookie) and its CSRF token.
    pub fn create(&self, principal: Principal) -> (String, String) {
        let id = random_hex(32);
        let csrf = random_hex(32);
        let mut map = self.map.lock().unwrap();
        let now = Instant::now();
        map.retain(|_, s| s.expires > now);
        map.insert(
            id.clone(),
            Session {
                principal,
                csrf: csrf.clone(),
                expires: now + SESSION_TTL,
            },
        );
        (id, csrf)
    }

    fn get(&self, id: &str) -> Option<(Principal, String)> {
        let map = self.map.lock().unwrap();
        map.get(id)
            .filter(|s| s.expires > Instant::now())
            .map(|s| (s.principal.clone(), s.csrf.clone()))
    }

    fn remove(&self, id: &str) {
        self.map.lock().unwrap().remove(id);
    }
}

/// A cookie's value from the request.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Who is looking at a page.
#[derive(Debug, Clone, Default)]
pub struct Viewer {
    pub principal: Option<Principal>,
    /// The session's CSRF token, put in every form.
    pub csrf: Option<String>,
    session: Option<String>,
}

pub fn viewer(ui: &Ui, headers: &HeaderMap) -> Viewer {
    let Some(id) = cookie(headers, SESSION_COOKIE) else {
        return Viewer::default();
    };
    match ui.sessions.get(id) {
        Some((p, csrf)) => Viewer {
            principal: Some(p),
            csrf: Some(csrf),
            session: Some(id.to_string()),
        },
        None => Viewer::default(),
    }
}

fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// A form post's fields (parsed from the body whatever its content type claims, so a
/// malformed post is refused as a CSRF failure, not with a parser error).
pub fn form_fields(body: &Bytes) -> HashMap<String, String> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
        .unwrap_or_default()
        .into_iter()
        .collect()
}

/// The logged-in principal of a form post whose CSRF token matches its session.
/// No session: to the login page; a missing or wrong token: 403.
pub fn form_principal(
    ui: &Ui,
    headers: &HeaderMap,
    fields: &HashMap<String, String>,
    back: &str,
) -> Result<Principal, Refused> {
    let v = viewer(ui, headers);
    let (Some(p), Some(csrf)) = (v.principal, v.csrf) else {
        return Err(Refused::Login(login_url(back)));
    };
    match fields.get("csrf") {
        Some(sent) if same(sent, &csrf) => Ok(p),
        _ => {
            tracing::warn!(token.name = %p.name, "form post refused: csrf token missing or wrong");
            Err(Refused::Csrf)
        }
    }
}

/// Why a form post was refused.
#[derive(Debug)]
pub enum Refused {
    /// Not logged in: to this login URL.
    Login(String),
    /// The CSRF token was missing or wrong.
    Csrf,
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::Login(url) => Redirect::to(&url).into_response(),
            Refused::Csrf => (
                StatusCode::FORBIDDEN,
                "forbidden: missing or invalid csrf token\n",
            )
                .into_response(),
        }
    }
}

pub fn login_url(next: &str) -> String {
    format!("/login?next={}", pct(next))
}

/// Percent-encode everything but unreserved characters and `/`.
pub fn pct(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Only same-site paths: `//host` or `/\host` would leave the site.
fn safe_next(next: Option<&String>) -> String {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.starts_with("/\\") => n.clone(),
        _ => "/".to_string(),
    }
}

fn cookie_header(ui: &Ui, name: &str, value: &str, max_age: Option<u64>) -> HeaderValue {
    let secure = if ui.app.public_url.starts_with("https://") {
        "; Secure"
    } else {
        ""
    };
    let age = max_age
        .map(|a| format!("; Max-Age={a}"))
        .unwrap_or_default();
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; HttpOnly; SameSite=Strict{secure}{age}"
    ))
    .expect("cookie values are hex")
}

#[derive(Debug, Deserialize)]
pub struct LoginQuery {
    pub next: Option<String>,
}

/// `GET /login`.
pub async fn login_form(
    State(ui): State<Ui>,
    headers: HeaderMap,
    Query(q): Query<LoginQuery>,
) -> Response {
    let v = viewer(&ui, &headers);
    let next = safe_next(q.next.as_ref());
    let csrf = random_hex(16);
    let mut resp = pages::login_page(&v, &csrf, &next, None).into_response();
    resp.headers_mut().append(
        header::SET_COOKIE,
        cookie_header(&ui, LOGIN_COOKIE, &csrf, Some(600)),
    );
    resp
}

/// `POST /login`: a token in exchange for a session cookie.
pub async fn login(State(ui): State<Ui>, headers: HeaderMap, body: Bytes) -> Response {
    let f = form_fields(&body);
    let next = safe_next(f.get("next"));
    let csrf_ok = match (cookie(&headers, LOGIN_COOKIE), f.get("csrf")) {
        (Some(c), Some(sent)) => same(c, sent),
        _ => false,
    };
    if !csrf_ok {
        return (
            StatusCode::FORBIDDEN,
            "forbidden: missing or invalid csrf token\n",
        )
            .into_response();
    }
    let token = f.get("token").map(String::as_str).unwrap_or("");
    match check_token(ui.app.store.as_ref(), token).await {
        Ok(Some(p)) => {
            tracing::info!(token.id = p.token_id, token.name = %p.name, "ui login");
            let (id, _) = ui.sessions.create(p);
            let mut resp = Redirect::to(&next).into_response();
            let h = resp.headers_mut();
            h.append(
                header::SET_COOKIE,
                cookie_header(&ui, SESSION_COOKIE, &id, Some(SESSION_TTL.as_secs())),
            );
            h.append(
                header::SET_COOKIE,
                cookie_header(&ui, LOGIN_COOKIE, "", Some(0)),
            );
            resp
        }
        Ok(None) => {
            tracing::warn!("ui login with an unknown token");
            let csrf = random_hex(16);
            let mut resp = (
                StatusCode::UNAUTHORIZED,
                pages::login_page(&Viewer::default(), &csrf, &next, Some("unknown token")),
            )
                .into_response();
            resp.headers_mut().append(
                header::SET_COOKIE,
                cookie_header(&ui, LOGIN_COOKIE, &csrf, Some(600)),
            );
            resp
        }
        Err(e) => PageError::Store(e).into_response(),
    }
}

/// `POST /logout`.
pub async fn logout(State(ui): State<Ui>, headers: HeaderMap, body: Bytes) -> Response {
    let fields = form_fields(&body);
    if let Err(refused) = form_principal(&ui, &headers, &fields, "/") {
        return refused.into_response();
    }
    if let Some(id) = viewer(&ui, &headers).session {
        ui.sessions.remove(&id);
    }
    let mut resp = Redirect::to("/").into_response();
    resp.headers_mut().append(
        header::SET_COOKIE,
        cookie_header(&ui, SESSION_COOKIE, "", Some(0)),
    );
    resp
}

/// Paths that stay open with `require_login`: the login itself, assets, the forge's
/// webhook (signed), health and metrics (scraped by machines).
fn always_open(path: &str) -> bool {
    path == "/login"
        || path.starts_with("/assets/")
        || path.starts_with("/hooks/")
        || path == "/healthz"
        || path == "/metrics"
}

/// Every response: security headers; with `require_login`, reading needs a session
/// (pages) or a bearer token or session (API).
pub async fn gate(State(ui): State<Ui>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    if ui.config.require_login && !always_open(&path) && req.method() != Method::OPTIONS {
        let logged_in = viewer(&ui, req.headers()).principal.is_some()
            || (path.starts_with("/api/") && bearer(&ui.app, req.headers()).await.is_ok());
        if !logged_in {
            if path.starts_with("/api/") {
                return unauthorized(AuthError::Missing);
            }
            let back = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or(path);
            return Redirect::to(&login_url(&back)).into_response();
        }
    }
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    // Scripts only from our own assets: even a missed escape could not run code.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
             img-src 'self' data:; object-src 'none'; base-uri 'none'; \
             form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    resp
}

/// A 401 for the API, with the challenge a client expects.
pub fn unauthorized(e: AuthError) -> Response {
    let status = match e {
        AuthError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::UNAUTHORIZED,
    };
    let mut resp = (
        status,
        axum::Json(serde_json::json!({"error": e.to_string()})),
    )
        .into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"slate\""),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_and_next() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "a=1; slate_session=abc; b=2".parse().unwrap(),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("abc"));
        assert_eq!(safe_next(Some(&"//evil".to_string())), "/");
        assert_eq!(safe_next(Some(&"/jobs/1".to_string())), "/jobs/1");
        assert_eq!(pct("/jobs/1?x=a b"), "/jobs/1%3Fx%3Da%20b");
        assert_eq!(hash_token("x").len(), 64);
    }
}
