//! Creating a sandbox, in four steps: plan (validate the request, resolve or build its
//! image, decide what runs), admit (quotas, address and record, under the create lock), spec
//! (the runtime's spec from the image's defaults, OpenCode's environment and the request) and
//! start (its veth and its shim, while the record is written); a failed step undoes what
//! the earlier ones made. The request's validation is free functions, unit-tested without
//! root.

use super::*;

impl Manager {
    /// See [`validate_create`].
    pub fn validate_create(&self, req: &CreateSandbox) -> Result<(Limits, String)> {
        validate_create(&self.config, req)
    }

    /// The rootfs of image `image_name`: its layers with owners shifted into the daemon's id
    /// range (unpacked once); the default image is built on first use.
    async fn resolve_image(&self, image_name: &str) -> Result<agentd_images::ImageRootfs> {
        let image_name = image_name.to_string();
        let store = self.store.clone();
        let opts = UnpackOptions {
            id_offset: self.config.id_base,
            ..UnpackOptions::default()
        };
        let name2 = image_name.clone();
        let store2 = store.clone();
        let opts2 = opts.clone();
        let unknown = |name: &str| {
            Error::Invalid(format!(
                "unknown image {name:?}: pull or import it first (POST /v1/images/pull, agentd image pull|import)"
            ))
        };
        let store_error = |e: agentd_images::StoreError| match e {
            agentd_images::StoreError::UnknownImage(_) => unknown(&image_name),
            other => Error::internal(agentd_runtime::error_chain(&other)),
        };
        let image = match tokio::task::spawn_blocking(move || store2.rootfs(&name2, &opts2))
            .await
            .map_err(Error::internal)?
        {
            Err(agentd_images::StoreError::UnknownImage(_))
                if image_name == crate::default_image::NAME =>
            {
                // The default image: built on first use (one build at a time); a build that
                // fails makes the request unavailable, with the build's reason.
                let _building = self.build_lock.lock().await;
                let name2 = image_name.clone();
                let cache = self.config.build_cache.clone();
                tokio::task::spawn_blocking(move || {
                    if store.resolve(&name2).is_err() {
                        crate::default_image::build(&store, &cache)
                            .map_err(|e| Error::Unavailable(format!("{e:#}")))?;
                    }
                    Ok::<_, Error>(store.rootfs(&name2, &opts))
                })
                .await
                .map_err(Error::internal)??
                .map_err(store_error)?
            }
            other => other.map_err(store_error)?,
        };
        Ok(image)
    }

    /// Creates a sandbox: validate and resolve the image ([`Self::plan`]), admit it (quotas,
    /// address, record: [`Self::admit`]), write its spec ([`Self::spec`]) and start it
    /// ([`Self::start`]); returns once it runs (OpenCode may still be starting).
    pub async fn create(self: &Arc<Self>, req: CreateSandbox) -> Result<SandboxRecord> {
        let started = Instant::now();
        if let Some(image) = pool::pool_for(&req) {
            let (limits, _) = self.validate_create(&req)?;
            if let Some(rec) = self.claim(&req, &image, &limits).await? {
                self.metrics.observe_create(started.elapsed());
                return Ok(rec);
            }
        }
        let plan = self.plan(&req).await?;
        // A valid cold create moves its sandbox into cgroups in a few ms: the kernel's wait for
        // that starts now, while the record is written (the runtime's spawn starts it too).
        agentd_runtime::cgroups::prime_attach(&self.config.cgroup_parent);
        let (sb, secrets) = match self.admit(&req, &plan).await {
            // Room a warm pool holds is given back to a create that needs it.
            Err(Error::Quota(_)) if req.pool.is_none() && self.evict_pooled().await => {
                self.admit(&req, &plan).await?
            }
            other => other?,
        };
        let id = sb.snapshot().id;
        tracing::debug!(sandbox = %id, ms = started.elapsed().as_secs_f64() * 1e3, "create: image and record ready");
        let spec = self.spec(&req, &plan, &id, secrets.as_ref());
        if let Err(e) = self.start(&sb, &plan, spec).await {
            self.net.remove_link(&id);
            self.map().remove(&id);
            let _ = self.db.delete(SANDBOXES, &id);
            return Err(e);
        }
        tracing::debug!(sandbox = %id, ms = started.elapsed().as_secs_f64() * 1e3, "create: shim reports started");
        self.metrics.observe_create(started.elapsed());
        if plan.opencode || req.setup.is_some() {
            self.set_state_lazy(&sb, SandboxState::Starting, |_| {});
        } else {
            self.set_state_lazy(&sb, SandboxState::Ready, |r| r.ready_at = Some(now_ms()));
        }
        tracing::info!(sandbox = %id, image = %plan.image_name, opencode = plan.opencode, "sandbox created");
        self.clone().supervise(sb.clone()).await;
        Ok(sb.snapshot())
    }

