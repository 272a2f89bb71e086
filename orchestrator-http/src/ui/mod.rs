//! The web dashboard under `/ui` (feature `ui`): server-rendered HTML (maud) over the same state as the
//! API, with a small script (`assets/app.js`) that sends the forms to the JSON API, refreshes the live parts
//! of a page and follows a run's log over server-sent events. The stylesheet and the script are compiled in
//! (`include_str!`); nothing is loaded from elsewhere.
//!
//! Authentication: with tokens configured, `/ui/sign-in` takes a token and starts a server-side session
//! ([`crate::session`]): its cookie is HttpOnly and SameSite=Strict, and writes made with it need the
//! session's CSRF token (the pages carry it in `<meta name="csrf-token">`). Without tokens the pages, like
//! the API, serve loopback peers only and there is no sign-in.

mod pages;

use crate::config::{Principal, Role};
use crate::error::ApiError;
use crate::session::{self, Session};
use crate::AppState;
use axum::body::Bytes;
use axum::extract::{OriginalUri, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use maud::{html, Markup, DOCTYPE};
use serde::Deserialize;
use std::sync::Arc;

const CSS: &str = include_str!("assets/app.css");
const JS: &str = include_str!("assets/app.js");

/// Who is looking at a page, and where the API is.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    /// The path the API router is mounted at (`""` at the root; the dashboard is at `{prefix}/ui`).
    pub prefix: String,
    pub principal: Principal,
    /// The session's CSRF token (with sign-in).
    pub csrf: Option<String>,
    /// Whether sign-in is in use (tokens configured).
    pub auth: bool,
}

impl Ctx {
    /// Whether the caller may use write controls (operators and admins).
    pub fn can_operate(&self) -> bool {
        matches!(self.principal.role, Role::Admin | Role::Operator)
    }

    /// A dashboard path.
    pub fn ui(&self, path: &str) -> String {
        format!("{}/ui{}", self.prefix, path)
    }
}

/// The API mount point, from the original path and the path inside `/ui`.
fn prefix_of(original: &str, inner: &str) -> String {
    let rest = if inner == "/" { "" } else { inner };
    let base = original.strip_suffix(rest).unwrap_or(original).trim_end_matches('/');
    base.strip_suffix("/ui").unwrap_or("").to_string()
}

fn prefix_of_req(req: &Request) -> String {
    let inner = req.uri().path().to_string();
    match req.extensions().get::<OriginalUri>() {
        Some(o) => prefix_of(o.0.path(), &inner),
        None => String::new(),
    }
}

/// The dashboard's router (nested at `/ui` by the API router).
pub(crate) fn router(state: AppState) -> Router<AppState> {
    let pages = Router::new()
        .route("/", get(pages::overview))
        .route("/projects", get(pages::projects))
        .route("/projects/{id}", get(pages::project))
        .route("/items", get(pages::board))
        .route("/items/new", get(pages::item_new))
        .route("/items/{id}", get(pages::item))
        .route("/approvals", get(pages::approvals))
        .route("/questions", get(pages::questions))
        .route("/runs/{id}", get(pages::run))
        .route_layer(from_fn_with_state(state, authenticate));
    Router::new()
        .merge(pages)
        .route("/sign-in", get(sign_in_page).post(sign_in))
        .route("/sign-out", post(sign_out))
        .route("/assets/app.css", get(|| async { asset("text/css; charset=utf-8", CSS) }))
        .route("/assets/app.js", get(|| async { asset("text/javascript; charset=utf-8", JS) }))
        .layer(Extension(Arc::new(pages::Sampler::default())))
        .layer(axum::middleware::from_fn(security_headers))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

/// No framing, no sniffing, nothing loaded from elsewhere.
async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; \
             frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    resp
}

/// The pages' guard: without tokens, loopback only (as the API); with tokens, a live session, else a
/// redirect to the sign-in form.
async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let prefix = prefix_of_req(&req);
    let ctx = if !state.config.auth_enabled() {
        if let Some(refused) = crate::middleware::refuse_without_auth(&req) {
            return refused;
        }
        Ctx { prefix, principal: Principal { name: "anonymous".into(), role: Role::Admin }, csrf: None, auth: false }
    } else {
        match session::of_headers(&state.sessions, req.headers()) {
            Some(Session { principal, csrf, .. }) => Ctx { prefix, principal, csrf: Some(csrf), auth: true },
            None => {
                let here = req.extensions().get::<OriginalUri>().map(|o| o.0.to_string()).unwrap_or_default();
                let to = format!("{prefix}/ui/sign-in?next={}", encode_component(&here));
                return Redirect::to(&to).into_response();
            }
        }
    };
    req.extensions_mut().insert(ctx);
    let mut resp = next.run(req).await;
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Percent-encodes everything but unreserved characters.
pub(crate) fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// ---- sign-in ----

