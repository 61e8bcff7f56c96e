//! A small OpenWhisk REST client: actions (put, list) and activations (invoke, get).

use std::time::{Duration, Instant};

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// How to reach the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// Base URL, e.g. `http://127.0.0.1:3233` (the `/api/v1` prefix is added).
    pub base_url: String,
    /// `uuid:key` for HTTP basic auth.
    pub auth: String,
    /// Namespace in URLs (default `_`: the caller's).
    pub namespace: String,
    /// Per-request timeout (default 90 s: above OpenWhisk's 60 s blocking wait).
    pub timeout: Duration,
}

impl ClientConfig {
    /// A config with the default namespace and timeout.
    pub fn new(base_url: impl Into<String>, auth: impl Into<String>) -> Self {
        ClientConfig {
            base_url: base_url.into(),
            auth: auth.into(),
            namespace: "_".into(),
            timeout: Duration::from_secs(90),
        }
    }
}

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The auth string is not `uuid:key`.
    #[error("auth must be \"uuid:key\"")]
    Auth,
    /// The base URL is not http(s).
    #[error("base url must start with http:// or https://: {0:?}")]
    Url(String),
    /// reqwest could not build its client.
    #[error("building the http client")]
    Build(#[source] reqwest::Error),
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// Connection, timeout or protocol failure.
    #[error("{method} {url}")]
    Transport {
        /// HTTP method.
        method: &'static str,
        /// URL.
        url: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// The API answered with an error status.
    #[error("http {status}: {error}")]
    Status {
        /// HTTP status.
        status: u16,
        /// The `error` field (or the body).
        error: String,
        /// The `code` field, if any.
        code: Option<String>,
    },
    /// The body is not what OpenWhisk returns.
    #[error("http {status}: unexpected body: {body}")]
    Decode {
        /// HTTP status.
        status: u16,
        /// The body (truncated to 500 characters).
        body: String,
    },
}

impl RequestError {
    /// The HTTP status, if the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            RequestError::Status { status, .. } | RequestError::Decode { status, .. } => {
                Some(*status)
            }
            RequestError::Transport { .. } => None,
        }
    }
}

/// An `{key, value}` annotation or parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyValue {
    /// Key.
    pub key: String,
    /// Value.
    pub value: Value,
}

/// `exec` of an action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecSpec {
    /// Runtime kind, e.g. `python:3`.
    pub kind: String,
    /// Source text, or base64 of a zip when `binary`.
    pub code: String,
    /// Whether `code` is a base64 zip.
    pub binary: bool,
    /// Entry point (default `main`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub main: Option<String>,
}

/// `limits` of an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitsSpec {
    /// Milliseconds.
    pub timeout: u64,
    /// MiB.
    pub memory: u64,
}

/// The body of `PUT /actions/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionSpec {
    /// Code.
    pub exec: ExecSpec,
    /// Limits.
    pub limits: LimitsSpec,
    /// Default parameters.
    #[serde(default)]
    pub parameters: Vec<KeyValue>,
    /// Annotations.
    #[serde(default)]
    pub annotations: Vec<KeyValue>,
}

/// One entry of `GET /actions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionSummary {
    /// Name.
    pub name: String,
    /// Namespace.
    #[serde(default)]
    pub namespace: String,
    /// Version.
    #[serde(default)]
    pub version: String,
    /// Limits, if listed.
    #[serde(default)]
    pub limits: Option<LimitsSpec>,
}

/// `response` of an activation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActivationResponse {
    /// `success`, `application error`, `action developer error` or `whisk internal error`.
    pub status: String,
    /// 0..=3.
    #[serde(rename = "statusCode", default)]
    pub status_code: Option<u8>,
    /// Whether it succeeded.
    #[serde(default)]
    pub success: Option<bool>,
    /// The action's result.
    #[serde(default)]
    pub result: Value,
}

