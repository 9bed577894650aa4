//! The OpenCode server in a sandbox: how it is started and how agentd knows it is up.
//!
//! agentd runs `opencode serve` as the sandbox's command, as the image's user, with:
//! - a random `OPENCODE_SERVER_PASSWORD` (HTTP Basic auth; agentd's proxy adds it, clients
//!   never see it);
//! - its config inline (`OPENCODE_CONFIG_CONTENT`): one provider per LLM upstream of agentd's
//!   (same name, the AI SDK package of its protocol), each pointing at agentd's LLM gateway on
//!   the bridge with a per-sandbox gateway token (not the upstream's key), tools allowed without
//!   prompts, sharing off;
//! - model catalogue and auto-update fetches off, LSP downloads off; its XDG dirs are the
//!   image's (each sandbox has its own overlay upper dir, so they are per sandbox), TMPDIR is the
//!   sandbox's private /tmp (exec allowed: OpenCode unpacks a native library there).
//!
//! The plugin install is pre-seeded in the image (rootfs-builder's opencode recipe).

pub mod client;

use std::net::Ipv4Addr;
use std::time::Duration;

/// Port OpenCode listens on inside the sandbox.
pub const PORT: u16 = 4096;
/// User name of OpenCode's Basic auth.
pub const USER: &str = "opencode";
/// How long OpenCode may take to answer its health check after start (it needs ~2 s alone,
/// several times that when many start at once on 2 cores).
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Label an image sets to say it carries OpenCode (its value is the version).
pub const IMAGE_LABEL: &str = "dev.agentd.opencode.version";

/// The command line.
pub fn command() -> Vec<String> {
    [
        "opencode",
        "serve",
        "--hostname",
        "0.0.0.0",
        "--port",
        "4096",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The environment entries agentd adds for OpenCode.
/// What OpenCode does when the agent wants a tool: `allow` it, `ask` a person (an approval),
/// or `deny` it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    /// Run it.
    Allow,
    /// Ask a person first.
    Ask,
    /// Refuse it.
    Deny,
}

/// Most entries of a permissions map.
pub const MAX_PERMISSIONS: usize = 32;

/// Checks a permissions map: OpenCode tool names (`bash`, `edit`, `webfetch`, ...).
pub fn check_permissions(p: &std::collections::BTreeMap<String, Permission>) -> Result<(), String> {
    if p.len() > MAX_PERMISSIONS {
        return Err(format!(
            "permissions has more than {MAX_PERMISSIONS} entries"
        ));
    }
    for k in p.keys() {
        if k.is_empty() || k.len() > 64 || !k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            return Err(format!(
                "permissions: {k:?} is not an OpenCode tool name (bash, edit, webfetch, read, ...)"
            ));
        }
    }
    Ok(())
}

pub fn env(
    password: &str,
    gateway: (Ipv4Addr, u16),
    gateway_token: &str,
    upstreams: &[crate::gateway::upstream::LlmUpstream],
    model: &str,
    permissions: &std::collections::BTreeMap<String, Permission>,
) -> Vec<String> {
    let (addr, port) = gateway;
    // `provider/model` as OpenCode names it: the upstream is the provider.
    let chosen = crate::gateway::upstream::resolve(upstreams, model);
    let full = match chosen {
        Some((u, m)) => format!("{}/{m}", u.name),
        None => format!("{}/{model}", crate::gateway::upstream::DEFAULT_NAME),
    };
    let mut providers = serde_json::Map::new();
    for u in upstreams {
        let mut models = serde_json::Map::new();
        for m in crate::gateway::upstream::models_for(upstreams, u, model) {
            models.insert(m.to_string(), serde_json::json!({ "name": m }));
        }
        providers.insert(
            u.name.clone(),
            serde_json::json!({
                "npm": u.kind.npm(),
                "name": format!("{} (agentd gateway)", u.name),
                "options": {
                    "baseURL": format!("http://{addr}:{port}/{}/v1", u.name),
                    "apiKey": gateway_token,
                },
                "models": models,
            }),
        );
    }
    // agentd's defaults (nobody to ask), then the request's.
    let mut permission =
        serde_json::json!({ "edit": "allow", "bash": "allow", "webfetch": "allow" });
    for (tool, p) in permissions {
        permission[tool] = serde_json::to_value(p).unwrap_or_default();
    }
    let config = serde_json::json!({
        "$schema": "https://opencode.ai/config.json",
        "provider": providers,
        "model": full,
        "small_model": full,
        "enabled_providers": upstreams.iter().map(|u| u.name.as_str()).collect::<Vec<_>>(),
        "permission": permission,
        "share": "disabled",
        "autoupdate": false,
    });
    vec![
        format!("OPENCODE_SERVER_PASSWORD={password}"),
        format!("OPENCODE_SERVER_USERNAME={USER}"),
        format!("OPENCODE_CONFIG_CONTENT={config}"),
        "OPENCODE_DISABLE_AUTOUPDATE=1".into(),
        "OPENCODE_DISABLE_MODELS_FETCH=1".into(),
        "OPENCODE_DISABLE_LSP_DOWNLOAD=1".into(),
        "OPENCODE_DISABLE_SHARE=1".into(),
        "TMPDIR=/tmp".into(),
    ]
}

