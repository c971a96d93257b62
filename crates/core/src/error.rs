use std::path::{Path, PathBuf};

/// Every failure vigil reports names what went wrong and, where there is one, the file.
#[derive(Debug, thiserror::Error)]
pub enum VigilError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("configuration: {0}")]
    Config(String),
    #[error("model: {0}")]
    Model(String),
    #[error("interrupted: {0}")]
    Interrupted(String),
}

impl VigilError {
    pub fn file(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        VigilError::File { path: path.as_ref().to_path_buf(), message: message.into() }
    }
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        VigilError::Io { path: path.as_ref().to_path_buf(), source }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        VigilError::Invalid(message.into())
    }
}

pub type Result<T> = std::result::Result<T, VigilError>;
