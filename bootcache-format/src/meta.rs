//! The metadata block: JSON, at the end of the file, covered by the root digest.

use serde::{Deserialize, Serialize};

/// The longest recorded boot a reader accepts.
pub(crate) const MAX_BOOT_SECONDS: f64 = 86_400.0;

/// Free-form, descriptive information about an image. Nothing in it is
/// needed to read guest bytes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    /// The program that wrote the image, e.g. `bootcache 0.1.0`.
    pub creator: String,
    /// How long the boot the image was laid out from read, in seconds (the
    /// latest traced boot's last read): a node streams the rest of the image
    /// after that rather than during boots. Checked to be 0 to a day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_seconds: Option<f64>,
    /// Where to find the parent image (reserved for layered images; see FORMAT.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_locator: Option<String>,
    /// Producer-specific details (source image, traces used, ...).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub extra: serde_json::Value,
}
