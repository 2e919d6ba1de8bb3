#![allow(dead_code)]
pub mod pair;
pub mod strategies;
