//! Credentials never leave the process through an error text.
//!
//! Hosted RPC, database, Redis and facilitator URLs carry API keys and passwords in their
//! userinfo, path or query ("https://base-mainnet.example/v2/KEY"), and the HTTP and database
//! clients put the whole URL into their error messages. Every error that may hold one passes
//! through [`urls`] before it is logged, stored or answered: each URL keeps its scheme and
//! host (and port), nothing else. Hand-written because it is one small scan; a regex crate
//! would be a dependency for this alone.

/// `text` with every `scheme://…` URL cut to `scheme://host[:port]`.
pub fn urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        out.push_str(&rest[..at + 3]);
        let after = &rest[at + 3..];
        let end = after
            .find(|c: char| c.is_whitespace() || matches!(c, ')' | '"' | '\'' | '>' | ','))
            .unwrap_or(after.len());
        let authority = &after[..end];
        let authority = authority.split(['/', '?', '#']).next().unwrap_or("");
        let host = authority.rsplit('@').next().unwrap_or("");
        out.push_str(host);
        if end > host.len() {
            out.push_str("/…");
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::urls;

    #[test]
    fn urls_keep_scheme_and_host_only() {
        let cases = [
            (
                "error sending request for url (http://127.0.0.1:1/v2/SECRETKEY?key=SECRET2)",
                "error sending request for url (http://127.0.0.1:1/…)",
            ),
            ("postgres://user:PASSWORD@db.internal:5432/app failed", "postgres://db.internal:5432/… failed"),
            ("redis://:TOKEN@cache:6379", "redis://cache:6379/…"),
            ("https://rpc.example", "https://rpc.example"),
            ("no url here", "no url here"),
            ("two: http://a/x?k=1 and https://b:8/y", "two: http://a/… and https://b:8/…"),
        ];
        for (input, expected) in cases {
            assert_eq!(urls(input), expected, "{input}");
        }
    }
}
