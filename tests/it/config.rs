//! `doorbridge check-config` and the layered configuration, through the real binary.
