//! What the gateway lets be spent beyond a sandbox's own budget: model prices (a cost per
//! million input and output tokens, from the config, in one currency) and the daemon's daily
//! budget, counted per UTC day in the database (one record per day, written lazily with every
//! request it counts: a crash loses at most the requests since the last durable write).

use std::collections::BTreeMap;
use std::sync::Mutex;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use super::upstream::{resolve, LlmUpstream};
use crate::db::{Db, LLM_DAYS};

/// A model's price per million tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    /// Per million input tokens (Anthropic's cache tokens count as input).
    pub input: f64,
    /// Per million output tokens.
    pub output: f64,
}

impl Price {
    /// What `input` and `output` tokens cost.
    pub fn cost(&self, input: u64, output: u64) -> f64 {
        (input as f64 * self.input + output as f64 * self.output) / 1_000_000.0
    }
}

/// Prices by (upstream, model), from `MODEL=INPUT,OUTPUT` entries (`MODEL` as sandboxes
/// name it: `UPSTREAM/MODEL`, or a plain model of the first upstream).
pub fn parse_prices(
    list: &[String],
    upstreams: &[LlmUpstream],
) -> anyhow::Result<BTreeMap<(String, String), Price>> {
    let mut out = BTreeMap::new();
    for entry in list.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
        let what = || {
            format!("llm price {entry:?}: write MODEL=INPUT,OUTPUT (per million tokens), e.g. claude/claude-sonnet-4-5=3,15")
        };
        let (model, prices) = entry.rsplit_once('=').with_context(what)?;
        let (input, output) = prices.split_once(',').with_context(what)?;
        let number = |s: &str| -> anyhow::Result<f64> {
            let v: f64 = s.trim().parse().with_context(what)?;
            if !v.is_finite() || !(0.0..=1e6).contains(&v) {
                bail!("{}: a price is a number from 0 to 1000000", what());
            }
            Ok(v)
        };
        let price = Price {
            input: number(input)?,
            output: number(output)?,
        };
        let Some((u, m)) = resolve(upstreams, model.trim()) else {
            bail!("llm price {entry:?}: there is no LLM upstream to price");
        };
        out.insert((u.name.clone(), m.to_string()), price);
    }
    Ok(out)
}

/// The prices by model as sandboxes name it (`UPSTREAM/MODEL`, or plainly on the first
/// upstream).
pub fn by_name<'a>(
    prices: &'a BTreeMap<(String, String), Price>,
    upstreams: &'a [LlmUpstream],
) -> impl Iterator<Item = (String, Price)> + 'a {
    prices.iter().filter_map(|((u, m), p)| {
        let up = upstreams.iter().find(|x| &x.name == u)?;
        Some((super::upstream::display_name(upstreams, up, m), *p))
    })
}

/// Today's (UTC) date, `YYYY-MM-DD`.
pub fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    agentd_images::commit::rfc3339(secs)[..10].to_string()
}

/// What went through the gateway on one UTC day.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct DayUsage {
    /// The day, `YYYY-MM-DD` (UTC).
    pub day: String,
    /// Requests answered by an upstream.
    pub requests: u64,
    /// Input plus output tokens.
    pub tokens: u64,
    /// Their cost in the config's currency (priced models only).
    pub cost: f64,
}

/// The daemon's count for today.
pub struct Daily(Mutex<DayUsage>);

impl Daily {
    /// Today's count as the database has it (zero for a new day).
    pub fn load(db: &Db) -> Daily {
        let day = today();
        let usage = db
            .get::<DayUsage>(LLM_DAYS, &day)
            .unwrap_or_else(|e| {
                tracing::error!(error = %agentd_runtime::error_chain(&e), "failed to read today's LLM usage: counting from zero");
                None
            })
            .unwrap_or(DayUsage {
                day,
                ..DayUsage::default()
            });
        Daily(Mutex::new(usage))
    }

    /// The count, started again at zero when the day changed.
    fn current(&self) -> std::sync::MutexGuard<'_, DayUsage> {
        let mut u = self.0.lock().expect("daily lock");
        let day = today();
        if u.day != day {
            *u = DayUsage {
                day,
                ..DayUsage::default()
            };
        }
        u
    }

    /// Today's count.
    pub fn today(&self) -> DayUsage {
        self.current().clone()
    }

    /// Counts one answered request.
    pub fn add(&self, db: &Db, tokens: u64, cost: f64) {
        let now = {
            let mut u = self.current();
            u.requests += 1;
            u.tokens += tokens;
            u.cost += cost;
            u.clone()
        };
        if let Err(e) = db.put_lazy(LLM_DAYS, &now.day, &now) {
            tracing::error!(error = %agentd_runtime::error_chain(&e), "failed to save today's LLM usage");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::upstream::{Kind, LlmUpstream};

    #[test]
    fn test_prices_by_upstream_and_cost() {
        let up = |name: &str| LlmUpstream {
            name: name.into(),
            kind: Kind::Anthropic,
            base_url: "http://x/v1".into(),
            api_key: None,
            models: vec![],
        };
        let ups = [up("first"), up("claude")];
        let p = parse_prices(
            &["claude/sonnet=3,15".into(), "plain = 0.5 , 1.5".into()],
            &ups,
        )
        .unwrap();
        let sonnet = p[&("claude".to_string(), "sonnet".to_string())];
        assert_eq!(p[&("first".to_string(), "plain".to_string())].output, 1.5);
        assert!((sonnet.cost(1_000_000, 100_000) - 4.5).abs() < 1e-9);
        for bad in ["m", "m=1", "m=a,b", "m=-1,2", "m=1,inf"] {
            assert!(parse_prices(&[bad.into()], &ups).is_err(), "{bad}");
        }
        assert!(parse_prices(&["m=1,1".into()], &[]).is_err());
        assert_eq!(today().len(), 10);
    }
}
