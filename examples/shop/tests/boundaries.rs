//! No module reads or writes another module's tables: every table a module's SQL names
//! carries that module's prefix. (Modules talk through messages; that is what lets one of
//! them move behind a broker later.)

const MODULES: [&str; 6] = [
    "catalog",
    "inventory",
    "notifications",
    "orders",
    "payments",
    "shipping",
];

/// The table names after `FROM`, `INTO`, `UPDATE`, `JOIN` and `TABLE IF NOT EXISTS` in `source`.
fn tables(source: &str) -> Vec<String> {
    let words: Vec<&str> = source
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
        .collect();
    let mut found = Vec::new();
    for pair in words.windows(2) {
        let keyword = pair[0].to_ascii_uppercase();
        if matches!(
            keyword.as_str(),
            "FROM" | "INTO" | "UPDATE" | "JOIN" | "EXISTS"
        ) {
            let name = pair[1];
            if MODULES.iter().any(|m| name.starts_with(&format!("{m}_"))) {
                found.push(name.to_owned());
            }
        }
    }
    found
}

#[test]
fn each_module_touches_only_its_own_tables() {
    let mut checked = 0;
    for module in MODULES {
        let path = format!("{}/src/{module}.rs", env!("CARGO_MANIFEST_DIR"));
        let source = std::fs::read_to_string(&path).expect("module source");
        let tables = tables(&source);
        assert!(!tables.is_empty(), "{module} names no table");
        for table in tables {
            assert!(
                table.starts_with(&format!("{module}_")),
                "module `{module}` touches `{table}`, a table of another module; send it a message instead"
            );
            checked += 1;
        }
    }
    assert!(checked >= 12, "only {checked} table references found");
}

#[test]
fn the_check_catches_a_foreign_table() {
    let source = r#"sqlx::query("SELECT available FROM inventory_stock WHERE sku = $1")"#;
    assert_eq!(tables(source), ["inventory_stock"]);
}