    /// Step 1 of a create: the request validated, its image resolved (built or unpacked if
    /// need be) and what runs in it decided. Nothing is held yet.
    async fn plan(&self, req: &CreateSandbox) -> Result<Plan> {
        let (limits, image_name) = self.validate_create(req)?;
        let memory = limits.memory_bytes.unwrap_or(self.config.sandbox_memory);
        if let Some(model) = &req.model {
            self.check_model(model).await?;
        }
        self.check_budget(req.budget.as_ref(), req.model.as_deref())?;
        let image = self.resolve_image(&image_name).await?;
        let opencode = req.opencode.unwrap_or_else(|| {
            image
                .config
                .labels
                .contains_key(crate::opencode::IMAGE_LABEL)
        });
        if opencode && req.command.is_some() {
            return Err(exclusive_error());
        }
        if opencode {
            self.require_llm()?;
        }
        let mut image = image;
        let defaults = crate::image_spec::defaults(&image)
            .map_err(|e| Error::Invalid(format!("image {image_name}: {e:#}")))?;
        let mut agent = None;
        let args = if opencode {
            let cmd = crate::opencode::command();
            if crate::image_spec::find_command(&image.lower_dirs, &cmd[0], &image.config.env) {
                cmd
            } else {
                // An image that never heard of OpenCode: agentd's agent layer brings it.
                agent = Some(self.agent_layer(&image_name, &image).await?);
                crate::agent_layer::command()
            }
        } else {
            req.command.clone().unwrap_or_default()
        };
        // On top of the image's layers (which stay below them, shared), topmost first.
        for (i, layer) in req.base_layers.iter().enumerate() {
            image.lower_dirs.insert(i, layer.clone());
        }
        Ok(Plan {
            limits,
            memory,
            image_name,
            image,
            opencode,
            defaults,
            args,
            agent,
        })
    }

    /// The agent layer for a sandbox of `image` (which lacks OpenCode), made from the default
    /// image on first use; refused for images it cannot run in.
    async fn agent_layer(
        &self,
        image_name: &str,
        image: &agentd_images::ImageRootfs,
    ) -> Result<std::path::PathBuf> {
        let env = &image.config.env;
        let has = |p: &str| crate::image_spec::find_command(&image.lower_dirs, p, env);
        if has("/lib/ld-musl-x86_64.so.1") {
            return Err(Error::Invalid(format!(
                "image {image_name} is musl-based: agentd's OpenCode layer needs glibc (use a glibc image, or one that carries OpenCode)"
            )));
        }
        if !has("/bin/sh") {
            return Err(Error::Invalid(format!(
                "image {image_name} has no /bin/sh: OpenCode (and its shell tool) needs one"
            )));
        }
        let default = self.resolve_image(crate::default_image::NAME).await?;
        let version = default
            .config
            .labels
            .get(crate::opencode::IMAGE_LABEL)
            .cloned()
            .unwrap_or_default();
        let state = self.config.state_dir.clone();
        let layers = default.lower_dirs.clone();
        tokio::task::spawn_blocking(move || crate::agent_layer::ensure(&state, &version, &layers))
            .await
            .map_err(Error::internal)?
            .map_err(|e| Error::internal(format!("the agent layer could not be made: {e}")))
    }

