//! Destination adapters: how the request for one delivery is built and how the answer is
//! classified, per destination `kind`. Every adapter ends in the same `Answer` (delivered /
//! retry / permanent), so the dispatcher, lanes, backoff and dead-lettering stay one design.
//! Outcome tables per adapter are in `docs/adapters.md`.
//!
//! Outbound authentication (HelseID client credentials, DPoP for JFT/PMD) is not done here: every
//! request passes through [`authorize`], the hook where a token is attached.

use std::time::{Duration, Instant};

use reqwest::header::LOCATION;
use serde_json::{Value, json};

use super::classify::{self, Class};
use super::client::{self, Answer, Reply};
use crate::config::ValidDestination;
use crate::journal::DeliveryTask;

/// Bytes of an answer read for classification (OperationOutcome, batch-response).
const MAX_BODY: usize = 64 * 1024;

/// Municipality number code system (PMD's `Bundle.meta.tag`).
pub const KOMMUNENUMMER: &str =
    "https://register.geonorge.no/sosi-kodelister/inndelinger/inndelingsbase/kommunenummer";

/// What a destination speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Adapter {
    /// The event's Bundle as is, POSTed to `url` (default).
    FhirBundle,
    /// A FHIR `transaction` Bundle POSTed to the server base `url`.
    FhirRest,
    /// VKP R4: the document Bundle POSTed to `{url}/epj/r4/{orgnr}/bundle`.
    Vkp { orgnr: String },
    /// JFT WriteAPI: `POST {url}/v1/Bundle`, then the status URL polled until journaled.
    Jft { poll: Duration, window: Duration },
    /// PMD: the event's Observations as a `batch` Bundle tagged with the municipality, to `url`.
    Pmd { municipality: String },
}

impl Adapter {
    pub fn name(&self) -> &'static str {
        match self {
            Adapter::FhirBundle => "fhir-bundle",
            Adapter::FhirRest => "fhir-rest",
            Adapter::Vkp { .. } => "vkp",
            Adapter::Jft { .. } => "jft",
            Adapter::Pmd { .. } => "pmd",
        }
    }

    /// Longest an attempt can take beyond the destination timeout (JFT status polling).
    pub fn extra_time(&self) -> Duration {
        match self {
            Adapter::Jft { window, .. } => *window,
            _ => Duration::ZERO,
        }
    }
}

/// Outbound authentication: the destination's OAuth2 access token (`[destination.oauth]`,
/// fetched and cached by the dispatcher), when it has one.
fn authorize(req: reqwest::RequestBuilder, bearer: Option<&str>) -> reqwest::RequestBuilder {
    match bearer {
        Some(t) => req.bearer_auth(t),
        None => req,
    }
}

/// One delivery attempt through the destination's adapter.
pub async fn send(
    http: &reqwest::Client,
    dest: &ValidDestination,
    task: &DeliveryTask,
    attempt: u32,
    bearer: Option<&str>,
) -> Answer {
    match &dest.adapter {
        Adapter::FhirBundle => {
            let req = http
                .post(&dest.url)
                .headers(client::headers(task, attempt))
                .body(task.fhir.to_string());
            match client::exchange(authorize(req, bearer), 2048).await {
                Ok(r) => r.answer(classify::status(r.code)),
                Err(a) => a,
            }
        }
        Adapter::FhirRest => {
            let body = match parse(task).map(|b| transaction(&b)) {
                Ok(b) => b,
                Err(a) => return a,
            };
            let req = http
                .post(&dest.url)
                .headers(client::headers(task, attempt))
                .body(body.to_string());
            match client::exchange(authorize(req, bearer), MAX_BODY).await {
                Ok(r) => r.answer(classify::status(r.code)),
                Err(a) => a,
            }
        }
        Adapter::Vkp { orgnr } => {
            let bundle = match parse(task).and_then(document) {
                Ok(b) => b,
                Err(a) => return a,
            };
            let url = format!("{}/epj/r4/{orgnr}/bundle", dest.url.trim_end_matches('/'));
            let req = http
                .post(url)
                .headers(client::headers(task, attempt))
                .body(bundle.to_string());
            match client::exchange(authorize(req, bearer), MAX_BODY).await {
                Ok(r) => vkp_answer(&r),
                Err(a) => a,
            }
        }
        Adapter::Jft { poll, window } => {
            jft(http, dest, task, attempt, bearer, *poll, *window).await
        }
        Adapter::Pmd { municipality } => {
            let batch = match parse(task).and_then(|b| pmd_batch(&b, municipality)) {
                Ok(b) => b,
                Err(a) => return a,
            };
            let mut headers = client::headers(task, attempt);
            if let Ok(v) = reqwest::header::HeaderValue::from_str(&task.event_id) {
                headers.insert("correlation-id", v);
            }
            let req = http
                .post(&dest.url)
                .headers(headers)
                .body(batch.to_string());
            match client::exchange(authorize(req, bearer), MAX_BODY).await {
                Ok(r) => pmd_answer(&r),
                Err(a) => a,
            }
        }
    }
}

