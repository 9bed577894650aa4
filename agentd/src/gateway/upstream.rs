//! The LLM upstreams the gateway forwards to: their kinds (wire protocols), how the config
//! writes them, and which one a model name picks.
//!
//! A model is written `MODEL` (the first upstream's) or `UPSTREAM/MODEL`, the way OpenCode
//! writes `provider/model`: each upstream is one OpenCode provider of the same name. A model
//! whose part before the first `/` is no upstream's name is the first upstream's, slash and all
//! (model names such as `org/model` stay usable on an OpenAI-compatible upstream).

use std::path::PathBuf;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// Name of the upstream `llm_base_url` configures.
pub const DEFAULT_NAME: &str = "agentd";
/// `anthropic-version` sent when the client sends none.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";
/// Most upstreams one agentd forwards to.
pub const MAX_UPSTREAMS: usize = 16;
/// Most models one upstream's allowlist names.
pub const MAX_MODELS: usize = 64;

/// The wire protocol an upstream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// OpenAI-compatible chat completions (`/chat/completions`, bearer key).
    OpenaiCompatible,
    /// OpenAI's own API: the Responses API (`/responses`), which OpenCode uses for it, and
    /// chat completions (bearer key).
    Openai,
    /// Anthropic's Messages API (`/messages`, `x-api-key`, `anthropic-version`).
    Anthropic,
}

impl Kind {
    /// The config's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::OpenaiCompatible => "openai-compatible",
            Kind::Openai => "openai",
            Kind::Anthropic => "anthropic",
        }
    }

    fn parse(s: &str) -> anyhow::Result<Kind> {
        Ok(match s {
            "openai-compatible" => Kind::OpenaiCompatible,
            "openai" => Kind::Openai,
            "anthropic" => Kind::Anthropic,
            other => bail!("kind must be openai-compatible, openai or anthropic, got {other:?}"),
        })
    }

    /// The AI SDK package OpenCode speaks it with.
    pub fn npm(self) -> &'static str {
        match self {
            Kind::OpenaiCompatible => "@ai-sdk/openai-compatible",
            Kind::Openai => "@ai-sdk/openai",
            Kind::Anthropic => "@ai-sdk/anthropic",
        }
    }

    /// Whether the gateway forwards `api` to an upstream of this kind.
    pub fn serves(self, api: Api) -> bool {
        match self {
            Kind::OpenaiCompatible => api == Api::Chat,
            Kind::Openai => matches!(api, Api::Chat | Api::Responses),
            Kind::Anthropic => api == Api::Messages,
        }
    }
}

/// One provider API the gateway forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// OpenAI chat completions.
    Chat,
    /// OpenAI Responses.
    Responses,
    /// Anthropic Messages.
    Messages,
}

impl Api {
    /// The API a path (after `/v1`) names.
    pub fn from_path(path: &str) -> Option<Api> {
        match path {
            "/chat/completions" => Some(Api::Chat),
            "/responses" => Some(Api::Responses),
            "/messages" => Some(Api::Messages),
            _ => None,
        }
    }

    /// Its path after the base URL.
    pub fn path(self) -> &'static str {
        match self {
            Api::Chat => "/chat/completions",
            Api::Responses => "/responses",
            Api::Messages => "/messages",
        }
    }
}

/// A configured upstream, validated, its key read.
#[derive(Debug, Clone)]
pub struct LlmUpstream {
    /// Its name: OpenCode's provider id and the first part of `UPSTREAM/MODEL`.
    pub name: String,
    /// Its wire protocol.
    pub kind: Kind,
    /// Base URL, without a trailing slash (requests go to `<base>/chat/completions`, ...).
    pub base_url: String,
    /// The key the gateway sends it (a bearer token, or Anthropic's `x-api-key`), if any.
    pub api_key: Option<String>,
    /// The only models sandboxes may ask it for (empty: any it lists).
    pub models: Vec<String>,
}