    /// Step 2: quotas checked, an address and an id chosen and the record made, under the
    /// create lock (so two creates cannot both take the last slot or the same address).
    async fn admit(
        &self,
        req: &CreateSandbox,
        plan: &Plan,
    ) -> Result<(Arc<Sandbox>, Option<OpenCodeSecrets>)> {
        let _guard = self.create_lock.lock().await;
        let (live, committed, used): (usize, u64, Vec<Ipv4Addr>) = {
            let map = self.map();
            let live: Vec<SandboxRecord> = map
                .values()
                .map(|s| s.snapshot())
                .filter(|r| r.state.is_live())
                .collect();
            (
                live.len(),
                live.iter().map(|r| r.memory_bytes).sum(),
                live.iter().map(|r| r.address).collect(),
            )
        };
        let memory = plan.memory;
        if live >= self.config.max_sandboxes {
            return Err(Error::Quota(format!(
                "agentd runs {live} sandboxes, its maximum (max_sandboxes): stop or delete one first"
            )));
        }
        if committed.saturating_add(memory) > self.config.max_memory {
            return Err(Error::Quota(format!(
                "{memory} bytes more would commit {} of {} bytes of memory (max_memory): stop a sandbox or ask for less",
                committed.saturating_add(memory),
                self.config.max_memory
            )));
        }
        if let Some(name) = &req.name {
            if self
                .map()
                .values()
                .any(|s| s.snapshot().name.as_deref() == Some(name))
            {
                return Err(Error::Conflict(format!("a sandbox named {name:?} exists")));
            }
        }
        let address = (0..)
            .map_while(|n| self.net.address(n))
            .find(|a| !used.contains(a))
            .ok_or_else(|| Error::Quota("no free address in the sandbox subnet".into()))?;
        let id = random_hex(6);
        let secrets = plan.opencode.then(|| OpenCodeSecrets {
            password: random_hex(24),
            gateway_token: random_hex(24),
            attach_password: random_hex(24),
        });
        let record = SandboxRecord {
            id: id.clone(),
            name: req.name.clone(),
            image: plan.image_name.clone(),
            image_digest: plan.image.image.manifest.to_string(),
            state: SandboxState::Creating,
            created_at: now_ms(),
            ready_at: None,
            address,
            memory_bytes: memory,
            cpus: req.limits.cpus,
            pids: plan.limits.pids,
            disk_bytes: plan.limits.disk_bytes,
            idle_timeout_secs: req.idle_timeout_secs.unwrap_or(self.config.idle_timeout),
            ttl_secs: req.ttl_secs,
            labels: req.labels.clone(),
            opencode: secrets.clone(),
            user: plan.defaults.user,
            usage: Usage::default(),
            exit: None,
            network: req.network.as_ref().map(|n| n.policy()).unwrap_or_default(),
            setup: req.setup.clone().map(|command| SandboxSetup {
                command,
                timeout_secs: req
                    .setup_timeout_secs
                    .unwrap_or(crate::task::DEFAULT_SETUP_TIMEOUT_SECS),
                result: None,
            }),
            paused_at: None,
            hibernated: false,
            idle_action: req.idle_action.unwrap_or_default(),
            base_layers: req.base_layers.clone(),
            pool: req.pool.clone(),
            model: None,
            budget_tokens: req.budget.as_ref().and_then(|b| b.tokens),
            budget_cost: req.budget.as_ref().and_then(|b| b.cost),
        };
        // The record (state `creating`) is written durably while the shim starts, in
        // parallel (see [`Self::start`]): a crash before the write lands leaves a state dir
        // without a record, which the next start removes; after it, the next start finds the
        // record and reattaches if the shim runs. Later state changes of the create are
        // written lazily.
        let sb = Sandbox::new(record);
        self.map().insert(id, sb.clone());
        Ok((sb, secrets))
    }

