//! The service in-process: `rbdfence::serve::build` and its router on a loopback port, and an
//! HTTP client that carries the configured token.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use rbdfence::config::Config;
use rbdfence::service::Service;
use serde_json::Value;

use super::stack::Stack;

pub struct Running {
    pub base: String,
    pub svc: Arc<Service>,
    pub http: reqwest::Client,
    pub token: Option<String>,
}

impl Running {
    pub async fn start(stack: &Stack) -> Running {
        let cfg = Config::load(&stack.config).unwrap();
        let svc = rbdfence::serve::build(cfg).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = rbdfence::api::router(svc.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        Running {
            base: format!("http://{addr}"),
            token: svc.token.clone(),
            svc,
            http,
        }
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let mut r = self.http.post(format!("{}{path}", self.base)).json(body);
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let mut r = self.http.get(format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        let resp = r.send().await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }

    pub async fn metric(&self, name_and_labels: &str) -> f64 {
        let (_, text) = self.get("/metrics").await;
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name_and_labels)
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }
}
