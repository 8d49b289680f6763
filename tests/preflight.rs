//! `tunnelkeeper check --deep [--connect]` on real files, programs and a real sshd: one line
//! per finding, exit 2 on any problem, 0 when everything the file points to is in order.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;

use tunnelkeeper_test_support::sshd;

fn check(config: &Path, connect: bool) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tunnelkeeper"));
    cmd.args(["check", "--deep", "-c"]).arg(config);
    if connect {
        cmd.arg("--connect");
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn write(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_check_finds_what_the_file_points_to() {
    let Some(sshd) = sshd::Sshd::start("").await else {
        panic!("sshd is needed (apt-get install openssh-server)");
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let good = sshd.plain_target();
    let key = good.identity_file.clone().unwrap();
    let known_hosts = good.known_hosts.clone();
    // A world-readable copy of the key, an empty known_hosts, an agent stand-in that reports
    // its version, a group-readable env_file.
    let loose_key = dir.path().join("loose_key");
    std::fs::copy(&key, &loose_key).unwrap();
    std::fs::set_permissions(&loose_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    write(&dir.path().join("empty_known_hosts"), "", 0o644);
    write(
        &dir.path().join("ngrok"),
        "#!/bin/sh\necho 'ngrok version 3.39.0'\n",
        0o755,
    );
    write(&dir.path().join("token"), "t0k3n\n", 0o600);
    write(&dir.path().join("env"), "A=b\n", 0o640);
    let port = good.port.unwrap();
    let config = format!(
        r#"version: 1
daemon: {{ control_socket: "{d}/control.sock", state_dir: "{d}/state" }}
routers:
  - name: rtr
    ssh: {{ host: 127.0.0.1, port: {port}, user: {user}, identity_file: "{key}", known_hosts: "{kh}" }}
services:
  - name: web
    listen: 127.0.0.1:2224
    tunnels:
      - {{ name: relay, provider: command, run: [socat, "TCP-LISTEN:2222", "TCP:127.0.0.1:22"], endpoint: "127.0.0.1:2222" }}
      - {{ name: gone, provider: command, run: [/nonexistent/agent, x], endpoint: "127.0.0.1:1", env_file: "{d}/env" }}
      - name: vps
        provider: ssh
        ssh: {{ host: 127.0.0.1, port: {port}, user: {user}, identity_file: "{d}/loose_key", known_hosts: "{d}/empty_known_hosts" }}
        local_forward: {{ to: 127.0.0.1:22 }}
      - {{ name: ng, provider: ngrok, binary: "{d}/ngrok", authtoken_file: "{d}/token", to: 127.0.0.1:22 }}
      - {{ name: nokey, provider: ngrok, binary: "{d}/ngrok", authtoken_file: "{d}/missing", to: 127.0.0.1:22 }}
"#,
        user = good.user.clone().unwrap(),
        key = key.display(),
        kh = known_hosts.display(),
    );
    let path = dir.path().join("tk.yaml");
    std::fs::write(&path, config).unwrap();
    let (code, out) = check(&path, true);
    assert_eq!(code, 2, "{out}");
    let has = |needle: &str| {
        assert!(
            out.lines().any(|l| l.contains(needle)),
            "no line with {needle:?}:\n{out}"
        )
    };
    has("error: services[0].tunnels[1] (web/gone) run[0]: `/nonexistent/agent` not found");
    has(&format!("error: services[0].tunnels[1] (web/gone) env_file: {d}/env is readable by group or others (mode 0640)"));
    has(&format!("error: services[0].tunnels[2] (web/vps) identity_file: {d}/loose_key is readable by group or others (mode 0644)"));
    has(&format!(
        "ssh-keyscan -p {port} 127.0.0.1 >> {d}/empty_known_hosts"
    ));
    has(&format!(
        "ok: services[0].tunnels[3] (web/ng) binary: {d}/ngrok version 3.39.0"
    ));
    has(&format!(
        "error: services[0].tunnels[4] (web/nokey) authtoken_file: {d}/missing: No such file"
    ));
    has("ok: routers[0] (rtr) login: logged in to");
    // The world-readable key is refused by the server's client side too: no login.
    has("error: services[0].tunnels[2] (web/vps) login: cannot log in");
    assert!(!out.contains("routers[0] (rtr) known_hosts"), "{out}");
    assert!(!out.contains("(web/ng) authtoken_file"), "{out}");

    // A listener on a tunnel's endpoint is the one collision rule `check` already applies:
    // refused before any deep check, at its key.
    let colliding = std::fs::read_to_string(&path)
        .unwrap()
        .replace("listen: 127.0.0.1:2224", "listen: 127.0.0.1:2222");
    std::fs::write(&path, colliding).unwrap();
    let (code, out) = check(&path, false);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(
            ":8:5: services[0].listen: 127.0.0.1:2222 is also the endpoint of tunnel `relay`"
        ),
        "{out}"
    );

    // Everything in order: exit 0.
    let config = format!(
        r#"version: 1
daemon: {{ control_socket: "{d}/control.sock", state_dir: "{d}/state" }}
routers:
  - name: rtr
    ssh: {{ host: 127.0.0.1, port: {port}, user: {user}, identity_file: "{key}", known_hosts: "{kh}" }}
services:
  - name: web
    listen: 127.0.0.1:2223
    tunnels:
      - {{ name: ng, provider: ngrok, binary: "{d}/ngrok", authtoken_file: "{d}/token", to: 127.0.0.1:22 }}
      - {{ name: sh, provider: command, run: [sh, -c, "sleep 1000"], endpoint: "127.0.0.1:1" }}
"#,
        user = good.user.clone().unwrap(),
        key = key.display(),
        kh = known_hosts.display(),
    );
    std::fs::write(&path, config).unwrap();
    let (code, out) = check(&path, true);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("deep check ok"), "{out}");
    assert!(
        out.contains("ok: services[0].tunnels[1] (web/sh) run[0]: /"),
        "{out}"
    );
}
