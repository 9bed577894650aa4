//! `agentd serve` configuration: flags, `AGENTD_*` environment variables and an optional TOML
//! file (same keys as the flags, with underscores), validated once at start into [`Config`].
//!
//! Precedence: a flag (or its environment variable) beats the file, which beats the defaults.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use serde::{Deserialize, Serialize};

/// Default state dir: images, sandboxes and the database live here.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/agentd";
/// Default API socket (root only).
pub const DEFAULT_SOCKET: &str = "/run/agentd/agentd.sock";
/// Default bridge name.
pub const DEFAULT_BRIDGE: &str = "agentd0";
/// Default sandbox subnet: the bridge takes the first address, sandboxes the rest. A /16 in
/// the private range that common tools (docker 172.17/16, podman 10.88/16) do not use.
pub const DEFAULT_SUBNET: &str = "10.209.0.0/16";
/// Port of the LLM gateway on the bridge address.
pub const DEFAULT_GATEWAY_PORT: u16 = 4199;
/// Port of the egress proxy on the bridge address (next to the gateway's).
pub const DEFAULT_EGRESS_PORT: u16 = 4198;
/// Default port of network mode open (TCP: the NAT; UDP: the DNS relay).
pub const DEFAULT_EGRESS_NAT_PORT: u16 = 4197;
/// Most sandboxes at once.
pub const DEFAULT_MAX_SANDBOXES: usize = 64;
/// Memory limit of a sandbox that asks for none: OpenCode needs about 500 MiB after a prompt.
pub const DEFAULT_SANDBOX_MEMORY: &str = "2g";
/// Most processes (tasks) in a sandbox that asks for no limit. A 2g sandbox holds ~16,700
/// processes and a host's pid_max is often 32,768, so without a limit two sandboxes could
/// stop every fork on the host; builds with parallel jobs and language servers stay far below.
pub const DEFAULT_SANDBOX_PIDS: u64 = 2048;
/// Writable layer of a sandbox that asks for no disk limit (bytes and, one per 16 KiB, inodes;
/// see `agentd_runtime::disk`). Sparse: the host pays for what is written, not for the limit.
pub const DEFAULT_SANDBOX_DISK: &str = "10g";
/// Size of each dependency cache when the config names none.
pub const DEFAULT_DEPENDENCY_CACHE: &str = "4g";
/// Largest warm pool of one image.
pub const MAX_POOL_SIZE: u32 = 256;
/// Longest `ttl_secs` and `idle_timeout_secs`: a year.
pub const MAX_SANDBOX_TIMEOUT_SECS: u64 = 366 * 24 * 3600;
/// Seconds without API traffic after which a sandbox is stopped and removed.
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 1800;
/// First host uid/gid of the range every daemon sandbox maps its ids 0-65535 to. Above the
/// ranges `agentd run` hands out (100000 + 1024 x 65536), below 2^31.
pub const DEFAULT_ID_BASE: u32 = 200_000_000;
/// Seconds a finished task's sandboxes are kept for inspection before they are removed.
pub const DEFAULT_TASK_GRACE_SECS: u64 = 600;
/// Model name OpenCode asks the gateway for when the config names none.
pub const DEFAULT_LLM_MODEL: &str = "default";

