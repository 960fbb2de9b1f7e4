//! Reading "the API behind is throttled" out of an upstream's answer.
//!
//! Three signals, all in the tool result the upstream proxy returns: an HTTP upstream's 429 or
//! 503 with `Retry-After` (the proxy turns it into a structured error carrying
//! `retry_after_seconds`, see [`http_throttled`]), a tool error whose structured content carries
//! `retry_after_seconds`, and an error text matching an operator's `throttle_patterns`.
//!
//! Guarantees: only error results are read; a pause is at least a second and at most
//! [`MAX_PAUSE_SECS`], whatever the upstream says; a pattern's pause is the operator's
//! `throttle_pause_secs` at most (error texts can echo a caller's arguments, so a caller can
//! never name a longer one). Does not pause anything
//! itself: `Protection::observe` does.

use std::sync::LazyLock;

use regex::{Regex, RegexSet};
use rmcp::model::CallToolResult;
use serde_json::{Value, json};

/// The longest pause one signal can cause.
pub const MAX_PAUSE_SECS: u64 = 3600;

/// "retry after 30s", "Retry-After: 30", "retry in 30 seconds": a time named in an error text.
static RETRY_IN_TEXT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)retry[\s_-]*(?:after|in)\s*:?\s*(\d{1,9})\s*(?:s\b|sec|seconds?\b)?")
        .expect("retry-time pattern compiles")
});

/// A throttle signal: which one, and how long to pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signal {
    pub kind: &'static str,
    pub pause_secs: u64,
}

/// The throttle signal in `result`, if any. `patterns` are the operator's; `default_secs` is
/// the pause when a signal names no time.
pub fn signal(result: &CallToolResult, patterns: &RegexSet, default_secs: u64) -> Option<Signal> {
    if result.is_error != Some(true) {
        return None;
    }
    let structured = result.structured_content.as_ref();
    let http = structured.and_then(|s| s.get("error")).and_then(Value::as_str) == Some(HTTP_THROTTLED);
    let secs = structured.and_then(|s| s.get("retry_after_seconds")).and_then(Value::as_u64);
    match (http, secs) {
        (true, secs) => {
            return Some(Signal { kind: "http_status", pause_secs: bounded(secs.unwrap_or(default_secs)) });
        }
        (false, Some(secs)) => {
            return Some(Signal { kind: "retry_after_seconds", pause_secs: bounded(secs) });
        }
        (false, None) => {}
    }
    if patterns.is_empty() {
        return None;
    }
    let text: String = result
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.as_str()))
        .collect::<Vec<_>>()
        .join("\n");
    if !patterns.is_match(&text) {
        return None;
    }
    // Error texts can repeat a caller's arguments: a time named in the text may shorten the
    // operator's pause, never lengthen it.
    let named = RETRY_IN_TEXT.captures(&text).and_then(|c| c[1].parse::<u64>().ok());
    let secs = named.map_or(default_secs, |named| named.min(default_secs));
    Some(Signal { kind: "pattern", pause_secs: bounded(secs) })
}

fn bounded(secs: u64) -> u64 {
    secs.clamp(1, MAX_PAUSE_SECS)
}

/// The `error` of the result an HTTP upstream's 429/503 becomes.
pub const HTTP_THROTTLED: &str = "upstream_throttled";

/// The tool result for an HTTP upstream that answered `status` with `retry_after` (the raw
/// header: delay-seconds or an HTTP date). Without a readable header it carries no time, and
/// pauses for the upstream's `throttle_pause_secs`.
pub fn http_throttled(upstream: &str, status: u16, retry_after: Option<&str>) -> CallToolResult {
    let secs = retry_after.and_then(retry_after_secs);
    let mut body = json!({
        "error": HTTP_THROTTLED,
        "message": format!("upstream `{upstream}` answered HTTP {status}: it is throttled"),
        "status": status,
    });
    if let Some(secs) = secs {
        body["retry_after_seconds"] = json!(secs);
    }
    CallToolResult::structured_error(body)
}

/// `Retry-After` (RFC 9110 §10.2.3): a number of seconds, or an HTTP date (judged against the
/// wall clock, as the upstream wrote it).
pub fn retry_after_secs(value: &str) -> Option<u64> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(secs);
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(std::time::SystemTime::now()).map_or(0, |d| d.as_secs()))
}

#[cfg(test)]
mod tests {
    use rmcp::model::ContentBlock;

    use super::*;

    fn patterns(p: &[&str]) -> RegexSet {
        RegexSet::new(p).unwrap()
    }

    #[test]
    fn each_signal_is_read_with_its_time_and_successes_never_pause() {
        let none = patterns(&[]);
        let structured = CallToolResult::structured_error(json!({ "retry_after_seconds": 12 }));
        assert_eq!(
            signal(&structured, &none, 30),
            Some(Signal { kind: "retry_after_seconds", pause_secs: 12 })
        );
        let http = http_throttled("api", 429, Some("30"));
        assert_eq!(signal(&http, &none, 5), Some(Signal { kind: "http_status", pause_secs: 30 }));
        let text =
            CallToolResult::error(vec![ContentBlock::text("upstream API rate limited: retry after 45s")]);
        assert_eq!(signal(&text, &none, 30), None, "no pattern configured, no signal");
        let limited = patterns(&["(?i)rate limited"]);
        assert_eq!(signal(&text, &limited, 60), Some(Signal { kind: "pattern", pause_secs: 45 }));
        assert_eq!(signal(&text, &limited, 30).unwrap().pause_secs, 30, "a text never lengthens the pause");
        let plain = CallToolResult::error(vec![ContentBlock::text("rate limited")]);
        assert_eq!(signal(&plain, &limited, 30).map(|s| s.pause_secs), Some(30), "no time named: default");
        let ok = CallToolResult::success(vec![ContentBlock::text("rate limited: retry after 9s")]);
        assert_eq!(signal(&ok, &limited, 30), None, "a success is never a throttle");
    }

    #[test]
    fn a_pause_is_bounded_whatever_the_upstream_says() {
        let huge = CallToolResult::structured_error(json!({ "retry_after_seconds": 10_000_000 }));
        assert_eq!(signal(&huge, &patterns(&[]), 30).unwrap().pause_secs, MAX_PAUSE_SECS);
        let zero = http_throttled("api", 503, Some("0"));
        assert_eq!(signal(&zero, &patterns(&[]), 30).unwrap().pause_secs, 1);
        let missing = http_throttled("api", 503, None);
        assert_eq!(missing.structured_content.as_ref().unwrap().get("retry_after_seconds"), None);
        assert_eq!(signal(&missing, &patterns(&[]), 30).unwrap().pause_secs, 30, "no Retry-After: default");
    }

    #[test]
    fn retry_after_is_seconds_or_an_http_date() {
        assert_eq!(retry_after_secs(" 30 "), Some(30));
        let soon = std::time::SystemTime::now() + std::time::Duration::from_secs(120);
        let date = httpdate::fmt_http_date(soon);
        assert!(retry_after_secs(&date).is_some_and(|s| (118..=120).contains(&s)), "{date}");
        assert_eq!(retry_after_secs("Wed, 21 Oct 2015 07:28:00 GMT"), Some(0), "a past date: now");
        assert_eq!(retry_after_secs("soon"), None);
    }
}
