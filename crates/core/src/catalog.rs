//! The templates every server has, whatever was built on it.

use ringfence_jail::template;

/// Templates a client may ask for. `base` and `host` are the host template; the code
/// interpreter's adds the interpreter environment and starts a Python kernel with each sandbox.
pub const TEMPLATES: &[&str] = &["base", template::INTERP_TEMPLATE, "host"];
