//! HTTP basic auth with OpenWhisk's `uuid:key` credentials, cached in memory.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use base64::Engine as _;
use medes_core::Namespace;
use medes_store::ApiKey;

use crate::Shared;
use crate::error::ApiError;

/// The authenticated caller.
#[derive(Debug, Clone)]
pub(crate) struct Caller(pub Arc<CachedKey>);

/// A key as the API keeps it: the store record and its `uuid:key` form.
#[derive(Debug)]
pub(crate) struct CachedKey {
    pub key: ApiKey,
    pub auth: String,
}

impl Caller {
    pub fn namespace(&self) -> &Namespace {
        &self.0.key.namespace
    }

    /// Refuses (403) a caller whose key is not an operator's: `what` names the refused change.
    pub fn require_admin(&self, what: &str) -> Result<(), ApiError> {
        if self.0.key.admin {
            Ok(())
        } else {
            Err(ApiError::new(
                axum::http::StatusCode::FORBIDDEN,
                format!(
                    "{what} needs an operator's key: the platform's default key or a key \
                     configured with `admin = true`."
                ),
            ))
        }
    }

    /// Resolves a namespace path segment: `_` or the caller's own namespace; anything else is
    /// another tenant's and refused with 403.
    pub fn resolve(&self, ns: &str) -> Result<Namespace, ApiError> {
        if ns == "_" || ns == self.namespace().0 {
            Ok(self.namespace().clone())
        } else {
            Err(ApiError::forbidden())
        }
    }
}

/// Compares two secrets in time independent of where they differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl FromRequestParts<Arc<Shared>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &Arc<Shared>) -> Result<Self, ApiError> {
        let value = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(ApiError::unauthorized)?;
        let (scheme, encoded) = value
            .trim()
            .split_once(' ')
            .ok_or_else(ApiError::unauthorized)?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return Err(ApiError::unauthorized());
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|_| ApiError::unauthorized())?;
        let decoded = std::str::from_utf8(&decoded).map_err(|_| ApiError::unauthorized())?;
        let (uuid, secret) = decoded.split_once(':').ok_or_else(ApiError::unauthorized)?;
        let cached = s.keys.read().get(uuid).cloned();
        let entry = match cached {
            Some(k) => k,
            None => {
                let key = s
                    .state
                    .store
                    .lookup_key(uuid)
                    .map_err(|e| ApiError::internal(&e))?
                    .ok_or_else(ApiError::unauthorized)?;
                let auth = key.auth_string();
                let entry = Arc::new(CachedKey { key, auth });
                s.keys.write().insert(uuid.to_owned(), entry.clone());
                entry
            }
        };
        if ct_eq(entry.key.key.as_bytes(), secret.as_bytes()) {
            Ok(Caller(entry))
        } else {
            Err(ApiError::unauthorized())
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ct_eq_compares() {
        assert!(super::ct_eq(b"abc", b"abc"));
        assert!(!super::ct_eq(b"abc", b"abd"));
        assert!(!super::ct_eq(b"abc", b"ab"));
    }
}