    /// Step 3: the runtime's spec: the image's defaults, OpenCode's environment, the
    /// request's environment, user namespaces and limits.
    fn spec(
        &self,
        req: &CreateSandbox,
        plan: &Plan,
        id: &str,
        secrets: Option<&OpenCodeSecrets>,
    ) -> SandboxSpec {
        let mut env = plan.defaults.env.clone();
        let mut set = |kv: String| crate::image_spec::set_env(&mut env, kv);
        if let Some(s) = secrets {
            for kv in crate::opencode::env(
                &s.password,
                (self.net.bridge_addr, self.config.gateway_port),
                &s.gateway_token,
                &self.config.llm,
                req.model.as_deref().unwrap_or(&self.config.llm_model),
                &req.permissions,
            ) {
                set(kv);
            }
            if !self.config.opencode_jit {
                set("BUN_JSC_useJIT=0".into());
            }
        }
        if plan.agent.is_some() {
            for kv in crate::agent_layer::env(&plan.defaults.env) {
                set(kv);
            }
        }
        let mode = req.network.as_ref().map(|n| n.policy().mode);
        let allowlist = mode == Some(crate::egress::EgressMode::Allowlist);
        let open = mode == Some(crate::egress::EgressMode::Open);
        if allowlist {
            let proxy = format!("{}:{}", self.net.bridge_addr, self.config.egress_port);
            for kv in crate::egress::proxy_env(&proxy, &self.net.bridge_addr.to_string()) {
                set(kv);
            }
        }
        if (allowlist || open) && self.config.egress_ca_file.is_some() {
            for kv in crate::egress::ca_env() {
                set(kv);
            }
        }
        if req.cache.is_some() {
            for kv in crate::cache::env() {
                set(kv);
            }
        }
        for (k, v) in &req.env {
            set(format!("{k}={v}"));
        }
        let user = plan.defaults.user;
        let mut spec = SandboxSpec::new(plan.args.clone());
        spec.idle = spec.args.is_empty();
        spec.env = env;
        spec.cwd = plan.defaults.cwd.clone();
        spec.uid = user.0;
        spec.gid = user.1;
        spec.hostname = format!("sb-{id}");
        spec.uid_map = Some(IdMap::unprivileged(self.config.id_base));
        spec.gid_map = Some(IdMap::unprivileged(self.config.id_base));
        spec.limits = plan.limits.clone();
        spec.readonly_rootfs = false;
        spec.memory_merge = self.config.memory_merge;
        if (allowlist || open) && self.config.egress_ca_file.is_some() {
            spec.mounts.push(agentd_runtime::BindMount {
                source: crate::egress::ca_dir(&self.config.state_dir),
                target: crate::egress::CA_MOUNT.into(),
                readonly: true,
            });
        }
        if open {
            // The resolver is agentd's relay (the NAT chain sends it every DNS query anyway).
            spec.mounts.push(agentd_runtime::BindMount {
                source: crate::egress::open::resolv_conf(&self.config.state_dir),
                target: "/etc/resolv.conf".into(),
                readonly: true,
            });
        }
        if let Some(cache) = &req.cache {
            spec.mounts.push(agentd_runtime::BindMount {
                source: cache.clone(),
                target: crate::cache::MOUNT.into(),
                readonly: false,
            });
        }
        if let Some(layer) = &plan.agent {
            spec.mounts.push(agentd_runtime::BindMount {
                source: layer.clone(),
                target: crate::agent_layer::MOUNT.into(),
                readonly: true,
            });
        }
        spec
    }

