//! The HTTP API (axum): the contract's routes, request validation, auth, metrics.
//!
//! Every malformed request gets `400` (`401` without a valid token, `413` too large, `415`
//! not JSON) with `{"error":{"code","message","field"}}` naming the field, and nothing is
//! done. Fences answer `200` with the decision, approve or deny.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::config::valid_host_uuid;
use crate::fence::driver::FenceRequest;
use crate::fence::record::{FenceRecord, FenceView};
use crate::fence::unfence::{Trigger, UnfenceError, unfence_host};
use crate::fence::vm::VmUuid;
use crate::rbd::ImageSpec;
use crate::service::{PreInstantiateError, Service};

/// Most volumes one request may name.
pub const MAX_VOLUMES: usize = 64;

/// An API error: status, a stable code, a message, and the field at fault.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
}

impl ApiError {
    fn bad(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        let field = field.into();
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_request",
            message: format!("{field}: {}", message.into()),
            field: Some(field),
        }
    }

    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": {"code": self.code, "message": self.message}});
        if let Some(f) = self.field {
            body["error"]["field"] = Value::from(f);
        }
        (self.status, axum::Json(body)).into_response()
    }
}

pub fn router(svc: Arc<Service>) -> Router {
    let limit = svc.config.api.max_body_bytes;
    let guarded = Router::new()
        .route("/v1/pre-instantiate", post(pre_instantiate))
        .route("/ha/sibling-fence-vm", post(sibling_fence_vm))
        .route("/v1/images/{pool}/{image}", get(image))
        .route("/v1/fences", get(fences))
        .route("/v1/fences/{id}", get(fence))
        .route("/v1/hosts/{uuid}/unfence", post(unfence))
        .route_layer(middleware::from_fn_with_state(svc.clone(), auth));
    Router::new()
        .merge(guarded)
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(middleware::from_fn_with_state(svc.clone(), count))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(svc)
}

/// Counts every request by route and status class.
async fn count(
    State(svc): State<Arc<Service>>,
    req: axum::extract::Request,
    next: Next,
) -> Response {
    let path = req.uri().path().to_string();
    let route = match path.as_str() {
        "/v1/pre-instantiate" => "pre_instantiate",
        "/ha/sibling-fence-vm" => "sibling_fence_vm",
        "/v1/fences" => "fences",
        "/metrics" => "metrics",
        "/healthz" => "healthz",
        "/readyz" => "readyz",
        p if p.starts_with("/v1/images/") => "image",
        p if p.starts_with("/v1/fences/") => "fence",
        p if p.starts_with("/v1/hosts/") && p.ends_with("/unfence") => "unfence",
        _ => "other",
    };
    let resp = next.run(req).await;
    svc.metrics.http_request(route, resp.status().as_u16());
    resp
}

/// Bearer-token check for /v1 and /ha, when a token is configured.
async fn auth(
    State(svc): State<Arc<Service>>,
    headers: HeaderMap,
    req: axum::extract::Request,
    next: Next,
) -> Response {
    if let Some(token) = &svc.token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong bearer token",
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Whether the given token equals the configured one, in time that depends on neither where
/// they differ nor how long either is: both are hashed (SHA-256) and the digests compared
/// without an early exit.
fn constant_time_eq(given: &[u8], token: &[u8]) -> bool {
    let digest = |b: &[u8]| ring::digest::digest(&ring::digest::SHA256, b);
    let (a, b) = (digest(given), digest(token));
    a.as_ref()
        .iter()
        .zip(b.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// A JSON body: content type, size, syntax and shape checked; errors name the field.
fn json_body<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct
        .split(';')
        .next()
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
    {
        return Err(ApiError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code: "unsupported_media_type",
            message: "Content-Type must be application/json".into(),
            field: Some("Content-Type".into()),
        });
    }
    let body = body.map_err(|e| {
        let status = e.status();
        ApiError::new(
            status,
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                "payload_too_large"
            } else {
                "invalid_body"
            },
            e.body_text(),
        )
    })?;
    parse_json(&body)
}

