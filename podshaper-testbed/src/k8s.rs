//! A real Kubernetes control plane for the agent's tests: etcd and kube-apiserver built from
//! their Go modules by scripts/k8s-bins.sh (cached outside the clone), started on loopback
//! with their own certificates, plus a stand-in for the kubelet and CNI, which do not run
//! here: it creates pod objects bound to a node, their cgroups where a kubelet would put
//! them, and their status.
use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::{Namespace, Pod, ServiceAccount},
    events::v1::Event,
};
use kube::{
    api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    discovery::{Discovery, Scope},
    Api, Client, Config, ResourceExt,
};

use podshaper_api::{
    proto::{CgroupStatus, Request, Response, RuleStatus},
    Limits,
};

use crate::{unique_name, Cgroup};

/// The directory of the cached kube-apiserver, etcd and helm; builds them on first use.
pub fn bin_dir() -> Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/k8s-bins.sh");
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("run {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed: {}", script.display(), out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout.lines().last().context("k8s-bins.sh printed no bin dir")?;
    Ok(PathBuf::from(dir.trim()))
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("run openssl")?;
    if !out.status.success() {
        bail!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// etcd and kube-apiserver on loopback, for the life of this value. The admin authenticates
/// with a static token in group system:masters; everyone else gets ServiceAccount tokens.
pub struct ControlPlane {
    dir: PathBuf,
    children: Vec<Child>,
    server: String,
    admin_token: String,
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver and waits until the apiserver is ready.
    pub async fn start() -> Result<Self> {
        // The ports are found free, then released for etcd and the apiserver to bind: another
        // process may take one in between. Only that is retried, with new ports.
        let mut attempt = 1;
        loop {
            match Self::start_once().await {
                Err(e) if attempt < 3 && format!("{e:#}").contains("address already in use") => {
                    tracing::warn!(error = %format!("{e:#}"), "a control-plane port was taken; retrying");
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn start_once() -> Result<Self> {
        let bin = bin_dir()?;
        let dir = std::env::temp_dir().join(unique_name("-k8s"));
        fs::create_dir_all(&dir)?;
        let mut cp = Self {
            dir: dir.clone(),
            children: Vec::new(),
            server: String::new(),
            admin_token: format!("admin-{}", unique_name("")),
        };
        // EC keys: generated in milliseconds, accepted for serving and for signing tokens.
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            &dir,
            &[
                &["req", "-x509"][..],
                &ec,
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.crt",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=podshaper-test-ca",
                ],
            ]
            .concat(),
        )?;
        openssl(
            &dir,
            &[
                &["req"][..],
                &ec,
                &[
                    "-keyout",
                    "server.key",
                    "-out",
                    "server.csr",
                    "-subj",
                    "/CN=kube-apiserver",
                ],
            ]
            .concat(),
        )?;
        fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n")?;
        openssl(
            &dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-days",
                "2",
                "-extfile",
                "san.ext",
            ],
        )?;
        openssl(
            &dir,
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                "sa.key",
            ],
        )?;
        openssl(&dir, &["ec", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
        fs::write(
            dir.join("tokens.csv"),
            format!("{},admin,admin,system:masters\n", cp.admin_token),
        )?;

        let (client_port, peer_port, api_port) = (free_port()?, free_port()?, free_port()?);
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        cp.spawn(
            &bin.join("etcd"),
            &[
                "--data-dir".into(),
                dir.join("etcd").display().to_string(),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-cluster=default=http://127.0.0.1:{peer_port}"),
                "--unsafe-no-fsync".into(),
                "--log-level=warn".into(),
            ],
            "etcd.log",
        )?;
        let p = |f: &str| dir.join(f).display().to_string();
        cp.spawn(
            &bin.join("kube-apiserver"),
            &[
                format!("--etcd-servers={etcd_url}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--secure-port={api_port}"),
                format!("--tls-cert-file={}", p("server.crt")),
                format!("--tls-private-key-file={}", p("server.key")),
                format!("--token-auth-file={}", p("tokens.csv")),
                "--authorization-mode=RBAC".into(),
                "--service-account-issuer=https://kubernetes.default.svc".into(),
                format!("--service-account-key-file={}", p("sa.pub")),
                format!("--service-account-signing-key-file={}", p("sa.key")),
                "--service-cluster-ip-range=198.19.0.0/16".into(),
                "--allow-privileged=true".into(),
                "--v=1".into(),
            ],
            "apiserver.log",
        )?;
        cp.server = format!("https://127.0.0.1:{api_port}");
        cp.wait_ready().await?;
        Ok(cp)
    }

    fn spawn(&mut self, program: &Path, args: &[String], log: &str) -> Result<()> {
        let log = fs::File::create(self.dir.join(log))?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", program.display()))?;
        self.children.push(child);
        Ok(())
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(90);
        let admin = self.client(&self.admin_token.clone()).await?;
        loop {
            let req = http::Request::get("/readyz").body(Vec::new())?;
            match admin.request_text(req).await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                _ if Instant::now() > deadline => {
                    bail!(
                        "kube-apiserver not ready after 90 s; last lines of its log:\n{}",
                        self.log_tail("apiserver.log")
                    );
                }
                _ => {}
            }
            for (c, log) in self.children.iter_mut().zip(["etcd.log", "apiserver.log"]) {
                if let Some(status) = c.try_wait()? {
                    // The directory goes with the control plane: the cause goes in the error.
                    bail!(
                        "{} exited early ({status}); last lines of its log:\n{}",
                        log.trim_end_matches(".log"),
                        self.log_tail(log)
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The last 20 lines of one of the control plane's logs.
    fn log_tail(&self, log: &str) -> String {
        let text = fs::read_to_string(self.dir.join(log)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// A kubeconfig for `token`, written under the control plane's directory.
    pub fn kubeconfig(&self, token: &str, name: &str) -> Result<PathBuf> {
        let ca = fs::read(self.dir.join("ca.crt"))?;
        let yaml = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    certificate-authority-data: {}\nusers:\n- name: {name}\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: {name}\ncurrent-context: test\n",
            self.server,
            base64::engine::general_purpose::STANDARD.encode(&ca)
        );
        let path = self.dir.join(format!("{name}.kubeconfig"));
        fs::write(&path, yaml)?;
        Ok(path)
    }

    /// A kubeconfig with every right (system:masters), for helm.
    pub fn kubeconfig_admin(&self) -> Result<PathBuf> {
        self.kubeconfig(&self.admin_token, "admin")
    }

    /// A client that authenticates with `token`.
    pub async fn client(&self, token: &str) -> Result<Client> {
        let path = self.kubeconfig(token, "client")?;
        let kc = Kubeconfig::read_from(&path)?;
        let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
        Ok(Client::try_from(config)?)
    }

    /// A client with every right (system:masters).
    pub async fn admin(&self) -> Result<Client> {
        self.client(&self.admin_token.clone()).await
    }

    /// A token of ServiceAccount `namespace/name` (TokenRequest), valid for an hour.
    pub async fn token(&self, namespace: &str, name: &str) -> Result<String> {
        let sas: Api<ServiceAccount> = Api::namespaced(self.admin().await?, namespace);
        let req = TokenRequest {
            spec: TokenRequestSpec {
                expiration_seconds: Some(3600),
                ..Default::default()
            },
            ..Default::default()
        };
        let resp = sas
            .create_token_request(name, &PostParams::default(), &req)
            .await?;
        resp.status
            .map(|s| s.token)
            .context("TokenRequest returned no token")
    }

    /// Server-side applies every object of a multi-document YAML text, in order.
    pub async fn apply(&self, client: &Client, yaml: &str) -> Result<()> {
        let discovery = Discovery::new(client.clone()).run().await?;
        let params = PatchParams::apply("podshaper-test").force();
        for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
            let value = <serde_yaml_ng::Value as serde::Deserialize>::deserialize(doc)?;
            if value.is_null() {
                continue;
            }
            let obj: DynamicObject = serde_yaml_ng::from_value(value)?;
            let types = obj.types.clone().context("object without apiVersion/kind")?;
            let gvk = kube::api::GroupVersionKind::try_from(&types)?;
            let (ar, caps) = discovery
                .resolve_gvk(&gvk)
                .ok_or_else(|| anyhow!("the apiserver does not serve {gvk:?}"))?;
            let api: Api<DynamicObject> = match (caps.scope, obj.namespace()) {
                (Scope::Namespaced, Some(ns)) => Api::namespaced_with(client.clone(), &ns, &ar),
                (Scope::Namespaced, None) => Api::default_namespaced_with(client.clone(), &ar),
                (Scope::Cluster, _) => Api::all_with(client.clone(), &ar),
            };
            api.patch(&obj.name_any(), &params, &Patch::Apply(&obj))
                .await
                .with_context(|| format!("apply {} {}", types.kind, obj.name_any()))?;
        }
        Ok(())
    }

    /// Creates a namespace and its `default` ServiceAccount (no controller-manager makes it).
    pub async fn namespace(&self, name: &str) -> Result<()> {
        let yaml = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: default\n  namespace: {name}\n"
        );
        self.apply(&self.admin().await?, &yaml).await
    }

    /// Where the logs and certificates are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // The apiserver first, so it does not spin on a vanished etcd.
        for c in self.children.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("control-plane logs kept in {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// The kubelet's cgroup driver, for where [`Kubelet`] puts pod cgroups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupDriver {
    Systemd,
    Cgroupfs,
}

/// A pod's QoS class, set through its resources as a user would.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// Plays the kubelet (and CNI) of one node: pod objects bound to it, their cgroups, their
/// status, and their removal.
pub struct Kubelet {
    pub node: String,
    client: Client,
    mount: PathBuf,
    /// Where the kubelet's hierarchy starts under the mount (its --cgroup-root).
    prefix: PathBuf,
    driver: CgroupDriver,
}

/// A pod the [`Kubelet`] runs: its object's identity and its cgroup.
pub struct RunningPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub cgroup: Cgroup,
}

impl Kubelet {
    /// A kubelet for `node`, putting pod cgroups under `prefix` (relative to the cgroup v2
    /// mount; empty for the default --cgroup-root).
    pub fn new(client: Client, node: &str, driver: CgroupDriver, prefix: &Path) -> Result<Self> {
        Ok(Self {
            node: node.into(),
            client,
            mount: podshaper_ebpf::cgroup::cgroup2_mount()?,
            prefix: prefix.into(),
            driver,
        })
    }

    /// Where this kubelet puts the cgroup of pod `uid`, as kubelet's cgroup managers name it.
    pub fn cgroup_path(&self, uid: &str, qos: QosClass) -> PathBuf {
        let tier = match qos {
            QosClass::Guaranteed => None,
            QosClass::Burstable => Some("burstable"),
            QosClass::BestEffort => Some("besteffort"),
        };
        let rel: PathBuf = match (self.driver, tier) {
            (CgroupDriver::Cgroupfs, None) => format!("kubepods/pod{uid}").into(),
            (CgroupDriver::Cgroupfs, Some(t)) => format!("kubepods/{t}/pod{uid}").into(),
            (CgroupDriver::Systemd, None) => {
                format!("kubepods.slice/kubepods-pod{}.slice", uid.replace('-', "_")).into()
            }
            (CgroupDriver::Systemd, Some(t)) => format!(
                "kubepods.slice/kubepods-{t}.slice/kubepods-{t}-pod{}.slice",
                uid.replace('-', "_")
            )
            .into(),
        };
        self.mount.join(&self.prefix).join(rel)
    }

    /// Creates the pod object on this node with `annotations`, its cgroup, and a Running
    /// status with `pod_ip`, as the kubelet does once the sandbox is up.
    pub async fn run_pod(
        &self,
        namespace: &str,
        name: &str,
        qos: QosClass,
        annotations: &[(&str, &str)],
        pod_ip: &str,
    ) -> Result<RunningPod> {
        self.run_pod_with(namespace, name, qos, annotations, &[], pod_ip)
            .await
    }

    /// A BestEffort pod with `labels` (an agent's own pod, say).
    pub async fn run_pod_labeled(
        &self,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Result<RunningPod> {
        self.run_pod_with(namespace, name, QosClass::BestEffort, &[], labels, "198.18.255.1")
            .await
    }

    /// A BestEffort pod with `labels` at `pod_ip` (a peer of a policy, say).
    pub async fn run_labeled_pod_at(
        &self,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
        pod_ip: &str,
    ) -> Result<RunningPod> {
        self.run_pod_with(namespace, name, QosClass::BestEffort, &[], labels, pod_ip)
            .await
    }

    async fn run_pod_with(
        &self,
        namespace: &str,
        name: &str,
        qos: QosClass,
        annotations: &[(&str, &str)],
        labels: &[(&str, &str)],
        pod_ip: &str,
    ) -> Result<RunningPod> {
        let map = |kv: &[(&str, &str)]| -> std::collections::BTreeMap<String, String> {
            kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let resources = match qos {
            QosClass::Guaranteed => serde_json::json!({"limits": {"cpu": "100m", "memory": "64Mi"}}),
            QosClass::Burstable => serde_json::json!({"requests": {"cpu": "10m"}}),
            QosClass::BestEffort => serde_json::json!({}),
        };
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "annotations": map(annotations),
                "labels": map(labels),
            },
            "spec": {
                "nodeName": self.node,
                "automountServiceAccountToken": false,
                "containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10", "resources": resources}],
            },
        }))?;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let created = pods.create(&PostParams::default(), &pod).await?;
        let uid = created.uid().context("created pod has no uid")?;
        let got = created.status.as_ref().and_then(|s| s.qos_class.as_deref());
        let want = format!("{qos:?}");
        if got != Some(want.as_str()) {
            bail!("pod {namespace}/{name}: apiserver says QoS {got:?}, the test wants {want}");
        }
        let cgroup = Cgroup::at(&self.cgroup_path(&uid, qos))?;
        let status = serde_json::json!({"status": {
            "phase": "Running",
            "podIP": pod_ip,
            "podIPs": [{"ip": pod_ip}],
            "qosClass": want,
            "conditions": [{"type": "Ready", "status": "True"}],
        }});
        pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        Ok(RunningPod {
            namespace: namespace.into(),
            name: name.into(),
            uid,
            cgroup,
        })
    }

    /// Sets (`Some`) or removes (`None`) annotations of a pod, as `kubectl annotate` does.
    pub async fn annotate(
        &self,
        namespace: &str,
        name: &str,
        annotations: &[(&str, Option<&str>)],
    ) -> Result<()> {
        self.patch_metadata(namespace, name, "annotations", annotations)
            .await
    }

    /// Sets (`Some`) or removes (`None`) labels of a pod, as `kubectl label` does.
    pub async fn label(&self, namespace: &str, name: &str, labels: &[(&str, Option<&str>)]) -> Result<()> {
        self.patch_metadata(namespace, name, "labels", labels).await
    }

    async fn patch_metadata(
        &self,
        namespace: &str,
        name: &str,
        field: &str,
        pairs: &[(&str, Option<&str>)],
    ) -> Result<()> {
        let map: serde_json::Map<String, serde_json::Value> = pairs
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    v.map(Into::into).unwrap_or(serde_json::Value::Null),
                )
            })
            .collect();
        let patch = serde_json::json!({"metadata": {field: map}});
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        pods.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(())
    }

    /// Stops the pod's "containers" (removes its cgroup) and force-deletes the object, as the
    /// kubelet does once they are gone.
    pub async fn delete_pod(&self, pod: RunningPod) -> Result<()> {
        let RunningPod {
            namespace,
            name,
            cgroup,
            ..
        } = pod;
        drop(cgroup);
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        pods.delete(&name, &DeleteParams::default().grace_period(0))
            .await?;
        Ok(())
    }

    /// Removes the QoS and kubepods directories this kubelet left (empty ones only).
    pub fn remove_empty_parents(&self) {
        let base = self.mount.join(&self.prefix);
        for rel in [
            "kubepods.slice/kubepods-burstable.slice",
            "kubepods.slice/kubepods-besteffort.slice",
            "kubepods.slice",
            "kubepods/burstable",
            "kubepods/besteffort",
            "kubepods",
        ] {
            let _ = fs::remove_dir(base.join(rel));
        }
        if !self.prefix.as_os_str().is_empty() {
            let _ = fs::remove_dir(&base);
        }
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.remove_empty_parents();
    }
}