fn permanent(error: String) -> Answer {
    Answer {
        class: Class::Permanent,
        status: None,
        error: Some(error),
        retry_after: None,
    }
}

fn parse(task: &DeliveryTask) -> Result<Value, Answer> {
    serde_json::from_str(&task.fhir).map_err(|e| permanent(format!("stored FHIR is not JSON: {e}")))
}

/// The event's Bundle as a FHIR `transaction`: each resource a `POST {ResourceType}`, made
/// idempotent by `ifNoneExist` on its first identifier, `fullUrl`s kept so references resolve.
pub fn transaction(b: &Value) -> Value {
    let entries: Vec<Value> = b["entry"]
        .as_array()
        .map(|e| e.as_slice())
        .unwrap_or_default()
        .iter()
        .filter_map(|e| {
            let r = &e["resource"];
            let rt = r["resourceType"].as_str()?;
            let mut request = json!({ "method": "POST", "url": rt });
            let ident = match &r["identifier"] {
                Value::Array(a) => a.first().cloned(),
                Value::Object(_) => Some(r["identifier"].clone()),
                _ => None,
            };
            if let Some(i) = ident
                && let Some(v) = i["value"].as_str()
            {
                let sys = i["system"]
                    .as_str()
                    .map(|s| format!("{s}|"))
                    .unwrap_or_default();
                request["ifNoneExist"] = json!(format!("identifier={sys}{v}"));
            }
            let mut out = json!({ "resource": r, "request": request });
            if let Some(u) = e["fullUrl"].as_str() {
                out["fullUrl"] = json!(u);
            }
            Some(out)
        })
        .collect();
    json!({
        "resourceType": "Bundle",
        "id": b["id"],
        "type": "transaction",
        "entry": entries,
    })
}

/// VKP journals one event as a `document` Bundle with the Composition first.
fn document(mut b: Value) -> Result<Value, Answer> {
    let first = b["entry"][0]["resource"]["resourceType"].as_str();
    if first != Some("Composition") {
        return Err(permanent(
            "vkp: the event's Bundle has no Composition first; VKP journals document Bundles only \
             (route only alarms, dispenses and notes to a vkp destination)"
                .into(),
        ));
    }
    b["type"] = json!("document");
    Ok(b)
}

/// Codes of `vkp-operation-outcome-v090` in an OperationOutcome body.
fn vkp_codes(body: &[u8]) -> Vec<String> {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for issue in v["issue"].as_array().map(Vec::as_slice).unwrap_or_default() {
        for c in issue["details"]["coding"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            if c["system"]
                .as_str()
                .is_some_and(|s| s.contains("vkp-operation-outcome"))
                && let Some(code) = c["code"].as_str()
            {
                out.push(code.to_string());
            }
        }
    }
    out
}

/// VKP: 2xx delivered; `3.1 TimedOut` (VKP waited on the EPJ) retried; any other outcome code
/// (`1.x` forbidden / no service need, `2.x` invalid data) and other 4xx dead-lettered; 401
/// retried (a token refresh may cure it); 408, 429, 5xx retried.
pub fn vkp_answer(r: &Reply) -> Answer {
    let codes = vkp_codes(&r.body);
    let class = match r.code {
        200..=299 => Class::Delivered,
        401 => Class::Retry,
        _ if codes.iter().any(|c| c == "3.1") => Class::Retry,
        _ => classify::status(r.code),
    };
    let mut a = r.answer(class);
    if !codes.is_empty()
        && let Some(e) = &mut a.error
    {
        *e = format!("vkp outcome {}: {e}", codes.join(","));
    }
    a
}

