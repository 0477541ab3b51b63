//! Handlers living in a crate that the app only depends on.
//!
//! `inseam_fixture_handlers` holds the ledger's handlers, and nothing here names any of its
//! items. Without the `use .. as _` below, the linker may leave that crate out of the binary and
//! `discover()` would not find its handlers; with it, they are linked and discovered.

use inseam::prelude::*;
use inseam_fixture_contracts::{Balance, Credit, LedgerError};
use inseam_fixture_handlers as _;

#[tokio::test]
async fn handlers_in_a_dependency_crate_are_discovered() {
    let balances = inseam_fixture_handlers::Balances::default();
    let audit = inseam_fixture_handlers::Audit::default();
    let app = App::builder()
        .discover()
        .state(balances)
        .state(audit.clone())
        .build()
        .await
        .expect("wiring is valid");

    assert_eq!(
        app.send(Credit {
            account: "acme".into(),
            amount: 250
        })
        .await
        .expect("credited"),
        250
    );
    assert_eq!(
        app.send(Credit {
            account: "acme".into(),
            amount: 50
        })
        .await
        .expect("credited"),
        300
    );
    assert!(matches!(
        app.send(Credit {
            account: "acme".into(),
            amount: 0
        })
        .await,
        Err(DispatchError::Handler(LedgerError::ZeroAmount))
    ));
    assert_eq!(
        app.query(Balance {
            account: "acme".into()
        })
        .await
        .expect("read"),
        300
    );

    app.wait_idle().await;
    let audited = audit.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(
        audited.iter().map(|c| c.amount).collect::<Vec<_>>(),
        vec![250, 50]
    );
    assert_eq!(
        app.subscriptions(),
        vec![(
            "ledger.credited",
            "audit",
            "inseam_fixture_handlers::audit_credit"
        )]
    );
}

#[tokio::test]
async fn discovered_handlers_still_need_their_state() {
    let error = App::builder()
        .discover()
        .build()
        .await
        .expect_err("no state given");
    let text = error.to_string();
    assert!(text.starts_with("the app has 3 wiring problems:"), "{text}");
    assert!(text.contains(
        "handler `inseam_fixture_handlers::credit` for `inseam_fixture_contracts::Credit` extracts state `inseam_fixture_handlers::Balances`, which was never provided"
    ), "{text}");
}
