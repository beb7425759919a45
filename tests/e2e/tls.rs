//! `--tls-cert` / `--tls-key`: HTTPS with ALPN, and certificates that
//! cannot serve refused at start-up.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{CertificateParams, KeyPair};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use wasmhive_guests as guests;

use crate::{Server, run};

/// A directory of its own for one test's certificates.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wasmhive-tls-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `wasmhive serve ARGS` (the component first) over TLS with `cert` and
/// `key`.
fn serve_tls(cert: &Path, key: &Path, args: &[&str]) -> Server {
    let tls = [
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    Server::start(&[args, &tls].concat())
}

/// A self-signed certificate for `127.0.0.1` and its key, written as PEM
/// to `dir/NAME.crt` and `dir/NAME.key`; `params` may change the defaults
/// (validity, say).
fn certificate(
    dir: &Path,
    name: &str,
    params: impl FnOnce(&mut CertificateParams),
) -> (PathBuf, PathBuf, CertificateDer<'static>) {
    let mut defaults = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    params(&mut defaults);
    let key = KeyPair::generate().unwrap();
    let cert = defaults.self_signed(&key).unwrap();
    let (cert_path, key_path) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path, cert.der().clone())
}

/// A TLS client that trusts only `root` and offers `alpn`, if any.
fn connector(root: &CertificateDer<'static>, alpn: Option<&[u8]>) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let mut config = ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.into_iter().map(<[u8]>::to_vec).collect();
    TlsConnector::from(Arc::new(config))
}

/// One `GET path` over TLS to `server`, trusting `root` and offering only
/// `alpn`: the response's HTTP version and its echo headers.
async fn get_over_tls(
    server: &Server,
    root: &CertificateDer<'static>,
    alpn: &[u8],
    path: &str,
) -> (http::Version, http::HeaderMap) {
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let name = ServerName::IpAddress(server.addr.ip().into());
    let tls = connector(root, Some(alpn))
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(alpn),
        "negotiated protocol"
    );
    let io = TokioIo::new(tls);
    let request = http::Request::get(format!("https://{}{path}", server.addr))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = if alpn == b"h2" {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
        tokio::spawn(connection);
        sender.send_request(request).await.unwrap()
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(connection);
        let (mut parts, body) = request.into_parts();
        parts.uri = path.parse().unwrap();
        parts
            .headers
            .insert(http::header::HOST, server.addr.to_string().parse().unwrap());
        sender
            .send_request(http::Request::from_parts(parts, body))
            .await
            .unwrap()
    };
    assert_eq!(response.status(), 200);
    let (parts, body) = response.into_parts();
    body.collect().await.unwrap();
    (parts.version, parts.headers)
}