/// Deletes namespace `name` (nothing finalizes it here; its pods were deleted already).
pub async fn delete_namespace(client: &Client, name: &str) -> Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    api.delete(name, &DeleteParams::default()).await?;
    Ok(())
}

/// `podshaper agent` as the DaemonSet runs it, in a private bpffs directory and socket.
pub struct AgentProcess {
    child: Option<Child>,
    program: PathBuf,
    node: String,
    kubeconfig: PathBuf,
    bpffs: PathBuf,
    socket: PathBuf,
    metrics: SocketAddr,
    own_pod: Option<String>,
    capabilities: Vec<String>,
    extra_args: Vec<String>,
}

impl AgentProcess {
    /// Starts `program agent` for `node` with `kubeconfig` and waits until it is ready.
    /// `own_pod` is its pod's name in kube-system, where the uninstall signal arrives.
    /// `capabilities` (e.g. `["BPF", "NET_ADMIN"]`), when not empty, are all the process gets,
    /// as a container runtime grants them: the bounding set, no inheritable or ambient ones.
    /// `extra_args` go last on the command line (e.g. `--max-rate 1G`).
    pub fn start(
        program: &Path,
        node: &str,
        kubeconfig: &Path,
        own_pod: Option<&str>,
        capabilities: &[&str],
        extra_args: &[&str],
    ) -> Result<Self> {
        let name = unique_name("");
        let mut agent = Self {
            child: None,
            program: program.into(),
            node: node.into(),
            kubeconfig: kubeconfig.into(),
            bpffs: PathBuf::from(format!("/sys/fs/bpf/{name}")),
            socket: std::env::temp_dir().join(format!("{name}.sock")),
            metrics: TcpListener::bind("127.0.0.1:0")?.local_addr()?,
            own_pod: own_pod.map(Into::into),
            capabilities: capabilities.iter().map(|c| c.to_ascii_lowercase()).collect(),
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
        };
        agent.restart()?;
        Ok(agent)
    }

