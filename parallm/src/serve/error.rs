//! The one place where errors become HTTP responses in OpenAI's shape:
//! `{"error": {"message", "type", "param", "code"}}`.
//!
//! Every refusal the server makes is an [`ApiError`]; its status, `type` and
//! `code` are fixed per variant here, so handlers never pick status codes.

use actix_web::http::header::{HeaderValue, RETRY_AFTER};
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use actors::llm::EngineError;
use actors::SubmitError;

/// Why a request was refused or failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// A parameter is missing, of the wrong type or out of range.
    #[error("{message}")]
    InvalidParam {
        /// The request field.
        param: Option<String>,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// The prompt and `max_tokens` do not fit the model's context.
    #[error("{message}")]
    ContextLength {
        /// The request field to change.
        param: &'static str,
        /// Both token counts and the context.
        message: String,
    },
    /// The body is not valid JSON.
    #[error("the request body is not valid JSON: {0}")]
    MalformedJson(String),
    /// The body exceeds the configured limit.
    #[error("the request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge {
        /// `server.max_body_bytes`.
        limit: usize,
    },
    /// The client did not send the whole body in time.
    #[error("the request body did not arrive within {secs}s")]
    RequestTimeout {
        /// `server.body_timeout_secs`.
        secs: u64,
    },
    /// The `model` field names a model this server does not serve.
    #[error("the model '{0}' does not exist; GET /v1/models lists the served model")]
    ModelNotFound(String),
    /// No route for the path.
    #[error("no route for {0}")]
    RouteNotFound(String),
    /// The path exists, but not for this method.
    #[error("{method} is not allowed on {path}; use {allow}")]
    MethodNotAllowed {
        /// The method sent.
        method: String,
        /// The path.
        path: String,
        /// The method the path answers (the `Allow` header).
        allow: &'static str,
    },
    /// The API key is missing or wrong.
    #[error("{0}")]
    Unauthorized(String),
    /// The queue is full.
    #[error("the server is at capacity ({capacity} requests waiting); retry later")]
    Overloaded {
        /// The queue's capacity.
        capacity: usize,
        /// Seconds for `Retry-After`.
        retry_after: u64,
    },
    /// The model is still loading, or the server is shutting down.
    #[error("{0}")]
    Unavailable(String),
    /// The engine failed while serving the request.
    #[error("the engine failed: {0}")]
    Engine(String),
    /// The client closed its connection before the answer (nginx's 499:
    /// no one reads it; the status is for the metrics and logs).
    #[error("the client closed the connection before the answer")]
    ClientClosed,
}

impl ApiError {
    /// An invalid parameter, named.
    pub fn param(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidParam {
            param: Some(param.into()),
            message: message.into(),
        }
    }

    /// Maps an engine refusal (`retry_after` for a full queue).
    pub fn from_engine(e: EngineError, retry_after: u64) -> Self {
        match e {
            EngineError::Invalid(framework::Error::InvalidRequest { field, reason }) => {
                ApiError::param(field, format!("`{field}` {reason}"))
            }
            EngineError::Invalid(
                e @ framework::Error::ContextOverflow {
                    prompt_tokens,
                    context,
                    ..
                },
            ) => ApiError::ContextLength {
                // The prompt alone leaves no room for a token.
                param: if prompt_tokens >= context {
                    "prompt"
                } else {
                    "max_tokens"
                },
                message: e.to_string(),
            },
            EngineError::Invalid(e @ framework::Error::PromptTooLong { .. }) => {
                ApiError::ContextLength {
                    param: "prompt",
                    message: e.to_string(),
                }
            }
            EngineError::Invalid(
                e @ (framework::Error::Tokenizer(_) | framework::Error::Template(_)),
            ) => ApiError::InvalidParam {
                param: None,
                message: e.to_string(),
            },
            EngineError::Submit(SubmitError::Overloaded { capacity }) => ApiError::Overloaded {
                capacity,
                retry_after,
            },
            EngineError::Submit(e) => ApiError::Unavailable(e.to_string()),
            other => ApiError::Engine(other.to_string()),
        }
    }

    /// OpenAI's `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::Unauthorized(_) => "authentication_error",
            ApiError::Overloaded { .. } => "rate_limit_error",
            ApiError::Engine(_) | ApiError::Unavailable(_) => "server_error",
            ApiError::ClientClosed => "client_closed",
            _ => "invalid_request_error",
        }
    }

    /// OpenAI's `code`.
    pub fn code(&self) -> Option<&'static str> {
        Some(match self {
            ApiError::InvalidParam { .. } => "invalid_value",
            ApiError::ContextLength { .. } => "context_length_exceeded",
            ApiError::MalformedJson(_) => "invalid_json",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::RequestTimeout { .. } => "request_timeout",
            ApiError::ModelNotFound(_) => "model_not_found",
            ApiError::RouteNotFound(_) => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::Unauthorized(_) => "invalid_api_key",
            ApiError::Overloaded { .. } => "rate_limit_exceeded",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Engine(_) => "engine_error",
            ApiError::ClientClosed => "client_closed",
        })
    }

    /// The `reason` of `parallm_request_failure_total` when the HTTP layer
    /// refuses a generation request before it reaches the engine.
    pub fn failure_reason(&self) -> &'static str {
        match self {
            ApiError::RequestTimeout { .. } => "timeout",
            ApiError::Overloaded { .. } => "overloaded",
            ApiError::Unavailable(_) => "shutting_down",
            ApiError::Engine(_) => "failed",
            ApiError::ClientClosed => "cancelled",
            _ => "invalid",
        }
    }

    /// Counts this refusal in `parallm_request_failure_total`, once.
    pub fn counted(self) -> Self {
        metrics::counter!(framework::metrics::REQUEST_FAILURE, "reason" => self.failure_reason())
            .increment(1);
        self
    }

    /// OpenAI's `param`.
    pub fn param_name(&self) -> Option<String> {
        match self {
            ApiError::InvalidParam { param, .. } => param.clone(),
            ApiError::ContextLength { param, .. } => Some(param.to_string()),
            ApiError::ModelNotFound(_) => Some("model".into()),
            _ => None,
        }
    }

    /// The error object, as sent in a body or a stream's error event.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind: self.kind(),
                param: self.param_name(),
                code: self.code(),
            },
        }
    }
}

/// `{"error": …}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The fields of an error.
#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    /// What went wrong, for people.
    pub message: String,
    /// The class of error.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The request field at fault.
    pub param: Option<String>,
    /// A stable code, for programs.
    pub code: Option<&'static str>,
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::InvalidParam { .. }
            | ApiError::ContextLength { .. }
            | ApiError::MalformedJson(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RequestTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::ModelNotFound(_) | ApiError::RouteNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Engine(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::ClientClosed => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut resp = HttpResponse::build(self.status_code());
        if let ApiError::Overloaded { retry_after, .. } = self {
            if let Ok(v) = HeaderValue::from_str(&retry_after.to_string()) {
                resp.insert_header((RETRY_AFTER, v));
            }
        }
        if let ApiError::MethodNotAllowed { allow, .. } = self {
            resp.insert_header(("Allow", *allow));
        }
        if let ApiError::Unauthorized(_) = self {
            resp.insert_header(("WWW-Authenticate", "Bearer"));
        }
        if let ApiError::RequestTimeout { .. } = self {
            // The rest of the body never came: the connection cannot carry
            // another request.
            resp.force_close();
        }
        resp.json(self.body())
    }
}