/// The `Authorization` header value for the server.
pub fn basic_auth(password: &str) -> String {
    use base64::Engine;
    let raw = format!("{USER}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_env_has_no_upstream_key_and_valid_config() {
        let asks = [
            ("bash".to_string(), Permission::Ask),
            ("read".to_string(), Permission::Deny),
        ]
        .into_iter()
        .collect();
        use crate::gateway::upstream::{Kind, LlmUpstream};
        let up = |name: &str, kind, models: &[&str]| LlmUpstream {
            name: name.into(),
            kind,
            base_url: "http://upstream/v1".into(),
            api_key: Some("upstream-key".into()),
            models: models.iter().map(|m| m.to_string()).collect(),
        };
        let ups = [
            up("agentd", Kind::OpenaiCompatible, &[]),
            up("claude", Kind::Anthropic, &["c1", "c2"]),
        ];
        let env = env(
            "pw",
            (Ipv4Addr::new(10, 209, 0, 1), 4199),
            "gw-token",
            &ups,
            "m1",
            &asks,
        );
        assert!(!env.iter().any(|e| e.contains("upstream-key")));
        let content = env
            .iter()
            .find_map(|e| e.strip_prefix("OPENCODE_CONFIG_CONTENT="))
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(content).unwrap();
        assert_eq!(
            v["provider"]["agentd"]["options"]["baseURL"],
            "http://10.209.0.1:4199/agentd/v1"
        );
        assert_eq!(v["provider"]["claude"]["npm"], "@ai-sdk/anthropic");
        assert_eq!(
            v["provider"]["claude"]["models"],
            serde_json::json!({"c1": {"name": "c1"}, "c2": {"name": "c2"}})
        );
        assert_eq!(
            v["provider"]["agentd"]["models"],
            serde_json::json!({"m1": {"name": "m1"}})
        );
        assert_eq!(v["model"], "agentd/m1");
        assert_eq!(
            v["enabled_providers"],
            serde_json::json!(["agentd", "claude"])
        );
        let env2 = super::env(
            "pw",
            (Ipv4Addr::LOCALHOST, 1),
            "t",
            &ups,
            "claude/c2",
            &asks,
        );
        let content = env2
            .iter()
            .find_map(|e| e.strip_prefix("OPENCODE_CONFIG_CONTENT="))
            .unwrap();
        let v2: serde_json::Value = serde_json::from_str(content).unwrap();
        assert_eq!(v2["model"], "claude/c2");
        assert_eq!(
            v["permission"],
            serde_json::json!({"edit": "allow", "bash": "ask", "webfetch": "allow", "read": "deny"})
        );
        assert_eq!(basic_auth("pw"), "Basic b3BlbmNvZGU6cHc=");
        assert!(check_permissions(&asks).is_ok());
        let bad = [("Bash!".to_string(), Permission::Ask)]
            .into_iter()
            .collect();
        assert!(check_permissions(&bad).unwrap_err().contains("tool name"));
    }
}