    /// (Re)starts the process; returns once it has reconciled the node (/readyz).
    pub fn restart(&mut self) -> Result<Duration> {
        let started = Instant::now();
        let mut cmd = if self.capabilities.is_empty() {
            Command::new(&self.program)
        } else {
            // For root, the bounding set is what execve leaves permitted and effective.
            let caps: Vec<String> = self.capabilities.iter().map(|c| format!("+{c}")).collect();
            let mut c = Command::new("setpriv");
            c.args(["--no-new-privs", "--inh-caps=-all", "--ambient-caps=-all"])
                .arg(format!("--bounding-set=-all,{}", caps.join(",")))
                .arg("--")
                .arg(&self.program);
            c
        };
        cmd.args(["agent", "--node-name", &self.node, "--metrics-addr"])
            .arg(self.metrics.to_string())
            .arg("--bpffs")
            .arg(&self.bpffs)
            .arg("--socket")
            .arg(&self.socket)
            .env("KUBECONFIG", &self.kubeconfig)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null());
        if let Some(pod) = &self.own_pod {
            cmd.args(["--pod-name", pod, "--pod-namespace", "kube-system"]);
        }
        cmd.args(&self.extra_args);
        self.child = Some(cmd.spawn().context("start podshaper agent")?);
        while started.elapsed() < Duration::from_secs(30) {
            if http_get(self.metrics, "/readyz").is_some_and(|(code, _)| code == 200) {
                return Ok(started.elapsed());
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("agent exited: {status}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("agent not ready after 30 s")
    }

    /// Kills the process hard, as an OOM kill would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The agent's socket (the daemon's local API).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The agent's bpffs directory.
    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// `podshaper status`, through the agent's socket.
    pub fn status(&self) -> Result<Vec<CgroupStatus>> {
        match self.ask(&Request::Status { cgroup: None })? {
            Response::Status { cgroups, .. } => Ok(cgroups),
            other => bail!("status: {other:?}"),
        }
    }

    /// One request to the agent's socket, and its answer.
    fn ask(&self, request: &Request) -> Result<Response> {
        // Plain blocking I/O: callers may be inside an async test's runtime.
        let mut stream = std::os::unix::net::UnixStream::connect(&self.socket)?;
        let mut line = serde_json::to_string(request)?;
        line.push('\n');
        stream.write_all(line.as_bytes())?;
        let mut answer = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stream), &mut answer)?;
        Ok(serde_json::from_str(&answer)?)
    }