/// The settings of `agentd serve`, one struct for all three sources: every field is a flag, an
/// `AGENTD_*` variable and a key of the TOML file (`--config`). Flags and variables win over
/// the file ([`ServeArgs::over`]).
#[derive(Debug, Args, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeArgs {
    /// TOML config file with the same keys as these flags (underscores for dashes).
    #[arg(long, env = "AGENTD_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// State dir: database, images, sandboxes [default: /var/lib/agentd].
    #[arg(long, env = "AGENTD_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Image store [default: <state-dir>/images].
    #[arg(long, env = "AGENTD_IMAGES_DIR")]
    pub images_dir: Option<PathBuf>,
    /// API Unix socket, root only [default: /run/agentd/agentd.sock].
    #[arg(long, env = "AGENTD_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Also serve the API on this TCP address; every request then needs the bearer token.
    #[arg(long, env = "AGENTD_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// File holding the bearer token for TCP [default: <state-dir>/api-token, made if missing].
    #[arg(long, env = "AGENTD_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Also serve SSH on this address: `ssh -p PORT SANDBOX@HOST` is a shell in the sandbox
    /// (exec, SFTP and `-L` forwarding to the sandbox's ports too) [default: off].
    #[arg(long, env = "AGENTD_SSH_LISTEN")]
    pub ssh_listen: Option<SocketAddr>,
    /// The public keys SSH accepts, in OpenSSH's authorized_keys format; read at every login
    /// [default: <state-dir>/ssh/authorized_keys].
    #[arg(long, env = "AGENTD_SSH_AUTHORIZED_KEYS")]
    pub ssh_authorized_keys: Option<PathBuf>,
    /// OpenAI-compatible upstream the LLM gateway forwards to (e.g. https://host/v1).
    #[arg(long, env = "AGENTD_LLM_BASE_URL")]
    pub llm_base_url: Option<String>,
    /// File holding the upstream's API key (it never enters a sandbox).
    #[arg(long, env = "AGENTD_LLM_API_KEY_FILE")]
    pub llm_api_key_file: Option<PathBuf>,
    /// Model OpenCode uses by default [default: default].
    #[arg(long, env = "AGENTD_LLM_MODEL")]
    pub llm_model: Option<String>,
    /// The only models sandboxes and tasks may ask for (comma-separated; in TOML a list); a
    /// create asking for another is refused with the list [default: any model the upstream
    /// lists].
    #[arg(long = "llm-models", env = "AGENTD_LLM_MODELS", value_delimiter = ',')]
    pub llm_models: Option<Vec<String>>,
    /// An LLM upstream besides (or instead of) llm_base_url's:
    /// `name=N,kind=K,base_url=URL[,api_key_file=PATH][,models=A|B]`, where kind is
    /// openai-compatible (chat completions), openai (OpenAI's Responses API) or anthropic
    /// (Anthropic's Messages API); sandboxes name its models `N/MODEL` (repeatable, `;`
    /// between them in the variable; in TOML one `[[llm_upstreams]]` table each)
    /// [default: none].
    #[arg(
        long = "llm-upstream",
        env = "AGENTD_LLM_UPSTREAMS",
        value_delimiter = ';'
    )]
    pub llm_upstreams: Option<Vec<crate::gateway::upstream::UpstreamArg>>,
    /// A model's price: `MODEL=INPUT,OUTPUT` per million tokens in llm_currency, MODEL as
    /// sandboxes name it (`claude/claude-sonnet-4-5=3,15`); needed for cost budgets
    /// (repeatable, `;` between them in the variable; in TOML a list) [default: none].
    #[arg(long = "llm-price", env = "AGENTD_LLM_PRICES", value_delimiter = ';')]
    pub llm_prices: Option<Vec<String>>,
    /// The currency of llm_prices and of cost budgets [default: USD].
    #[arg(long, env = "AGENTD_LLM_CURRENCY")]
    pub llm_currency: Option<String>,
    /// Most tokens (input + output) all sandboxes together may spend per UTC day; past it
    /// the gateway refuses every request until midnight UTC [default: no limit].
    #[arg(long, env = "AGENTD_LLM_DAILY_TOKENS")]
    pub llm_daily_tokens: Option<u64>,
    /// Most cost (in llm_currency, from llm_prices) all sandboxes together may spend per UTC
    /// day; requests for unpriced models are then refused [default: no limit].
    #[arg(long, env = "AGENTD_LLM_DAILY_COST")]
    pub llm_daily_cost: Option<f64>,
    /// Keep each request's last message (its prompt, 4 KiB at most) in the gateway's audit
    /// log; off, the log never holds what agents said [default: false].
    #[arg(long, env = "AGENTD_LLM_LOG_PROMPTS")]
    pub llm_log_prompts: Option<bool>,
    /// Each task attempt's token budget when the task gives none [default: none].
    #[arg(long, env = "AGENTD_TASK_BUDGET_TOKENS")]
    pub task_budget_tokens: Option<u64>,
    /// Bridge for sandbox networking [default: agentd0].
    #[arg(long, env = "AGENTD_BRIDGE")]
    pub bridge: Option<String>,
    /// Sandbox subnet, IPv4 CIDR [default: 10.209.0.0/16].
    #[arg(long, env = "AGENTD_SUBNET")]
    pub subnet: Option<String>,
    /// Port of the LLM gateway on the bridge address [default: 4199].
    #[arg(long, env = "AGENTD_GATEWAY_PORT")]
    pub gateway_port: Option<u16>,
    /// Port of the egress proxy (allowlist mode) on the bridge address [default: 4198].
    #[arg(long, env = "AGENTD_EGRESS_PORT")]
    pub egress_port: Option<u16>,
    /// Port of network mode open on the bridge address: TCP for the NAT, UDP for the DNS
    /// relay [default: 4197].
    #[arg(long, env = "AGENTD_EGRESS_NAT_PORT")]
    pub egress_nat_port: Option<u16>,
    /// The domain under which each sandbox has origins on the TCP listener:
    /// `{sandbox}.{base}` (its OpenCode) and `{port}-{sandbox}.{base}` (a port inside)
    /// [default: localhost, which browsers resolve to loopback without DNS].
    #[arg(long, env = "AGENTD_ORIGIN_BASE")]
    pub origin_base: Option<String>,
    /// Whether sandboxes and tasks may ask for network mode open (any public address, through
    /// agentd's NAT) [default: true].
    #[arg(long, env = "AGENTD_EGRESS_OPEN")]
    pub egress_open: Option<bool>,
    /// A named list of hosts a sandbox's network.allow (or --allow) may name at once:
    /// NAME=HOST[,HOST...], e.g. pkgs=registry.example,*.cdn.example (repeatable; in TOML a
    /// list of such strings) [default: none].
    #[arg(
        long = "egress-preset",
        env = "AGENTD_EGRESS_PRESETS",
        value_delimiter = ';'
    )]
    pub egress_presets: Option<Vec<String>>,
    /// A warm pool: IMAGE=N keeps N sandboxes of IMAGE started ahead (OpenCode ready, then
    /// paused), which creates and task attempts that ask for nothing the pool cannot give
    /// take at once (repeatable; in TOML a list of such strings; `PUT /v1/pools/IMAGE`
    /// changes it live) [default: none].
    #[arg(long = "warm-pool", env = "AGENTD_WARM_POOLS", value_delimiter = ';')]
    pub warm_pools: Option<Vec<String>>,
    /// Let the kernel keep identical memory pages of sandboxes once (KSM; Linux 6.4+, and
    /// the host must turn it on: echo 1 > /sys/kernel/mm/ksm/run). Many idle OpenCode
    /// sandboxes then cost much less memory, but sandboxes can then probe each other's
    /// memory contents through timing: only for sandboxes that trust each other
    /// [default: false].
    #[arg(long, env = "AGENTD_MEMORY_MERGE")]
    pub memory_merge: Option<bool>,
    /// Let OpenCode's JavaScript engine compile to machine code (its JIT). `false` runs it
    /// interpreted: an idle OpenCode then holds about 50 MiB less (191 against 242 MiB per
    /// paused sandbox in `cargo xtask bench density` here), but it starts about 0.5 s slower
    /// and its work is much slower (a one-round task's round 8.1 s against 1.3 s in `cargo
    /// xtask bench pool`): for many sandboxes that mostly wait. A sandbox's `env` can still
    /// say `BUN_JSC_useJIT=1` [default: true].
    #[arg(long, env = "AGENTD_OPENCODE_JIT")]
    pub opencode_jit: Option<bool>,
    /// Internal networks the egress proxy may connect to, comma-separated CIDRs (e.g. a
    /// package mirror at 10.1.2.3/32) [default: none: loopback, private, link-local and
    /// metadata addresses are refused].
    #[arg(long, env = "AGENTD_EGRESS_ALLOW_NETWORKS", value_delimiter = ',')]
    pub egress_allow_networks: Option<Vec<String>>,
    /// A CA bundle (PEM) that sandboxes in allowlist mode trust instead of their image's, for
    /// a TLS-inspecting proxy in front of this host: give a full bundle (e.g. this host's
    /// /etc/ssl/certs/ca-certificates.crt). Copied into the state dir at start [default: none].
    #[arg(long, env = "AGENTD_EGRESS_CA_FILE")]
    pub egress_ca_file: Option<PathBuf>,
    /// A git credential-store file (`https://user:token@host` lines, mode 0600) for pushing
    /// attempts' branches to git-URL workspaces (`agentd task push`) [default: none].
    #[arg(long, env = "AGENTD_GIT_CREDENTIALS")]
    pub git_credentials: Option<PathBuf>,
    /// Most sandboxes at once [default: 64].
    #[arg(long, env = "AGENTD_MAX_SANDBOXES")]
    pub max_sandboxes: Option<usize>,
    /// Most memory committed to sandboxes in total, e.g. 16g [default: the host's RAM].
    #[arg(long, env = "AGENTD_MAX_MEMORY")]
    pub max_memory: Option<String>,
    /// Memory limit of a sandbox that asks for none [default: 2g].
    #[arg(long, env = "AGENTD_SANDBOX_MEMORY")]
    pub sandbox_memory: Option<String>,
    /// Idle timeout of a sandbox that asks for none, seconds (0: never) [default: 1800].
    #[arg(long, env = "AGENTD_IDLE_TIMEOUT")]
    pub idle_timeout: Option<u64>,
    /// Process limit of a sandbox that asks for none [default: 2048].
    #[arg(long, env = "AGENTD_SANDBOX_PIDS")]
    pub sandbox_pids: Option<u64>,
    /// Size of the writable layer of a sandbox that asks for none, e.g. 20g, or `none` for no
    /// bound on what sandboxes write to the host's disk [default: 10g].
    #[arg(long, env = "AGENTD_SANDBOX_DISK")]
    pub sandbox_disk: Option<String>,
    /// Internal networks git URLs of TCP clients may reach, comma-separated CIDRs, e.g.
    /// 10.1.0.0/16 [default: none: loopback, private, link-local and metadata addresses are
    /// refused over TCP].
    #[arg(long, env = "AGENTD_GIT_ALLOW_NETWORKS", value_delimiter = ',')]
    pub git_allow_networks: Option<Vec<String>>,
    /// Log format: text or json [default: text].
    #[arg(long, env = "AGENTD_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Cgroup parent of the sandboxes, under every controller [default: agentd/serve].
    #[arg(long, env = "AGENTD_CGROUP_PARENT")]
    pub cgroup_parent: Option<String>,
    /// Cache of the default image's build [default: <state-dir>/build-cache].
    #[arg(long, env = "AGENTD_BUILD_CACHE")]
    pub build_cache: Option<PathBuf>,
    /// Seconds a finished task's sandboxes are kept for inspection, then removed [default: 600].
    #[arg(long, env = "AGENTD_TASK_GRACE")]
    pub task_grace: Option<u64>,
    /// Size of each dependency cache (pip, npm, uv, yarn downloads kept for the next setup of
    /// the same repository and image), or `none` for no caches [default: 4g].
    #[arg(long, env = "AGENTD_DEPENDENCY_CACHE")]
    pub dependency_cache: Option<String>,
}

