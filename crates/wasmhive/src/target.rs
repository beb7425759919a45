//! The request target a guest sees: every request gets an absolute URI
//! (scheme and authority) before it is admitted, and a request whose
//! authority is missing or malformed is refused before any instance is
//! involved.
//!
//! HTTP/1.1 requests arrive in origin form (`GET /path` with a `Host`
//! header); HTTP/2 ones carry `:scheme` and `:authority`; absolute-form
//! requests carry both in the target. wasmtime-wasi-http hands a p3 guest
//! the URI as it is, so without this a p3 guest on HTTP/1.1 would see no
//! scheme and no authority (p2 guests get the `Host` header as authority).

use http::uri::{Authority, PathAndQuery, Scheme, Uri};

use crate::{Error, Request};

/// Gives `request` an absolute URI, with the authority from its target or
/// else its single `Host` header, and the scheme of the [`Scheme`] in its
/// extensions (the connection's, set by the server), else the one its
/// target names, else `http`.
pub(crate) fn absolute(request: Request) -> Result<Request, Error> {
    let invalid = |why: &str| Error::InvalidRequest(why.to_string());
    let (mut parts, body) = request.into_parts();
    let mut hosts = parts.headers.get_all(http::header::HOST).iter();
    let (host, repeated) = (hosts.next(), hosts.next().is_some());
    if repeated {
        return Err(invalid("more than one Host header"));
    }
    // RFC 9112 3.2.3: a target that is only an authority (`GET abc`) is
    // for CONNECT alone; elsewhere the host it names would route the
    // request and reach the guest as its authority.
    if parts.uri.scheme().is_none()
        && parts.uri.authority().is_some()
        && parts.method != http::Method::CONNECT
    {
        return Err(invalid("an authority-form target outside CONNECT"));
    }
    // RFC 9112 3.2.2: an authority in the target wins over Host.
    let authority = match (parts.uri.authority(), host) {
        (Some(authority), _) => checked_authority(authority.as_str()),
        (None, Some(host)) => host.to_str().ok().and_then(checked_authority),
        (None, None) => return Err(invalid("no authority and no Host header")),
    }
    .ok_or_else(|| invalid("invalid authority or Host header"))?;
    let scheme = (parts.extensions.remove::<Scheme>())
        .or_else(|| parts.uri.scheme().cloned())
        .unwrap_or(Scheme::HTTP);
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    parts.uri = Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(path)
        .build()
        .map_err(|_| invalid("the request target cannot be made absolute"))?;
    Ok(Request::from_parts(parts, body))
}

/// `value` as a `host[:port]` authority: a non-empty host, no user info,
/// and nothing after the host but a valid port.
pub(crate) fn checked_authority(value: &str) -> Option<Authority> {
    let authority: Authority = value.parse().ok()?;
    let after_host = authority.as_str().strip_prefix(authority.host())?;
    let port_ok = after_host.is_empty() || authority.port_u16().is_some();
    (!authority.host().is_empty() && !authority.as_str().contains('@') && port_ok)
        .then_some(authority)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(target: &str, hosts: &[&str]) -> Request {
        let mut builder = http::Request::builder().uri(target);
        for host in hosts {
            builder = builder.header(http::header::HOST, *host);
        }
        builder
            .body(crate::into_body(http_body_util::Empty::new()))
            .unwrap()
    }

    fn uri(target: &str, hosts: &[&str]) -> Result<String, String> {
        absolute(request(target, hosts))
            .map(|r| r.uri().to_string())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn origin_and_absolute_forms_become_absolute() {
        assert_eq!(
            uri("/a?b=c", &["example.com:8080"]).unwrap(),
            "http://example.com:8080/a?b=c"
        );
        assert_eq!(
            uri("http://other.org/x", &["ignored.example"]).unwrap(),
            "http://other.org/x"
        );
        assert_eq!(
            uri("https://secure.org/x", &[]).unwrap(),
            "https://secure.org/x"
        );
        assert_eq!(uri("/", &["[::1]:80"]).unwrap(), "http://[::1]:80/");
    }

    #[test]
    fn the_connections_scheme_wins_over_the_targets() {
        for (target, connection, seen) in [
            ("/a", Scheme::HTTPS, "https://example.com/a"),
            (
                "http://example.com/a",
                Scheme::HTTPS,
                "https://example.com/a",
            ),
            (
                "https://example.com/a",
                Scheme::HTTP,
                "http://example.com/a",
            ),
        ] {
            let mut request = request(target, &["example.com"]);
            request.extensions_mut().insert(connection);
            let request = absolute(request).unwrap();
            assert_eq!(request.uri().to_string(), seen);
            assert!(request.extensions().get::<Scheme>().is_none());
        }
    }

    #[test]
    fn an_authority_form_target_is_only_for_connect() {
        assert!(uri("abc:80", &["x"]).is_err());
        let connect = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("abc:80")
            .body(crate::into_body(http_body_util::Empty::new()))
            .unwrap();
        assert_eq!(
            absolute(connect).unwrap().uri().to_string(),
            "http://abc:80/"
        );
    }

    #[test]
    fn missing_invalid_or_repeated_hosts_are_refused() {
        for hosts in [
            &[][..],
            &[""],
            &["a:99999"],
            &["a b"],
            &["a/b"],
            &["u@a"],
            &[":80"],
            &["a", "b"],
        ] {
            assert!(uri("/", hosts).is_err(), "{hosts:?}");
        }
    }
}