    /// The peer rules on the node (`podshaper rule list`), through the agent's socket.
    pub fn rules(&self) -> Result<Vec<RuleStatus>> {
        match self.ask(&Request::Rules)? {
            Response::Rules { rules } => Ok(rules),
            other => bail!("rules: {other:?}"),
        }
    }

    /// The peer rules pod `namespace/name` is bound to, sorted; empty if it is not limited.
    pub fn pod_rules(&self, namespace: &str, name: &str) -> Result<Vec<String>> {
        let key = format!("{namespace}/{name}");
        let mut rules: Vec<String> = self
            .status()?
            .into_iter()
            .filter(|c| c.name.as_deref() == Some(key.as_str()))
            .flat_map(|c| c.peers.into_iter().map(|p| p.rule))
            .collect();
        rules.sort();
        Ok(rules)
    }

    /// Waits until pod `namespace/name` is bound to exactly `want`; how long that took.
    pub fn wait_pod_rules(
        &self,
        namespace: &str,
        name: &str,
        want: &[&str],
        within: Duration,
    ) -> Result<Duration> {
        wait_for(&format!("{namespace}/{name}: rules"), want, within, || {
            self.pod_rules(namespace, name)
        })
    }

    /// The limits in force for pod `namespace/name`; `None` if it is not limited.
    pub fn limits(&self, namespace: &str, name: &str) -> Result<Option<Limits>> {
        let key = format!("{namespace}/{name}");
        Ok(self
            .status()?
            .into_iter()
            .find(|c| c.name.as_deref() == Some(key.as_str()))
            .map(|c| c.limits()))
    }

