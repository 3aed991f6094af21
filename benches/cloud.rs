//! The cloud link's figures (written by the next commit).

fn main() {}