impl ServeArgs {
    /// These settings over `file`'s: each one set here wins, the file fills in the rest.
    pub fn over(self, file: ServeArgs) -> anyhow::Result<ServeArgs> {
        let mut merged = serde_json::to_value(file)?;
        if let (Some(m), serde_json::Value::Object(mine)) =
            (merged.as_object_mut(), serde_json::to_value(self)?)
        {
            m.extend(mine.into_iter().filter(|(_, v)| !v.is_null()));
        }
        Ok(serde_json::from_value(merged)?)
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

pub use crate::gateway::upstream::LlmUpstream;

/// Validated daemon configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// State dir.
    pub state_dir: PathBuf,
    /// Image store root.
    pub images_dir: PathBuf,
    /// API Unix socket.
    pub socket: PathBuf,
    /// Optional TCP listener address.
    pub listen: Option<SocketAddr>,
    /// Bearer token file for TCP.
    pub token_file: PathBuf,
    /// Optional SSH listener address.
    pub ssh_listen: Option<SocketAddr>,
    /// The keys SSH accepts.
    pub ssh_authorized_keys: PathBuf,
    /// LLM upstreams; the first is the one a model without `UPSTREAM/` goes to.
    pub llm: Vec<LlmUpstream>,
    /// Default model name.
    pub llm_model: String,
    /// Prices by (upstream, model).
    pub llm_prices: std::collections::BTreeMap<(String, String), crate::gateway::spend::Price>,
    /// The currency of prices and cost budgets.
    pub llm_currency: String,
    /// The daemon's daily token budget.
    pub llm_daily_tokens: Option<u64>,
    /// The daemon's daily cost budget.
    pub llm_daily_cost: Option<f64>,
    /// The audit log keeps prompts.
    pub llm_log_prompts: bool,
    /// A task attempt's default token budget.
    pub task_budget_tokens: Option<u64>,
    /// Bridge name.
    pub bridge: String,
    /// Network address of the sandbox subnet.
    pub subnet: Ipv4Addr,
    /// Prefix length of the subnet.
    pub prefix_len: u8,
    /// Gateway port on the bridge address.
    pub gateway_port: u16,
    /// Egress proxy port on the bridge address.
    pub egress_port: u16,
    /// Network mode open may be asked for.
    pub egress_open: bool,
    /// The domain of sandboxes' origins.
    pub origin_base: String,
    /// Network mode open's port on the bridge address (TCP and UDP).
    pub egress_nat_port: u16,
    /// Named host lists for allow lists.
    pub egress_presets: std::collections::BTreeMap<String, Vec<String>>,
    /// Warm pools at start: image and size.
    pub warm_pools: std::collections::BTreeMap<String, u32>,
    /// Sandboxes' memory is mergeable by KSM.
    pub memory_merge: bool,
    /// OpenCode's JavaScript engine may JIT-compile (else `BUN_JSC_useJIT=0`).
    pub opencode_jit: bool,
    /// Internal networks the egress proxy may connect to.
    pub egress_allow_networks: Vec<crate::workspace::Network>,
    /// The CA bundle allowlist sandboxes trust, as given.
    pub egress_ca_file: Option<PathBuf>,
    /// The git credential-store file pushes use.
    pub git_credentials: Option<PathBuf>,
    /// Most sandboxes at once.
    pub max_sandboxes: usize,
    /// Most memory committed in total, bytes.
    pub max_memory: u64,
    /// Default sandbox memory limit, bytes.
    pub sandbox_memory: u64,
    /// Default idle timeout, seconds (0: never).
    pub idle_timeout: u64,
    /// Default sandbox process limit.
    pub sandbox_pids: u64,
    /// Default size of a sandbox's writable layer, bytes (None: unbounded).
    pub sandbox_disk: Option<u64>,
    /// Internal networks TCP clients' git URLs may reach.
    pub git_allow_networks: Vec<crate::workspace::Network>,
    /// First host id of the sandboxes' id range.
    pub id_base: u32,
    /// Log format.
    pub log_format: LogFormat,
    /// Cgroup parent of the sandboxes.
    pub cgroup_parent: String,
    /// Build cache of the default image.
    pub build_cache: PathBuf,
    /// Seconds a finished task's sandboxes are kept.
    pub task_grace: u64,
    /// Size of each dependency cache; None: no caches.
    pub dependency_cache: Option<u64>,
}

impl Config {
    /// The bridge's own address: the first host of the subnet.
    pub fn bridge_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet) + 1)
    }

    /// Where the database lives.
    pub fn db_path(&self) -> PathBuf {
        self.state_dir.join("agentd.redb")
    }

    /// The image store root.
    pub fn images_dir(&self) -> PathBuf {
        self.images_dir.clone()
    }

    /// The sandboxes' state root (one dir per sandbox, owned by its shim).
    pub fn sandboxes_dir(&self) -> PathBuf {
        self.state_dir.join("sandboxes")
    }

    /// Reads the file (if any), merges flags and env over it and validates the result.
    pub fn load(args: ServeArgs) -> anyhow::Result<Config> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| {
                    format!("failed to read the config file {}", path.display())
                })?;
                toml::from_str::<ServeArgs>(&text)
                    .with_context(|| format!("invalid config file {}", path.display()))?
            }
            None => ServeArgs::default(),
        };
        let args = args.over(file)?;
        // Paths are made absolute once: the shims, the overlay mounts and the layer checks
        // need absolute paths, whatever the daemon's working directory.
        let abs = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
        let state_dir = abs(args
            .state_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)));
        let token_file = args
            .token_file
            .unwrap_or_else(|| state_dir.join("api-token"));
        let llm = crate::gateway::upstream::from_config(
            args.llm_base_url,
            args.llm_api_key_file,
            args.llm_models.unwrap_or_default(),
            args.llm_upstreams.unwrap_or_default(),
            read_secret,
        )?;
        let subnet_text = args.subnet.unwrap_or_else(|| DEFAULT_SUBNET.into());
        let (subnet, prefix_len) = parse_cidr(&subnet_text)?;
        let bridge = args.bridge.unwrap_or_else(|| DEFAULT_BRIDGE.into());
        if bridge.is_empty()
            || bridge.len() > 15
            || !bridge
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            bail!("bridge must be 1-15 letters, digits, - or _, got {bridge:?}");
        }
        let size = |what: &str, v: Option<String>, default: &str| -> anyhow::Result<u64> {
            let text = v.unwrap_or_else(|| default.to_string());
            agentd_runtime::parse_size(&text).map_err(|e| anyhow::anyhow!("{what}: {e}"))
        };
        let host_mem = host_memory().unwrap_or(u64::MAX);
        let max_memory = match args.max_memory {
            None => host_mem,
            Some(v) => size("max_memory", Some(v), "")?,
        };
        let sandbox_memory = size(
            "sandbox_memory",
            args.sandbox_memory,
            DEFAULT_SANDBOX_MEMORY,
        )?;
        if sandbox_memory < agentd_runtime::spec::MIN_MEMORY_BYTES {
            bail!("sandbox_memory must be at least 4m");
        }
        let sandbox_disk = match args.sandbox_disk {
            Some(v) if v.trim() == "none" => None,
            v => {
                let d = size("sandbox_disk", v, DEFAULT_SANDBOX_DISK)?;
                if d < agentd_runtime::disk::MIN_DISK_BYTES {
                    bail!("sandbox_disk must be at least 16m (or none), got {d} bytes");
                }
                Some(d)
            }
        };
        let git_credentials = args.git_credentials.clone().map(abs);
        if let Some(f) = &git_credentials {
            let meta =
                std::fs::metadata(f).with_context(|| format!("git_credentials {}", f.display()))?;
            if !meta.is_file()
                || std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o077 != 0
            {
                bail!(
                    "git_credentials {} must be a file only its owner reads: chmod 600 {}",
                    f.display(),
                    f.display()
                );
            }
        }
        let dependency_cache = match args.dependency_cache {
            Some(v) if v.trim() == "none" => None,
            v => {
                let d = size("dependency_cache", v, DEFAULT_DEPENDENCY_CACHE)?;
                if d < agentd_runtime::disk::MIN_DISK_BYTES {
                    bail!("dependency_cache must be at least 16m (or none), got {d} bytes");
                }
                Some(d)
            }
        };
        let log_format = match args.log_format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => bail!("log_format must be text or json, got {other:?}"),
        };
        let max_sandboxes = args.max_sandboxes.unwrap_or(DEFAULT_MAX_SANDBOXES);
        if max_sandboxes == 0 {
            bail!("max_sandboxes must be at least 1");
        }
        let gateway_port = args.gateway_port.unwrap_or(DEFAULT_GATEWAY_PORT);
        if gateway_port == 0 {
            bail!("gateway_port must not be 0");
        }
        let egress_port = args.egress_port.unwrap_or(DEFAULT_EGRESS_PORT);
        if egress_port == 0 || egress_port == gateway_port {
            bail!("egress_port must not be 0 nor the gateway's port");
        }
        let egress_nat_port = args.egress_nat_port.unwrap_or(DEFAULT_EGRESS_NAT_PORT);
        if egress_nat_port == 0 || egress_nat_port == gateway_port || egress_nat_port == egress_port
        {
            bail!("egress_nat_port must not be 0, the gateway's port nor egress_port");
        }
        let origin_base = args
            .origin_base
            .unwrap_or_else(|| "localhost".into())
            .trim_end_matches('.')
            .to_ascii_lowercase();
        if origin_base.is_empty()
            || origin_base.len() > 200
            || !origin_base.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
        {
            bail!("origin_base must be a domain name such as localhost or sandboxes.example.org, got {origin_base:?}");
        }
        let mut egress_presets = std::collections::BTreeMap::new();
        for p in args
            .egress_presets
            .iter()
            .flatten()
            .filter(|p| !p.trim().is_empty())
        {
            let (name, hosts) = p
                .split_once('=')
                .with_context(|| format!("egress preset {p:?}: write NAME=HOST[,HOST...]"))?;
            let name = name.trim();
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                bail!("egress preset {p:?}: the name must be letters, digits, '-' or '_'");
            }
            let hosts: Vec<String> = hosts
                .split(',')
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
                .collect();
            for h in &hosts {
                h.parse::<crate::egress::Rule>()
                    .map_err(|e| anyhow::anyhow!("egress preset {name}: {e}"))?;
            }
            egress_presets.insert(name.to_string(), hosts);
        }
        // The default model: the first upstream's first allowed one when llm_base_url's
        // upstream (whose models have always defaulted to "default") is not there.
        let llm_model = args.llm_model.unwrap_or_else(|| match llm.first() {
            Some(u) if u.name != crate::gateway::upstream::DEFAULT_NAME => {
                format!(
                    "{}/{}",
                    u.name,
                    u.models.first().map_or(DEFAULT_LLM_MODEL, String::as_str)
                )
            }
            _ => DEFAULT_LLM_MODEL.into(),
        });
        if let Some((u, m)) = crate::gateway::upstream::resolve(&llm, &llm_model) {
            if !u.models.is_empty() && !u.models.iter().any(|x| x == m) {
                let what = if u.name == crate::gateway::upstream::DEFAULT_NAME {
                    "llm_models".to_string()
                } else {
                    format!("the models of LLM upstream {:?}", u.name)
                };
                anyhow::bail!(
                    "llm_model {llm_model:?} is not in {what} ({}): allow it, or choose one of them",
                    u.models.join(", ")
                );
            }
        }
        let mut warm_pools = std::collections::BTreeMap::new();
        for p in args
            .warm_pools
            .iter()
            .flatten()
            .filter(|p| !p.trim().is_empty())
        {
            let (image, n) = p
                .rsplit_once('=')
                .with_context(|| format!("warm pool {p:?}: write IMAGE=N, e.g. opencode=4"))?;
            let n: u32 = n
                .trim()
                .parse()
                .ok()
                .filter(|n| *n <= MAX_POOL_SIZE)
                .with_context(|| {
                    format!("warm pool {p:?}: N must be a number from 0 to {MAX_POOL_SIZE}")
                })?;
            warm_pools.insert(image.trim().to_string(), n);
        }
        Ok(Config {
            socket: abs(args.socket.unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))),
            listen: args.listen,
            token_file,
            ssh_listen: args.ssh_listen,
            ssh_authorized_keys: abs(args
                .ssh_authorized_keys
                .unwrap_or_else(|| state_dir.join("ssh").join("authorized_keys"))),
            llm_prices: crate::gateway::spend::parse_prices(
                &args.llm_prices.unwrap_or_default(),
                &llm,
            )?,
            llm_currency: {
                let c = args.llm_currency.unwrap_or_else(|| "USD".into());
                if c.is_empty() || c.len() > 8 || !c.bytes().all(|b| b.is_ascii_alphanumeric()) {
                    bail!("llm_currency must be a short code such as USD or EUR, got {c:?}");
                }
                c
            },
            llm_daily_tokens: args.llm_daily_tokens,
            llm_daily_cost: match args.llm_daily_cost {
                Some(c) if !c.is_finite() || c <= 0.0 => {
                    bail!("llm_daily_cost must be a positive number, got {c}")
                }
                c => c,
            },
            llm_log_prompts: args.llm_log_prompts.unwrap_or(false),
            task_budget_tokens: args.task_budget_tokens,
            llm,
            llm_model,
            bridge,
            subnet,
            prefix_len,
            gateway_port,
            egress_port,
            egress_open: args.egress_open.unwrap_or(true),
            origin_base,
            egress_nat_port,
            egress_presets,
            warm_pools,
            memory_merge: args.memory_merge.unwrap_or(false),
            opencode_jit: args.opencode_jit.unwrap_or(true),
            egress_allow_networks: networks(
                "egress_allow_networks",
                args.egress_allow_networks.as_deref(),
            )?,
            egress_ca_file: args.egress_ca_file.map(abs),
            git_credentials,
            max_sandboxes,
            max_memory,
            sandbox_memory,
            idle_timeout: {
                let t = args.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT_SECS);
                if t > MAX_SANDBOX_TIMEOUT_SECS {
                    bail!("idle_timeout must be at most {MAX_SANDBOX_TIMEOUT_SECS} s");
                }
                t
            },
            git_allow_networks: networks("git_allow_networks", args.git_allow_networks.as_deref())?,
            sandbox_pids: {
                let p = args.sandbox_pids.unwrap_or(DEFAULT_SANDBOX_PIDS);
                if p < 16 {
                    bail!("sandbox_pids must be at least 16, got {p}");
                }
                p
            },
            sandbox_disk,
            id_base: DEFAULT_ID_BASE,
            log_format,
            cgroup_parent: {
                let p = args
                    .cgroup_parent
                    .unwrap_or_else(|| crate::sandbox::CGROUP_PARENT.into());
                if p.is_empty()
                    || p.starts_with('/')
                    || p.split('/').any(|c| c.is_empty() || c == "." || c == "..")
                {
                    bail!("cgroup_parent must be a relative path like agentd/serve, got {p:?}");
                }
                p
            },
            task_grace: args.task_grace.unwrap_or(DEFAULT_TASK_GRACE_SECS),
            dependency_cache,
            build_cache: abs(args
                .build_cache
                .unwrap_or_else(|| state_dir.join("build-cache"))),
            images_dir: abs(args.images_dir.unwrap_or_else(|| state_dir.join("images"))),
            state_dir,
        })
    }
}

