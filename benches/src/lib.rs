//! Criterion benches and the peer comparison scripts live beside this crate (benches/*.rs, *.sh).
