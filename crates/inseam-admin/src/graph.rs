//! The catalog's flow diagram as inline SVG, laid out in layers from left to right.
//!
//! The nodes and arrows are those of the catalog's Mermaid diagram: commands (parallelograms),
//! events (hexagons), groups (boxes with side bars: subscribers, sagas, projections) and inline
//! subscribers (rounded); a solid arrow publishes or receives, a dashed one sends a command
//! durably. Each node sits one layer right of the furthest node that points at it (arrows that
//! close a cycle, such as a saga's command answered by an event it receives, are left out of
//! that count and drawn back leftwards); within a layer nodes are ordered by the position of
//! what points at them, to keep arrows short.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use inseam_core::catalog::{Catalog, Publisher, Role};

use crate::html::esc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Command,
    Event,
    Group,
    Inline,
}

#[derive(Debug)]
struct Node {
    label: String,
    title: String,
    kind: Kind,
}

#[derive(Debug, Default)]
struct Graph {
    nodes: Vec<Node>,
    index: HashMap<String, usize>,
    /// From, to, dashed.
    edges: Vec<(usize, usize, bool)>,
}

impl Graph {
    fn node(&mut self, key: String, label: String, title: String, kind: Kind) -> usize {
        if let Some(&i) = self.index.get(&key) {
            return i;
        }
        self.nodes.push(Node { label, title, kind });
        self.index.insert(key, self.nodes.len() - 1);
        self.nodes.len() - 1
    }

    fn edge(&mut self, from: &str, to: &str, dashed: bool) {
        if let (Some(&a), Some(&b)) = (self.index.get(from), self.index.get(to))
            && !self.edges.contains(&(a, b, dashed))
        {
            self.edges.push((a, b, dashed));
        }
    }

    fn of(catalog: &Catalog) -> Graph {
        let mut g = Graph::default();
        for command in &catalog.commands {
            g.node(
                format!("c:{}", command.name),
                command.name.to_owned(),
                format!("command {} ({})", command.name, command.rust_type),
                Kind::Command,
            );
        }
        for event in catalog.contracts() {
            g.node(
                format!("e:{}", event.reference()),
                event.reference().to_string(),
                format!("event {} ({})", event.reference(), event.rust_type),
                Kind::Event,
            );
        }
        for group in catalog.groups.iter().filter(|g| g.role != Role::Command) {
            let label = match group.role {
                Role::Subscriber => group.name.to_owned(),
                role => format!("{} {}", role.as_str(), group.name),
            };
            g.node(
                format!("g:{}", group.name),
                label,
                format!("group {} (process {})", group.name, group.process),
                Kind::Group,
            );
        }
        for event in catalog.contracts() {
            for subscriber in event.subscribers.iter().filter(|s| s.group.is_none()) {
                g.node(
                    format!("i:{}", subscriber.handler),
                    subscriber.handler.to_owned(),
                    format!("inline subscriber {}", subscriber.handler),
                    Kind::Inline,
                );
            }
        }
        for command in &catalog.commands {
            if let Some(handler) = &command.handler {
                let from = format!("c:{}", command.name);
                for event in &handler.publishes {
                    g.edge(&from, &format!("e:{event}"), false);
                }
                for sent in &handler.sends {
                    g.edge(&from, &format!("c:{sent}"), true);
                }
            }
        }
        for event in catalog.contracts() {
            let from = format!("e:{}", event.reference());
            for subscriber in &event.subscribers {
                match subscriber.group {
                    Some(group) => g.edge(&from, &format!("g:{group}"), false),
                    None => g.edge(&from, &format!("i:{}", subscriber.handler), false),
                }
            }
            for publisher in &event.publishers {
                if let Publisher::InlineSubscriber(handler) = publisher {
                    g.edge(&format!("i:{handler}"), &from, false);
                }
            }
        }
        for group in catalog.groups.iter().filter(|g| g.role != Role::Command) {
            let from = format!("g:{}", group.name);
            for event in &group.publishes {
                g.edge(&from, &format!("e:{event}"), false);
            }
            for sent in &group.sends {
                g.edge(&from, &format!("c:{sent}"), true);
            }
        }
        g
    }

