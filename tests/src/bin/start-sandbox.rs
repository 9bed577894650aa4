//! Test helper: starts a background sandbox running `sleep 60`, prints `started`, then waits
//! to be killed. Used to prove that a sandbox outlives the process that started it.
//! Usage: start-sandbox STATE_ROOT CGROUP_PARENT ROOTFS ID

use std::path::PathBuf;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, state, parent, rootfs, id] = args.as_slice() else {
        eprintln!("usage: start-sandbox STATE_ROOT CGROUP_PARENT ROOTFS ID");
        std::process::exit(2);
    };
    let runtime = agentd_runtime::Runtime::new(PathBuf::from(state)).with_cgroup_parent(parent);
    let spec = agentd_runtime::SandboxSpec::new(vec!["sleep".into(), "60".into()]);
    if let Err(e) = runtime.create(id, std::path::Path::new(rootfs), &spec, None) {
        eprintln!("start-sandbox: {}", agentd_runtime::error_chain(&e));
        std::process::exit(1);
    }
    println!("started");
    std::thread::sleep(std::time::Duration::from_secs(600));
}
