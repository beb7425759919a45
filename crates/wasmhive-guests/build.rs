//! Builds every component of `guests/` and writes `guests.rs` into `OUT_DIR`:
//! one `Guest` constant per component.
//!
//! - The Rust guests are their own cargo workspace, built for `wasm32-wasip2`
//!   in release mode (small, fast to instantiate) into `<target>/guests`, so
//!   repeated host builds reuse the same guest artifacts.
//! - The Python and JavaScript apps (`guests/python`, `guests/js`) are
//!   packaged by the tools Python and JavaScript developers use,
//!   componentize-py and componentize-js, at the versions pinned in `guests/python/requirements.txt`
//!   and `guests/js/package.json` + `package-lock.json`. Each tool is installed
//!   from its registry (PyPI, npm) into `<target>/guest-tools/<tool>` once: a
//!   stamp of the pin files lets later builds skip the install, so a warm
//!   build uses no network. Each app is packaged into
//!   `<target>/guests/<name>/<name>.wasm` only when its sources, the WIT in
//!   `wit/` or its tool changed (a fingerprint stamp beside the component).

#[path = "../../guests/build_support.rs"]
mod build_support;

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The apps packaged by another language's tool; see [`Tool`].
const PACKAGED_APPS: [PackagedApp; 2] = [
    PackagedApp {
        name: "python-app",
        source: "python",
        entry: "app.py",
        tool: Tool::ComponentizePy,
        // CPython reads the environment through wasi-libc, so the standard
        // world is enough.
        world: "wasi:http/proxy@0.2.12",
    },
    PackagedApp {
        name: "js-app",
        source: "js",
        entry: "app.js",
        tool: Tool::ComponentizeJs,
        // componentize-js only lets JavaScript import the interfaces of the
        // world it targets: this one adds `wasi:cli/environment`.
        world: "wasmhive:guests/http-app",
    },
];

/// The WIT directory the packaged apps are built against, under the
/// repository root.
const WIT_DIR: &str = "wit/wasi-http-0.2";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let repo_dir = manifest_dir.join("../..").canonicalize().unwrap();
    let guests_dir = repo_dir.join("guests");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    let guests_out = build_support::guests_target_dir();
    let target_dir = guests_out.parent().unwrap();

    for watched in [
        "Cargo.toml",
        "Cargo.lock",
        "src",
        "components",
        "python",
        "js",
    ] {
        println!(
            "cargo:rerun-if-changed={}",
            guests_dir.join(watched).display()
        );
    }
    println!("cargo:rerun-if-changed={}", repo_dir.join("wit").display());

    let mut generated = String::new();
    build_rust_guests(&guests_dir, &guests_out, &mut generated);

    let tools_dir = target_dir.join("guest-tools");
    fs::create_dir_all(&tools_dir).unwrap();
    // Two builds sharing the target directory must not install or package at
    // the same time; the lock is released when the file is dropped.
    let lock = fs::File::create(tools_dir.join(".lock")).unwrap();
    lock.lock().unwrap();
    for app in &PACKAGED_APPS {
        let tool_dir = install_tool(app, &guests_dir, &tools_dir);
        let file = package_app(app, &repo_dir, &tool_dir, &guests_out);
        writeln!(
            generated,
            "/// The `{name}` guest component (`guests/{source}/{entry}`, packaged by {tool}).\n\
             pub const {konst}: Guest = Guest {{ name: {name:?}, path: {path:?} }};",
            name = app.name,
            source = app.source,
            entry = app.entry,
            tool = app.tool.package(),
            konst = app.name.replace('-', "_").to_uppercase(),
            path = file.display().to_string(),
        )
        .unwrap();
    }
    fs::write(out_dir.join("guests.rs"), generated).unwrap();
}

/// Builds the Rust guests (the `[[example]]`s of `guests/Cargo.toml`) into
/// `guests_out` and appends their constants to `generated`.
fn build_rust_guests(guests_dir: &Path, guests_out: &Path, generated: &mut String) {
    let examples = build_support::build_guest_examples(guests_dir, guests_out, &[]);
    let manifest = fs::read_to_string(guests_dir.join("Cargo.toml")).unwrap();
    for name in example_names(&manifest) {
        let file = examples.join(format!("{}.wasm", name.replace('-', "_")));
        assert!(file.exists(), "missing guest artifact {}", file.display());
        let konst = name.replace('-', "_").to_uppercase();
        writeln!(
            generated,
            "/// The `{name}` guest component (`guests/components/{file_name}.rs`).\n\
             pub const {konst}: Guest = Guest {{ name: {name:?}, path: {path:?} }};",
            file_name = name.replace('-', "_"),
            path = file.display().to_string(),
        )
        .unwrap();
    }
}

