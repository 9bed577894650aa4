//! Seccomp profiles: the reviewed data in `runtime/profiles/`, parsed, checked and compiled to
//! BPF with `seccompiler`, and installed in the sandbox's init right before it runs the command.
//!
//! A profile is a deny-list: every rule names syscalls that fail with an errno (EPERM, ENOSYS
//! or EAFNOSUPPORT), optionally only when its argument conditions hold. A syscall may appear in
//! several rules only if each has conditions and they share an errno: it is denied when any of
//! them holds. Everything else is allowed.

use std::collections::BTreeMap;
use std::path::Path;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use serde::Deserialize;

/// The default profile, compiled into the binary so that it cannot drift from the reviewed file.
pub const DEFAULT_PROFILE: &str = include_str!("../profiles/default.json");

/// Errors from loading or compiling a seccomp profile.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The profile is not valid JSON of the expected shape.
    #[error("seccomp profile is not valid")]
    Parse(#[source] serde_json::Error),
    /// A profile file could not be read.
    #[error("failed to read seccomp profile {path}")]
    Read {
        /// The file that was read.
        path: String,
        /// Why reading failed.
        #[source]
        source: std::io::Error,
    },
    /// The profile names a syscall this build does not know.
    #[error("seccomp profile names unknown syscall {0:?}")]
    UnknownSyscall(String),
    /// A rule has no comment saying why.
    #[error("seccomp rule for {0:?} has no comment: every rule must say why")]
    MissingComment(Vec<String>),
    /// A syscall appears in more than one rule, one of them unconditional or with another
    /// errno.
    #[error("syscall {0:?} appears in more than one seccomp rule (allowed only for rules with conditions and one errno)")]
    Duplicate(String),
    /// An errno other than EPERM, ENOSYS or EAFNOSUPPORT.
    #[error("seccomp rule uses unsupported errno {0:?}: use EPERM, ENOSYS or EAFNOSUPPORT")]
    BadErrno(String),
    /// An argument condition is malformed.
    #[error("seccomp rule for {0:?} has a bad argument condition (index 0-5, len 4 or 8, op masked_eq, eq, ge or le)")]
    BadArg(String),
    /// seccompiler refused the filter.
    #[error("failed to compile seccomp filter")]
    Compile(#[source] seccompiler::Error),
    /// Installing the filter failed.
    #[error("failed to install seccomp filter")]
    Install(#[source] seccompiler::Error),
}

type Result<T> = std::result::Result<T, SeccompError>;

/// A seccomp profile as written in `runtime/profiles/*.json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// What the profile is for (for its readers; the file must say it).
    #[allow(dead_code)]
    pub comment: String,
    /// The deny rules.
    pub rules: Vec<Rule>,
}

/// One deny rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Syscall names the rule applies to.
    pub syscalls: Vec<String>,
    /// The errno they fail with: `EPERM` or `ENOSYS`.
    pub errno: String,
    /// Conditions that must all hold for the rule to apply; none means always.
    #[serde(default)]
    pub args: Vec<ArgCondition>,
    /// Why these syscalls are denied.
    pub comment: String,
}

/// A test of one argument: `(arg[index] & mask) == value` (op `masked_eq`, the default), or
/// `arg[index] == value`, `>= value`, `<= value` (ops `eq`, `ge`, `le`; `mask` unused).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArgCondition {
    /// Argument index, 0-5.
    pub index: u8,
    /// Width of the argument in bytes: 4 for `int`, 8 for `long`.
    pub len: u8,
    /// The comparison [default: `masked_eq`].
    #[serde(default)]
    pub op: Option<String>,
    /// Bits to test (`masked_eq` only).
    #[serde(default)]
    pub mask: u64,
    /// Value the argument is compared with.
    pub value: u64,
}

