//! SIGINT and SIGTERM during training: the first one is noted, so that the loop can finish its
//! step, write a checkpoint and stop; a second one exits at once (130 or 143), leaving the last
//! complete checkpoint as it was.

use anyhow::Result;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::{flag, SigId};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// The handlers of one training loop; dropping it restores the default behaviour.
pub struct Interrupts {
    received: Arc<AtomicUsize>,
    handlers: Vec<SigId>,
}

impl Interrupts {
    pub fn watch() -> Result<Self> {
        let armed = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicUsize::new(0));
        let mut handlers = Vec::new();
        for signal in [SIGINT, SIGTERM] {
            // The exit must be registered first: it sees the flag as the previous signal left it.
            handlers.push(flag::register_conditional_shutdown(
                signal,
                128 + signal,
                Arc::clone(&armed),
            )?);
            handlers.push(flag::register(signal, Arc::clone(&armed))?);
            handlers.push(flag::register_usize(
                signal,
                Arc::clone(&received),
                signal as usize,
            )?);
        }
        Ok(Self { received, handlers })
    }

    /// The signal that asked the run to stop, if one did.
    pub fn received(&self) -> Option<i32> {
        match self.received.load(Ordering::SeqCst) {
            0 => None,
            signal => Some(signal as i32),
        }
    }
}

impl Drop for Interrupts {
    fn drop(&mut self) {
        for id in self.handlers.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}
