//! Handler arguments taken from the app and the message being handled, in the spirit of axum
//! extractors: everything an extractor needs from the app is looked up once, when the app is
//! built, so a missing piece is a wiring error and extraction per dispatch is a clone.

use std::any::{Any, TypeId, type_name};
use std::collections::HashMap;
use std::fmt;

use crate::app::App;
use crate::context::DispatchMeta;
use crate::envelope::{Headers, Metadata};
use crate::error::WiringProblem;

/// Shared values registered on the builder with `.state(..)`, keyed by type.
#[derive(Default)]
pub struct Resources {
    values: HashMap<TypeId, (&'static str, Box<dyn Any + Send + Sync>)>,
}

impl Resources {
    pub(crate) fn insert<T: Send + Sync + 'static>(&mut self, value: T) {
        self.values
            .insert(TypeId::of::<T>(), (type_name::<T>(), Box::new(value)));
    }

    /// The value of type `T`, if one was registered.
    pub fn get<T: Send + Sync + 'static>(&self) -> Option<&T> {
        self.values
            .get(&TypeId::of::<T>())
            .and_then(|(_, v)| v.downcast_ref())
    }
}

impl fmt::Debug for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries(self.values.values().map(|(name, _)| name))
            .finish()
    }
}

/// What extractors see while the app is being built: the resources, and where to report a
/// missing one.
#[derive(Debug)]
pub struct PrepareCx<'a> {
    pub(crate) resources: &'a Resources,
    pub(crate) handler: &'static str,
    pub(crate) message: &'static str,
    pub(crate) problems: &'a mut Vec<WiringProblem>,
}

impl PrepareCx<'_> {
    /// The registered resources.
    pub fn resources(&self) -> &Resources {
        self.resources
    }

    /// Reports that the handler needs a value of type `T` that was never provided.
    pub fn missing<T: ?Sized>(&mut self) {
        self.problems.push(WiringProblem::MissingState {
            handler: self.handler,
            message: self.message,
            state: type_name::<T>(),
        });
    }
}

/// What extractors see per dispatch.
#[derive(Debug, Clone, Copy)]
pub struct Parts<'a> {
    pub(crate) app: &'a App,
    pub(crate) meta: &'a DispatchMeta<'a>,
}

impl Parts<'_> {
    /// The app.
    pub fn app(&self) -> &App {
        self.app
    }

    /// The ids of the message being handled.
    pub fn metadata(&self) -> Metadata {
        self.meta.metadata(self.app)
    }

    /// The headers of the message being handled.
    pub fn headers(&self) -> &Headers {
        self.meta.headers()
    }
}

/// A handler argument (after the message) that is taken from the app or the message.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a handler argument",
    label = "not an extractor",
    note = "handler arguments after the message are extractors such as `State<T>`, `Metadata` or `App`, or the context (`&mut CommandContext<'_>`, `&QueryContext<'_>`, `&mut EventContext<'_>`)"
)]
pub trait Extract: Sized + Send {
    /// What is looked up once at build.
    type Prepared: Send + Sync + 'static;
    /// Looks up what the extractor needs; reports what is missing to `cx` and returns `None`.
    fn prepare(cx: &mut PrepareCx<'_>) -> Option<Self::Prepared>;
    /// Produces the argument for one dispatch.
    fn extract(prepared: &Self::Prepared, parts: &Parts<'_>) -> Self;
}

/// Shared state registered on the builder with `.state(value)`; cloned into each dispatch, so
/// wrap large values in an `Arc`.
///
/// ```ignore
/// #[query_handler]
/// async fn order_summary(q: GetOrderSummary, State(db): State<ReadDb>) -> Result<Summary, QueryError> { .. }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct State<T>(pub T);

impl<T: Clone + Send + Sync + 'static> Extract for State<T> {
    type Prepared = T;

    fn prepare(cx: &mut PrepareCx<'_>) -> Option<T> {
        match cx.resources.get::<T>() {
            Some(value) => Some(value.clone()),
            None => {
                cx.missing::<T>();
                None
            }
        }
    }

    fn extract(prepared: &T, _: &Parts<'_>) -> Self {
        State(prepared.clone())
    }
}

impl Extract for Metadata {
    type Prepared = ();

    fn prepare(_: &mut PrepareCx<'_>) -> Option<()> {
        Some(())
    }

    fn extract(_: &(), parts: &Parts<'_>) -> Self {
        parts.metadata()
    }
}

impl Extract for App {
    type Prepared = ();

    fn prepare(_: &mut PrepareCx<'_>) -> Option<()> {
        Some(())
    }

    fn extract(_: &(), parts: &Parts<'_>) -> Self {
        parts.app.clone()
    }
}

impl Extract for Headers {
    type Prepared = ();

    fn prepare(_: &mut PrepareCx<'_>) -> Option<()> {
        Some(())
    }

    fn extract(_: &(), parts: &Parts<'_>) -> Self {
        parts.meta.headers().clone()
    }
}

macro_rules! tuple_extract {
    ($($t:ident $p:ident),*) => {
        impl<$($t: Extract),*> Extract for ($($t,)*) {
            type Prepared = ($($t::Prepared,)*);

            #[allow(unused_variables)]
            fn prepare(cx: &mut PrepareCx<'_>) -> Option<Self::Prepared> {
                // Prepare every element before giving up, so every missing piece is reported.
                $(let $p = $t::prepare(cx);)*
                Some(($($p?,)*))
            }

            #[allow(unused_variables, clippy::unused_unit)]
            fn extract(prepared: &Self::Prepared, parts: &Parts<'_>) -> Self {
                let ($($p,)*) = prepared;
                ($($t::extract($p, parts),)*)
            }
        }
    };
}

tuple_extract!();
tuple_extract!(T1 p1);
tuple_extract!(T1 p1, T2 p2);
tuple_extract!(T1 p1, T2 p2, T3 p3);
tuple_extract!(T1 p1, T2 p2, T3 p3, T4 p4);
tuple_extract!(T1 p1, T2 p2, T3 p3, T4 p4, T5 p5);
tuple_extract!(T1 p1, T2 p2, T3 p3, T4 p4, T5 p5, T6 p6);
tuple_extract!(T1 p1, T2 p2, T3 p3, T4 p4, T5 p5, T6 p6, T7 p7);
tuple_extract!(T1 p1, T2 p2, T3 p3, T4 p4, T5 p5, T6 p6, T7 p7, T8 p8);
tuple_extract!(T1 p1, T2 p2, T3 p3, T4 p4, T5 p5, T6 p6, T7 p7, T8 p8, T9 p9);
tuple_extract!(T1 p1, T2 p2, T3 p3, T4 p4, T5 p5, T6 p6, T7 p7, T8 p8, T9 p9, T10 p10);
tuple_extract!(T1 p1, T2 p2, T3 p3, T4 p4, T5 p5, T6 p6, T7 p7, T8 p8, T9 p9, T10 p10, T11 p11);
tuple_extract!(T1 p1, T2 p2, T3 p3, T4 p4, T5 p5, T6 p6, T7 p7, T8 p8, T9 p9, T10 p10, T11 p11, T12 p12);