/// A JSON request body of shape `T`: exactly one value and nothing after it but whitespace;
/// errors name the field.
fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let invalid = |inner: serde_json::Error| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("invalid JSON body: {inner}"),
        )
    };
    let de = &mut serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path.is_empty() || path == "." {
            invalid(inner)
        } else {
            ApiError::bad(path, inner.to_string())
        }
    })?;
    // One object and nothing after it but whitespace: a request is never acted on up to its
    // first object with something else following.
    de.end().map_err(invalid)?;
    Ok(value)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PreInstantiateBody {
    request_id: Option<String>,
    vm_uuid: String,
    failed_host: String,
    target_host: String,
    volumes: Vec<String>,
    #[serde(default)]
    dry_run: bool,
}

fn check_host(field: &str, v: &str) -> Result<String, ApiError> {
    if valid_host_uuid(v) {
        Ok(v.to_string())
    } else {
        Err(ApiError::bad(field, "1-64 characters of A-Z a-z 0-9 . _ -"))
    }
}

fn check_request_id(v: Option<String>) -> Result<Option<String>, ApiError> {
    match v {
        Some(id)
            if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Err(ApiError::bad(
                "request_id",
                "1-128 printable ASCII characters",
            ))
        }
        other => Ok(other),
    }
}

fn check_volumes(
    field: &str,
    volumes: Vec<String>,
    required: bool,
) -> Result<Vec<ImageSpec>, ApiError> {
    if required && volumes.is_empty() {
        return Err(ApiError::bad(
            field,
            "at least one POOL/IMAGE: the volumes are the evidence",
        ));
    }
    if volumes.len() > MAX_VOLUMES {
        return Err(ApiError::bad(
            field,
            format!("at most {MAX_VOLUMES} volumes"),
        ));
    }
    let mut out: Vec<ImageSpec> = Vec::new();
    for (i, v) in volumes.iter().enumerate() {
        let spec: ImageSpec = v.parse().map_err(|e: crate::rbd::ImageSpecError| {
            ApiError::bad(format!("{field}[{i}]"), e.to_string())
        })?;
        if !out.contains(&spec) {
            out.push(spec);
        }
    }
    Ok(out)
}

fn check_vm(field: &str, v: &str) -> Result<VmUuid, ApiError> {
    v.parse()
        .map_err(|e: crate::fence::vm::VmUuidError| ApiError::bad(field, e.to_string()))
}

fn ledger_unavailable(e: crate::fence::ledger::LedgerError) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "ledger_unavailable",
        e.to_string(),
    )
}

fn bounded_fence_timeout(svc: &Service) -> Duration {
    // The engine's own deadline ends every fence; the HTTP bound is only a backstop.
    Duration::from_secs(svc.config.fence.deadline_secs + svc.config.api.request_timeout_secs)
}

async fn run_fence(svc: &Arc<Service>, req: FenceRequest) -> Result<FenceRecord, ApiError> {
    match tokio::time::timeout(bounded_fence_timeout(svc), svc.pre_instantiate(req)).await {
        Ok(Ok(record)) => Ok(record),
        Ok(Err(PreInstantiateError::Reused(reused))) => Err(ApiError {
            status: StatusCode::CONFLICT,
            code: "request_id_reused",
            message: reused.to_string(),
            field: Some("request_id".into()),
        }),
        Ok(Err(e @ PreInstantiateError::Ledger(_))) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ledger_unavailable",
            e.to_string(),
        )),
        Err(_) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            "the fence did not finish in time; it is still recorded when it does",
        )),
    }
}

async fn pre_instantiate(
    State(svc): State<Arc<Service>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let b: PreInstantiateBody = json_body(&headers, body)?;
    let req = pre_instantiate_request(b)?;
    let record = run_fence(&svc, req).await?;
    Ok(axum::Json(record.reply).into_response())
}

