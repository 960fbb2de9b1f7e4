//! Credentials never leave the process through an error text or a log line.
//!
//! Hosted RPC, database, Redis, facilitator and upstream URLs carry API keys and passwords in
//! their userinfo, path or query ("https://base-mainnet.example/v2/KEY"), and the HTTP and
//! database clients put the whole URL into their error messages (and some log it themselves).
//! Every error that may hold one passes through [`urls`] before it is logged, stored or
//! answered, and the log writer passes every line through it too: each URL keeps its scheme
//! and host (and port), nothing else. Hand-written because it is one small scan; a regex
//! crate would be a dependency for this alone.

/// `text` with every `scheme://…` URL (also JSON-escaped, `scheme:\/\/…`) cut to
/// `scheme://host[:port]`.
pub fn urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some((at, sep)) = next_separator(rest) {
        out.push_str(&rest[..at + sep.len()]);
        let after = &rest[at + sep.len()..];
        // A URL ends only where nothing URL-like can follow: `,` `)` `'` are legal inside one.
        let end = after
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '<' | '>' | '`'))
            .unwrap_or(after.len());
        let token = after[..end].replace("\\/", "/");
        let authority = token.split(['/', '?', '#']).next().unwrap_or("");
        let host = authority.rsplit('@').next().unwrap_or("");
        // Punctuation the URL was quoted in, never part of a host (an IPv6 `]` stays).
        let host = host.trim_end_matches([')', ',', '.', '\'']);
        out.push_str(host);
        if token.len() > host.len() {
            out.push_str("/…");
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

fn next_separator(text: &str) -> Option<(usize, &'static str)> {
    let plain = text.find("://").map(|i| (i, "://"));
    let escaped = text.find(":\\/\\/").map(|i| (i, ":\\/\\/"));
    match (plain, escaped) {
        (Some(a), Some(b)) => Some(if a.0 < b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// A log writer that redacts every line before it reaches stderr: a backstop for libraries
/// that log whole URLs (or errors holding them) on their own, at any level.
#[derive(Clone, Copy, Default)]
pub struct RedactingStderr;

impl std::io::Write for RedactingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        std::io::stderr().write_all(urls(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for RedactingStderr {
    type Writer = RedactingStderr;
    fn make_writer(&'a self) -> Self::Writer {
        *self
    }
}

#[cfg(test)]
mod tests {
    use super::urls;

    #[test]
    fn urls_keep_scheme_and_host_only() {
        let cases = [
            (
                "error sending request for url (http://127.0.0.1:1/v2/SECRETKEY?key=SECRET2)",
                "error sending request for url (http://127.0.0.1:1/…",
            ),
            ("postgres://user:PASSWORD@db.internal:5432/app failed", "postgres://db.internal:5432/… failed"),
            ("postgres://app:pa,ss@db:5432/x", "postgres://db:5432/…"),
            ("(https://u:p)w@h/k)", "(https://h/…"),
            ("https://h/v2?ids=1,2&key=SECRET", "https://h/…"),
            ("{\"url\":\"http:\\/\\/h\\/v2\\/SECRET\"}", "{\"url\":\"http:\\/\\/h/…\"}"),
            ("redis://:TOKEN@cache:6379", "redis://cache:6379/…"),
            ("https://rpc.example", "https://rpc.example"),
            ("http://[::1]:8545/key/SECRET", "http://[::1]:8545/…"),
            ("no url here", "no url here"),
            ("two: http://a/x?k=1 and https://b:8/y", "two: http://a/… and https://b:8/…"),
        ];
        for (input, expected) in cases {
            let out = urls(input);
            assert_eq!(out, expected, "{input}");
            assert!(!out.contains("SECRET") && !out.contains("PASSWORD") && !out.contains("TOKEN"), "{out}");
        }
    }
}