/// An upstream as the config writes it: a table in TOML (`[[llm_upstreams]]`), or
/// `name=N,kind=K,base_url=URL[,api_key_file=PATH][,models=A|B]` in a flag or variable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "UpstreamRepr")]
pub struct UpstreamArg {
    /// Name (letters, digits, `-`, `_`).
    pub name: String,
    /// `openai-compatible`, `openai` or `anthropic`.
    pub kind: String,
    /// Base URL, e.g. `https://llm.example/v1`.
    pub base_url: String,
    /// File holding its key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_file: Option<PathBuf>,
    /// The models allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum UpstreamRepr {
    Text(String),
    Table(UpstreamTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamTable {
    name: String,
    kind: String,
    base_url: String,
    #[serde(default)]
    api_key_file: Option<PathBuf>,
    #[serde(default)]
    models: Vec<String>,
}

impl TryFrom<UpstreamRepr> for UpstreamArg {
    type Error = String;

    fn try_from(r: UpstreamRepr) -> Result<UpstreamArg, String> {
        match r {
            UpstreamRepr::Text(s) => s.parse(),
            UpstreamRepr::Table(t) => Ok(UpstreamArg {
                name: t.name,
                kind: t.kind,
                base_url: t.base_url,
                api_key_file: t.api_key_file,
                models: t.models,
            }),
        }
    }
}

impl std::str::FromStr for UpstreamArg {
    type Err = String;

    fn from_str(s: &str) -> Result<UpstreamArg, String> {
        let mut arg = UpstreamArg {
            name: String::new(),
            kind: String::new(),
            base_url: String::new(),
            api_key_file: None,
            models: Vec::new(),
        };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| {
                format!("LLM upstream {s:?}: write name=N,kind=K,base_url=URL[,api_key_file=PATH][,models=A|B]")
            })?;
            let v = v.trim().to_string();
            match k.trim() {
                "name" => arg.name = v,
                "kind" => arg.kind = v,
                "base_url" => arg.base_url = v,
                "api_key_file" => arg.api_key_file = Some(PathBuf::from(v)),
                "models" => arg.models = v.split('|').map(|m| m.trim().to_string()).collect(),
                other => {
                    return Err(format!(
                        "LLM upstream {s:?}: unknown key {other:?} (name, kind, base_url, api_key_file, models)"
                    ))
                }
            }
        }
        Ok(arg)
    }
}

/// Checks a base URL and drops its trailing slash.
fn base_url(what: &str, url: &str) -> anyhow::Result<String> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        bail!("{what} must start with http:// or https://, got {url:?}");
    }
    Ok(url.trim_end_matches('/').to_string())
}

/// Checks a list of models: not empty names, at most [`MAX_MODELS`].
fn models(what: &str, list: Vec<String>) -> anyhow::Result<Vec<String>> {
    let list: Vec<String> = list
        .into_iter()
        .map(|m| m.trim().to_string())
        .filter(|m| !m.is_empty())
        .collect();
    if list.len() > MAX_MODELS {
        bail!("{what}: at most {MAX_MODELS} models");
    }
    for m in &list {
        if m.len() > 200 || m.chars().any(char::is_control) {
            bail!("{what}: {m:?} is not a model name (1-200 printable characters)");
        }
    }
    Ok(list)
}

/// The upstreams of a config: `llm_base_url`'s first (named [`DEFAULT_NAME`], its models
/// `llm_models`), then `llm_upstreams` in their order.
pub fn from_config(
    base: Option<String>,
    key_file: Option<PathBuf>,
    allowed: Vec<String>,
    listed: Vec<UpstreamArg>,
    read_secret: impl Fn(&std::path::Path) -> anyhow::Result<String>,
) -> anyhow::Result<Vec<LlmUpstream>> {
    let mut out = Vec::new();
    match base {
        None => {
            if key_file.is_some() {
                bail!("llm_api_key_file is set but llm_base_url is not: set both");
            }
            if allowed.iter().any(|m| !m.trim().is_empty()) {
                bail!("llm_models restricts llm_base_url's upstream, which is not set: give each of llm_upstreams its own models");
            }
        }
        Some(url) => out.push(LlmUpstream {
            name: DEFAULT_NAME.into(),
            kind: Kind::OpenaiCompatible,
            base_url: base_url("llm_base_url", &url)?,
            api_key: match key_file {
                None => None,
                Some(p) => Some(read_secret(&p).context("llm_api_key_file")?),
            },
            models: models("llm_models", allowed)?,
        }),
    }
    for u in listed {
        let what = format!("LLM upstream {:?}", u.name);
        let name = u.name.trim().to_string();
        if name.is_empty()
            || name.len() > 64
            || name == "v1"
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            bail!("{what}: the name must be 1-64 letters, digits, '-' or '_' (and not v1)");
        }
        if out.iter().any(|o: &LlmUpstream| o.name == name) {
            bail!("{what}: two upstreams have this name (llm_base_url's is {DEFAULT_NAME:?})");
        }
        out.push(LlmUpstream {
            kind: Kind::parse(u.kind.trim()).with_context(|| what.clone())?,
            base_url: base_url(&format!("{what}: base_url"), &u.base_url)?,
            api_key: match &u.api_key_file {
                None => None,
                Some(p) => Some(read_secret(p).with_context(|| format!("{what}: api_key_file"))?),
            },
            models: models(&what, u.models)?,
            name,
        });
    }
    if out.len() > MAX_UPSTREAMS {
        bail!("at most {MAX_UPSTREAMS} LLM upstreams");
    }
    Ok(out)
}