/// An activation record as OpenWhisk returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActivationRecord {
    /// Id.
    #[serde(rename = "activationId")]
    pub activation_id: String,
    /// Action name.
    #[serde(default)]
    pub name: String,
    /// Start, ms since the epoch.
    #[serde(default)]
    pub start: Option<u64>,
    /// End, ms since the epoch.
    #[serde(default)]
    pub end: Option<u64>,
    /// Duration, ms.
    #[serde(default)]
    pub duration: Option<u64>,
    /// Result.
    pub response: ActivationResponse,
    /// Annotations (`startKind`, `initTime`, `waitTime`, ...).
    #[serde(default)]
    pub annotations: Vec<KeyValue>,
}

impl ActivationRecord {
    /// An annotation's value.
    pub fn annotation(&self, key: &str) -> Option<&Value> {
        self.annotations
            .iter()
            .find(|kv| kv.key == key)
            .map(|kv| &kv.value)
    }

    /// `startKind` (`cold`, `warm`, `dedup`, ...); without it, `cold` if `initTime` is present
    /// (stock OpenWhisk), else `warm`.
    pub fn start_kind(&self) -> String {
        match self.annotation("startKind").and_then(Value::as_str) {
            Some(k) => k.to_string(),
            None if self.init_time_ms().is_some() => "cold".into(),
            None => "warm".into(),
        }
    }

    /// `initTime`, ms.
    pub fn init_time_ms(&self) -> Option<f64> {
        self.annotation("initTime").and_then(Value::as_f64)
    }

    /// `waitTime`, ms.
    pub fn wait_time_ms(&self) -> Option<f64> {
        self.annotation("waitTime").and_then(Value::as_f64)
    }

    /// Whether the activation succeeded.
    pub fn succeeded(&self) -> bool {
        self.response
            .success
            .unwrap_or(self.response.status == "success")
    }
}

/// The outcome of an invoke request.
#[derive(Debug, Clone, PartialEq)]
pub enum Invoked {
    /// The activation finished within the blocking wait (HTTP 200, or 502 for a failed action).
    Completed {
        /// The record.
        record: Box<ActivationRecord>,
        /// HTTP status.
        http_status: u16,
    },
    /// Accepted (HTTP 202): non-blocking, or the blocking wait expired.
    Accepted {
        /// The id to poll.
        activation_id: String,
    },
}

/// An OpenWhisk REST client. Cheap to clone (one connection pool).
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    api: String,
    user: String,
    key: String,
    namespace: String,
}