    /// Waits until pod `namespace/name` has `want`; returns how long that took.
    pub fn wait_limits(
        &self,
        namespace: &str,
        name: &str,
        want: Option<Limits>,
        within: Duration,
    ) -> Result<Duration> {
        wait_for(&format!("{namespace}/{name}: limits"), &want, within, || {
            self.limits(namespace, name)
        })
    }

    /// Whether /readyz answers 200.
    pub fn ready(&self) -> bool {
        http_get(self.metrics, "/readyz").is_some_and(|(code, _)| code == 200)
    }

    /// The text of /metrics.
    pub fn metrics(&self) -> Result<String> {
        Ok(http_get(self.metrics, "/metrics").context("scrape /metrics")?.1)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            let _ = c.wait();
        }
        let _ = podshaper_ebpf::reset(&self.bpffs);
        let _ = fs::remove_file(&self.socket);
    }
}

/// `podshaper controller` as the chart's Deployment runs it: unprivileged, with the chart's
/// controller ServiceAccount, campaigning for the chart's Lease in kube-system.
pub struct ControllerProcess {
    child: Option<Child>,
    program: PathBuf,
    kubeconfig: PathBuf,
    identity: String,
}

/// The unprivileged user the controller runs as here.
const NOBODY: u32 = 65_534;