/// The upstream `model` picks and the model's name there, or `None` without upstreams.
pub fn resolve<'a>(
    upstreams: &'a [LlmUpstream],
    model: &'a str,
) -> Option<(&'a LlmUpstream, &'a str)> {
    if let Some((prefix, rest)) = model.split_once('/') {
        if let Some(u) = upstreams.iter().find(|u| u.name == prefix) {
            return Some((u, rest));
        }
    }
    upstreams.first().map(|u| (u, model))
}

/// `model` of `upstream` as a sandbox names it: plainly on the first upstream, else
/// `UPSTREAM/MODEL`.
pub fn display_name(upstreams: &[LlmUpstream], upstream: &LlmUpstream, model: &str) -> String {
    match upstreams.first() {
        Some(first) if first.name == upstream.name => model.to_string(),
        _ => format!("{}/{model}", upstream.name),
    }
}

/// The models a sandbox whose model is `model` may name on `upstream`: its allowlist, and
/// the sandbox's own model when that is on `upstream` (an upstream without an allowlist).
pub fn models_for<'a>(
    upstreams: &'a [LlmUpstream],
    upstream: &'a LlmUpstream,
    model: &'a str,
) -> Vec<&'a str> {
    let mut ids: Vec<&str> = upstream.models.iter().map(String::as_str).collect();
    if let Some((u, m)) = resolve(upstreams, model) {
        if u.name == upstream.name && !ids.contains(&m) {
            ids.push(m);
        }
    }
    ids
}

/// Every allowed model as a sandbox would name it (the first upstream's plainly, the others'
/// as `UPSTREAM/MODEL`); empty when some upstream allows any model.
pub fn allowed_names(upstreams: &[LlmUpstream]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, u) in upstreams.iter().enumerate() {
        for m in &u.models {
            out.push(if i == 0 {
                m.clone()
            } else {
                format!("{}/{m}", u.name)
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_secret(_: &std::path::Path) -> anyhow::Result<String> {
        Ok("key".into())
    }

    #[test]
    fn test_upstreams_from_flags_and_tables() {
        let a: UpstreamArg =
            "name=claude,kind=anthropic,base_url=https://a.example/v1/,api_key_file=/k,models=m1|m2"
                .parse()
                .unwrap();
        assert_eq!(a.models, ["m1", "m2"]);
        let t: UpstreamArg = toml::from_str::<std::collections::BTreeMap<String, UpstreamArg>>(
            "u = { name = \"oa\", kind = \"openai\", base_url = \"http://x/v1\" }",
        )
        .unwrap()
        .remove("u")
        .unwrap();
        // The config's merge goes through JSON: a table comes back as itself.
        let back: UpstreamArg = serde_json::from_value(serde_json::to_value(&a).unwrap()).unwrap();
        assert_eq!(back, a);
        let ups = from_config(
            Some("http://legacy/v1".into()),
            None,
            vec!["default".into()],
            vec![a, t],
            no_secret,
        )
        .unwrap();
        assert_eq!(ups.len(), 3);
        assert_eq!(ups[1].base_url, "https://a.example/v1");
        assert_eq!(ups[1].api_key.as_deref(), Some("key"));
        assert_eq!(ups[1].kind, Kind::Anthropic);
        let (u, m) = resolve(&ups, "claude/m1").unwrap();
        assert_eq!((u.name.as_str(), m), ("claude", "m1"));
        let (u, m) = resolve(&ups, "org/model").unwrap();
        assert_eq!((u.name.as_str(), m), ("agentd", "org/model"));
        assert_eq!(allowed_names(&ups), ["default", "claude/m1", "claude/m2"]);
        assert!(resolve(&[], "m").is_none());
        for bad in [
            "name=v1,kind=openai,base_url=http://x",
            "name=x,kind=gemini,base_url=http://x",
            "name=x,kind=openai,base_url=ftp://x",
            "name=agentd,kind=openai,base_url=http://x",
        ] {
            let arg: UpstreamArg = bad.parse().unwrap();
            assert!(
                from_config(Some("http://l".into()), None, vec![], vec![arg], no_secret).is_err(),
                "{bad}"
            );
        }
        assert!("name=x,colour=red".parse::<UpstreamArg>().is_err());
        assert!(from_config(None, None, vec!["m".into()], vec![], no_secret).is_err());
    }
}