/// JFT: `POST {url}/v1/Bundle`. `202` + `Location`: the status URL is polled every `poll` until
/// `journaled` (delivered) or `failed` (dead letter), for at most `window`; still `registered` or
/// `read` then: delivered (JFT holds the event; posting it again would duplicate it), with the
/// last status in the attempt's audit detail. A 2xx other than 202 is delivered; errors are
/// classified like any answer (401 retried).
async fn jft(
    http: &reqwest::Client,
    dest: &ValidDestination,
    task: &DeliveryTask,
    attempt: u32,
    bearer: Option<&str>,
    poll: Duration,
    window: Duration,
) -> Answer {
    let base = dest.url.trim_end_matches('/');
    let req = http
        .post(format!("{base}/v1/Bundle"))
        .headers(client::headers(task, attempt))
        .body(task.fhir.to_string());
    let r = match client::exchange(authorize(req, bearer), MAX_BODY).await {
        Ok(r) => r,
        Err(a) => return a,
    };
    if r.code != 202 {
        let class = match r.code {
            401 => Class::Retry,
            c => classify::status(c),
        };
        return r.answer(class);
    }
    let Some(location) = r
        .headers
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|l| reqwest::Url::parse(&format!("{base}/")).ok()?.join(l).ok())
    else {
        let mut a = r.answer(Class::Delivered);
        a.error = Some("jft: 202 without a Location; journaling status unknown".into());
        return a;
    };
    let started = Instant::now();
    let mut last = "registered".to_string();
    loop {
        tokio::time::sleep(poll).await;
        let req = http.get(location.clone());
        if let Ok(s) = client::exchange(authorize(req, bearer), MAX_BODY).await
            && (200..300).contains(&s.code)
        {
            let v: Value = serde_json::from_slice(&s.body).unwrap_or(Value::Null);
            if let Some(status) = v["status"].as_str() {
                last = status.to_ascii_lowercase();
            }
            match last.as_str() {
                "journaled" => {
                    return Answer {
                        class: Class::Delivered,
                        status: Some(202),
                        error: None,
                        retry_after: None,
                    };
                }
                "failed" => {
                    return Answer {
                        class: Class::Permanent,
                        status: Some(202),
                        error: Some(format!(
                            "jft: journaling failed ({location}): {}",
                            String::from_utf8_lossy(&s.body[..s.body.len().min(300)])
                        )),
                        retry_after: None,
                    };
                }
                _ => {}
            }
        }
        if started.elapsed() + poll > window {
            tracing::warn!(dest = %dest.name, event_id = %task.event_id, status = %last,
                "jft: not journaled within the status window");
            return Answer {
                class: Class::Delivered,
                status: Some(202),
                error: Some(format!(
                    "jft: accepted, status '{last}' after {} s (not journaled yet)",
                    window.as_secs()
                )),
                retry_after: None,
            };
        }
    }
}

/// PMD takes Observations only: a `batch` Bundle (PmdBundleObservation) of the event's
/// Observations, each `POST Observation` with its `fullUrl`, tagged with the municipality.
pub fn pmd_batch(b: &Value, municipality: &str) -> Result<Value, Answer> {
    let entries: Vec<Value> = b["entry"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|e| e["resource"]["resourceType"] == "Observation")
        .enumerate()
        .map(|(i, e)| {
            let full_url = e["fullUrl"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("urn:uuid:{}-{i}", b["id"].as_str().unwrap_or("x")));
            json!({
                "fullUrl": full_url,
                "resource": e["resource"],
                "request": { "method": "POST", "url": "Observation" }
            })
        })
        .collect();
    if entries.is_empty() {
        return Err(permanent(
            "pmd: the event has no Observation (PMD stores measurements only; route only \
             measurements to a pmd destination)"
                .into(),
        ));
    }
    Ok(json!({
        "resourceType": "Bundle",
        "id": b["id"],
        "meta": { "tag": [{ "system": KOMMUNENUMMER, "code": municipality }] },
        "identifier": b["identifier"],
        "type": "batch",
        "entry": entries,
    }))
}

