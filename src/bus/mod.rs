//! The door bus: frames and messages between the gateway and its door units.