/// The chart's Lease name (release "podshaper").
pub const CONTROLLER_LEASE: &str = "podshaper-controller";

impl ControllerProcess {
    /// Starts `program controller` as `identity`; it acts once it holds the Lease (see
    /// [`ControllerProcess::wait_leader`]).
    pub fn start(program: &Path, kubeconfig: &Path, identity: &str) -> Result<Self> {
        // Its token, readable by its user only.
        std::os::unix::fs::chown(kubeconfig, Some(NOBODY), Some(NOBODY))?;
        fs::set_permissions(kubeconfig, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let mut c = Self {
            child: None,
            program: program.into(),
            kubeconfig: kubeconfig.into(),
            identity: identity.into(),
        };
        c.restart()?;
        Ok(c)
    }

    /// (Re)starts the process, as an unprivileged user (nobody), as the chart runs it.
    pub fn restart(&mut self) -> Result<()> {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "--no-new-privs",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
        ])
        .arg(&self.program)
        .args([
            "controller",
            "--namespace",
            "kube-system",
            "--lease-name",
            CONTROLLER_LEASE,
            "--identity",
            &self.identity,
        ])
        .env("KUBECONFIG", &self.kubeconfig)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null());
        self.child = Some(cmd.spawn().context("start podshaper controller")?);
        Ok(())
    }

    /// Stops it as Kubernetes does (SIGTERM; it gives the Lease up) and waits.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills it hard: the Lease stays until it lapses.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits until it holds the Lease; how long that took.
    pub async fn wait_leader(&mut self, admin: &Client, within: Duration) -> Result<Duration> {
        let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(admin.clone(), "kube-system");
        let start = Instant::now();
        loop {
            let holder = leases
                .get_opt(CONTROLLER_LEASE)
                .await?
                .and_then(|l| l.spec)
                .and_then(|s| s.holder_identity);
            if holder.as_deref() == Some(self.identity.as_str()) {
                return Ok(start.elapsed());
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("controller {} exited: {status}", self.identity);
            }
            if start.elapsed() > within {
                bail!(
                    "controller {} not leader within {within:?} (holder {holder:?})",
                    self.identity
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A plain HTTP/1.1 GET: (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: podshaper\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// A control plane with podshaper's manifests applied, a namespace for pods, and the agent's
/// kubeconfig: the chart's ServiceAccount, so the agent has exactly the chart's RBAC.
pub struct Cluster {
    pub cp: ControlPlane,
    pub admin: Client,
    pub agent_kubeconfig: PathBuf,
    pub controller_kubeconfig: PathBuf,
}

impl Cluster {
    /// Starts the control plane, applies `manifests` and makes namespace `namespace`.
    pub async fn start(manifests: &str, namespace: &str) -> Result<Self> {
        let cp = ControlPlane::start().await?;
        let admin = cp.admin().await?;
        cp.apply(&admin, manifests).await.context("apply the manifests")?;
        cp.namespace(namespace).await?;
        // No controller-manager makes kube-system's default ServiceAccount, which pods need.
        cp.namespace("kube-system").await?;
        let token = cp.token("kube-system", "podshaper").await?;
        let agent_kubeconfig = cp.kubeconfig(&token, "agent")?;
        let token = cp.token("kube-system", "podshaper-controller").await?;
        let controller_kubeconfig = cp.kubeconfig(&token, "controller")?;
        Ok(Self {
            cp,
            admin,
            agent_kubeconfig,
            controller_kubeconfig,
        })
    }

    /// A kubelet of `node` (see [`Kubelet::new`]).
    pub fn kubelet(&self, node: &str, driver: CgroupDriver, prefix: &str) -> Result<Kubelet> {
        Kubelet::new(self.admin.clone(), node, driver, Path::new(prefix))
    }

    /// Notes of the Events with `reason` about `namespace/name`.
    pub async fn events(&self, namespace: &str, name: &str, reason: &str) -> Result<Vec<String>> {
        let api: Api<Event> = Api::namespaced(self.admin.clone(), namespace);
        let list = api.list(&ListParams::default()).await?;
        Ok(list
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .map(|e| e.note.unwrap_or_default())
            .collect())
    }

    /// Waits for an Event with `reason` about `namespace/name`; returns its note.
    pub async fn wait_event(
        &self,
        namespace: &str,
        name: &str,
        reason: &str,
        within: Duration,
    ) -> Result<String> {
        let start = Instant::now();
        loop {
            if let Some(note) = self.events(namespace, name, reason).await?.pop() {
                return Ok(note);
            }
            if start.elapsed() > within {
                bail!("no {reason} event on {namespace}/{name} within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Polls `get` until it returns `want`; how long that took, or an error saying what it was.
pub fn wait_for<T, W>(what: &str, want: &W, within: Duration, get: impl Fn() -> Result<T>) -> Result<Duration>
where
    T: PartialEq<W> + std::fmt::Debug,
    W: std::fmt::Debug + ?Sized,
{
    let start = Instant::now();
    loop {
        let got = get()?;
        if got == *want {
            return Ok(start.elapsed());
        }
        if start.elapsed() > within {
            bail!("{what} {got:?}, want {want:?} within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
