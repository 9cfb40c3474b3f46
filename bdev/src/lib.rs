//! sluice block devices.
