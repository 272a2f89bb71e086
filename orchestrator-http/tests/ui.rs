//! The dashboard's sign-in, session cookie and CSRF handling (feature `ui`).
#![cfg(feature = "ui")]

mod common;

use axum::body::Body;
use axum::http::{Method, Request};
use common::*;
use serde_json::json;

fn form(path: &str, body: &str, cookie: Option<&str>) -> Request<Body> {
    let mut b = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header("host", "127.0.0.1:18080")
        .header("origin", "http://127.0.0.1:18080")
        .header("content-type", "application/x-www-form-urlencoded");
    if let Some(c) = cookie {
        b = b.header("cookie", format!("orch_session={c}"));
    }
    b.body(Body::from(body.to_string())).unwrap()
}

fn with_cookie(
    method: Method,
    path: &str,
    cookie: &str,
    csrf: Option<&str>,
    body: Option<serde_json::Value>,
) -> Request<Body> {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "127.0.0.1:18080")
        .header("cookie", format!("other=1; orch_session={cookie}"));
    if let Some(c) = csrf {
        b = b.header("x-csrf-token", c);
    }
    match body {
        Some(v) => b.header("content-type", "application/json").body(Body::from(v.to_string())).unwrap(),
        None => b.body(Body::empty()).unwrap(),
    }
}

/// Signs in with `token`; answers the session cookie's value.
async fn sign_in(app: &App, token: &str) -> String {
    let r = send(&app.router, form("/ui/sign-in", &format!("token={token}&next=%2Fui%2Fprojects"), None)).await;
    assert_eq!(r.status.as_u16(), 303, "{}", r.text);
    assert_eq!(r.headers["location"], "/ui/projects");
    let set = r.headers["set-cookie"].to_str().unwrap().to_string();
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age="] {
        assert!(set.contains(flag), "{flag} missing: {set}");
    }
    assert!(!set.contains(token), "the token must not be the cookie: {set}");
    let value = set.strip_prefix("orch_session=").unwrap().split(';').next().unwrap().to_string();
    assert_eq!(value.len(), 64);
    value
}

