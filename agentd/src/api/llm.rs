//! `/v1/llm`: the LLM gateway's setup as sandboxes see it (upstreams without their keys, the
//! default model, prices, budgets) and what was spent today.

use std::sync::Arc;

use axum::extract::State;
use hyper::{Response, StatusCode};

use super::error::ApiError;
use super::types::{LlmStatus, PriceView, UpstreamView};
use super::{json, Body};
use crate::sandbox::Manager;

/// `GET /v1/llm`.
pub(crate) async fn status(State(mgr): State<Arc<Manager>>) -> Result<Response<Body>, ApiError> {
    let c = &mgr.config;
    let prices = crate::gateway::spend::by_name(&c.llm_prices, &c.llm)
        .map(|(name, p)| {
            (
                name,
                PriceView {
                    input: p.input,
                    output: p.output,
                },
            )
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        &LlmStatus {
            upstreams: c
                .llm
                .iter()
                .map(|u| UpstreamView {
                    name: u.name.clone(),
                    kind: u.kind.as_str().to_string(),
                    base_url: u.base_url.clone(),
                    has_key: u.api_key.is_some(),
                    models: u.models.clone(),
                })
                .collect(),
            default_model: c.llm_model.clone(),
            currency: c.llm_currency.clone(),
            prices,
            today: mgr.daily.today(),
            daily_tokens: c.llm_daily_tokens,
            daily_cost: c.llm_daily_cost,
            task_budget_tokens: c.task_budget_tokens,
            log_prompts: c.llm_log_prompts,
        },
    ))
}
