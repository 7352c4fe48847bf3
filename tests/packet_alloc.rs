#![cfg(feature = "packet")]
