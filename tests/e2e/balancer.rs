//! Two `wasmhive serve` replicas behind a real balancer (Debian's nginx):
//! one drains on SIGTERM and is restarted, then the other is killed
//! outright, all under steady load, and no client request fails.
//!
//! nginx comes from Debian's archive, unpacked (not installed) under
//! cargo's target directory the first time: `apt-get download` and
//! `dpkg-deb -x` need no root, and every machine here reaches Debian's
//! packages. An nginx already on `PATH` is used as it is.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use wasmhive_guests as guests;

use crate::{Bystander, Server, wait_until_metric};

/// The nginx binary: on `PATH`, or unpacked from Debian's package.
fn nginx() -> PathBuf {
    for dir in ["/usr/sbin", "/usr/local/sbin", "/usr/bin"] {
        let path = Path::new(dir).join("nginx");
        if path.exists() {
            return path;
        }
    }
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("nginx");
    let binary = root.join("usr/sbin/nginx");
    if binary.exists() {
        return binary;
    }
    let download = root.with_extension("download");
    std::fs::create_dir_all(&download).unwrap();
    let fetched = Command::new("apt-get")
        .args(["download", "nginx"])
        .current_dir(&download)
        .output()
        .expect("apt-get runs (this test needs Debian's nginx package)");
    assert!(
        fetched.status.success(),
        "apt-get download nginx: {}",
        String::from_utf8_lossy(&fetched.stderr)
    );
    let package = std::fs::read_dir(&download)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .expect("the nginx package");
    let unpacked = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&package)
        .arg(&root)
        .status()
        .expect("dpkg-deb runs");
    assert!(
        unpacked.success() && binary.exists(),
        "unpacking {}",
        package.display()
    );
    binary
}

/// `N` distinct ports free right now on 127.0.0.1 (held together while
/// chosen, so that none is picked twice).
fn free_ports<const N: usize>() -> [u16; N] {
    let held: [TcpListener; N] = std::array::from_fn(|_| TcpListener::bind("127.0.0.1:0").unwrap());
    held.map(|listener| listener.local_addr().unwrap().port())
}

/// nginx in the foreground, balancing `listen` over `replicas`, retrying
/// a request on the next replica when one refuses, resets or answers
/// `503` (`proxy_next_upstream`; GET is idempotent).
struct Balancer {
    child: Child,
    dir: PathBuf,
}

impl Balancer {
    async fn start(listen: SocketAddr, replicas: &[SocketAddr]) -> Balancer {
        let dir = std::env::temp_dir().join(format!("wasmhive-nginx-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let servers: String = replicas
            .iter()
            .map(|addr| format!("    server {addr} max_fails=1 fail_timeout=1s;\n"))
            .collect();
        let config = format!(
            "daemon off;\nmaster_process off;\npid nginx.pid;\nerror_log stderr warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n\
               client_body_temp_path tmp/body; proxy_temp_path tmp/proxy;\n\
               fastcgi_temp_path tmp/fastcgi; uwsgi_temp_path tmp/uwsgi; scgi_temp_path tmp/scgi;\n\
               upstream wasmhive {{\n{servers}    keepalive 32;\n  }}\n\
               server {{\n    listen {listen};\n    location / {{\n\
                 proxy_pass http://wasmhive;\n      proxy_http_version 1.1;\n\
                 proxy_set_header Connection \"\";\n\
                 proxy_next_upstream error timeout http_502 http_503;\n\
                 proxy_next_upstream_tries 4;\n    }}\n  }}\n}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), config).unwrap();
        let child = Command::new(nginx())
            .args(["-e", "stderr", "-p"])
            .arg(&dir)
            .args(["-c", "nginx.conf"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
            .spawn()
            .expect("nginx starts");
        let balancer = Balancer { child, dir };
        // Ready once it accepts.
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(listen).await.is_err() {
            assert!(Instant::now() < deadline, "nginx: {}", balancer.log());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        balancer
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until `server` has started at least `count` requests.
async fn serves(server: &Server, count: f64) {
    let admin = server.admin_addr().await;
    wait_until_metric(
        admin,
        "wasmhive_requests_started_total",
        |started| started >= count,
        Duration::from_secs(30),
    )
    .await;
}

fn replica(port: u16) -> Server {
    Server::start_at(
        &format!("127.0.0.1:{port}"),
        &[guests::HELLO_P2.path, "--admin-addr", "127.0.0.1:0"],
        Stdio::null(),
    )
}

#[tokio::test]
async fn a_replica_draining_and_another_killed_behind_nginx_fail_no_request() {
    let _alone = crate::HEAVY.lock().await;
    let [port_a, port_b, port_nginx] = free_ports();
    let (a, b) = (replica(port_a), replica(port_b));
    let listen: SocketAddr = format!("127.0.0.1:{port_nginx}").parse().unwrap();
    let balancer = Balancer::start(listen, &[a.addr, b.addr]).await;
    let load = Bystander::start(listen, "/", 16);
    serves(&a, 50.0).await;
    serves(&b, 50.0).await;

    // A drains (as on a rolling update) and comes back on its port.
    a.finish().await;
    let a = replica(port_a);
    serves(&a, 50.0).await;

    // B dies without warning; A takes everything.
    let status = b.kill().await;
    assert!(!status.success(), "{status}");
    let before = {
        let (_, _, metrics) = crate::get(a.admin_addr().await, "/metrics").await;
        crate::metric(&metrics, "wasmhive_requests_started_total")
    };
    serves(&a, before + 200.0).await;

    let seen = load.stop().await;
    let failed: Vec<_> = seen.iter().filter(|seen| **seen != Ok(200)).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}\nnginx: {}",
        failed.len(),
        seen.len(),
        balancer.log()
    );
    a.finish().await;
}
