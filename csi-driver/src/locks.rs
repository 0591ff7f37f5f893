//! One operation at a time per volume: a second concurrent call gets ABORTED (CSI spec).

use std::collections::HashSet;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::errors::{CsiError, Result};

#[derive(Default, Clone)]
pub struct OpLocks(Arc<Mutex<HashSet<String>>>);

pub struct OpGuard {
    set: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl OpLocks {
    pub fn try_lock(&self, key: &str) -> Result<OpGuard> {
        if !self.0.lock().insert(key.to_string()) {
            return Err(CsiError::Aborted(format!(
                "an operation on {key} is already in progress"
            )));
        }
        Ok(OpGuard {
            set: self.0.clone(),
            key: key.to_string(),
        })
    }
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        self.set.lock().remove(&self.key);
    }
}
