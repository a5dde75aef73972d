//! The metadata block: JSON, at the end of the file, covered by the root digest.

use serde::{Deserialize, Serialize};

/// Free-form, descriptive information about an image. Nothing in it is
/// needed to read guest bytes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    /// The program that wrote the image, e.g. `bootcache 0.1.0`.
    pub creator: String,
    /// Where to find the parent image (reserved for layered images; see FORMAT.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_locator: Option<String>,
    /// Producer-specific details (source image, traces used, ...).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub extra: serde_json::Value,
}
