//! pglb: a PostgreSQL-aware TCP load balancer for fleets of PgBouncers.
//!
//! The data path, one module per step:
//! [`accept`] → [`startup`] → [`pick`] (with [`balance`]) → [`relay`], driven per client
//! by [`session`], on one of the [`workers`]. Server and listen state lives in [`state`],
//! shared by everything;
//! [`checker`] (with [`probe`] and [`health`]) keeps it truthful.

#![forbid(unsafe_code)]

pub mod accept;
pub mod balance;
pub mod cancel;
pub mod checker;
pub mod client;
pub mod config;
pub mod counters;
pub mod daemon;
pub mod events;
pub mod health;
pub mod login;
pub mod net;
pub mod notify;
pub mod operator_state;
pub mod pick;
pub mod probe;
pub mod refusal;
pub mod relay;
pub mod reload;
pub mod runtime_api;
pub mod session;
pub mod startup;
pub mod state;
pub mod tls;
pub mod upgrade;
pub mod workers;

pub use config::Config;
pub use daemon::run;
pub mod admin;
pub mod alerts;
pub mod http;
pub mod peers;
pub mod scanner;
pub mod stats;
pub mod webclient;
