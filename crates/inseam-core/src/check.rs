//! The checks `AppBuilder::build` runs on the wiring as a whole. Each adds its problems to one
//! list instead of stopping at the first, so that a build that fails names everything there is
//! to fix at once.

use std::collections::HashMap;

use tokio::runtime::Handle;

use crate::catalog::{AggregateDoc, Gather};
use crate::error::{BuildError, WiringProblem};
use crate::extract::Resources;
use crate::middleware::Layers;
use crate::registry::{Built, Wiring};
use crate::upcast::Upcasters;

/// A wiring that passed every check: what `build()` assembles the app from.
pub(crate) struct Checked {
    /// The prepared command and query handlers and the event routes.
    pub(crate) built: Built,
    /// What the catalog shows of the wiring.
    pub(crate) gather: Gather,
    /// The runtime that background deliveries are spawned on.
    pub(crate) runtime: Handle,
}

/// Checks `wiring` (every handler, with the state and layers it needs), the upcasters of every
/// event, those of the declared `aggregates` included (nothing may subscribe to them), and that
/// the app is built inside a tokio runtime, which runs its background deliveries.
pub(crate) fn check(
    wiring: Wiring,
    resources: &Resources,
    layers: &Layers,
    aggregates: &[AggregateDoc],
    upcasters: &Upcasters,
) -> Result<Checked, BuildError> {
    let runtime = Handle::try_current();
    let gather = wiring.gather();
    let built = wiring.build(resources, layers);
    let mut events: Vec<(&'static str, u32)> = aggregates
        .iter()
        .flat_map(|a| a.events.iter().map(|e| (e.name, e.version)))
        .collect();
    if let Ok(built) = &built {
        events.extend(
            built
                .events
                .values()
                .map(|route| (route.event_name(), route.event_version())),
        );
    }
    let upcasting = check_upcasters(&events, upcasters);
    match (built, runtime) {
        (Ok(built), Ok(runtime)) if upcasting.is_empty() => Ok(Checked {
            built,
            gather,
            runtime,
        }),
        (built, runtime) => {
            let mut problems = built.err().unwrap_or_default();
            problems.extend(upcasting);
            if runtime.is_err() {
                problems.push(WiringProblem::NoRuntime);
            }
            Err(BuildError::Wiring(problems))
        }
    }
}

/// The upcasting problems of `events` (every known `(name, current version)`).
fn check_upcasters(events: &[(&'static str, u32)], upcasters: &Upcasters) -> Vec<WiringProblem> {
    let mut current: HashMap<&'static str, u32> = HashMap::new();
    for &(name, version) in events {
        let entry = current.entry(name).or_insert(version);
        *entry = (*entry).max(version);
    }
    let mut problems = Vec::new();
    let mut names: Vec<(&'static str, u32)> = current.iter().map(|(n, v)| (*n, *v)).collect();
    names.sort_unstable();
    for (event, version) in names {
        for from in 1..version {
            if !upcasters.has(event, from) {
                problems.push(WiringProblem::MissingUpcaster {
                    event,
                    version,
                    from,
                });
            }
        }
    }
    let mut stray: Vec<(&'static str, u32)> = upcasters
        .registered()
        .filter(|(name, from)| current.get(name).is_none_or(|v| from >= v))
        .collect();
    stray.sort_unstable();
    problems.extend(
        stray
            .into_iter()
            .map(|(event, from)| WiringProblem::StrayUpcaster {
                event,
                from,
                current: current.get(event).copied(),
            }),
    );
    problems
}
