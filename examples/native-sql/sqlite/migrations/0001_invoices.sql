-- Invoices, written by the `issue_invoice` command handler. SQLite stores what sqlx encodes:
-- a `Uuid` as a 16-byte BLOB, a `DateTime<Utc>` as RFC 3339 TEXT, a `Json<T>` as TEXT.
CREATE TABLE invoices (
    id          BLOB PRIMARY KEY NOT NULL,
    customer    TEXT NOT NULL,
    issued_at   TEXT NOT NULL,
    total_cents INTEGER NOT NULL,
    details     TEXT NOT NULL
);
CREATE INDEX invoices_customer ON invoices (customer);

-- What the `receivables` group records for each issued invoice, in its delivery's transaction.
CREATE TABLE receivables (
    id           INTEGER PRIMARY KEY,
    invoice_id   BLOB NOT NULL REFERENCES invoices (id),
    event_id     BLOB NOT NULL,
    customer     TEXT NOT NULL,
    amount_cents INTEGER NOT NULL,
    due_at       TEXT NOT NULL
);
CREATE INDEX receivables_customer ON receivables (customer);