#[derive(Debug, Default, Deserialize)]
struct NextQuery {
    next: Option<String>,
}

/// A `next` target inside the dashboard, else the overview.
fn safe_next(prefix: &str, next: Option<&str>) -> String {
    let home = format!("{prefix}/ui");
    match next {
        Some(n) if n.starts_with(&home) && !n.contains("//") && !n.contains('\\') => n.to_string(),
        _ => home,
    }
}

async fn sign_in_page(State(state): State<AppState>, req: Request) -> Response {
    let prefix = prefix_of_req(&req);
    if !state.config.auth_enabled() {
        return Redirect::to(&format!("{prefix}/ui")).into_response();
    }
    let q: NextQuery = req.uri().query().and_then(|q| serde_urlencoded::from_str(q).ok()).unwrap_or_default();
    let next = safe_next(&prefix, q.next.as_deref());
    Html(sign_in_markup(&prefix, &next, None).into_string()).into_response()
}

/// A page without the navigation (sign-in, errors before a session): the document shell around `main`.
fn bare_page(prefix: &str, title: &str, main: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · orchestrator" }
                link rel="stylesheet" href={(prefix) "/ui/assets/app.css"};
            }
            body { (main) }
        }
    }
}

fn sign_in_markup(prefix: &str, next: &str, error: Option<&str>) -> Markup {
    bare_page(
        prefix,
        "Sign in",
        html! {
            main #main .signin {
                h1 { "orchestrator" }
                p { "Sign in with your API token (" code { "ORCH_API_TOKENS" } "). The token is checked once; the browser keeps only a session cookie." }
                @if let Some(e) = error {
                    p .error role="alert" { (e) }
                }
                form method="post" action={(prefix) "/ui/sign-in"} {
                    input type="hidden" name="next" value=(next);
                    label for="token" { "API token" }
                    input #token type="password" name="token" autocomplete="current-password" required autofocus;
                    button type="submit" { "Sign in" }
                }
            }
        },
    )
}

#[derive(Debug, Deserialize)]
struct SignInForm {
    token: String,
    #[serde(default)]
    next: Option<String>,
}

async fn sign_in(State(state): State<AppState>, OriginalUri(original): OriginalUri, req: Request) -> Response {
    let prefix = prefix_of(original.path(), "/sign-in");
    let peer = crate::middleware::peer_addr(&req).map(|a| a.ip().to_string()).unwrap_or_else(|| "shared".into());
    let (parts, body) = req.into_parts();
    let headers = parts.headers;
    let body = axum::body::to_bytes(body, 64 * 1024).await.unwrap_or_default();
    if !state.config.auth_enabled() {
        return Redirect::to(&format!("{prefix}/ui")).into_response();
    }
    // A sign-in posted from another site's page is refused (login CSRF).
    let origin = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok());
    if let Some(o) = origin {
        if !session::same_origin(o, &headers) && !state.config.origin_allowed(o) {
            return (
                StatusCode::FORBIDDEN,
                Html(sign_in_markup(&prefix, &prefix, Some("Sign-in from another site is refused.")).into_string()),
            )
                .into_response();
        }
    }
    let form: SignInForm = match serde_urlencoded::from_bytes(&body) {
        Ok(f) => f,
        Err(_) => {
            let page = sign_in_markup(&prefix, &format!("{prefix}/ui"), Some("The form could not be read."));
            return (StatusCode::BAD_REQUEST, Html(page.into_string())).into_response();
        }
    };
    let next = safe_next(&prefix, form.next.as_deref());
    if let Some(limiter) = &state.limiter {
        let key = format!("sign-in:{peer}");
        if limiter.check(&key, std::time::Instant::now()).is_err() {
            let page = sign_in_markup(&prefix, &next, Some("Too many attempts; wait a minute."));
            return (StatusCode::TOO_MANY_REQUESTS, Html(page.into_string())).into_response();
        }
    }
    let Some(principal) = state.config.authenticate(form.token.trim()).cloned() else {
        tracing::warn!("dashboard sign-in with an unknown token");
        let page = sign_in_markup(&prefix, &next, Some("Unknown token."));
        return (StatusCode::UNAUTHORIZED, Html(page.into_string())).into_response();
    };
    tracing::info!(principal = %principal.name, role = %principal.role, "dashboard sign-in");
    let id = match state.sessions.create(principal) {
        Ok((id, _)) => id,
        Err(e) => {
            tracing::error!(error = %e, "cannot make a session id");
            let page = sign_in_markup(&prefix, &next, Some("The server cannot make a session now; try again."));
            return (StatusCode::INTERNAL_SERVER_ERROR, Html(page.into_string())).into_response();
        }
    };
    let secure = origin.is_some_and(|o| o.starts_with("https://"));
    let cookie = format!(
        "{}={id}; Path={}; HttpOnly; SameSite=Strict; Max-Age={}{}",
        session::COOKIE,
        if prefix.is_empty() { "/" } else { &prefix },
        session::LIFETIME.as_secs(),
        if secure { "; Secure" } else { "" }
    );
    let mut resp = Redirect::to(&next).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