/// PMD: the HTTP status first; a `batch-response` is then read entry by entry: any 5xx/429
/// entry retries the event, any other non-2xx entry dead-letters it (naming the `fullUrl`).
pub fn pmd_answer(r: &Reply) -> Answer {
    let class = match r.code {
        401 => Class::Retry,
        c => classify::status(c),
    };
    if class != Class::Delivered {
        return r.answer(class);
    }
    let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    let mut worst = Class::Delivered;
    let mut why = Vec::new();
    for e in v["entry"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let status = e["response"]["status"].as_str().unwrap_or("");
        let code: u16 = status
            .split_whitespace()
            .next()
            .and_then(|c| c.parse().ok())
            .unwrap_or(200);
        let c = classify::status(code);
        if c != Class::Delivered {
            why.push(format!(
                "{} -> {status}",
                e["fullUrl"]
                    .as_str()
                    .or(e["response"]["location"].as_str())
                    .unwrap_or("?")
            ));
            worst = match (worst, c) {
                (Class::Retry, _) | (_, Class::Retry) => Class::Retry,
                _ => Class::Permanent,
            };
        }
    }
    let mut a = r.answer(worst);
    if !why.is_empty() {
        a.error = Some(format!("pmd batch entries failed: {}", why.join("; ")));
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderMap;

    fn reply(code: u16, body: &str) -> Reply {
        Reply {
            code,
            headers: HeaderMap::new(),
            body: body.as_bytes().to_vec(),
        }
    }

    fn oo(code: &str) -> String {
        json!({ "resourceType": "OperationOutcome", "issue": [{ "severity": "error", "code": "processing",
            "details": { "coding": [{ "system": "http://ehelse.no/fhir/CodeSystem/vkp-operation-outcome-v090", "code": code }] } }] })
        .to_string()
    }

    #[test]
    fn vkp_outcome_table() {
        assert_eq!(vkp_answer(&reply(201, "")).class, Class::Delivered);
        assert_eq!(vkp_answer(&reply(400, &oo("3.1"))).class, Class::Retry);
        for c in ["1.1", "1.3", "2.1", "2.4"] {
            let a = vkp_answer(&reply(400, &oo(c)));
            assert_eq!(a.class, Class::Permanent, "{c}");
            assert!(a.error.as_deref().is_some_and(|e| e.contains(c)), "{a:?}");
        }
        assert_eq!(vkp_answer(&reply(400, "{}")).class, Class::Permanent);
        assert_eq!(vkp_answer(&reply(401, "")).class, Class::Retry);
        assert_eq!(vkp_answer(&reply(503, "")).class, Class::Retry);
    }

    #[test]
    fn pmd_batch_response_table() {
        let ok = json!({ "resourceType": "Bundle", "type": "batch-response",
            "entry": [{ "response": { "status": "201 Created" } }] })
        .to_string();
        assert_eq!(pmd_answer(&reply(200, &ok)).class, Class::Delivered);
        let bad = json!({ "type": "batch-response", "entry": [
            { "fullUrl": "urn:uuid:a", "response": { "status": "201" } },
            { "fullUrl": "urn:uuid:b", "response": { "status": "400 Bad Request" } }] })
        .to_string();
        let a = pmd_answer(&reply(200, &bad));
        assert_eq!(a.class, Class::Permanent);
        assert!(a.error.as_deref().is_some_and(|e| e.contains("urn:uuid:b")));
        let busy = json!({ "type": "batch-response", "entry": [
            { "response": { "status": "400" } }, { "response": { "status": "503" } }] })
        .to_string();
        assert_eq!(pmd_answer(&reply(200, &busy)).class, Class::Retry);
    }

    #[test]
    fn transaction_keeps_full_urls_and_is_conditional() {
        let b = json!({ "resourceType": "Bundle", "id": "e1", "type": "collection", "entry": [
            { "fullUrl": "urn:uuid:1", "resource": { "resourceType": "Observation",
              "identifier": [{ "system": "urn:s", "value": "v1" }] } },
            { "fullUrl": "urn:uuid:2", "resource": { "resourceType": "Device" } }] });
        let t = transaction(&b);
        assert_eq!(t["type"], "transaction");
        assert_eq!(t["entry"][0]["fullUrl"], "urn:uuid:1");
        assert_eq!(t["entry"][0]["request"]["url"], "Observation");
        assert_eq!(
            t["entry"][0]["request"]["ifNoneExist"],
            "identifier=urn:s|v1"
        );
        assert!(t["entry"][1]["request"]["ifNoneExist"].is_null());
    }
}