/// The CSRF token a page carries.
fn csrf_of(html: &str) -> String {
    let at = html.find(r#"name="csrf-token" content=""#).expect("csrf meta") + r#"name="csrf-token" content=""#.len();
    html[at..].split('"').next().unwrap().to_string()
}

#[tokio::test]
async fn sign_in_session_and_csrf() {
    let app = secure_app();
    // Pages need a session: a redirect to the sign-in form, which comes back here.
    let r = get(&app, "/ui/approvals", None).await;
    assert_eq!(r.status.as_u16(), 303);
    assert_eq!(r.headers["location"], "/ui/sign-in?next=/ui/approvals");
    let r = get(&app, "/ui/sign-in", None).await;
    assert_eq!(r.status.as_u16(), 200);
    assert!(r.text.contains(r#"type="password""#) && r.text.contains("Sign in"));
    // A wrong token is refused, without a cookie.
    let r = send(&app.router, form("/ui/sign-in", "token=nope&next=%2Fui", None)).await;
    assert_eq!(r.status.as_u16(), 401);
    assert!(r.headers.get("set-cookie").is_none());
    // A sign-in posted by another site is refused.
    let mut req = form("/ui/sign-in", &format!("token={OPERATOR}"), None);
    req.headers_mut().insert("origin", "http://evil.example".parse().unwrap());
    assert_eq!(send(&app.router, req).await.status.as_u16(), 403);

    let cookie = sign_in(&app, OPERATOR).await;
    let page = send(&app.router, with_cookie(Method::GET, "/ui/projects", &cookie, None, None)).await;
    assert_eq!(page.status.as_u16(), 200, "{}", page.text);
    assert!(page.text.contains("ops (operator)"));
    assert!(page.text.contains("Create project"), "an operator sees the write controls");
    let csrf = csrf_of(&page.text);
    assert_eq!(csrf.len(), 64);
    assert!(page.headers["content-security-policy"].to_str().unwrap().contains("default-src 'self'"));

    // The cookie authenticates API reads…
    let r = send(&app.router, with_cookie(Method::GET, "/projects", &cookie, None, None)).await;
    r.ok(200);
    // …but a write without the CSRF header (or with a wrong one) is refused.
    let body = json!({"name": "web"});
    let r = send(&app.router, with_cookie(Method::POST, "/projects", &cookie, None, Some(body.clone()))).await;
    r.err(403, "forbidden");
    assert!(r.text.contains("X-CSRF-Token"));
    let r =
        send(&app.router, with_cookie(Method::POST, "/projects", &cookie, Some(&"0".repeat(64)), Some(body.clone())))
            .await;
    r.err(403, "forbidden");
    // With it, the write goes through under the token's name.
    let r = send(&app.router, with_cookie(Method::POST, "/projects", &cookie, Some(&csrf), Some(body.clone()))).await;
    let p = r.ok(201);
    let pid = p["id"].as_str().unwrap().to_string();
    let r = send(
        &app.router,
        with_cookie(Method::PUT, &format!("/projects/{pid}/vision"), &cookie, Some(&csrf), Some(json!({"text": "v1"}))),
    )
    .await;
    assert_eq!(r.ok(200)["author"], "ops");
    // A cross-site write is refused even with the right CSRF token.
    let mut req = with_cookie(Method::POST, "/projects", &cookie, Some(&csrf), Some(body.clone()));
    req.headers_mut().insert("origin", "http://evil.example".parse().unwrap());
    send(&app.router, req).await.err(403, "forbidden");
    // The same-origin page may write (its Origin is the server's own).
    let mut req = with_cookie(Method::POST, "/projects", &cookie, Some(&csrf), Some(json!({"name": "web2"})));
    req.headers_mut().insert("origin", "http://127.0.0.1:18080".parse().unwrap());
    send(&app.router, req).await.ok(201);
    // Bearer tokens work as before, without CSRF.
    post(&app, "/projects", Some(OPERATOR), json!({"name": "api"})).await.ok(201);

    // Every page renders for the session.
    for path in [
        "/ui",
        "/ui/projects",
        &format!("/ui/projects/{pid}"),
        "/ui/items",
        "/ui/items/new",
        "/ui/approvals",
        "/ui/questions",
    ] {
        let r = send(&app.router, with_cookie(Method::GET, path, &cookie, None, None)).await;
        assert_eq!(r.status.as_u16(), 200, "{path}: {}", r.text);
        assert_eq!(r.headers["cache-control"], "no-store", "{path}");
    }

    // Sign-out needs the CSRF token, ends the session and clears the cookie.
    let r = send(&app.router, form("/ui/sign-out", "csrf=wrong", Some(&cookie))).await;
    assert_eq!(r.status.as_u16(), 403);
    let r = send(&app.router, form("/ui/sign-out", &format!("csrf={csrf}"), Some(&cookie))).await;
    assert_eq!(r.status.as_u16(), 303);
    assert_eq!(r.headers["location"], "/ui/sign-in");
    assert!(r.headers["set-cookie"].to_str().unwrap().contains("Max-Age=0"));
    let r = send(&app.router, with_cookie(Method::GET, "/projects", &cookie, None, None)).await;
    r.err(401, "unauthorized");
    let r = send(&app.router, with_cookie(Method::GET, "/ui/projects", &cookie, None, None)).await;
    assert_eq!(r.status.as_u16(), 303);
}

#[tokio::test]
async fn a_viewer_sees_no_write_controls_and_cannot_write() {
    let app = secure_app();
    let p = post(&app, "/projects", Some(OPERATOR), json!({"name": "web"})).await.ok(201);
    let pid = p["id"].as_str().unwrap();
    post(&app, &format!("/projects/{pid}/requirements"), Some(OPERATOR), json!({"requirements": [{"title": "Login"}]}))
        .await
        .ok(201);
    let cookie = sign_in(&app, VIEWER).await;
    for path in ["/ui/projects".to_string(), format!("/ui/projects/{pid}"), "/ui/approvals".into(), "/ui/items".into()]
    {
        let page = send(&app.router, with_cookie(Method::GET, &path, &cookie, None, None)).await;
        assert_eq!(page.status.as_u16(), 200, "{path}");
        assert!(page.text.contains("watcher (viewer)"));
        assert!(!page.text.contains("data-api="), "{path} shows a write control to a viewer");
    }
    let page = send(&app.router, with_cookie(Method::GET, "/ui/projects", &cookie, None, None)).await;
    let csrf = csrf_of(&page.text);
    // Even with its CSRF token, the viewer's role may not write.
    let r = send(&app.router, with_cookie(Method::POST, "/projects", &cookie, Some(&csrf), Some(json!({"name": "x"}))))
        .await;
    r.err(403, "forbidden");
    assert!(r.text.contains("viewer"));
    // And without it, refused as well.
    let r = send(&app.router, with_cookie(Method::POST, "/projects", &cookie, None, Some(json!({"name": "x"})))).await;
    r.err(403, "forbidden");
    // It reads through the API with the cookie.
    send(&app.router, with_cookie(Method::GET, "/stats", &cookie, None, None)).await.ok(200);
}

#[tokio::test]
async fn without_tokens_there_is_no_sign_in() {
    let app = open_app();
    let r = get(&app, "/ui/sign-in", None).await;
    assert_eq!(r.status.as_u16(), 303);
    assert_eq!(r.headers["location"], "/ui");
    let r = get(&app, "/ui", None).await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.text);
    assert!(r.text.contains("anonymous (admin)"));
    assert!(!r.text.contains("csrf-token") && !r.text.contains("Sign out"));
    let r = get(&app, "/ui/assets/app.js", None).await;
    assert_eq!(r.status.as_u16(), 200);
    assert!(r.headers["content-type"].to_str().unwrap().starts_with("text/javascript"));
}

#[tokio::test]
async fn pages_under_a_prefix_link_within_it() {
    let dir = tempfile::tempdir().unwrap();
    let orch = std::sync::Arc::new(orchestrator_core::Orchestrator::new(
        sqlite_store(dir.path()),
        orchestrator_core::OrchestratorConfig::default(),
    ));
    let api = orchestrator_http::router_with_metrics(
        orch,
        orchestrator_http::HttpConfig::new(),
        orchestrator_http::Metrics::new(),
    );
    let router = local(axum::Router::new().nest("/api", api));
    let r = send(&router, request(Method::GET, "/api/ui/projects", None, None)).await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.text);
    assert!(r.text.contains(r#"<meta name="api-base" content="/api">"#));
    assert!(r.text.contains(r#"href="/api/ui/items""#));
}