#[derive(Debug, Default, Deserialize)]
struct SignOutForm {
    #[serde(default)]
    csrf: String,
}

async fn sign_out(
    State(state): State<AppState>,
    OriginalUri(original): OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let prefix = prefix_of(original.path(), "/sign-out");
    let form: SignOutForm = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    if let Some(id) = session::cookie(&headers, session::COOKIE) {
        match state.sessions.get(id) {
            Some(s) if session::same_secret(form.csrf.trim(), &s.csrf) => state.sessions.remove(id),
            Some(_) => {
                return (
                    StatusCode::FORBIDDEN,
                    Html(error_page_markup(&prefix, "Sign-out needs the page's CSRF token.").into_string()),
                )
                    .into_response()
            }
            None => {}
        }
    }
    let cookie = format!(
        "{}=; Path={}; HttpOnly; SameSite=Strict; Max-Age=0",
        session::COOKIE,
        if prefix.is_empty() { "/" } else { &prefix }
    );
    let mut resp = Redirect::to(&format!("{prefix}/ui/sign-in")).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

fn error_page_markup(prefix: &str, message: &str) -> Markup {
    bare_page(
        prefix,
        "Error",
        html! { main #main { p .error role="alert" { (message) } p { a href={(prefix) "/ui"} { "Back to the overview" } } } },
    )
}

// ---- layout ----

/// Which navigation entry a page belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Nav {
    Overview,
    Projects,
    Items,
    Approvals,
    Questions,
}

/// The page frame: header with navigation and who is signed in, the main content.
pub(crate) fn layout(ctx: &Ctx, nav: Nav, title: &str, content: Markup) -> Html<String> {
    let link = |n: Nav, path: &str, label: &str| {
        html! {
            a href=(ctx.ui(path)) aria-current=[(n == nav).then_some("page")] { (label) }
        }
    };
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="api-base" content=(ctx.prefix);
                @if let Some(csrf) = &ctx.csrf { meta name="csrf-token" content=(csrf); }
                title { (title) " · orchestrator" }
                link rel="stylesheet" href=(ctx.ui("/assets/app.css"));
                script src=(ctx.ui("/assets/app.js")) defer {}
            }
            body {
                a .skip href="#main" { "Skip to content" }
                header .top {
                    a .brand href=(ctx.ui("")) { "orchestrator" }
                    nav aria-label="Main" {
                        (link(Nav::Overview, "", "Overview"))
                        (link(Nav::Projects, "/projects", "Projects"))
                        (link(Nav::Items, "/items", "Work items"))
                        (link(Nav::Approvals, "/approvals", "Approvals"))
                        (link(Nav::Questions, "/questions", "Questions"))
                    }
                    div .who {
                        span data-testid="who" { (ctx.principal.name) " (" (ctx.principal.role) ")" }
                        @if ctx.auth {
                            form method="post" action=(ctx.ui("/sign-out")) {
                                input type="hidden" name="csrf" value=[ctx.csrf.as_deref()];
                                button .link type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main #main tabindex="-1" {
                    h1 { (title) }
                    (content)
                }
            }
        }
    };
    Html(page.into_string())
}

/// An error page inside the frame (status kept).
pub(crate) fn error_page(ctx: &Ctx, e: ApiError) -> Response {
    let status = e.status;
    let body = layout(
        ctx,
        Nav::Overview,
        "Something went wrong",
        html! { p .error role="alert" { (e.message) " (" (e.code) ")" } p { a href=(ctx.ui("")) { "Back to the overview" } } },
    );
    (status, body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert_eq!(prefix_of("/ui", "/"), "");
        assert_eq!(prefix_of("/ui/", "/"), "");
        assert_eq!(prefix_of("/ui/projects/1", "/projects/1"), "");
        assert_eq!(prefix_of("/api/ui/projects", "/projects"), "/api");
        assert_eq!(prefix_of("/api/ui", "/"), "/api");
        assert_eq!(safe_next("", Some("/ui/items?x=1")), "/ui/items?x=1");
        assert_eq!(safe_next("", Some("//evil.example/ui")), "/ui");
        assert_eq!(safe_next("", Some("https://evil.example")), "/ui");
    }
}
