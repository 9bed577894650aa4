//! `agentd llm`: the LLM gateway's upstreams (never their keys), prices, budgets and what all
//! sandboxes spent today.

use std::path::PathBuf;

use clap::Args;
use hyper::Method;

use crate::cli::sandbox::{call, check};

/// `agentd llm`.
#[derive(Args)]
pub struct LlmArgs {
    /// The daemon's API socket.
    #[arg(long, env = "AGENTD_SOCKET", default_value = crate::daemon::config::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: LlmArgs) -> anyhow::Result<u8> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let v = check(&call(&args.socket, Method::GET, "/v1/llm", None, None).await?)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(0);
        }
        print!("{}", text(&v));
        Ok(0)
    })
}

/// The view as a person reads it.
fn text(v: &serde_json::Value) -> String {
    let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    let currency = s(&v["currency"]);
    let mut out = format!(
        "{:<16} {:<18} {:<8} {:<40} MODELS\n",
        "UPSTREAM", "KIND", "KEY", "BASE URL"
    );
    for u in v["upstreams"].as_array().into_iter().flatten() {
        let models: Vec<String> = u["models"]
            .as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect();
        out.push_str(&format!(
            "{:<16} {:<18} {:<8} {:<40} {}\n",
            s(&u["name"]),
            s(&u["kind"]),
            if u["has_key"] == true { "yes" } else { "no" },
            s(&u["base_url"]),
            if models.is_empty() {
                "any it lists".to_string()
            } else {
                models.join(", ")
            }
        ));
    }
    out.push_str(&format!("default model: {}\n", s(&v["default_model"])));
    if let Some(prices) = v["prices"].as_object().filter(|p| !p.is_empty()) {
        out.push_str(&format!(
            "prices per million tokens ({currency}, input/output):\n"
        ));
        for (model, p) in prices {
            out.push_str(&format!("  {model}: {} / {}\n", p["input"], p["output"]));
        }
    }
    let t = &v["today"];
    let limit = |k: &str| match &v[k] {
        serde_json::Value::Null => "no limit".to_string(),
        l => format!("of {l}"),
    };
    out.push_str(&format!(
        "today ({} UTC): {} requests, {} tokens ({}), {:.4} {currency} ({})\n",
        s(&t["day"]),
        t["requests"],
        t["tokens"],
        limit("daily_tokens"),
        t["cost"].as_f64().unwrap_or(0.0),
        limit("daily_cost"),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_text_shows_upstreams_and_today() {
        let v = serde_json::json!({
            "upstreams": [{"name": "claude", "kind": "anthropic", "base_url": "https://a.example/v1",
                "has_key": true, "models": ["m1", "m2"]}],
            "default_model": "claude/m1", "currency": "EUR",
            "prices": {"claude/m1": {"input": 3.0, "output": 15.0}},
            "today": {"day": "2026-12-01", "requests": 2, "tokens": 49, "cost": 0.5},
            "daily_tokens": 400, "daily_cost": null,
        });
        let t = text(&v);
        assert!(t.contains("claude           anthropic          yes"), "{t}");
        assert!(t.contains("m1, m2"), "{t}");
        assert!(t.contains("claude/m1: 3.0 / 15.0"), "{t}");
        assert!(
            t.contains("49 tokens (of 400), 0.5000 EUR (no limit)"),
            "{t}"
        );
    }
}
