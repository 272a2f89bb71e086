//! Browser sessions of the dashboard: a sign-in with an API token creates a server-side session whose random
//! id is the `orch_session` cookie (HttpOnly, SameSite=Strict); the store keeps only the SHA-256 of that id,
//! the caller it stands for and a random CSRF token. The API guard accepts the cookie for every route the
//! token's role may call, but a cookie-authenticated write (any method but GET, HEAD and OPTIONS) must carry
//! the session's CSRF token in the `X-CSRF-Token` header.
#![cfg_attr(not(feature = "ui"), allow(dead_code))]

use crate::config::Principal;
use crate::error::ApiError;
use axum::extract::Request;
use axum::http::{header, HeaderMap, Method};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The session cookie's name.
pub const COOKIE: &str = "orch_session";
/// The header carrying the CSRF token of a cookie-authenticated write.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a session lasts after sign-in.
pub const LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// At most this many live sessions; the oldest goes first.
const MAX_SESSIONS: usize = 10_000;

/// One signed-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    /// Who it is (the token's name and role).
    pub principal: Principal,
    /// The token writes must echo (`X-CSRF-Token` header, or the `csrf` form field of the sign-out form).
    pub csrf: String,
    created: Instant,
}

/// The server-side session store (in memory: sessions end with the process).
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<[u8; 32], Session>>,
}

fn digest(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

/// 32 bytes from the operating system's generator, as 64 hex digits.
pub(crate) fn random_hex() -> Result<String, getrandom::Error> {
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b)?;
    Ok(hex::encode(b))
}

/// Compares without an early exit (the CSRF token is a secret).
pub(crate) fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Sessions {
    /// Creates a session for `principal`; returns its cookie value and the session, or why the system's
    /// random number generator could not make its secrets.
    pub fn create(&self, principal: Principal) -> Result<(String, Session), getrandom::Error> {
        let id = random_hex()?;
        let session = Session { principal, csrf: random_hex()?, created: Instant::now() };
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, s| s.created.elapsed() < LIFETIME);
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map.iter().min_by_key(|(_, s)| s.created).map(|(k, _)| *k) {
                map.remove(&oldest);
            }
        }
        map.insert(digest(&id), session.clone());
        Ok((id, session))
    }

    /// The live session of a cookie value.
    pub fn get(&self, id: &str) -> Option<Session> {
        let key = digest(id);
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&key) {
            Some(s) if s.created.elapsed() < LIFETIME => Some(s.clone()),
            Some(_) => {
                map.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Ends a session.
    pub fn remove(&self, id: &str) {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).remove(&digest(id));
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub(crate) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// The session of the request's cookie, if any and live.
pub(crate) fn of_headers(sessions: &Sessions, headers: &HeaderMap) -> Option<Session> {
    cookie(headers, COOKIE).filter(|v| !v.is_empty()).and_then(|v| sessions.get(v))
}

/// For the API guard, when the request has no bearer token: the session cookie's caller (`Ok(None)`
/// without a cookie). An unknown or expired session answers 401; a write without the session's CSRF
/// token answers 403.
pub(crate) fn authenticate(sessions: &Sessions, req: &Request) -> Result<Option<Principal>, Box<Response>> {
    let Some(id) = cookie(req.headers(), COOKIE).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let Some(session) = sessions.get(id) else {
        return Err(Box::new(ApiError::unauthorized("the session has ended; sign in again").into_response()));
    };
    if !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        let sent = req.headers().get(CSRF_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !same_secret(sent.trim(), &session.csrf) {
            tracing::warn!(principal = %session.principal.name, "cookie-authenticated write without its CSRF token");
            return Err(Box::new(
                ApiError::forbidden(
                    "a write authenticated by the session cookie needs the session's X-CSRF-Token header",
                )
                .into_response(),
            ));
        }
    }
    Ok(Some(session.principal))
}

/// Whether `origin` (`scheme://host[:port]`) names the host the request was sent to (a same-origin call
/// of the dashboard's own pages).
pub(crate) fn same_origin(origin: &str, headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let authority = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"));
    authority.is_some_and(|a| !host.is_empty() && a.eq_ignore_ascii_case(host.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Role;
    use axum::http::HeaderValue;

    #[test]
    fn sessions_and_cookies() {
        let s = Sessions::default();
        let (id, sess) = s.create(Principal { name: "a".into(), role: Role::Viewer }).unwrap();
        assert_eq!(id.len(), 64);
        assert_ne!(id, sess.csrf);
        assert_eq!(s.get(&id).unwrap().principal.name, "a");
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_str(&format!("x=1; {COOKIE}={id}; y=2")).unwrap());
        assert!(of_headers(&s, &h).is_some());
        s.remove(&id);
        assert!(s.get(&id).is_none());
        assert!(same_secret("abc", "abc") && !same_secret("abc", "abd") && !same_secret("abc", "ab"));
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:18080"));
        assert!(same_origin("http://127.0.0.1:18080", &h));
        assert!(!same_origin("http://evil.example", &h));
    }
}
