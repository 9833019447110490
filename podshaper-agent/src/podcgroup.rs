//! Where the kubelet puts a pod's cgroup. Both cgroup drivers name it after the pod's UID and
//! QoS class:
//!
//! | driver   | guaranteed                       | burstable / besteffort                                                 |
//! |----------|----------------------------------|------------------------------------------------------------------------|
//! | systemd  | kubepods.slice/kubepods-pod<U>.slice | kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<U>.slice |
//! | cgroupfs | kubepods/pod<uid>                | kubepods/burstable/pod<uid>                                            |
//!
//! (U is the UID with `-` turned into `_`, as systemd unit names need.) The kubelet's own
//! `--cgroup-root` (kind uses /kubelet) nests all of it deeper, so when the usual places miss,
//! the hierarchy is searched a few levels down for a directory with the pod's name.
use std::{
    fs,
    path::{Path, PathBuf},
    str::FromStr,
};

/// The kubelet's cgroup driver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Driver {
    /// Try both.
    #[default]
    Auto,
    Systemd,
    Cgroupfs,
}

impl FromStr for Driver {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "systemd" => Ok(Self::Systemd),
            "cgroupfs" => Ok(Self::Cgroupfs),
            _ => Err(format!(
                "unknown cgroup driver {s:?}: expected auto, systemd or cgroupfs"
            )),
        }
    }
}

/// A pod's QoS class (status.qosClass).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl Qos {
    /// Reads status.qosClass; `None` for anything else (the pod is then looked up in all three).
    pub fn from_status(s: Option<&str>) -> Option<Self> {
        match s? {
            "Guaranteed" => Some(Self::Guaranteed),
            "Burstable" => Some(Self::Burstable),
            "BestEffort" => Some(Self::BestEffort),
            _ => None,
        }
    }

    fn tier(self) -> Option<&'static str> {
        match self {
            Self::Guaranteed => None,
            Self::Burstable => Some("burstable"),
            Self::BestEffort => Some("besteffort"),
        }
    }
}

/// The directory name of a pod's cgroup under `driver` (not Auto).
fn leaf(uid: &str, qos: Qos, driver: Driver) -> String {
    match (driver, qos.tier()) {
        (Driver::Cgroupfs, _) => format!("pod{uid}"),
        (_, None) => format!("kubepods-pod{}.slice", uid.replace('-', "_")),
        (_, Some(t)) => format!("kubepods-{t}-pod{}.slice", uid.replace('-', "_")),
    }
}

/// Where the kubelet with the default `--cgroup-root` puts the pod, relative to the mount.
pub fn default_path(uid: &str, qos: Qos, driver: Driver) -> PathBuf {
    let leaf = leaf(uid, qos, driver);
    match (driver, qos.tier()) {
        (Driver::Cgroupfs, None) => ["kubepods", &leaf].iter().collect(),
        (Driver::Cgroupfs, Some(t)) => ["kubepods", t, &leaf].iter().collect(),
        (_, None) => ["kubepods.slice", &leaf].iter().collect(),
        (_, Some(t)) => ["kubepods.slice", &format!("kubepods-{t}.slice"), &leaf]
            .iter()
            .collect(),
    }
}

fn drivers(driver: Driver) -> &'static [Driver] {
    match driver {
        Driver::Auto => &[Driver::Systemd, Driver::Cgroupfs],
        Driver::Systemd => &[Driver::Systemd],
        Driver::Cgroupfs => &[Driver::Cgroupfs],
    }
}

fn classes(qos: Option<Qos>) -> Vec<Qos> {
    match qos {
        Some(q) => vec![q],
        None => vec![Qos::Guaranteed, Qos::Burstable, Qos::BestEffort],
    }
}

/// How deep below the mount a pod cgroup is searched for: kind's
/// kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/<pod> is depth 4.
const SEARCH_DEPTH: usize = 5;

/// Finds the cgroup directory of the pod with this UID under the cgroup v2 mount `root`.
pub fn find(root: &Path, uid: &str, qos: Option<Qos>, driver: Driver) -> Option<PathBuf> {
    let mut names = Vec::new();
    for &d in drivers(driver) {
        for q in classes(qos) {
            let p = root.join(default_path(uid, q, d));
            if p.is_dir() {
                return Some(p);
            }
            // A non-default --cgroup-root adds a prefix to the systemd names (kind: kubelet-).
            names.push(leaf(uid, q, d));
        }
    }
    search(root, SEARCH_DEPTH, &|name| {
        names
            .iter()
            .any(|n| name == n || (n.starts_with("kubepods-") && name.ends_with(&format!("-{n}"))))
    })
}