    /// The edges that close a cycle, found by a depth-first walk from every node in order.
    fn back_edges(&self) -> Vec<bool> {
        let n = self.nodes.len();
        let mut out: Vec<Vec<(usize, usize)>> = vec![Vec::new(); n];
        for (i, &(a, b, _)) in self.edges.iter().enumerate() {
            out[a].push((b, i));
        }
        // 0: not seen, 1: on the walk's path, 2: done.
        let mut state = vec![0u8; n];
        let mut back = vec![false; self.edges.len()];
        for start in 0..n {
            if state[start] != 0 {
                continue;
            }
            let mut stack = vec![(start, 0usize)];
            state[start] = 1;
            while let Some(&mut (node, ref mut next)) = stack.last_mut() {
                if let Some(&(to, edge)) = out[node].get(*next) {
                    *next += 1;
                    match state[to] {
                        0 => {
                            state[to] = 1;
                            stack.push((to, 0));
                        }
                        1 => back[edge] = true,
                        _ => {}
                    }
                } else {
                    state[node] = 2;
                    stack.pop();
                }
            }
        }
        back
    }
}

const HEIGHT: f64 = 34.0;
const GAP_X: f64 = 64.0;
const GAP_Y: f64 = 18.0;
const MARGIN: f64 = 16.0;
const CHAR: f64 = 7.2;

fn width(node: &Node) -> f64 {
    (node.label.chars().count() as f64 * CHAR + 34.0).max(80.0)
}

