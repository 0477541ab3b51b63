//! Draws the relay bench's figures: `cargo bench -p inseam-benches --bench relay_plot -- <csv>
//! <svg>` reads the lines `INSEAM_BENCH_CSV` collected (`backend,mode,events,groups,instances,
//! keys,events_per_s,p99_ms`) and writes an SVG with two panels: throughput against the backlog
//! (one line per backend and mode, one group, one instance, 64 keys) and against the relay
//! instances (PostgreSQL, 100,000 events, 1 and 4 groups).

#![allow(clippy::print_stdout)] // a bench binary reports on stdout

use std::fmt::Write as _;

struct Point {
    backend: String,
    mode: String,
    events: f64,
    groups: u64,
    instances: u64,
    keys: u64,
    rate: f64,
}

fn parse(line: &str) -> Option<Point> {
    let f: Vec<&str> = line.trim().split(',').collect();
    if f.len() < 8 {
        return None;
    }
    Some(Point {
        backend: f[0].to_owned(),
        mode: f[1].to_owned(),
        events: f[2].parse().ok()?,
        groups: f[3].parse().ok()?,
        instances: f[4].parse().ok()?,
        keys: f[5].parse().ok()?,
        rate: f[6].parse().ok()?,
    })
}

const W: f64 = 420.0;
const H: f64 = 300.0;
const M: f64 = 55.0;
const COLOURS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];

/// One panel at `(x0, 0)`: lines of `(x, y)` with labels; `log_x` for the backlog axis.
fn panel(
    svg: &mut String,
    x0: f64,
    title: &str,
    x_label: &str,
    lines: &[(String, Vec<(f64, f64)>)],
    log_x: bool,
) {
    let xs: Vec<f64> = lines
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(x, _)| if log_x { x.log10() } else { *x }))
        .collect();
    let (x_min, x_max) = xs
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    let (x_min, x_max) = if x_min >= x_max {
        (x_min - 1.0, x_max + 1.0)
    } else {
        (x_min, x_max)
    };
    let y_max = lines
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .fold(1.0, f64::max)
        * 1.1;
    let px = |x: f64| {
        let x = if log_x { x.log10() } else { x };
        x0 + M + (x - x_min) / (x_max - x_min) * (W - 2.0 * M)
    };
    let py = |y: f64| H - M - y / y_max * (H - 2.0 * M);
    let _ = write!(
        svg,
        r#"<text x="{}" y="20" font-size="13" text-anchor="middle">{title}</text>"#,
        x0 + W / 2.0
    );
    let _ = write!(
        svg,
        r#"<line x1="{a}" y1="{b}" x2="{c}" y2="{b}" stroke="black"/><line x1="{a}" y1="{d}" x2="{a}" y2="{b}" stroke="black"/>"#,
        a = x0 + M,
        b = H - M,
        c = x0 + W - M,
        d = M
    );
    for i in 0..=4 {
        let y = y_max / 4.0 * f64::from(i);
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" font-size="10" text-anchor="end">{:.0}k</text>"#,
            x0 + M - 4.0,
            py(y) + 3.0,
            y / 1000.0
        );
    }
    let mut ticks: Vec<f64> = lines
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(x, _)| *x))
        .collect();
    ticks.sort_by(f64::total_cmp);
    ticks.dedup();
    for x in ticks {
        let label = if x >= 1e6 {
            format!("{}M", x / 1e6)
        } else if x >= 1e3 {
            format!("{}k", x / 1e3)
        } else {
            format!("{x}")
        };
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" font-size="10" text-anchor="middle">{label}</text>"#,
            px(x),
            H - M + 14.0
        );
    }
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" font-size="11" text-anchor="middle">{x_label}</text><text x="{}" y="{}" font-size="11" text-anchor="middle" transform="rotate(-90 {} {})">deliveries/s</text>"#,
        x0 + W / 2.0,
        H - 15.0,
        x0 + 14.0,
        H / 2.0,
        x0 + 14.0,
        H / 2.0
    );
    for (i, (label, points)) in lines.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        for (x, y) in points {
            let _ = write!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/>"#,
                px(*x),
                py(*y)
            );
        }
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" font-size="10" fill="{colour}">{label}</text>"#,
            x0 + M + 8.0,
            M + 4.0 + 13.0 * i as f64
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let (Some(csv), Some(out)) = (args.first(), args.get(1)) else {
        eprintln!("usage: relay_plot <figures.csv> <out.svg>");
        std::process::exit(2);
    };
    let text = std::fs::read_to_string(csv).unwrap_or_else(|e| {
        eprintln!("cannot read {csv}: {e}");
        std::process::exit(1)
    });
    let points: Vec<Point> = text.lines().filter_map(parse).collect();
    let mut by_backlog: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for (backend, mode) in [
        ("pg", "position"),
        ("pg", "rows"),
        ("sqlite", "position"),
        ("sqlite", "rows"),
    ] {
        let mut line: Vec<(f64, f64)> = points
            .iter()
            .filter(|p| {
                p.backend == backend
                    && p.mode == mode
                    && p.groups == 1
                    && p.instances == 1
                    && p.keys == 64
            })
            .map(|p| (p.events, p.rate))
            .collect();
        line.sort_by(|a, b| a.0.total_cmp(&b.0));
        if !line.is_empty() {
            by_backlog.push((format!("{backend}, {mode}"), line));
        }
    }
    let mut by_instances: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for groups in [1, 4] {
        let mut line: Vec<(f64, f64)> = points
            .iter()
            .filter(|p| {
                p.backend == "pg"
                    && p.mode == "position"
                    && p.events == 100_000.0
                    && p.groups == groups
                    && p.keys == 64
            })
            .map(|p| (p.instances as f64, p.rate))
            .collect();
        line.sort_by(|a, b| a.0.total_cmp(&b.0));
        if !line.is_empty() {
            by_instances.push((format!("pg, {groups} group(s)"), line));
        }
    }
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{H}" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>"#,
        2.0 * W
    );
    panel(
        &mut svg,
        0.0,
        "Relay throughput against the backlog",
        "events in the backlog",
        &by_backlog,
        true,
    );
    panel(
        &mut svg,
        W,
        "Against relay instances (100k events)",
        "instances on one database",
        &by_instances,
        false,
    );
    svg.push_str("</svg>\n");
    if let Err(e) = std::fs::write(out, svg) {
        eprintln!("cannot write {out}: {e}");
        std::process::exit(1);
    }
    println!("wrote {out} from {} figures", points.len());
}
