//! Files in `data_dir/run` that one process writes and others read (shard
//! snapshots, recent errors, the status file, the effective config):
//! written whole (to a temporary name, then renamed, so a reader sees the
//! old file or the new one), and read as a set by name prefix.

use serde::de::DeserializeOwned;
use std::path::Path;

/// Write `bytes` to `path` through `path.tmp` and a rename.
pub fn write_whole(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Every `<prefix>*.json` file in `dir` that reads as a `T` (the others,
/// half-made or foreign, are skipped).
pub fn read_json_files<T: DeserializeOwned>(dir: &Path, prefix: &str) -> Vec<T> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with(prefix) && name.ends_with(".json")) {
            continue;
        }
        if let Some(v) = std::fs::read(entry.path()).ok().and_then(|b| serde_json::from_slice(&b).ok()) {
            out.push(v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn written_whole_and_read_by_prefix() {
        let dir = tempfile::tempdir().unwrap();
        super::write_whole(&dir.path().join("shard-1.json"), b"[1]").unwrap();
        super::write_whole(&dir.path().join("shard-2.json"), b"[2]").unwrap();
        std::fs::write(dir.path().join("shard-3.json"), b"{half").unwrap();
        std::fs::write(dir.path().join("other-1.json"), b"[9]").unwrap();
        let mut got: Vec<Vec<u8>> = super::read_json_files(dir.path(), "shard-");
        got.sort();
        assert_eq!(got, vec![vec![1], vec![2]]);
        assert!(!dir.path().join("shard-1.json.tmp").exists());
    }
}
