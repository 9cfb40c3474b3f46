//! sluice block jobs.
