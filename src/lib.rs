//! pglb: a PostgreSQL-aware TCP load balancer for fleets of PgBouncers.
//!
//! The data path, one module per step:
//! [`accept`] → [`startup`] → [`pick`] (with [`balance`]) → [`relay`], driven per client
//! by [`session`], on one of the [`workers`]. Server and listen state lives in [`state`],
//! shared by everything;
//! [`checker`] (with [`probe`] and [`health`]) keeps it truthful.

#![deny(unsafe_code)]

pub(crate) mod accept;
pub(crate) mod balance;
pub(crate) mod cancel;
pub(crate) mod checker;
pub(crate) mod client;
pub mod config;
pub(crate) mod counters;
pub mod daemon;
pub(crate) mod events;
pub(crate) mod health;
pub mod kernel_relay;
pub(crate) mod login;
pub(crate) mod net;
pub(crate) mod notify;
pub(crate) mod operator_state;
pub(crate) mod pick;
pub(crate) mod probe;
pub(crate) mod refusal;
pub(crate) mod relay;
pub(crate) mod reload;
pub(crate) mod runtime_api;
pub(crate) mod session;
pub mod startup;
pub(crate) mod state;
#[cfg(test)]
pub(crate) mod testing;
pub(crate) mod tls;
pub(crate) mod upgrade;
pub mod workers;

pub use config::Config;
pub use daemon::run;
pub(crate) mod admin;
pub(crate) mod alerts;
pub(crate) mod http;
pub(crate) mod peers;
pub mod scanner;
pub mod stats;
pub(crate) mod webclient;