/// The flow diagram of `catalog` as an `<svg>` element, sized to fit; styled by the admin
/// stylesheet's `.flow` rules (classes `command`, `event`, `group`, `inline`, `sends`).
pub fn flow_svg(catalog: &Catalog) -> String {
    let g = Graph::of(catalog);
    let n = g.nodes.len();
    if n == 0 {
        return "<p class=\"muted\">The app declares no messages.</p>".to_owned();
    }
    let back = g.back_edges();
    // Longest path over the forward edges: repeated relaxation, at most n rounds (a DAG).
    let mut layer = vec![0usize; n];
    for _ in 0..n {
        let mut changed = false;
        for (i, &(a, b, _)) in g.edges.iter().enumerate() {
            if !back[i] && layer[b] < layer[a] + 1 {
                layer[b] = layer[a] + 1;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let mut layers: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, &l) in layer.iter().enumerate() {
        layers.entry(l).or_default().push(i);
    }
    // Order each layer by the mean position of its predecessors, two sweeps.
    let mut position = vec![0f64; n];
    for nodes in layers.values() {
        for (p, &i) in nodes.iter().enumerate() {
            position[i] = p as f64;
        }
    }
    for _ in 0..2 {
        for nodes in layers.values_mut() {
            let key = |i: usize| {
                let preds: Vec<f64> = g
                    .edges
                    .iter()
                    .enumerate()
                    .filter(|(e, (_, b, _))| *b == i && !back[*e])
                    .map(|(_, (a, _, _))| position[*a])
                    .collect();
                if preds.is_empty() {
                    position[i]
                } else {
                    preds.iter().sum::<f64>() / preds.len() as f64
                }
            };
            let mut keyed: Vec<(f64, usize)> = nodes.iter().map(|&i| (key(i), i)).collect();
            keyed.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            *nodes = keyed.into_iter().map(|(_, i)| i).collect();
            for (p, &i) in nodes.iter().enumerate() {
                position[i] = p as f64;
            }
        }
    }
    // Coordinates: layers left to right, each as wide as its widest node, centred vertically.
    let tallest = layers.values().map(Vec::len).max().unwrap_or(1) as f64;
    let total_height = tallest * (HEIGHT + GAP_Y) - GAP_Y + 2.0 * MARGIN;
    let mut x = MARGIN;
    let mut place = vec![(0f64, 0f64, 0f64); n];
    for nodes in layers.values() {
        let column = nodes
            .iter()
            .map(|&i| width(&g.nodes[i]))
            .fold(0.0, f64::max);
        let height = nodes.len() as f64 * (HEIGHT + GAP_Y) - GAP_Y;
        let mut y = (total_height - height) / 2.0;
        for &i in nodes {
            let w = width(&g.nodes[i]);
            place[i] = (x + (column - w) / 2.0, y, w);
            y += HEIGHT + GAP_Y;
        }
        x += column + GAP_X;
    }
    let total_width = x - GAP_X + MARGIN;

    let mut svg = String::new();
    let _ = write!(
        svg,
        "<svg class=\"flow\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{total_width:.0}\" height=\"{total_height:.0}\" viewBox=\"0 0 {total_width:.0} {total_height:.0}\" role=\"img\" aria-label=\"flow diagram\">\
<defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\"><path d=\"M 0 0 L 10 5 L 0 10 z\" class=\"head\"/></marker></defs>"
    );
    for (i, &(a, b, dashed)) in g.edges.iter().enumerate() {
        let (ax, ay, aw) = place[a];
        let (bx, by, bw) = place[b];
        let (sy, ty) = (ay + HEIGHT / 2.0, by + HEIGHT / 2.0);
        let backwards = back[i] || bx <= ax;
        let class = match (dashed, backwards) {
            (true, true) => "edge sends back",
            (true, false) => "edge sends",
            (false, true) => "edge back",
            (false, false) => "edge",
        };
        let path = if backwards {
            // Back to the left: out under the source, in under the target.
            let (sx, tx) = (ax + aw / 2.0, bx + bw / 2.0);
            let low = ay.max(by) + HEIGHT + GAP_Y * 0.8;
            format!(
                "M {sx:.1} {:.1} C {sx:.1} {low:.1}, {tx:.1} {low:.1}, {tx:.1} {:.1}",
                ay + HEIGHT,
                by + HEIGHT
            )
        } else {
            let (sx, tx) = (ax + aw, bx);
            let mid = (sx + tx) / 2.0;
            format!("M {sx:.1} {sy:.1} C {mid:.1} {sy:.1}, {mid:.1} {ty:.1}, {tx:.1} {ty:.1}")
        };
        let _ = write!(
            svg,
            "<path class=\"{class}\" d=\"{path}\" marker-end=\"url(#arrow)\"/>"
        );
    }
    for (i, node) in g.nodes.iter().enumerate() {
        let (x, y, w) = place[i];
        let h = HEIGHT;
        let shape = match node.kind {
            Kind::Command => format!(
                "<polygon points=\"{:.1},{y:.1} {:.1},{y:.1} {:.1},{:.1} {x:.1},{:.1}\"/>",
                x + 10.0,
                x + w,
                x + w - 10.0,
                y + h,
                y + h
            ),
            Kind::Event => format!(
                "<polygon points=\"{:.1},{y:.1} {:.1},{y:.1} {:.1},{:.1} {:.1},{:.1} {:.1},{:.1} {x:.1},{:.1}\"/>",
                x + 10.0,
                x + w - 10.0,
                x + w,
                y + h / 2.0,
                x + w - 10.0,
                y + h,
                x + 10.0,
                y + h,
                y + h / 2.0
            ),
            Kind::Group => format!(
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{h:.1}\"/><line x1=\"{:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{:.1}\"/><line x1=\"{:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{:.1}\"/>",
                x + 6.0,
                x + 6.0,
                y + h,
                x + w - 6.0,
                x + w - 6.0,
                y + h
            ),
            Kind::Inline => format!(
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{h:.1}\" rx=\"{:.1}\"/>",
                h / 2.0
            ),
        };
        let class = match node.kind {
            Kind::Command => "command",
            Kind::Event => "event",
            Kind::Group => "group",
            Kind::Inline => "inline",
        };
        let _ = write!(
            svg,
            "<g class=\"node {class}\"><title>{}</title>{shape}<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" dominant-baseline=\"central\">{}</text></g>",
            esc(&node.title),
            x + w / 2.0,
            y + h / 2.0,
            esc(&node.label)
        );
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(usize, usize)], n: usize) -> Graph {
        let mut g = Graph::default();
        for i in 0..n {
            g.node(i.to_string(), i.to_string(), String::new(), Kind::Event);
        }
        for &(a, b) in edges {
            g.edges.push((a, b, false));
        }
        g
    }

    #[test]
    fn only_the_edges_that_close_a_cycle_are_back_edges() {
        let g = graph(&[(0, 1), (1, 2), (2, 0), (0, 2)], 3);
        assert_eq!(g.back_edges(), vec![false, false, true, false]);
        let g = graph(&[(0, 1), (1, 2)], 3);
        assert_eq!(g.back_edges(), vec![false, false]);
    }
}
