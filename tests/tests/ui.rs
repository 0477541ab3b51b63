//! Compile-fail tests of the macros: each misuse is reported at the offending token, with a
//! message that says how to fix it.

#[test]
fn ui() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("ui/*/fail/*.rs");
}
