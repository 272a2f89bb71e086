//! The OpenAPI document covers every route the router serves, and the router serves every documented
//! operation.

mod common;

use axum::body::Body;
use axum::http::{Method, Request};
use common::*;
use orchestrator_http::route_list;

fn concrete(path: &str) -> String {
    path.split('/')
        .map(|seg| if seg.starts_with('{') { uuid::Uuid::now_v7().to_string() } else { seg.to_string() })
        .collect::<Vec<_>>()
        .join("/")
}

#[tokio::test]
async fn every_route_is_documented_and_served() {
    let app = open_app();
    let doc = get(&app, "/openapi.json", None).await.ok(200);
    let routes = route_list();
    assert!(routes.len() >= 55, "{} routes", routes.len());
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for (method, path) in &routes {
        let op = &doc["paths"][path][method.to_ascii_lowercase()];
        assert!(op.is_object(), "{method} {path} missing from the document");
        assert!(op["responses"].is_object() && op["summary"].is_string(), "{method} {path}");
        // Every $ref of the operation resolves.
        let text = op.to_string();
        for part in text.split("#/components/schemas/").skip(1) {
            let name: String = part.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            assert!(schemas.contains_key(&name), "{method} {path}: unknown schema {name}");
        }
        // The router answers it (not the "no such route" fallback, not 405).
        let req = Request::builder()
            .method(Method::from_bytes(method.as_bytes()).unwrap())
            .uri(concrete(path))
            .header("content-type", "application/json")
            .body(Body::from("{}"))
            .unwrap();
        let r = send(&app.router, req).await;
        assert_ne!(r.status, 405, "{method} {path}");
        if r.status == 404 {
            assert_ne!(r.json()["error"]["message"], "no such route", "{method} {path} is not routed");
        }
    }
    // And the document has nothing the router lacks.
    let mut documented = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            documented += 1;
            assert!(
                routes.iter().any(|(m, p)| p == path && m.eq_ignore_ascii_case(method)),
                "{method} {path} documented but not routed"
            );
        }
    }
    assert_eq!(documented, routes.len());
    // Schemas' own references resolve too.
    let all = doc["components"].to_string();
    for part in all.split("#/components/schemas/").skip(1) {
        let name: String = part.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        assert!(schemas.contains_key(&name), "unknown schema {name}");
    }
}
