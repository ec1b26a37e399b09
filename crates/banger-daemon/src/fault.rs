//! Fault injection for crash tests: a daemon started with
//! `BANGER_FAULT_PAUSE_AT=POINT` in its environment (only whoever starts
//! bangerd, root, can set it) stops at the named point, prints
//! `bangerd: fault point POINT reached; paused` on stderr and blocks that
//! thread for good, so a test can `kill -9` the daemon while the operation
//! is in that state. Unset (always, outside tests), [`pause_at`] compares
//! nothing and changes nothing.
//!
//! Points are `OPERATION:STEP` when a step begins and `OPERATION:STEP:done`
//! once its work is done (before the next step): `create:clone root disk`,
//! `create:prepare work disk:done`, `start:boot`, `stop:kill`,
//! `delete:remove disk`, `disk resize:grow`, `image import:register`,
//! `kernel import:register`, `snapshot:write`, `snapshot:resume`, … (see
//! the callers).

use std::sync::OnceLock;

/// The environment variable naming the point to pause at.
pub const PAUSE_VAR: &str = "BANGER_FAULT_PAUSE_AT";

/// Pauses forever if `point()` is the configured point; see the module docs.
pub fn pause_at(point: impl FnOnce() -> String) {
    static TARGET: OnceLock<Option<String>> = OnceLock::new();
    let Some(target) = TARGET.get_or_init(|| std::env::var(PAUSE_VAR).ok()) else {
        return;
    };
    let point = point();
    if *target != point {
        return;
    }
    eprintln!("bangerd: fault point {point} reached; paused");
    loop {
        std::thread::park();
    }
}
