//! The gRPC bearer token: a secret that never reaches `Debug` or serialized
//! output and is compared without leaking its contents or its length.

use std::{fmt, sync::Arc};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Text shown in place of the token.
const REDACTED: &str = "[redacted]";

/// A bearer token. `Debug` and `Serialize` print `[redacted]`; it is read
/// from configuration as a plain string. No `PartialEq`: compare with
/// [`matches`](Self::matches), which takes constant time.
#[derive(Clone)]
pub struct BearerToken(Arc<str>);

impl BearerToken {
    /// Wraps `token`.
    pub fn new(token: impl Into<Arc<str>>) -> Self {
        Self(token.into())
    }

    /// The token itself, for sending it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this token. Both sides are hashed first so the
    /// comparison takes the same time whatever their lengths and contents.
    pub fn matches(&self, presented: &str) -> bool {
        TokenDigest::of(self.expose()).matches(presented)
    }
}

impl From<&str> for BearerToken {
    fn from(token: &str) -> Self {
        Self::new(token)
    }
}

impl From<String> for BearerToken {
    fn from(token: String) -> Self {
        Self::new(token)
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for BearerToken {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

impl<'de> Deserialize<'de> for BearerToken {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self::from)
    }
}

/// SHA-256 of the expected token, kept by the server's check so the token
/// itself is not held there.
#[derive(Clone)]
pub(crate) struct TokenDigest([u8; 32]);

impl TokenDigest {
    pub(crate) fn of(token: &str) -> Self {
        Self(Sha256::digest(token.as_bytes()).into())
    }

    /// Constant-time comparison of fixed-size digests: neither the token's
    /// length nor the position of the first difference shows in timing.
    pub(crate) fn matches(&self, presented: &str) -> bool {
        let presented: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.0.ct_eq(&presented).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_serialize_never_show_the_token() {
        let token = BearerToken::from("hunter2-secret");
        assert_eq!(format!("{token:?}"), "[redacted]");
        assert_eq!(format!("{:?}", Some(token.clone())), "Some([redacted])");
        let json = serde_json::to_string(&token).unwrap();
        assert!(!json.contains("hunter2"), "{json}");
    }

    #[test]
    fn deserializes_from_a_plain_string() {
        let token: BearerToken = serde_json::from_str("\"abc\"").unwrap();
        assert_eq!(token.expose(), "abc");
    }

    #[test]
    fn matches_only_the_same_token() {
        let token = BearerToken::from("s3cret");
        assert!(token.matches("s3cret"));
        assert!(!token.matches("s3cre"));
        assert!(!token.matches("s3cret "));
        assert!(!token.matches("S3cret"));
        assert!(!token.matches(""));
        assert!(BearerToken::from("").matches(""));
    }
}
