//! Durable delivery for inseam on sqlx: a transactional outbox, a relay, inbox deduplication
//! and dead letters, on SQLite (the embedded default) and PostgreSQL.
//!
//! With a [`SqlStore`], every command runs in a database transaction that its handler can
//! write through ([`Transactional::tx`]; on PostgreSQL the transaction begins there, and a
//! command that never asks for it commits its outbox rows in one statement, see
//! [`DeferredUnitOfWork`]); the events it publishes are written to the outbox in that same
//! transaction and are delivered, after commit, to every subscribed group by the
//! relay that [`App::start`](inseam_core::App::start) runs. Each group handles a message in a
//! transaction that also records it in the group's inbox, so its effects apply once even when
//! the message is delivered again.
//!
//! # Guarantees
//! - A command's events are delivered if and only if its transaction committed.
//! - Every committed event reaches every subscribed group at least once, across crashes and
//!   restarts; with the inbox, its effects on the database apply exactly once.
//! - A transaction that commits late (out of id order, as PostgreSQL allows) is delivered like
//!   any other: delivery rows are claimed, never passed over, and a cursor reading the outbox
//!   by position ([`RelayOptions::read_by_position`]) reads only below the oldest transaction
//!   still running (decision 0024).
//! - Within a group, events with the same key are delivered in id order, which is commit order
//!   whenever their writers serialize on the key (they update the same row, or the database is
//!   SQLite). A failing event holds back only its own key until it is retried or dead-lettered.

mod admin;
mod bridge;
mod conn;
mod deferred;
mod error;
pub mod metrics;
mod position;
mod projection;
mod relay;
mod sql;
mod store;

pub use admin::{
    DeadLetter, DeliveryState, FlowDelivery, FlowEntry, GroupLag, GroupStatus, Lag, Pruned, Status,
    flow_lines,
};
pub use conn::{SqlPool, SqlTx};
pub use deferred::{CommitStats, DeferredUnitOfWork};
pub use error::{Error, Result};
pub use projection::{
    EventInfo, Model, OnError, Paused, Projection, ProjectionStep, Projections, RebuildProgress,
    Rebuilt, projection_names,
};
pub use relay::RelayStats;
pub use sql::Backend;
pub use store::{RelayOptions, SqlStore, SqlStoreOptions, SqlUnitOfWork, Transactional};

/// The sqlx inseam is built on (0.9): use the same version in your crate for `sqlx::query!`.
pub use sqlx;
