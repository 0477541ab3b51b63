use inseam::prelude::*;

pub struct NotAnEvent;

#[derive(EventSet)]
pub enum OrderEvent {
    Placed(NotAnEvent),
}

fn main() {}