/// Reads a secret from a file: trimmed, must not be empty.
pub fn read_secret(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read {}", path.display()))?;
    let s = text.trim();
    if s.is_empty() {
        bail!("{} is empty", path.display());
    }
    Ok(s.to_string())
}

/// Parses `a.b.c.d/n` into the network address and prefix length; the subnet must leave room
/// for the bridge and at least one sandbox.
pub fn parse_cidr(s: &str) -> anyhow::Result<(Ipv4Addr, u8)> {
    let bad = || anyhow::anyhow!("subnet must be an IPv4 CIDR like 10.209.0.0/16, got {s:?}");
    let (addr, len) = s.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    if !(8..=28).contains(&len) {
        bail!("subnet prefix length must be between 8 and 28, got /{len}");
    }
    let mask = u32::MAX << (32 - u32::from(len));
    if u32::from(addr) & !mask != 0 {
        bail!(
            "subnet {s} has host bits set: use {}/{len}",
            Ipv4Addr::from(u32::from(addr) & mask)
        );
    }
    Ok((addr, len))
}

fn host_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A list of CIDRs from a setting named `what` (empty entries skipped).
fn networks(what: &str, list: Option<&[String]>) -> anyhow::Result<Vec<crate::workspace::Network>> {
    list.unwrap_or_default()
        .iter()
        .filter(|n| !n.trim().is_empty())
        .map(|n| {
            n.parse()
                .map_err(|e: String| anyhow::anyhow!("{what}: {e}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_defaults_without_flags() {
        let c = Config::load(ServeArgs::default()).unwrap();
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.bridge_addr(), Ipv4Addr::new(10, 209, 0, 1));
        assert_eq!(c.prefix_len, 16);
        assert!(c.llm.is_empty());
    }

    /// README's gateway config, as written there (its key files made here): the upstreams
    /// load in order, the default model resolves to the Anthropic one, and a flag's upstream
    /// comes through the merge of flags over the file.
    #[test]
    fn test_readmes_llm_upstreams_config_loads() {
        let readme = include_str!("../../../README.md");
        let start = readme
            .find("# /etc/agentd/agentd.toml")
            .expect("README has the gateway's config example");
        let text = &readme[start..start + readme[start..].find("```").unwrap()];
        let dir = tempfile::tempdir().unwrap();
        for k in ["anthropic.key", "local.key"] {
            std::fs::write(dir.path().join(k), "k\n").unwrap();
        }
        let text = text.replace("/etc/agentd/", &format!("{}/", dir.path().display()));
        let f = dir.path().join("agentd.toml");
        std::fs::write(&f, text).unwrap();
        let c = Config::load(ServeArgs {
            config: Some(f),
            llm_upstreams: Some(vec![format!(
                "name=gpt,kind=openai,base_url=http://x/v1,api_key_file={}/local.key",
                dir.path().display()
            )
            .parse()
            .unwrap()]),
            ..Default::default()
        })
        .unwrap();
        let names: Vec<_> = c
            .llm
            .iter()
            .map(|u| (u.name.as_str(), u.kind.as_str()))
            .collect();
        // Flags win over the file for the same key: the flag's list replaces the file's.
        assert_eq!(names, [("gpt", "openai")]);
        let c = Config::load(ServeArgs {
            config: Some(dir.path().join("agentd.toml")),
            ..Default::default()
        })
        .unwrap();
        let names: Vec<_> = c
            .llm
            .iter()
            .map(|u| (u.name.as_str(), u.kind.as_str()))
            .collect();
        assert_eq!(
            names,
            [("claude", "anthropic"), ("local", "openai-compatible")]
        );
        assert_eq!(c.llm_model, "claude/claude-sonnet-4-5");
        assert_eq!(c.llm[0].api_key.as_deref(), Some("k"));
    }

    #[test]
    fn test_file_and_flag_precedence_and_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("agentd.toml");
        std::fs::write(&f, "state_dir = \"/srv/a\"\nmax_sandboxes = 3\n").unwrap();
        let args = ServeArgs {
            config: Some(f.clone()),
            max_sandboxes: Some(5),
            ..Default::default()
        };
        let c = Config::load(args).unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/srv/a"));
        assert_eq!(c.max_sandboxes, 5);
        std::fs::write(&f, "stat_dir = \"/srv/a\"\n").unwrap();
        let err = Config::load(ServeArgs {
            config: Some(f),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("unknown field `stat_dir`"),
            "{err:#}"
        );
    }

    #[test]
    fn test_every_kind_of_key_goes_through_the_merge() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("agentd.toml");
        std::fs::write(
            &f,
            "listen = \"127.0.0.1:7070\"\ngit_allow_networks = [\"10.0.0.0/8\"]\nsandbox_disk = \"20g\"\nsandbox_pids = 99\n",
        )
        .unwrap();
        let c = Config::load(ServeArgs {
            config: Some(f),
            sandbox_disk: Some("none".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.listen, Some("127.0.0.1:7070".parse().unwrap()));
        assert_eq!(c.git_allow_networks.len(), 1);
        assert_eq!(c.sandbox_disk, None, "the flag wins over the file");
        assert_eq!(c.sandbox_pids, 99);
    }

    #[test]
    fn test_git_credentials_must_be_private_and_caches_sized() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("credentials");
        std::fs::write(&f, "https://u:t@git.example\n").unwrap();
        let load = |dependency_cache: Option<&str>| {
            Config::load(ServeArgs {
                git_credentials: Some(f.clone()),
                dependency_cache: dependency_cache.map(String::from),
                ..Default::default()
            })
        };
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load(None).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = load(None).unwrap();
        assert_eq!(c.git_credentials.as_deref(), Some(f.as_path()));
        assert_eq!(c.dependency_cache, Some(4 << 30));
        assert_eq!(load(Some("none")).unwrap().dependency_cache, None);
        assert!(load(Some("1m")).is_err());
    }

    #[test]
    fn test_cidr() {
        assert_eq!(
            parse_cidr("10.1.0.0/16").unwrap(),
            (Ipv4Addr::new(10, 1, 0, 0), 16)
        );
        assert!(parse_cidr("10.1.0.1/16")
            .unwrap_err()
            .to_string()
            .contains("host bits"));
        assert!(parse_cidr("10.1.0.0/31").is_err());
        assert!(parse_cidr("nonsense").is_err());
    }
}
