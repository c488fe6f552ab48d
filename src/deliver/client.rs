//! One HTTP POST of a FHIR Bundle, reduced to what the classifier needs.

use std::time::{Duration, SystemTime};

use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};

use super::classify::{self, Class};
use crate::journal::DeliveryTask;

/// What came back from one attempt.
#[derive(Debug, Clone)]
pub struct Answer {
    pub class: Class,
    pub status: Option<u16>,
    pub error: Option<String>,
    pub retry_after: Option<Duration>,
}

pub fn build(timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    build_with_identity(timeout, None)
}

/// Like `build`, presenting `identity` (client certificate + key) for mTLS to the destination.
pub fn build_with_identity(
    timeout: Duration,
    identity: Option<reqwest::Identity>,
) -> Result<reqwest::Client, reqwest::Error> {
    let builder = match identity {
        Some(id) => reqwest::Client::builder().identity(id),
        None => reqwest::Client::builder(),
    };
    builder
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        // A redirect is a configuration error at the receiver; never follow it with patient data.
        .redirect(reqwest::redirect::Policy::none())
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
}

/// Posts the task's Bundle. The `Idempotency-Key` is the event id, the same on every attempt and
/// every replay, so receivers can drop repeats.
pub async fn post(
    client: &reqwest::Client,
    url: &str,
    task: &DeliveryTask,
    attempt: u32,
) -> Answer {
    let req = client
        .post(url)
        .headers(headers(task, attempt))
        .body(task.fhir.to_string());
    match exchange(req, 2048).await {
        Ok(reply) => reply.answer(classify::status(reply.code)),
        Err(failed) => failed,
    }
}

/// The headers of every delivery request: FHIR JSON, the event id as idempotency key, attempt.
pub fn headers(task: &DeliveryTask, attempt: u32) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/fhir+json; fhirVersion=4.0"),
    );
    if let Ok(v) = HeaderValue::from_str(&task.event_id) {
        headers.insert("idempotency-key", v.clone());
        headers.insert("x-knutepunkt-event-id", v);
    }
    headers.insert("x-knutepunkt-attempt", HeaderValue::from(attempt));
    // W3C trace context of the caller's span (the attempt's `deliver` span).
    if let Some(v) = crate::telemetry::traces::current_traceparent()
        .and_then(|tp| HeaderValue::from_str(&tp).ok())
    {
        headers.insert("traceparent", v);
    }
    headers
}

/// A response, with a bounded prefix of its body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub code: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    /// The answer for this reply under `class`, naming the body when it is not a success.
    pub fn answer(&self, class: Class) -> Answer {
        let retry_after = self
            .headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let error = (class != Class::Delivered).then(|| self.error_text());
        Answer {
            class,
            status: Some(self.code),
            error,
            retry_after,
        }
    }

    /// `HTTP {code}: {body prefix}`.
    pub fn error_text(&self) -> String {
        let code = self.code;
        let text =
            String::from_utf8_lossy(&self.body[..self.body.len().min(300)]).replace('\n', " ");
        if text.trim().is_empty() {
            format!("HTTP {code}")
        } else {
            format!("HTTP {code}: {}", text.trim())
        }
    }
}

/// Sends a request and reads up to `max_body` bytes of the answer (reading names the reason,
/// e.g. an OperationOutcome, and draining lets the connection be reused). A request that got no
/// answer is a retryable `Answer`.
pub async fn exchange(req: reqwest::RequestBuilder, max_body: usize) -> Result<Reply, Answer> {
    let mut resp = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            let kind = if e.is_timeout() {
                "timeout"
            } else if e.is_connect() {
                "connect error"
            } else {
                "transport error"
            };
            return Err(Answer {
                class: Class::Retry,
                status: None,
                error: Some(format!("{kind}: {}", error_chain(&e))),
                retry_after: None,
            });
        }
    };
    let code = resp.status().as_u16();
    let headers = resp.headers().clone();
    let mut body = Vec::new();
    while body.len() < max_body {
        match resp.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    Ok(Reply {
        code,
        headers,
        body,
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// `Retry-After` is either delta-seconds or an HTTP date.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs.min(86_400)));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(" 0 "), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon"), None);
        let future = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        let d = parse_retry_after(&future).expect("date");
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(120));
        assert_eq!(parse_retry_after(&past), Some(Duration::ZERO));
    }
}
