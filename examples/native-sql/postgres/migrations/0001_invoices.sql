-- Invoices, written by the `issue_invoice` command handler.
CREATE TABLE invoices (
    id          UUID PRIMARY KEY,
    customer    TEXT NOT NULL,
    issued_at   TIMESTAMPTZ NOT NULL,
    total_cents BIGINT NOT NULL,
    details     JSONB NOT NULL
);
CREATE INDEX invoices_customer ON invoices (customer);

-- What the `receivables` group records for each issued invoice, in its delivery's transaction.
CREATE TABLE receivables (
    id           BIGSERIAL PRIMARY KEY,
    invoice_id   UUID NOT NULL REFERENCES invoices (id),
    event_id     UUID NOT NULL,
    customer     TEXT NOT NULL,
    amount_cents BIGINT NOT NULL,
    due_at       TIMESTAMPTZ NOT NULL
);
CREATE INDEX receivables_customer ON receivables (customer);