impl ArgCondition {
    fn cmp_op(&self) -> Option<SeccompCmpOp> {
        match self.op.as_deref() {
            None | Some("masked_eq") => Some(SeccompCmpOp::MaskedEq(self.mask)),
            Some("eq") => Some(SeccompCmpOp::Eq),
            Some("ge") => Some(SeccompCmpOp::Ge),
            Some("le") => Some(SeccompCmpOp::Le),
            Some(_) => None,
        }
    }
}

/// The compiled filters of a profile, one per errno, ready to install.
#[derive(Debug, Clone)]
pub struct CompiledProfile {
    programs: Vec<BpfProgram>,
}

impl Profile {
    /// Parses and checks a profile: every rule commented, every syscall known, none twice.
    pub fn parse(text: &str) -> Result<Profile> {
        let profile: Profile = serde_json::from_str(text).map_err(SeccompError::Parse)?;
        // Each syscall's errno, and whether every rule naming it so far has conditions.
        let mut seen: BTreeMap<String, (String, bool)> = BTreeMap::new();
        for rule in &profile.rules {
            if rule.comment.trim().is_empty() {
                return Err(SeccompError::MissingComment(rule.syscalls.clone()));
            }
            errno_value(&rule.errno)?;
            let conditional = !rule.args.is_empty();
            for name in &rule.syscalls {
                syscall_number(name).ok_or_else(|| SeccompError::UnknownSyscall(name.clone()))?;
                if let Some((errno, was_conditional)) = seen.get(name) {
                    if !(conditional && *was_conditional && *errno == rule.errno) {
                        return Err(SeccompError::Duplicate(name.clone()));
                    }
                }
                seen.insert(name.clone(), (rule.errno.clone(), conditional));
            }
            for arg in &rule.args {
                if arg.index > 5 || !(arg.len == 4 || arg.len == 8) || arg.cmp_op().is_none() {
                    return Err(SeccompError::BadArg(rule.syscalls.join(",")));
                }
            }
        }
        Ok(profile)
    }

    /// Loads the built-in default profile.
    pub fn default_profile() -> Result<Profile> {
        Profile::parse(DEFAULT_PROFILE)
    }