    /// Step 4: the network link and the shim, while the record is written. On an error the
    /// caller removes the link and the record; a started shim whose record could not be
    /// saved is removed here.
    async fn start(
        self: &Arc<Self>,
        sb: &Arc<Sandbox>,
        plan: &Plan,
        mut spec: SandboxSpec,
    ) -> Result<()> {
        let rec = sb.snapshot();
        let id = rec.id.clone();
        spec.network = NetworkMode::Veth(VethConfig {
            host: Network::link_name(&id),
            bridge: self.net.bridge.clone(),
            address: rec.address,
            prefix_len: self.config.prefix_len,
            // Only open sandboxes have a way beyond the subnet (redirected to agentd's NAT).
            gateway: (rec.network.mode == crate::egress::EgressMode::Open)
                .then_some(self.net.bridge_addr),
        });
        let runtime = self.runtime.clone();
        let id2 = id.clone();
        let layers = plan.image.lower_dirs.clone();
        let start = tokio::task::spawn_blocking(move || {
            runtime.create(&id2, Rootfs::Layers(layers), &spec, None)
        });
        let me = self.clone();
        let sb2 = sb.clone();
        let write = tokio::task::spawn_blocking(move || me.persist(&sb2));
        let (started, written) = tokio::join!(start, write);
        started.map_err(Error::internal)?.map_err(|e| {
            let chain = agentd_runtime::error_chain(&e);
            if chain.contains("os error 28") || chain.contains("No space left") {
                Error::NoSpace(
                    "agentd's disk is full: the sandbox was not created (free space on the state dir's filesystem and retry)".into(),
                )
            } else {
                Error::internal(chain)
            }
        })?;
        // A sandbox whose record could not be saved is not acknowledged: the next start
        // would take it for debris. It is removed again and the create fails.
        if let Err(e) = written.map_err(Error::internal).and_then(|r| r) {
            let client = self.runtime.client(&id);
            let _ = tokio::task::spawn_blocking(move || {
                let _ = client.kill(libc::SIGKILL);
                client.delete()
            })
            .await;
            return Err(e);
        }
        Ok(())
    }
}

/// What a create decided before it holds anything: limits, image, command.
struct Plan {
    /// Validated limits.
    limits: Limits,
    /// Memory limit, bytes (the request's or the default).
    memory: u64,
    /// The image as requested.
    image_name: String,
    /// Its rootfs layers and config.
    image: agentd_images::ImageRootfs,
    /// OpenCode runs in it.
    opencode: bool,
    /// The image's env, workdir and user.
    defaults: crate::image_spec::ImageDefaults,
    /// What runs (OpenCode's command, the request's, or nothing: the sandbox idles).
    args: Vec<String>,
    /// The agent layer to mount, for OpenCode in an image that lacks it.
    agent: Option<std::path::PathBuf>,
}

/// The error for a request that gives both a command and OpenCode.
fn exclusive_error() -> Error {
    Error::Invalid(
        "command and opencode are exclusive: OpenCode is the command of an OpenCode sandbox".into(),
    )
}

