//! All integration tests in one binary (one link of the heavy dependencies).

mod it;