/// The `name = "..."` of every `[[example]]` in the guests' manifest.
fn example_names(manifest: &str) -> Vec<String> {
    let manifest: toml::Table = manifest.parse().expect("guests/Cargo.toml is TOML");
    let examples = manifest.get("example").and_then(toml::Value::as_array);
    examples
        .into_iter()
        .flatten()
        .filter_map(|example| Some(example.get("name")?.as_str()?.to_string()))
        .collect()
}

/// A guest app in another language, packaged into a component by that
/// language's own tool.
struct PackagedApp {
    /// The component's name; its constant is the upper-case form.
    name: &'static str,
    /// Its directory under `guests/`: the sources and the tool's pin files.
    source: &'static str,
    /// The file in `source` the tool packages.
    entry: &'static str,
    tool: Tool,
    /// The WIT world the component targets, from [`WIT_DIR`].
    world: &'static str,
}

/// A registry-installed tool that packages apps of one language, and what
/// differs between them; everything else is shared by [`install_tool`] and
/// [`package_app`].
#[derive(Clone, Copy)]
enum Tool {
    /// componentize-py, from PyPI, in a virtualenv.
    ComponentizePy,
    /// componentize-js, from npm, in a `node_modules`.
    ComponentizeJs,
}

impl Tool {
    /// The tool's package name, for messages and the install directory.
    fn package(self) -> &'static str {
        match self {
            Tool::ComponentizePy => "componentize-py",
            Tool::ComponentizeJs => "componentize-js",
        }
    }

    /// The registry the tool is installed from.
    fn registry(self) -> &'static str {
        match self {
            Tool::ComponentizePy => "PyPI",
            Tool::ComponentizeJs => "npm",
        }
    }

    /// What must be on `PATH` to install and run the tool.
    fn needs(self) -> &'static str {
        match self {
            Tool::ComponentizePy => "python3 with its venv module and pip",
            Tool::ComponentizeJs => "node with npm",
        }
    }

    /// The files (in the app's source directory) that pin the tool's version.
    fn pin_files(self) -> &'static [&'static str] {
        match self {
            Tool::ComponentizePy => &["requirements.txt"],
            Tool::ComponentizeJs => &["package.json", "package-lock.json"],
        }
    }

    /// The commands that install the tool into `dir`, which holds a copy of
    /// the pin files.
    fn install_commands(self, dir: &Path) -> Vec<Command> {
        match self {
            Tool::ComponentizePy => {
                let mut venv = Command::new("python3");
                venv.args(["-m", "venv"]).arg(dir);
                let mut pip = Command::new(dir.join("bin/python"));
                pip.args(["-m", "pip", "install", "--disable-pip-version-check"])
                    .args(["--no-input", "--requirement", "requirements.txt"]);
                vec![venv, pip]
            }
            // `npm install` with the lock file installs exactly its versions.
            // Not `npm ci`: it refuses a lock file that lacks optional
            // platform packages npm could not resolve when it wrote the lock
            // (some Windows, musl and BSD bindings of jco's dependencies),
            // and that is the lock file npm writes for componentize-js 0.23.
            Tool::ComponentizeJs => {
                let mut npm = Command::new("npm");
                npm.args(["install", "--ignore-scripts", "--no-audit", "--no-fund"])
                    .arg("--no-save");
                vec![npm]
            }
        }
    }

    /// The command that packages `entry` (in `src`, a copy of the app's
    /// sources) against `wit` into `out`, with the tool installed in `dir`.
    fn package_command(
        self,
        dir: &Path,
        src: &Path,
        entry: &str,
        wit: &Path,
        world: &str,
        out: &Path,
    ) -> Command {
        match self {
            Tool::ComponentizePy => {
                let mut cmd = Command::new(dir.join("bin/componentize-py"));
                cmd.arg("--wit-path")
                    .arg(wit)
                    .args(["--world", world, "componentize", "--python-path"])
                    .arg(src)
                    .arg("--output")
                    .arg(out)
                    .arg(Path::new(entry).file_stem().unwrap());
                // componentize-py adds the site-packages of $VIRTUAL_ENV to
                // the app's path: make that the tool's own, never the user's.
                cmd.env("VIRTUAL_ENV", dir)
                    .env_remove("PYTHONPATH")
                    .env_remove("PYTHONHOME");
                cmd
            }
            Tool::ComponentizeJs => {
                let mut cmd = Command::new("node");
                cmd.arg(dir.join("node_modules/@bytecodealliance/componentize-js/src/cli.js"))
                    .arg("--wit")
                    .arg(wit)
                    .args(["--world-name", world, "--out"])
                    .arg(out)
                    .arg(src.join(entry));
                cmd
            }
        }
    }
}

