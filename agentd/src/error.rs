//! `Error`: why a service (sandboxes, tasks, exec) could not do what it was asked, by kind, with
//! a message for whoever asked. No HTTP here: the API maps each kind to a status
//! (`api::error`), the CLI prints the message.

use std::fmt::Display;

/// A service's answer when a request cannot be done.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is invalid; the message says what to change.
    #[error("{0}")]
    Invalid(String),
    /// Not allowed from where the request came (host paths over TCP).
    #[error("{0}")]
    Forbidden(String),
    /// No such sandbox or task.
    #[error("{0}")]
    NotFound(String),
    /// The resource is in the wrong state for the request.
    #[error("{0}")]
    Conflict(String),
    /// A quota (sandboxes, memory, addresses) would be exceeded: retry later.
    #[error("{0}")]
    Quota(String),
    /// agentd's disk is full: nothing was saved.
    #[error("{0}")]
    NoSpace(String),
    /// Something the request needs cannot be had now (the default image did not build).
    #[error("{0}")]
    Unavailable(String),
    /// A bug or a host failure: the message is for agentd's log, not for the client.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// An internal error from anything displayable, with its causes.
    pub fn internal(e: impl Display) -> Self {
        Error::Internal(format!("{e:#}"))
    }
}

impl From<anyhow::Error> for Error {
    fn from(e: anyhow::Error) -> Self {
        Error::Internal(format!("{e:#}"))
    }
}

impl From<crate::db::DbError> for Error {
    fn from(e: crate::db::DbError) -> Self {
        match e {
            // Said plainly: the client can do something about it (free space, retry).
            crate::db::DbError::NoSpace(_) => Error::NoSpace(
                "agentd's disk is full: the change was not saved (free space on the state dir's filesystem and retry)".into(),
            ),
            other => Error::Internal(agentd_runtime::error_chain(&other)),
        }
    }
}