/// A pre-instantiate body's fields checked into a fence request.
fn pre_instantiate_request(b: PreInstantiateBody) -> Result<FenceRequest, ApiError> {
    let req = FenceRequest {
        request_id: check_request_id(b.request_id)?,
        vm: check_vm("vm_uuid", &b.vm_uuid)?,
        failed_host: check_host("failed_host", &b.failed_host)?,
        target_host: check_host("target_host", &b.target_host)?,
        volumes: check_volumes("volumes", b.volumes, true)?,
        dry_run: b.dry_run,
    };
    if req.failed_host == req.target_host {
        return Err(ApiError::bad("target_host", "must differ from failed_host"));
    }
    Ok(req)
}

/// The body of `POST /v1/pre-instantiate` decoded and checked as the handler does it, for
/// the fuzz targets: `Err` carries the error reply's code and message.
pub fn decode_pre_instantiate(body: &[u8]) -> Result<FenceRequest, (&'static str, String)> {
    parse_json(body)
        .and_then(pre_instantiate_request)
        .map_err(|e| (e.code, e.message))
}

/// The body of `POST /ha/sibling-fence-vm` decoded and its fields checked as the handler does
/// (before it looks at the inventory), for the fuzz targets.
pub fn decode_sibling_fence(body: &[u8]) -> Result<FenceRequest, (&'static str, String)> {
    let check = || -> Result<FenceRequest, ApiError> {
        let b: SiblingFenceBody = parse_json(body)?;
        check_host("clusterUuid", &b.cluster_uuid)?;
        Ok(FenceRequest {
            request_id: None,
            vm: check_vm("vmUuid", &b.vm_uuid)?,
            failed_host: check_host("failedHostUuid", &b.failed_host_uuid)?,
            target_host: check_host("haTargetHostUuid", &b.ha_target_host_uuid)?,
            volumes: check_volumes("volumes", b.volumes, false)?,
            dry_run: false,
        })
    };
    check().map_err(|e| (e.code, e.message))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SiblingFenceBody {
    failed_host_uuid: String,
    vm_uuid: String,
    cluster_uuid: String,
    ha_target_host_uuid: String,
    #[serde(default)]
    volumes: Vec<String>,
}

/// ZStack's sibling-fence message shape, on the same engine.
async fn sibling_fence_vm(
    State(svc): State<Arc<Service>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let b: SiblingFenceBody = json_body(&headers, body)?;
    let failed_host = check_host("failedHostUuid", &b.failed_host_uuid)?;
    let cluster = check_host("clusterUuid", &b.cluster_uuid)?;
    let target_host = check_host("haTargetHostUuid", &b.ha_target_host_uuid)?;
    if failed_host == target_host {
        return Err(ApiError::bad(
            "haTargetHostUuid",
            "must differ from failedHostUuid",
        ));
    }
    if let Some(h) = svc.engine.inventory.get(&failed_host)
        && h.cluster != cluster
    {
        return Err(ApiError::bad(
            "clusterUuid",
            format!(
                "host {failed_host} is in cluster {}, not {cluster}",
                h.cluster
            ),
        ));
    }
    let req = FenceRequest {
        request_id: None,
        vm: check_vm("vmUuid", &b.vm_uuid)?,
        failed_host,
        target_host,
        volumes: check_volumes("volumes", b.volumes, svc.config.zstack.require_volumes)?,
        dry_run: false,
    };
    let r = run_fence(&svc, req).await?.reply;
    let approved = r.approved();
    let kill = r.evidence.kill.clone();
    // Alive unless the scan confirmed the qemu gone: an approval on the storage fence alone
    // says nothing of the process (it may be alive but unable to write).
    let gone = approved
        && matches!(
            r.outcome.as_str(),
            "success-killed" | "success-already-dead"
        );
    Ok(axum::Json(json!({
        "success": approved,
        "error": if approved { Value::Null } else { Value::from(r.message.clone()) },
        "alive": !gone,
        "withoutVolumes": r.evidence.without_volumes,
        "scope": r.evidence.blocklist.as_ref().map(|b| b.scope),
        "killed": kill.as_ref().is_some_and(|k| k.killed),
        "sshReachable": kill.as_ref().is_some_and(|k| k.ssh_reachable),
        "qemuFound": kill.as_ref().is_some_and(|k| k.qemu_found),
        "executorHostUuid": kill.as_ref().and_then(|k| k.executor.clone()),
        "executorRole": kill.as_ref().map(|k| k.role),
        "reason": r.reason,
        "fenceId": r.fence_id,
        "outcome": r.outcome,
    }))
    .into_response())
}

async fn image(
    State(svc): State<Arc<Service>>,
    Path((pool, image)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let spec: ImageSpec = format!("{pool}/{image}")
        .parse()
        .map_err(|e: crate::rbd::ImageSpecError| ApiError::bad("image", e.to_string()))?;
    let ceph = svc.link.ceph().map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ceph_unavailable",
            e.to_string(),
        )
    })?;
    match ceph.image_status(&spec).await {
        Ok(status) => Ok(axum::Json(crate::cli::watchers_json(&spec, &status)).into_response()),
        Err(e) if e.is_not_found() => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "image_not_found",
            e.to_string(),
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ceph_unavailable",
            e.to_string(),
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FencesQuery {
    limit: Option<usize>,
}

async fn fences(
    State(svc): State<Arc<Service>>,
    q: Result<Query<FencesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad("limit", e.body_text()))?;
    let limit = q
        .limit
        .unwrap_or(100)
        .min(crate::fence::ledger::MEMORY_LIMIT);
    let ledger = &svc.engine.ledger;
    let fences = ledger.recent(limit).await.map_err(ledger_unavailable)?;
    let unfences = ledger.unfences(None).await.map_err(ledger_unavailable)?;
    let fences: Vec<FenceView> = fences
        .into_iter()
        .map(|r| FenceView {
            state: r.state(&unfences),
            record: r,
        })
        .collect();
    Ok(axum::Json(json!({ "fences": fences })).into_response())
}