    /// Loads a profile from a file.
    pub fn load(path: &Path) -> Result<Profile> {
        let text = std::fs::read_to_string(path).map_err(|source| SeccompError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Profile::parse(&text)
    }

    /// All syscall names the profile denies (in any condition).
    #[cfg(test)]
    pub fn denied_syscalls(&self) -> std::collections::BTreeSet<&str> {
        self.rules
            .iter()
            .flat_map(|r| r.syscalls.iter().map(String::as_str))
            .collect()
    }

    /// Compiles the profile to BPF for the architecture this binary was built for.
    pub fn compile(&self) -> Result<CompiledProfile> {
        let arch = if cfg!(target_arch = "aarch64") {
            TargetArch::aarch64
        } else {
            TargetArch::x86_64
        };
        // One filter per errno: seccompiler gives a filter a single match action. The kernel
        // runs every installed filter and the syscalls of the filters are disjoint.
        let mut by_errno: BTreeMap<u32, BTreeMap<i64, Vec<SeccompRule>>> = BTreeMap::new();
        for rule in &self.rules {
            let errno = errno_value(&rule.errno)?;
            let conditions = rule
                .args
                .iter()
                .map(|a| {
                    let len = if a.len == 4 {
                        SeccompCmpArgLen::Dword
                    } else {
                        SeccompCmpArgLen::Qword
                    };
                    let op = a
                        .cmp_op()
                        .ok_or_else(|| SeccompError::BadArg(rule.syscalls.join(",")))?;
                    SeccompCondition::new(a.index, len, op, a.value)
                        .map_err(|e| SeccompError::Compile(e.into()))
                })
                .collect::<Result<Vec<_>>>()?;
            for name in &rule.syscalls {
                let nr = syscall_number(name)
                    .ok_or_else(|| SeccompError::UnknownSyscall(name.clone()))?;
                let rules = by_errno.entry(errno).or_default().entry(nr).or_default();
                if !conditions.is_empty() {
                    rules.push(
                        SeccompRule::new(conditions.clone())
                            .map_err(|e| SeccompError::Compile(e.into()))?,
                    );
                }
            }
        }
        let mut programs = Vec::new();
        for (errno, rules) in by_errno {
            let filter = SeccompFilter::new(
                rules,
                SeccompAction::Allow,
                SeccompAction::Errno(errno),
                arch,
            )
            .map_err(|e| SeccompError::Compile(e.into()))?;
            programs
                .push(BpfProgram::try_from(filter).map_err(|e| SeccompError::Compile(e.into()))?);
        }
        Ok(CompiledProfile { programs })
    }
}

impl CompiledProfile {
    /// Installs the filters on the calling thread. Requires no_new_privs (set by libcontainer
    /// from the spec) or CAP_SYS_ADMIN. After this the denied syscalls fail for this process and
    /// every process it starts.
    pub fn install(&self) -> Result<()> {
        for program in &self.programs {
            seccompiler::apply_filter(program).map_err(SeccompError::Install)?;
        }
        Ok(())
    }
}

fn errno_value(name: &str) -> Result<u32> {
    match name {
        "EPERM" => Ok(libc::EPERM.unsigned_abs()),
        "ENOSYS" => Ok(libc::ENOSYS.unsigned_abs()),
        "EAFNOSUPPORT" => Ok(libc::EAFNOSUPPORT.unsigned_abs()),
        other => Err(SeccompError::BadErrno(other.to_string())),
    }
}

/// Builds `syscall_number` from a name → `libc::SYS_*` table.
macro_rules! sys {
    ($($name:literal => $nr:ident),* $(,)?) => {
        /// The number of a syscall on this architecture, by name.
        pub fn syscall_number(name: &str) -> Option<i64> {
            match name {
                $($name => Some(libc::$nr),)*
                _ => None,
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
sys! {
    "acct" => SYS_acct, "add_key" => SYS_add_key, "adjtimex" => SYS_adjtimex, "bpf" => SYS_bpf,
    "clock_adjtime" => SYS_clock_adjtime, "clock_settime" => SYS_clock_settime, "clone" => SYS_clone,
    "clone3" => SYS_clone3, "delete_module" => SYS_delete_module,
    "finit_module" => SYS_finit_module, "fsconfig" => SYS_fsconfig, "fsmount" => SYS_fsmount,
    "fsopen" => SYS_fsopen, "fspick" => SYS_fspick,
    "init_module" => SYS_init_module, "io_uring_enter" => SYS_io_uring_enter,
    "io_uring_register" => SYS_io_uring_register, "io_uring_setup" => SYS_io_uring_setup,
    "ioperm" => SYS_ioperm, "iopl" => SYS_iopl, "kcmp" => SYS_kcmp, "kexec_file_load" => SYS_kexec_file_load,
    "kexec_load" => SYS_kexec_load, "keyctl" => SYS_keyctl, "lookup_dcookie" => SYS_lookup_dcookie,
    "mount" => SYS_mount, "mount_setattr" => SYS_mount_setattr, "move_mount" => SYS_move_mount,
    "name_to_handle_at" => SYS_name_to_handle_at, "nfsservctl" => SYS_nfsservctl,
    "open_by_handle_at" => SYS_open_by_handle_at, "open_tree" => SYS_open_tree,
    "perf_event_open" => SYS_perf_event_open, "pivot_root" => SYS_pivot_root,
    "process_vm_readv" => SYS_process_vm_readv, "process_vm_writev" => SYS_process_vm_writev,
    "ptrace" => SYS_ptrace, "quotactl" => SYS_quotactl,
    "reboot" => SYS_reboot, "request_key" => SYS_request_key, "setns" => SYS_setns,
    "settimeofday" => SYS_settimeofday, "socket" => SYS_socket, "swapoff" => SYS_swapoff, "swapon" => SYS_swapon,
    "syslog" => SYS_syslog, "umount2" => SYS_umount2, "unshare" => SYS_unshare,
    "userfaultfd" => SYS_userfaultfd, "uselib" => SYS_uselib, "vhangup" => SYS_vhangup,
    "_sysctl" => SYS__sysctl,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_default_profile_parses_and_compiles() {
        let p = Profile::default_profile().unwrap();
        let denied = p.denied_syscalls();
        for must in [
            "mount",
            "umount2",
            "ptrace",
            "kexec_load",
            "kexec_file_load",
            "bpf",
            "init_module",
            "finit_module",
            "delete_module",
            "keyctl",
            "add_key",
            "request_key",
            "userfaultfd",
            "perf_event_open",
            "open_by_handle_at",
            "pivot_root",
            "swapon",
            "swapoff",
            "reboot",
            "setns",
            "unshare",
            "clone3",
        ] {
            assert!(denied.contains(must), "default profile must deny {must}");
        }
        let compiled = p.compile().unwrap();
        assert_eq!(
            compiled.programs.len(),
            3,
            "one filter for EPERM, one for ENOSYS, one for EAFNOSUPPORT"
        );
    }

    #[test]
    fn test_profile_checks() {
        let dup = r#"{"comment":"c","rules":[{"syscalls":["bpf"],"errno":"EPERM","comment":"a"},{"syscalls":["bpf"],"errno":"EPERM","comment":"b"}]}"#;
        assert!(matches!(
            Profile::parse(dup),
            Err(SeccompError::Duplicate(_))
        ));
        let nocomment =
            r#"{"comment":"c","rules":[{"syscalls":["bpf"],"errno":"EPERM","comment":" "}]}"#;
        assert!(matches!(
            Profile::parse(nocomment),
            Err(SeccompError::MissingComment(_))
        ));
        let unknown = r#"{"comment":"c","rules":[{"syscalls":["frobnicate"],"errno":"EPERM","comment":"x"}]}"#;
        assert!(matches!(
            Profile::parse(unknown),
            Err(SeccompError::UnknownSyscall(_))
        ));
        let errno =
            r#"{"comment":"c","rules":[{"syscalls":["bpf"],"errno":"EACCES","comment":"x"}]}"#;
        assert!(matches!(
            Profile::parse(errno),
            Err(SeccompError::BadErrno(_))
        ));
        // A syscall in several rules: only when all have conditions and one errno.
        let or = r#"{"comment":"c","rules":[
            {"syscalls":["socket"],"errno":"EAFNOSUPPORT","comment":"a","args":[{"index":0,"len":4,"op":"eq","value":40}]},
            {"syscalls":["socket"],"errno":"EAFNOSUPPORT","comment":"b","args":[{"index":0,"len":4,"op":"ge","value":50}]}]}"#;
        Profile::parse(or).unwrap().compile().unwrap();
        let mixed = r#"{"comment":"c","rules":[
            {"syscalls":["socket"],"errno":"EAFNOSUPPORT","comment":"a","args":[{"index":0,"len":4,"op":"eq","value":40}]},
            {"syscalls":["socket"],"errno":"EPERM","comment":"b","args":[{"index":0,"len":4,"op":"ge","value":50}]}]}"#;
        assert!(matches!(
            Profile::parse(mixed),
            Err(SeccompError::Duplicate(_))
        ));
        let badop = r#"{"comment":"c","rules":[{"syscalls":["socket"],"errno":"EPERM","comment":"a","args":[{"index":0,"len":4,"op":"gt","value":1}]}]}"#;
        assert!(matches!(
            Profile::parse(badop),
            Err(SeccompError::BadArg(_))
        ));
        let extra = r#"{"comment":"c","rules":[],"allow":[]}"#;
        assert!(matches!(Profile::parse(extra), Err(SeccompError::Parse(_))));
    }
}
