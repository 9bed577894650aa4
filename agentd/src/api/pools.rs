//! `/v1/pools`: the warm pools (sandboxes started ahead, claimed by creates): read them, and
//! set a pool's size.

use std::sync::Arc;

use axum::extract::State;
use hyper::{Response, StatusCode};

use super::error::ApiError;
use super::{json, read_json, Body, Req};
use crate::sandbox::pool::{PoolList, SetPool};
use crate::sandbox::Manager;

type Reply = Result<Response<Body>, ApiError>;

/// `GET /v1/pools`.
pub(crate) async fn list(State(mgr): State<Arc<Manager>>) -> Reply {
    Ok(json(StatusCode::OK, &PoolList { pools: mgr.pools() }))
}

/// `PUT /v1/pools`.
pub(crate) async fn set(State(mgr): State<Arc<Manager>>, req: Req) -> Reply {
    let body: SetPool = read_json(req).await?;
    let view = mgr.set_pool(&body.image, body.size).await?;
    Ok(json(StatusCode::OK, &view))
}