/// Installs `app`'s tool under `tools_dir` unless the installed copy was made
/// from the same pin files, and returns the tool's directory.
fn install_tool(app: &PackagedApp, guests_dir: &Path, tools_dir: &Path) -> PathBuf {
    let tool = app.tool;
    let dir = tools_dir.join(tool.package());
    let stamp = dir.join(".installed");
    let mut pins = String::new();
    for pin in tool.pin_files() {
        let path = guests_dir.join(app.source).join(pin);
        let text =
            fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        write!(pins, "{pin}\n{text}\n").unwrap();
    }
    if fs::read_to_string(&stamp).is_ok_and(|installed| installed == pins) {
        return dir;
    }

    // Start from scratch: a failed or older install is not reused.
    if dir.exists() {
        fs::remove_dir_all(&dir).unwrap();
    }
    fs::create_dir_all(&dir).unwrap();
    for pin in tool.pin_files() {
        fs::copy(guests_dir.join(app.source).join(pin), dir.join(pin)).unwrap();
    }
    let doing = format!(
        "installing {} from {} for guests/{}",
        tool.package(),
        tool.registry(),
        app.source
    );
    for mut cmd in tool.install_commands(&dir) {
        cmd.current_dir(&dir);
        run(cmd, &doing, tool.needs());
    }
    // Written last, so an interrupted install is redone.
    fs::write(&stamp, pins).unwrap();
    dir
}

/// Packages `app` with the tool in `tool_dir` into
/// `<guests_out>/<name>/<name>.wasm` unless its inputs are unchanged since
/// the last time, and returns the component's path.
fn package_app(app: &PackagedApp, repo_dir: &Path, tool_dir: &Path, guests_out: &Path) -> PathBuf {
    let source = repo_dir.join("guests").join(app.source);
    let wit = repo_dir.join(WIT_DIR);
    let out_dir = guests_out.join(app.name);
    let file = out_dir.join(format!("{}.wasm", app.name));
    let stamp = out_dir.join("fingerprint");
    let tool_stamp = fs::read_to_string(tool_dir.join(".installed")).unwrap();
    let fingerprint = fingerprint(&[&source, &wit], &format!("{}\n{tool_stamp}", app.world));
    if file.exists() && fs::read_to_string(&stamp).is_ok_and(|old| old == fingerprint) {
        return file;
    }

    // The tool runs on a copy of the sources, so whatever it writes there
    // (CPython's __pycache__) does not land in guests/ and make cargo rerun
    // this script on every build.
    let src = out_dir.join("src");
    if src.exists() {
        fs::remove_dir_all(&src).unwrap();
    }
    copy_dir(&source, &src);
    // Written aside and renamed, so a failed run leaves no component behind.
    let partial = out_dir.join(format!("{}.wasm.partial", app.name));
    let cmd = app
        .tool
        .package_command(tool_dir, &src, app.entry, &wit, app.world, &partial);
    let doing = format!(
        "packaging guests/{} with {}",
        app.source,
        app.tool.package()
    );
    run(cmd, &doing, app.tool.needs());
    fs::rename(&partial, &file).unwrap();
    fs::write(&stamp, fingerprint).unwrap();
    file
}

/// Runs `cmd` for `doing`, its output going to cargo's build log, and panics
/// with a message saying what failed, or what is needed if it cannot start.
fn run(mut cmd: Command, doing: &str, needs: &str) {
    // Stdout too goes to stderr: cargo reads this script's stdout for
    // `cargo:` directives.
    cmd.stdout(Stdio::from(std::io::stderr()));
    match cmd.status() {
        Ok(status) if status.success() => {}
        Ok(status) => panic!("{doing} failed ({status}; its output is above): {cmd:?}"),
        Err(e) => panic!(
            "{needs} is needed for {doing}: cannot run {program:?}: {e}",
            program = cmd.get_program(),
        ),
    }
}

/// A hash (64-bit FNV-1a, stable across builds and toolchains) of `extra`
/// and of the relative path and contents of every file under `dirs`.
fn fingerprint(dirs: &[&Path], extra: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &byte in bytes {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    };
    feed(extra.as_bytes());
    for dir in dirs {
        for file in files_under(dir) {
            feed(file.strip_prefix(dir).unwrap().to_string_lossy().as_bytes());
            feed(&[0]);
            feed(&fs::read(&file).unwrap());
        }
    }
    format!("{hash:016x}\n")
}

/// Every file under `dir`, recursively, in sorted order, leaving out what
/// tools leave in a source directory (`node_modules`, `__pycache__`).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| !path.ends_with("node_modules") && !path.ends_with("__pycache__"))
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// Copies the files under `from` to `to`, keeping their relative paths.
fn copy_dir(from: &Path, to: &Path) {
    for file in files_under(from) {
        let dest = to.join(file.strip_prefix(from).unwrap());
        fs::create_dir_all(dest.parent().unwrap()).unwrap();
        fs::copy(&file, dest).unwrap();
    }
}