async fn fence(
    State(svc): State<Arc<Service>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match svc
        .engine
        .ledger
        .get(&id)
        .await
        .map_err(ledger_unavailable)?
    {
        Some(r) => {
            let unfences = svc
                .engine
                .ledger
                .unfences(Some(&r.failed_host))
                .await
                .map_err(ledger_unavailable)?;
            let view = FenceView {
                state: r.state(&unfences),
                record: r,
            };
            Ok(axum::Json(view).into_response())
        }
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "fence_not_found",
            format!("no fence {id:?} in the ledger"),
        )),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct UnfenceBody {
    /// Lift even though a fence of this host approved without seeing its VM's qemu gone.
    #[serde(default)]
    force: bool,
}

/// Lifts the blocklist entries this service's fences of a host made (never anyone else's),
/// once its VMs are confirmed gone, and records the unfence in the ledger. Refused while a
/// fence of the host approved on the blocklist alone (its VM never seen gone: `force` skips
/// that proof, and is recorded as forced), and always while a fence of the host is in flight.
async fn unfence(
    State(svc): State<Arc<Service>>,
    Path(uuid): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let uuid = check_host("uuid", &uuid)?;
    let has_body = body.as_ref().map(|b| !b.is_empty()).unwrap_or(true);
    let opts: UnfenceBody = if has_body {
        json_body(&headers, body)?
    } else {
        UnfenceBody::default()
    };
    if svc.engine.inventory.get(&uuid).is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_host",
            format!("host {uuid} is not in the inventory"),
        ));
    }
    // No fence of the host runs in this instance meanwhile (nor, by the lease below, in any).
    let Some(_lifting) = svc.lift_lock(&uuid) else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "fence_in_flight",
            format!(
                "a fence of {uuid} is running; its approval would rest on entries lifted under it"
            ),
        ));
    };
    let ceph = svc.link.ceph().map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ceph_unavailable",
            e.to_string(),
        )
    })?;
    // No fence of the host runs meanwhile, in any instance.
    let _lease = svc
        .host_lease(&uuid)
        .await
        .map_err(|why| ApiError::new(StatusCode::CONFLICT, "fence_in_flight", why))?;
    let trigger = Trigger::Api { force: opts.force };
    let quiet = svc.config.fence.lift_quiet();
    let record = match unfence_host(&svc.engine.ledger, &ceph, &uuid, trigger, quiet).await {
        Ok(r) => r,
        Err(e @ UnfenceError::Quiet { .. }) => {
            return Err(ApiError {
                status: StatusCode::CONFLICT,
                code: "quiet_period",
                message: e.to_string(),
                field: Some("force".into()),
            });
        }
        Err(e @ UnfenceError::Unconfirmed { .. }) => {
            return Err(ApiError {
                status: StatusCode::CONFLICT,
                code: "vms_not_confirmed_gone",
                message: e.to_string(),
                field: Some("force".into()),
            });
        }
        Err(UnfenceError::Ledger(e)) => return Err(ledger_unavailable(e)),
        Err(UnfenceError::Ceph(e)) => {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "blocklist_failed",
                e.to_string(),
            ));
        }
    };
    svc.metrics.entries_lifted(&record.lifted);
    svc.metrics.unfenced(&record.trigger);
    Ok(axum::Json(
        json!({"host": uuid, "unfence_id": record.unfence_id, "trigger": record.trigger,
                          "fences": record.fences, "lifted": record.lifted}),
    )
    .into_response())
}