/// Checks a create request without touching the system (beyond the state dir's size for
/// a disk limit): its limits with agentd's defaults, and the image it names.
pub fn validate_create(config: &Config, req: &CreateSandbox) -> Result<(Limits, String)> {
    crate::opencode::check_permissions(&req.permissions).map_err(Error::Invalid)?;
    if let Some(n) = &req.network {
        crate::egress::compile(&n.policy(), &config.egress_presets, config.egress_open)
            .map_err(Error::Invalid)?;
    }
    if let Some(s) = &req.setup {
        if s.trim().is_empty() || s.contains('\0') || s.len() > crate::task::MAX_SETUP_BYTES {
            return Err(Error::Invalid(format!(
                "setup must be a non-empty shell command of at most {} bytes",
                crate::task::MAX_SETUP_BYTES
            )));
        }
    }
    match (req.setup_timeout_secs, &req.setup) {
        (Some(t), Some(_)) if t == 0 || t > crate::daemon::config::MAX_SANDBOX_TIMEOUT_SECS => {
            return Err(Error::Invalid(format!(
                "setup_timeout_secs must be between 1 and {}",
                crate::daemon::config::MAX_SANDBOX_TIMEOUT_SECS
            )))
        }
        (Some(_), None) => {
            return Err(Error::Invalid(
                "setup_timeout_secs needs a setup command".into(),
            ))
        }
        _ => {}
    }
    if let Some(name) = &req.name {
        if name.is_empty()
            || name.len() > 63
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(Error::Invalid(format!(
                "name must be 1-63 letters, digits, '-', '_' or '.', got {name:?}"
            )));
        }
    }
    validate_env(&req.env)?;
    let limits = limits_for(config, &req.limits)?;
    for (name, value) in [
        ("ttl_secs", req.ttl_secs),
        ("idle_timeout_secs", req.idle_timeout_secs),
    ] {
        let max = crate::daemon::config::MAX_SANDBOX_TIMEOUT_SECS;
        if value.is_some_and(|v| v > max) {
            return Err(Error::Invalid(format!(
                "{name} must be at most {max} (a year); 0 turns the idle timeout off"
            )));
        }
    }
    if req.ttl_secs == Some(0) {
        return Err(Error::Invalid(
            "ttl_secs must be at least 1 (leave it out for no TTL)".into(),
        ));
    }
    validate_model(req.model.as_deref())?;
    if req
        .budget
        .as_ref()
        .is_some_and(|b| b.ask.is_some() || b.total_tokens.is_some() || b.total_cost.is_some())
    {
        return Err(Error::Invalid(
            "budget.ask, total_tokens and total_cost are a task's (its attempts together, a person answering for them); a sandbox's budget has tokens and cost".into(),
        ));
    }
    if let Some(cmd) = &req.command {
        if cmd.is_empty() || cmd[0].is_empty() {
            return Err(Error::Invalid("command must not be empty".into()));
        }
    }
    let image_name = req
        .image
        .clone()
        .unwrap_or_else(|| DEFAULT_IMAGE.to_string());
    if req.opencode == Some(true) && req.command.is_some() {
        return Err(exclusive_error());
    }
    // Refused before the image is resolved (the default image may be built first).
    if req.opencode == Some(true)
        || (req.opencode.is_none() && req.command.is_none() && image_name == DEFAULT_IMAGE)
    {
        require_llm(config)?;
    }
    Ok((limits, image_name))
}

/// The limits a request asks for, with agentd's defaults, validated.
pub fn limits_for(config: &Config, req: &LimitsRequest) -> Result<Limits> {
    let memory = match &req.memory {
        Some(m) => m.bytes("limits.memory")?,
        None => config.sandbox_memory,
    };
    let disk = match &req.disk {
        Some(d) => Some(d.bytes("limits.disk")?),
        None => config.sandbox_disk,
    };
    let limits = Limits {
        memory_bytes: Some(memory),
        swap_bytes: None,
        cpus: req.cpus,
        pids: Some(req.pids.unwrap_or(config.sandbox_pids)),
        disk_bytes: disk,
    };
    limits
        .validate()
        .map_err(|e| Error::Invalid(agentd_runtime::error_chain(&e)))?;
    if let Some(disk) = req.disk.as_ref().and(limits.disk_bytes) {
        // Sparse layers overcommit the host's disk by design, but one layer asked for
        // that is larger than the whole file system is no bound at all.
        if let Ok(fs) = nix::sys::statvfs::statvfs(&config.state_dir) {
            let total = fs.blocks().saturating_mul(fs.fragment_size());
            if disk > total {
                return Err(Error::Invalid(format!(
                    "limits.disk {disk} bytes is more than the file system of agentd's state dir holds ({total} bytes)"
                )));
            }
        }
    }
    if memory > config.max_memory {
        return Err(Error::Invalid(format!(
            "limits.memory {memory} bytes is more than agentd may commit in total ({} bytes)",
            config.max_memory
        )));
    }
    Ok(limits)
}

