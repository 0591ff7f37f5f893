//! Errors of the driver and their one mapping onto the gRPC codes of the CSI spec.

use strata::meta::MetaError;

#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, CsiError>;

impl CsiError {
    /// A metadata error met while working on `what`.
    pub fn meta(what: &str, e: MetaError) -> CsiError {
        match e {
            MetaError::NotFound => CsiError::NotFound(format!("{what}: not found")),
            MetaError::Quota | MetaError::NoSpace => {
                CsiError::ResourceExhausted(format!("{what}: {e}"))
            }
            MetaError::NotDir => CsiError::FailedPrecondition(format!("{what}: not a directory")),
            e => CsiError::Internal(format!("{what}: {e}")),
        }
    }

    pub fn io(what: &str, e: std::io::Error) -> CsiError {
        CsiError::Internal(format!("{what}: {e}"))
    }
}

/// The one place where driver errors become gRPC statuses.
impl From<CsiError> for tonic::Status {
    fn from(e: CsiError) -> tonic::Status {
        use tonic::Code;
        let code = match &e {
            CsiError::InvalidArgument(_) => Code::InvalidArgument,
            CsiError::NotFound(_) => Code::NotFound,
            CsiError::AlreadyExists(_) => Code::AlreadyExists,
            CsiError::FailedPrecondition(_) => Code::FailedPrecondition,
            CsiError::ResourceExhausted(_) => Code::ResourceExhausted,
            CsiError::OutOfRange(_) => Code::OutOfRange,
            CsiError::Aborted(_) => Code::Aborted,
            CsiError::Unimplemented(_) => Code::Unimplemented,
            CsiError::Internal(_) => Code::Internal,
        };
        tonic::Status::new(code, e.to_string())
    }
}

/// Run blocking work (metadata transactions, mounts) off the async threads, in `span`.
pub async fn blocking<T: Send + 'static>(
    span: tracing::Span,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(move || span.in_scope(f))
        .await
        .map_err(|e| CsiError::Internal(format!("worker failed: {e}")))?
}
