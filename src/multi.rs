//! Clients holding connections to several publishers.
//! placeholder