/// Refuses what needs an LLM when agentd has no upstream: an OpenCode server without one
/// would only fail at its first prompt, long after the request.
pub fn require_llm(config: &Config) -> Result<()> {
    if config.llm.is_empty() {
        return Err(Error::Invalid(
            "agentd has no LLM upstream, so OpenCode would have nobody to ask: start agentd with --llm-base-url URL (or AGENTD_LLM_BASE_URL, or llm_base_url in agentd.toml, or llm_upstreams), or create the sandbox with \"opencode\": false".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, llm: bool) -> Config {
        Config::load(crate::daemon::config::ServeArgs {
            state_dir: Some(dir.to_path_buf()),
            llm_base_url: llm.then(|| "http://127.0.0.1:9/v1".to_string()),
            ..Default::default()
        })
        .unwrap()
    }

    fn refused(config: &Config, req: serde_json::Value) -> String {
        let req: CreateSandbox = serde_json::from_value(req).unwrap();
        match validate_create(config, &req) {
            Err(Error::Invalid(m)) => m,
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn test_network_requests_parse_or_say_what_to_give() {
        let net = |v: serde_json::Value| {
            serde_json::from_value::<crate::sandbox::NetworkRequest>(v).map(|n| n.policy())
        };
        assert_eq!(net(serde_json::json!("none")).unwrap(), Default::default());
        let p = net(serde_json::json!({"mode": "allowlist", "allow": ["a.example"]})).unwrap();
        assert_eq!(p.mode, crate::egress::EgressMode::Allowlist);
        let e = net(serde_json::json!("nat")).unwrap_err().to_string();
        assert!(
            e.contains("network: unknown variant `nat`") && e.contains("allowlist"),
            "{e}"
        );
        let e = net(serde_json::json!({"mode": "allowlist", "hosts": []}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `hosts`"), "{e}");
    }

    #[test]
    fn test_create_validation_without_root() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path(), false);
        assert!(refused(&c, serde_json::json!({})).contains("--llm-base-url"));
        let plain = |extra: serde_json::Value| {
            let mut v = serde_json::json!({"opencode": false, "image": "x"});
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            v
        };
        for (extra, says) in [
            (serde_json::json!({"name": "no spaces"}), "name must be"),
            (
                serde_json::json!({"network": {"mode": "open", "allow": ["a.example"]}}),
                "needs mode allowlist",
            ),
            (
                serde_json::json!({"network": {"mode": "allowlist", "allow": ["a b"]}}),
                "not a host",
            ),
            (
                serde_json::json!({"ttl_secs": 0}),
                "ttl_secs must be at least 1",
            ),
            (serde_json::json!({"ttl_secs": u64::MAX}), "at most"),
            (serde_json::json!({"limits": {"memory": "1k"}}), "memory"),
            (serde_json::json!({"limits": {"disk": "1m"}}), "disk"),
            (serde_json::json!({"limits": {"pids": 0}}), "pids"),
            (
                serde_json::json!({"command": []}),
                "command must not be empty",
            ),
            (serde_json::json!({"env": {"A=B": "x"}}), "env"),
        ] {
            let m = refused(&c, plain(extra.clone()));
            assert!(m.contains(says), "{extra}: {m}");
        }
        let c = config(dir.path(), true);
        let m = refused(
            &c,
            serde_json::json!({"opencode": true, "command": ["true"]}),
        );
        assert!(m.contains("opencode"), "{m}");
        let req: CreateSandbox = serde_json::from_value(
            serde_json::json!({"image": "x", "opencode": false, "limits": {"memory": "64m", "disk": "20m"}}),
        )
        .unwrap();
        let (limits, image) = validate_create(&c, &req).unwrap();
        assert_eq!(image, "x");
        assert_eq!(limits.memory_bytes, Some(64 << 20));
        assert_eq!(limits.disk_bytes, Some(20 << 20));
        assert_eq!(
            limits.pids,
            Some(crate::daemon::config::DEFAULT_SANDBOX_PIDS)
        );
    }
}