#[tokio::test]
async fn https_offers_http2_and_http1_by_alpn_and_guests_see_https() {
    let dir = scratch("serve");
    let (cert, key, root) = certificate(&dir, "server", |_| {});
    for guest in [guests::ECHO_P2, guests::ECHO_P3] {
        let server = serve_tls(&cert, &key, &[guest.path]);
        assert!(
            server.stderr.lock().unwrap()[0].contains("Serving HTTPS on https://"),
            "{:?}",
            server.stderr.lock().unwrap()
        );
        for (alpn, version) in [
            (&b"h2"[..], http::Version::HTTP_2),
            (b"http/1.1", http::Version::HTTP_11),
        ] {
            let (seen, headers) = get_over_tls(&server, &root, alpn, "/tls?x=1").await;
            assert_eq!(seen, version, "{}", guest.name);
            assert_eq!(headers["x-echo-scheme"], "https", "{}", guest.name);
            assert_eq!(
                headers["x-echo-authority"],
                server.addr.to_string().as_str(),
                "{}",
                guest.name
            );
            assert_eq!(headers["x-echo-path"], "/tls?x=1", "{}", guest.name);
        }
        // Cleartext on the TLS port gets no HTTP answer.
        let refused = crate::try_call(server.addr, "GET", "/", Bytes::new()).await;
        assert!(refused.is_err(), "{refused:?}");
        server.finish().await;
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn certificates_that_cannot_serve_are_refused_at_start_up() {
    let dir = scratch("refused");
    let (cert, key, _) = certificate(&dir, "valid", |_| {});
    let (expired, expired_key, _) = certificate(&dir, "expired", |params| {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    let (not_yet, not_yet_key, _) = certificate(&dir, "future", |params| {
        params.not_before = rcgen::date_time_ymd(2999, 1, 1);
        params.not_after = rcgen::date_time_ymd(3000, 1, 1);
    });
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let path = |p: &PathBuf| p.to_str().unwrap().to_string();
    for (cert, key, says) in [
        (path(&expired), path(&expired_key), "expired on"),
        (path(&not_yet), path(&not_yet_key), "not valid until"),
        (
            path(&cert),
            path(&expired_key),
            "does not go with the certificate",
        ),
        (path(&garbage), path(&key), "holds no PEM certificate"),
        (path(&cert), path(&garbage), "cannot read a private key"),
    ] {
        let (code, stderr) = run(&[
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ]);
        assert_eq!(code, Some(2), "{cert} {key}: {stderr}");
        assert!(stderr.contains(says), "{cert} {key}: {stderr}");
        assert!(!stderr.contains("Serving"), "{stderr}");
    }
    // One without the other is a usage error.
    let (code, stderr) = run(&["serve", "--tls-cert", &path(&cert)]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--tls-key"), "{stderr}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_client_that_never_starts_its_handshake_is_closed_by_the_header_timeout() {
    use tokio::io::AsyncReadExt as _;
    let dir = scratch("silent");
    let (cert, key, root) = certificate(&dir, "server", |_| {});
    let server = serve_tls(
        &cert,
        &key,
        &[guests::HELLO_P2.path, "--header-timeout", "1s"],
    );
    let mut silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), silent.read(&mut buf))
        .await
        .expect("closed within 10 s");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // Others are served meanwhile and after.
    let (version, _) = get_over_tls(&server, &root, b"h2", "/").await;
    assert_eq!(version, http::Version::HTTP_2);
    server.finish().await;
    std::fs::remove_dir_all(dir).unwrap();
}

/// Whether a TLS handshake with `server` succeeds for a client that trusts
/// only `root`.
async fn trusted(server: &Server, root: &CertificateDer<'static>) -> bool {
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let name = ServerName::IpAddress(server.addr.ip().into());
    connector(root, None).connect(name, tcp).await.is_ok()
}

#[tokio::test]
async fn a_reload_takes_a_renewed_certificate_and_refuses_a_broken_one() {
    let dir = scratch("renew");
    let (cert, key, old_root) = certificate(&dir, "server", |_| {});
    let server = serve_tls(
        &cert,
        &key,
        &[guests::HELLO_P2.path, "--admin-addr", "127.0.0.1:0"],
    );
    let admin = server.admin_addr().await;
    assert!(trusted(&server, &old_root).await);
    // Renewed in place (another key, another certificate), then reloaded.
    let (renewed, renewed_key, new_root) = certificate(&dir, "renewed", |_| {});
    std::fs::rename(renewed, &cert).unwrap();
    std::fs::rename(renewed_key, &key).unwrap();
    let reload = || crate::try_call(admin, "POST", "/reload", Bytes::new());
    assert_eq!(reload().await.unwrap().0, 200);
    assert!(trusted(&server, &new_root).await, "the renewed certificate");
    assert!(!trusted(&server, &old_root).await, "not the old one");
    // A broken pair is refused; the current certificate stays.
    std::fs::write(&key, "not a key\n").unwrap();
    let (status, _, body) = reload().await.unwrap();
    assert_eq!(status, 500);
    let body = String::from_utf8_lossy(&body.unwrap()).into_owned();
    assert!(body.contains("cannot read a private key"), "{body}");
    assert!(trusted(&server, &new_root).await);
    let (version, _) = get_over_tls(&server, &new_root, b"http/1.1", "/").await;
    assert_eq!(version, http::Version::HTTP_11);
    server.finish().await;
    std::fs::remove_dir_all(dir).unwrap();
}
