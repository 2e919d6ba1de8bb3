#![allow(dead_code)]
pub mod strategies;
