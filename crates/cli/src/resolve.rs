//! Resolving `ringfence run --template NAME`: a built-in template or an image template from
//! the store, in the form the jail starts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ringfence_image::Store;
use ringfence_jail::template::{self, Meta, Template};
use ringfence_proto::SandboxUser;

/// A template to run: the jail's [`Template`], the lower layers above it, and what the image
/// asks for (environment, working directory, user).
#[derive(Debug)]
pub struct Resolved {
    pub template: Template,
    pub layers: Vec<PathBuf>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    /// Who runs commands unless `--user` says otherwise, and why, if not the usual `user`.
    pub user: SandboxUser,
    pub user_note: Option<String>,
    /// Setuid binaries (`sudo`) may raise processes to the sandbox's own root (the template's
    /// record asks for it; see [`ringfence_image::Record::allow_setuid`]).
    pub allow_setuid: bool,
    /// Held while a sandbox runs from an image, so `template rm` cannot pull its layers away.
    pub _in_use: Option<ringfence_image::store::InUse>,
}

/// Resolves `name`: a built-in template (`host`, `base`, the code interpreter's) or an image
/// template from the store. Images run on their own layers only (no host `/usr`), over the
/// store's skeleton layer.
pub fn resolve(name: &str, data_dir: &Path) -> anyhow::Result<Resolved> {
    let builtin = ringfence_image::store::RESERVED.contains(&name);
    if builtin {
        let template = template::resolve(name, data_dir)?;
        return Ok(Resolved {
            template,
            layers: Vec::new(),
            env: BTreeMap::new(),
            workdir: None,
            user: SandboxUser::User,
            user_note: None,
            allow_setuid: false,
            _in_use: None,
        });
    }
    let store = Store::open(data_dir)?;
    if !store.contains(name) {
        anyhow::bail!(
            "unknown template {name:?}: not a built-in one ({}) and no image template of that \
             name (see `ringfence template ls`)",
            ringfence_image::store::RESERVED.join(", ")
        );
    }
    let in_use = store.in_use(name)?;
    let run = store.runnable(name)?;
    let config = &run.record.config;
    let env: BTreeMap<String, String> = run.env();
    let workdir = config.working_dir.clone().filter(|w| !w.is_empty());
    let image_user = config.user.clone().unwrap_or_default();
    let image_wants_root = matches!(image_user.as_str(), "" | "root" | "0" | "0:0" | "root:root");
    let (user, user_note) = if run.has_user_1000 {
        (SandboxUser::User, None)
    } else {
        let why = if image_wants_root {
            String::new()
        } else {
            format!(" (the image asks for user {image_user:?}; the jail runs `user` or `root`)")
        };
        (
            SandboxUser::Root,
            Some(format!(
                "template {}: its /etc/passwd has no user with uid 1000, so commands run as the \
                 sandbox's root{why}; pass --user to choose",
                run.record.name
            )),
        )
    };
    let template = Template {
        name: run.record.name.clone(),
        rootfs: run.skeleton.clone(),
        meta: Meta { format: 0, host_layers: Vec::new() },
    };
    Ok(Resolved {
        template,
        layers: run.layers,
        env,
        workdir,
        user,
        user_note,
        allow_setuid: run.record.allow_setuid,
        _in_use: Some(in_use),
    })
}