fn search(dir: &Path, depth: usize, is_pod: &dyn Fn(&str) -> bool) -> Option<PathBuf> {
    if depth == 0 {
        return None;
    }
    let mut subdirs = Vec::new();
    for entry in fs::read_dir(dir).ok()?.flatten() {
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if is_pod(&name) {
            return Some(entry.path());
        }
        // A pod's own cgroup holds containers, never other pods.
        if pod_uid_of(Path::new(&*name)).is_none() {
            subdirs.push(entry.path());
        }
    }
    subdirs.iter().find_map(|d| search(d, depth - 1, is_pod))
}

/// The pod UID a cgroup directory is named after, if it is a pod cgroup of either driver.
pub fn pod_uid_of(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    let uid = if let Some(slice) = name.strip_suffix(".slice") {
        slice.rsplit_once("-pod")?.1.replace('_', "-")
    } else {
        name.strip_prefix("pod")?.to_string()
    };
    // A UID is 36 characters of hex and dashes; anything else is some other cgroup.
    (uid.len() == 36 && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-')).then_some(uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f5a1c3e-7b2d-4e8f-9a10-b2c3d4e5f607";

    #[test]
    fn default_paths_of_both_drivers_and_all_classes() {
        let cases = [
            (
                Driver::Systemd,
                Qos::Guaranteed,
                "kubepods.slice/kubepods-pod0f5a1c3e_7b2d_4e8f_9a10_b2c3d4e5f607.slice",
            ),
            (
                Driver::Systemd,
                Qos::Burstable,
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f5a1c3e_7b2d_4e8f_9a10_b2c3d4e5f607.slice",
            ),
            (
                Driver::Systemd,
                Qos::BestEffort,
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0f5a1c3e_7b2d_4e8f_9a10_b2c3d4e5f607.slice",
            ),
            (Driver::Cgroupfs, Qos::Guaranteed, "kubepods/pod0f5a1c3e-7b2d-4e8f-9a10-b2c3d4e5f607"),
            (Driver::Cgroupfs, Qos::Burstable, "kubepods/burstable/pod0f5a1c3e-7b2d-4e8f-9a10-b2c3d4e5f607"),
            (Driver::Cgroupfs, Qos::BestEffort, "kubepods/besteffort/pod0f5a1c3e-7b2d-4e8f-9a10-b2c3d4e5f607"),
        ];
        for (driver, qos, want) in cases {
            let p = default_path(UID, qos, driver);
            assert_eq!(p, PathBuf::from(want), "{driver:?} {qos:?}");
            assert_eq!(pod_uid_of(&p).as_deref(), Some(UID), "{want}");
        }
    }

    #[test]
    fn other_cgroups_are_not_pods() {
        for p in [
            "kubepods.slice",
            "kubepods/burstable",
            "system.slice/sshd.service",
            "pod",
            "podx",
        ] {
            assert_eq!(pod_uid_of(Path::new(p)), None, "{p}");
        }
    }

    #[test]
    fn finds_pods_in_default_places_and_under_a_kubelet_cgroup_root() {
        let tmp = std::env::temp_dir().join(format!("podshaper-podcgroup-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        let kind = tmp.join(
            "podshaper.slice/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod0f5a1c3e_7b2d_4e8f_9a10_b2c3d4e5f607.slice",
        );
        fs::create_dir_all(&kind).unwrap();
        assert_eq!(
            find(&tmp, UID, Some(Qos::BestEffort), Driver::Auto),
            Some(kind.clone())
        );
        assert_eq!(find(&tmp, UID, None, Driver::Systemd), Some(kind.clone()));
        // The cgroupfs driver never names pods like systemd does.
        assert_eq!(find(&tmp, UID, None, Driver::Cgroupfs), None);
        let plain = tmp.join("kubepods/burstable").join(format!("pod{UID}"));
        fs::create_dir_all(&plain).unwrap();
        assert_eq!(
            find(&tmp, UID, Some(Qos::Burstable), Driver::Cgroupfs),
            Some(plain)
        );
        assert_eq!(
            find(&tmp, "11111111-2222-3333-4444-555555555555", None, Driver::Auto),
            None
        );
        fs::remove_dir_all(&tmp).unwrap();
    }
}
