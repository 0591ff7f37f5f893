//! Strata operator: Volume, Quota and CacheGroup custom resources.
