#!/usr/bin/env bash
# Regenerates the offline query data (`.sqlx/`) of the native-sql examples: each package is
# built once against a fresh database that has its migrations applied (a throwaway database
# on the PostgreSQL server, a temporary SQLite file), with the query macros online. Run it
# after changing a query or a migration, and commit the `.sqlx/` directories.
#
#   examples/native-sql/prepare.sh
#
# PostgreSQL: the server at INSEAM_TEST_POSTGRES (default postgres://postgres@127.0.0.1:5432,
# trust auth). Neither psql nor sqlite3 is needed.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
server=${INSEAM_TEST_POSTGRES:-postgres://postgres@127.0.0.1:5432}
work=$(mktemp -d)
pg_url="$server/native_sql_prepare_$$"
cd "$root"

migrate() { cargo run --quiet -p native-sql-migrate -- "$@"; }
cleanup() {
    migrate drop "$pg_url" || echo "prepare.sh: could not drop $pg_url" >&2
    rm -rf "$work"
}
trap cleanup EXIT

# prepare <package> <directory> <database url>
prepare() {
    local package=$1 dir=$here/$2 url=$3
    local data=$work/$2.sqlx
    echo "== $package against $url"
    migrate reset "$url" "$dir/migrations" || {
        echo "prepare.sh: cannot create $url with the migrations of $package; if PostgreSQL is" >&2
        echo "not running: pg_ctlcluster --skip-systemctl-redirect \$(ls /etc/postgresql) main start" >&2
        exit 1
    }
    mkdir "$data"
    # Cargo would otherwise reuse the last build, and the query macros would not run.
    find "$dir/src" "$dir/tests" -name '*.rs' -exec touch {} +
    # The environment wins over .cargo/config.toml's SQLX_OFFLINE=true.
    SQLX_OFFLINE=false SQLX_OFFLINE_DIR=$data DATABASE_URL=$url \
        cargo build -p "$package" --all-targets
    rm -rf "$dir/.sqlx"
    mv "$data" "$dir/.sqlx"
    echo "   $(ls "$dir/.sqlx" | wc -l) queries in ${dir#"$root"/}/.sqlx"
}

prepare native-sql-postgres postgres "$pg_url"
prepare native-sql-sqlite sqlite "sqlite://$work/native-sql.db"

echo "== both packages offline, with the new data"
find "$here/postgres/src" "$here/postgres/tests" "$here/sqlite/src" "$here/sqlite/tests" \
    -name '*.rs' -exec touch {} +
env -u DATABASE_URL SQLX_OFFLINE=true \
    cargo build -p native-sql-postgres -p native-sql-sqlite --all-targets
