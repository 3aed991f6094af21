//! Power cuts, not only crashes (placeholder while the campaign is written).

#[path = "../support/powercut_fs.rs"]
mod powercut_fs;