impl Client {
    /// Builds a client.
    pub fn new(cfg: &ClientConfig) -> Result<Self, ClientError> {
        let (user, key) = cfg.auth.split_once(':').ok_or(ClientError::Auth)?;
        if user.is_empty() || key.is_empty() {
            return Err(ClientError::Auth);
        }
        let base = cfg.base_url.trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ClientError::Url(cfg.base_url.clone()));
        }
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .pool_max_idle_per_host(1024)
            .tcp_nodelay(true)
            .build()
            .map_err(ClientError::Build)?;
        Ok(Client {
            http,
            api: format!("{base}/api/v1"),
            user: user.to_string(),
            key: key.to_string(),
            namespace: cfg.namespace.clone(),
        })
    }

    fn url(&self, tail: &str) -> String {
        format!("{}/namespaces/{}/{tail}", self.api, self.namespace)
    }

    async fn send(
        &self,
        method: &'static str,
        url: String,
        body: Option<&Value>,
    ) -> Result<(u16, Value), RequestError> {
        let m = match method {
            "PUT" => reqwest::Method::PUT,
            "POST" => reqwest::Method::POST,
            "DELETE" => reqwest::Method::DELETE,
            _ => reqwest::Method::GET,
        };
        let mut req = self
            .http
            .request(m, &url)
            .basic_auth(&self.user, Some(&self.key));
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|source| RequestError::Transport {
            method,
            url: url.clone(),
            source,
        })?;
        let status = resp.status().as_u16();
        let bytes = resp
            .bytes()
            .await
            .map_err(|source| RequestError::Transport {
                method,
                url,
                source,
            })?;
        let value: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).map_err(|_| RequestError::Decode {
                status,
                body: String::from_utf8_lossy(&bytes).chars().take(500).collect(),
            })?
        };
        Ok((status, value))
    }

    fn status_error(status: u16, body: &Value) -> RequestError {
        RequestError::Status {
            status,
            error: body
                .get("error")
                .and_then(Value::as_str)
                .map_or_else(|| body.to_string(), str::to_string),
            code: body
                .get("code")
                .map(|c| c.as_str().map_or_else(|| c.to_string(), str::to_string)),
        }
    }

    /// `PUT /actions/{name}?overwrite=true`; returns the stored action as JSON.
    pub async fn put_action(&self, name: &str, spec: &ActionSpec) -> Result<Value, RequestError> {
        let body = serde_json::to_value(spec).map_err(|e| RequestError::Decode {
            status: 0,
            body: e.to_string(),
        })?;
        let (status, v) = self
            .send(
                "PUT",
                self.url(&format!("actions/{name}?overwrite=true")),
                Some(&body),
            )
            .await?;
        if (200..300).contains(&status) {
            Ok(v)
        } else {
            Err(Self::status_error(status, &v))
        }
    }

    /// `GET /actions`.
    pub async fn list_actions(&self) -> Result<Vec<ActionSummary>, RequestError> {
        let (status, v) = self
            .send("GET", self.url("actions?limit=200"), None)
            .await?;
        if !(200..300).contains(&status) {
            return Err(Self::status_error(status, &v));
        }
        serde_json::from_value(v.clone()).map_err(|_| RequestError::Decode {
            status,
            body: v.to_string(),
        })
    }

    /// `POST /actions/{name}?blocking=B` with `params` as the body.
    pub async fn invoke(
        &self,
        name: &str,
        params: &Map<String, Value>,
        blocking: bool,
    ) -> Result<Invoked, RequestError> {
        let body = Value::Object(params.clone());
        let (status, v) = self
            .send(
                "POST",
                self.url(&format!("actions/{name}?blocking={blocking}")),
                Some(&body),
            )
            .await?;
        let is_record = v.get("activationId").is_some() && v.get("response").is_some();
        match status {
            200 | 502 if is_record => {
                let record =
                    serde_json::from_value(v.clone()).map_err(|_| RequestError::Decode {
                        status,
                        body: v.to_string().chars().take(500).collect(),
                    })?;
                Ok(Invoked::Completed {
                    record: Box::new(record),
                    http_status: status,
                })
            }
            202 => match v.get("activationId").and_then(Value::as_str) {
                Some(id) => Ok(Invoked::Accepted {
                    activation_id: id.to_string(),
                }),
                None => Err(RequestError::Decode {
                    status,
                    body: v.to_string(),
                }),
            },
            _ => Err(Self::status_error(status, &v)),
        }
    }

    /// `GET /activations/{id}`; `Ok(None)` while it is not recorded yet (404).
    pub async fn get_activation(&self, id: &str) -> Result<Option<ActivationRecord>, RequestError> {
        let (status, v) = self
            .send("GET", self.url(&format!("activations/{id}")), None)
            .await?;
        match status {
            200..=299 => {
                serde_json::from_value(v.clone())
                    .map(Some)
                    .map_err(|_| RequestError::Decode {
                        status,
                        body: v.to_string().chars().take(500).collect(),
                    })
            }
            404 => Ok(None),
            _ => Err(Self::status_error(status, &v)),
        }
    }

    /// Polls an accepted activation every `every` until it is recorded or `deadline` passes.
    pub async fn wait_activation(
        &self,
        id: &str,
        every: Duration,
        deadline: Instant,
    ) -> Result<Option<ActivationRecord>, RequestError> {
        loop {
            if let Some(r) = self.get_activation(id).await? {
                return Ok(Some(r));
            }
            if Instant::now() + every > deadline {
                return Ok(None);
            }
            tokio::time::sleep(every).await;
        }
    }
}

/// Base64 of bytes (standard alphabet), as OpenWhisk expects for binary code.
pub fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
