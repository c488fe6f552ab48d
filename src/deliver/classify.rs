//! The one table that turns a destination's answer into an outcome class.
//!
//! | answer                                   | class       |
//! |------------------------------------------|-------------|
//! | 2xx                                      | Delivered   |
//! | 408, 429, 5xx except 501                 | Retry       |
//! | connection refused/reset, timeout, I/O   | Retry       |
//! | no access token (token endpoint failed)  | Retry       |
//! | 501, any other 1xx/3xx/4xx               | Permanent (dead letter) |

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Delivered,
    Retry,
    Permanent,
}

/// The destination's OAuth2 token could not be obtained: nothing was sent, so try again later
/// (the token endpoint is as much a part of the destination as its network).
pub fn token_unavailable() -> Class {
    Class::Retry
}

pub fn status(code: u16) -> Class {
    match code {
        200..=299 => Class::Delivered,
        408 | 429 => Class::Retry,
        501 => Class::Permanent,
        500..=599 => Class::Retry,
        _ => Class::Permanent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        for c in [200, 201, 202, 204, 299] {
            assert_eq!(status(c), Class::Delivered, "{c}");
        }
        for c in [408, 429, 500, 502, 503, 504, 599] {
            assert_eq!(status(c), Class::Retry, "{c}");
        }
        for c in [100, 301, 302, 400, 401, 403, 404, 409, 410, 422, 501] {
            assert_eq!(status(c), Class::Permanent, "{c}");
        }
    }
}
