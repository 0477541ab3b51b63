#!/usr/bin/env bash
# The outbox row against the floor's row, server side only: `pgbench`, one client, prepared
# statements, ROUNDS rounds (default 4) of PGBENCH_SECONDS seconds (default 5) alternating the
# statements, on a scratch database (dropped first). docs/benchmarks.md quotes its figures.
#
#   benches/cqrs-compare/pgbench/run.sh            # PostgreSQL at 127.0.0.1:5432, user postgres
#
# Tables: `floor_events` (the bench's floor), `o_full` (inseam's outbox with its indexes, as
# migrated), `o_noreplay` (without `outbox_replay`), `o_min` (primary key and stream key only).
# Statements: the one-row `INSERT` a lone command sends, and the ordered CTE form it replaced.
set -euo pipefail
cd "$(dirname "$0")"
HOST="${PGHOST:-127.0.0.1}" USER_="${PGUSER:-postgres}" DB=inseam_pgbench
ROUNDS="${ROUNDS:-4}" SECONDS_="${PGBENCH_SECONDS:-5}"
psql -q -h "$HOST" -U "$USER_" -d postgres -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB"
psql -q -h "$HOST" -U "$USER_" -d "$DB" -f schema.sql
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# A 430-byte envelope, as the bench's rows carry.
envelope="\\\\x$(printf '7b%.0s' $(seq 1 430))"
columns="message_id, name, version, msg_key, envelope, created_at, stream, stream_version, correlation_id, groups"
values="'0196f0a2-7c3b-7d4e-8f00-' || :r, 'cart.item_added', 1, NULL, '$envelope'::bytea, 1733356800000000 + :t, 'cart-' || :r, 1, '0196f0a2-7c3b-7d4e-8f01-' || :r"
head='\set r random(1, 1000000000000)
\set t random(1, 1000000000000)'
for table in o_full o_noreplay o_min; do
    printf '%s\nINSERT INTO %s (%s) VALUES (%s, NULL);\n' "$head" "$table" "$columns" "$values" > "$work/insert_$table.sql"
done
printf '%s\nWITH v (ord, %s, deliver_at, groups2) AS (VALUES (0, %s, NULL, 0, %s)) INSERT INTO o_full (%s) SELECT %s FROM v ORDER BY ord;\n' \
    "$head" "$columns" "$values" "'[]'" "$columns" "$columns" > "$work/cte_o_full.sql"
printf '%s\nINSERT INTO floor_events (stream, version, payload) VALUES (%s, 1, %s::jsonb);\n' \
    "$head" "'c' || :r" "'{\"sku\":\"sku-1\",\"qty\":1,\"unit_price\":250}'" > "$work/floor.sql"
for round in $(seq 1 "$ROUNDS"); do
    for script in floor insert_o_full cte_o_full insert_o_noreplay insert_o_min; do
        tps=$(pgbench -h "$HOST" -U "$USER_" -n -M prepared -c1 -T "$SECONDS_" -f "$work/$script.sql" "$DB" 2>&1 |
            sed -n 's/^tps = \([0-9.]*\).*/\1/p')
        echo "round $round  $script  ${tps:-failed} transactions/s"
    done
done
psql -q -h "$HOST" -U "$USER_" -d postgres -c "DROP DATABASE $DB"
