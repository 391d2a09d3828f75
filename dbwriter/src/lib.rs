//! sluice-dbwriter (built in later steps).
