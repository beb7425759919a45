//! `deploy/`: the Kubernetes manifests and the Dockerfile are read, checked
//! for what a cluster relies on, and their server command is run on
//! loopback. (The image itself is not built here: CI machines have no
//! Docker daemon.)

use std::path::Path;
use std::time::Duration;

use yaml_rust2::{Yaml, YamlLoader};

use crate::{Server, get};

fn deploy_file(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The value after `flag` in `args`.
fn flag<'a>(args: &'a [String], flag: &str) -> &'a str {
    let at = args.iter().position(|arg| arg == flag);
    let value = at.and_then(|at| args.get(at + 1));
    value.unwrap_or_else(|| panic!("{flag} in {args:?}"))
}

fn port_of(addr: &str) -> i64 {
    addr.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// `args` (a `serve` command line, `serve` first) with its addresses moved
/// to free loopback ports and its paths to `scratch`, run; checks that it
/// serves and answers the probes, then drains.
async fn run_on_loopback(args: &[String], scratch: &Path) {
    assert_eq!(args[0], "serve", "{args:?}");
    let mut local: Vec<String> = Vec::new();
    let mut rest = args[1..].iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--addr" => {
                rest.next();
            }
            "--admin-addr" => {
                rest.next();
                local.extend(["--admin-addr".into(), "127.0.0.1:0".into()]);
            }
            "--cache-dir" => {
                rest.next();
                local.extend(["--cache-dir".into(), scratch.display().to_string()]);
            }
            _ => local.push(arg.clone()),
        }
    }
    let local: Vec<&str> = local.iter().map(String::as_str).collect();
    let server = Server::start(&local);
    let admin = server.admin_addr().await;
    for path in ["/readyz", "/healthz", "/metrics"] {
        let (status, _, body) = get(admin, path).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    let (status, _, body) = get(server.addr, "/").await;
    assert_eq!(status, 200, "{body}");
    server.finish().await;
}

#[tokio::test]
async fn the_kubernetes_manifests_hold_together_and_their_command_serves() {
    let docs = YamlLoader::load_from_str(&deploy_file("kubernetes.yaml")).expect("valid YAML");
    let kind = |kind: &str| {
        docs.iter()
            .find(|doc| doc["kind"].as_str() == Some(kind))
            .unwrap_or_else(|| panic!("a {kind}"))
            .clone()
    };
    let (deployment, service, hpa) = (
        kind("Deployment"),
        kind("Service"),
        kind("HorizontalPodAutoscaler"),
    );
    let name = deployment["metadata"]["name"].as_str().unwrap();
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(&deployment["spec"]["selector"]["matchLabels"], labels);
    assert_eq!(
        &service["spec"]["selector"], labels,
        "the Service selects the pods"
    );

    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let args: Vec<String> = container["args"]
        .as_vec()
        .expect("container args")
        .iter()
        .map(|arg| arg.as_str().expect("string args").to_string())
        .collect();
    let port_named = |name: &str| {
        let ports = container["ports"].as_vec().unwrap();
        let port = ports.iter().find(|p| p["name"].as_str() == Some(name));
        port.unwrap_or_else(|| panic!("a port named {name}"))["containerPort"]
            .as_i64()
            .unwrap()
    };
    assert_eq!(port_named("http"), port_of(flag(&args, "--addr")));
    assert_eq!(port_named("admin"), port_of(flag(&args, "--admin-addr")));
    assert!(
        flag(&args, "--addr").starts_with("0.0.0.0:"),
        "reachable from the Service"
    );

    // Probes on the admin port, and the drain fits in the grace period.
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(container[probe]["httpGet"]["path"].as_str(), Some(path));
        assert_eq!(container[probe]["httpGet"]["port"].as_str(), Some("admin"));
    }
    let drain = humantime::parse_duration(flag(&args, "--drain-timeout")).unwrap();
    let grace = Duration::from_secs(pod["terminationGracePeriodSeconds"].as_i64().unwrap() as u64);
    let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_i64()
        .map_or(Duration::ZERO, |s| Duration::from_secs(s as u64));
    assert!(
        grace > drain + pre_stop,
        "grace {grace:?} <= drain {drain:?} + preStop"
    );

    // The memory limit holds the guests' memory budget with room to spare.
    let budget: bytesize::ByteSize = flag(&args, "--max-total-memory").parse().unwrap();
    let limit = container["resources"]["limits"]["memory"].as_str().unwrap();
    let limit = limit
        .strip_suffix("Mi")
        .map(|mib| mib.parse::<u64>().unwrap() << 20)
        .expect("a limit in Mi");
    assert!(limit > budget.as_u64(), "limit {limit} <= budget {budget}");
    assert!(container["resources"]["requests"]["cpu"].as_str().is_some());

    // Scraped on the admin port; not run as root; scaled on CPU.
    let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"].as_str(), Some("true"));
    assert_eq!(
        annotations["prometheus.io/port"]
            .as_str()
            .map(|p| p.parse::<i64>().unwrap()),
        Some(port_named("admin"))
    );
    assert_eq!(annotations["prometheus.io/path"].as_str(), Some("/metrics"));
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(
        service["spec"]["ports"][0]["targetPort"].as_str(),
        Some("http")
    );
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["kind"].as_str(),
        Some("Deployment")
    );
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"].as_str(), Some(name));
    assert_eq!(
        hpa["spec"]["metrics"][0]["resource"]["name"].as_str(),
        Some("cpu")
    );
    assert!(!matches!(hpa["spec"]["maxReplicas"], Yaml::BadValue));

    let scratch = std::env::temp_dir().join(format!("wasmhive-deploy-k8s-{}", std::process::id()));
    run_on_loopback(&args, &scratch).await;
    let _ = std::fs::remove_dir_all(scratch);
}

#[tokio::test]
async fn the_dockerfile_builds_in_stages_runs_unprivileged_and_its_command_serves() {
    let dockerfile = deploy_file("Dockerfile");
    let lines: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect();
    let instruction = |name: &str| -> Vec<&str> {
        lines
            .iter()
            .filter_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .collect()
    };
    assert_eq!(
        instruction("FROM").len(),
        2,
        "a build stage and a run stage"
    );
    assert!(
        instruction("RUN")
            .iter()
            .any(|run| run.contains("rustup target add wasm32-wasip2")),
        "the demo app needs the guest target"
    );
    let user = instruction("USER");
    assert!(
        user.last()
            .is_some_and(|user| !user.starts_with('0') && !user.starts_with("root")),
        "{user:?}"
    );
    // The default command, run as the image would.
    let json = |line: &str| -> Vec<String> { serde_json::from_str(line).expect("exec form") };
    assert_eq!(json(instruction("ENTRYPOINT")[0]), ["wasmhive"]);
    let command = json(instruction("CMD")[0]);
    let exposed: Vec<i64> = instruction("EXPOSE")[0]
        .split_whitespace()
        .map(|port| port.parse().unwrap())
        .collect();
    assert_eq!(
        exposed,
        [
            port_of(flag(&command, "--addr")),
            port_of(flag(&command, "--admin-addr"))
        ]
    );
    let scratch =
        std::env::temp_dir().join(format!("wasmhive-deploy-docker-{}", std::process::id()));
    run_on_loopback(&command, &scratch).await;
    let _ = std::fs::remove_dir_all(scratch);
}