async fn metrics(State(svc): State<Arc<Service>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        svc.metrics.encode(),
    )
        .into_response()
}

/// Ready when connected to Ceph as a user that may add blocklist entries and ranges; the body
/// says why not (or what the user lacks).
async fn readyz(State(svc): State<Arc<Service>>) -> Response {
    let r = svc.link.readiness();
    if r.ready {
        (StatusCode::OK, format!("ready: {}\n", r.why)).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", r.why),
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_compare_is_exact_whatever_the_lengths() {
        let token = b"s3cret-token-for-tests-0123456789";
        assert!(constant_time_eq(token, token));
        assert!(!constant_time_eq(b"", token));
        assert!(
            !constant_time_eq(&token[..token.len() - 1], token),
            "a prefix"
        );
        let mut longer = token.to_vec();
        longer.push(b'x');
        assert!(!constant_time_eq(&longer, token), "a longer token");
        for i in 0..token.len() {
            let mut flipped = token.to_vec();
            flipped[i] ^= 1;
            assert!(!constant_time_eq(&flipped, token), "one bit at byte {i}");
        }
    }

    #[test]
    fn a_body_must_be_one_json_object_and_nothing_after_it() {
        let good = br#"{"vm_uuid":"0b6e3f4e-9a51-4c55-8d3a-1f2e3d4c5b6a","failed_host":"h1","target_host":"h2","volumes":["rbd/a"]}"#;
        assert!(decode_pre_instantiate(good).is_ok());
        let mut spaced = good.to_vec();
        spaced.extend_from_slice(b" \n\t");
        assert!(decode_pre_instantiate(&spaced).is_ok(), "whitespace after");
        for tail in [&b"x"[..], b"{}", b" {\"dry_run\":true}", b"\n]"] {
            let mut bad = good.to_vec();
            bad.extend_from_slice(tail);
            let Err((code, message)) = decode_pre_instantiate(&bad) else {
                panic!("{tail:?} after the object was accepted");
            };
            assert_eq!(code, "invalid_request");
            assert!(message.contains("trailing"), "{message}");
        }
    }
}
