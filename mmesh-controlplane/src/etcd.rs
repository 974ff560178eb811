//! Policies from etcd: the policy folder's files as keys under a prefix
//! (`/mmesh/policies/nodes/web-1.yaml`, `/mmesh/policies/default.yaml`,
//! `/mmesh/policies/shared/blocked.txt`), read through etcd's v3 JSON
//! gateway and watched.
//!
//! Each read takes every key of the prefix at one revision and writes them
//! into a private folder, which is then read as a policy folder: `file:`
//! references resolve between keys as between files, and the validation is
//! the files' own. Versions depend on content only, so replicas on one etcd
//! serve the same version for the same node.

use std::{
    path::{Component, Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use mmesh_agent::policy::ReadLimits;
use serde_json::{Value, json};
use tokio::{net::TcpStream, sync::watch};

use crate::{catalog::Catalog, folder};

/// The first pause after etcd could not be read; doubled up to
/// [`MAX_RETRY`].
const RETRY: Duration = Duration::from_millis(250);
const MAX_RETRY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error(
        "--etcd {0}: give the client URL as http://HOST:PORT (TLS to etcd is not supported; \
         reach it over loopback or a protected network)"
    )]
    Url(String),
    #[error("etcd at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("etcd at {addr}: {source}")]
    Http {
        addr: String,
        #[source]
        source: hyper::Error,
    },
    #[error("etcd at {addr} answered {path} with {status}: {body}")]
    Status {
        addr: String,
        path: &'static str,
        status: StatusCode,
        body: String,
    },
    #[error("etcd at {addr} answered {path} with something else than expected: {what}")]
    Answer {
        addr: String,
        path: &'static str,
        what: String,
    },
    #[error("the watch of {prefix} ended: {reason}")]
    WatchEnded { prefix: String, reason: String },
    #[error(transparent)]
    Folder(#[from] folder::FolderError),
    #[error("etcd mirror folder {path}: {source}")]
    Mirror {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A client of etcd's v3 JSON gateway (`/v3/kv/range`, `/v3/kv/put`,
/// `/v3/watch`), one HTTP/1.1 connection per request.
#[derive(Clone, Debug)]
pub struct Etcd {
    /// `host:port`.
    addr: String,
}

/// Keys and values under a prefix, at one revision.
#[derive(Debug)]
pub struct Range {
    pub revision: i64,
    pub kvs: Vec<(String, Vec<u8>)>,
}

impl Etcd {
    /// A client of the etcd at `url` (`http://HOST:PORT`).
    pub fn new(url: &str) -> Result<Self, EtcdError> {
        let addr = url
            .strip_prefix("http://")
            .map(|rest| rest.trim_end_matches('/'))
            .filter(|a| !a.is_empty() && !a.contains('/'))
            .ok_or_else(|| EtcdError::Url(url.to_owned()))?;
        Ok(Self {
            addr: addr.to_owned(),
        })
    }

    async fn request(
        &self,
        path: &'static str,
        body: &Value,
    ) -> Result<hyper::Response<hyper::body::Incoming>, EtcdError> {
        let stream = TcpStream::connect(&self.addr)
            .await
            .map_err(|source| EtcdError::Connect {
                addr: self.addr.clone(),
                source,
            })?;
        let http = |source| EtcdError::Http {
            addr: self.addr.clone(),
            source,
        };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("etcd connection: {e}");
            }
        });
        let request = Request::post(path)
            .header(header::HOST, &self.addr)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("a request from valid parts");
        let response = sender.send_request(request).await.map_err(http)?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default();
        Err(EtcdError::Status {
            addr: self.addr.clone(),
            path,
            status,
            body,
        })
    }

    async fn call(&self, path: &'static str, body: &Value) -> Result<Value, EtcdError> {
        let response = self.request(path, body).await?;
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|source| EtcdError::Http {
                addr: self.addr.clone(),
                source,
            })?
            .to_bytes();
        serde_json::from_slice(&bytes).map_err(|e| self.answer(path, e.to_string()))
    }

    fn answer(&self, path: &'static str, what: String) -> EtcdError {
        EtcdError::Answer {
            addr: self.addr.clone(),
            path,
            what,
        }
    }

    /// Every key under `prefix`, with its value, at one revision.
    pub async fn range(&self, prefix: &str) -> Result<Range, EtcdError> {
        const PATH: &str = "/v3/kv/range";
        let answer = self
            .call(
                PATH,
                &json!({ "key": B64.encode(prefix), "range_end": B64.encode(prefix_end(prefix)) }),
            )
            .await?;
        let revision = int(&answer["header"]["revision"])
            .ok_or_else(|| self.answer(PATH, format!("no header.revision in {answer}")))?;
        let mut kvs = Vec::new();
        for kv in answer["kvs"].as_array().into_iter().flatten() {
            let decode = |field: &str| {
                kv[field]
                    .as_str()
                    .map_or(Ok(Vec::new()), |text| B64.decode(text))
                    .map_err(|e| self.answer(PATH, format!("{field} is not base64: {e}")))
            };
            let key = String::from_utf8(decode("key")?)
                .map_err(|_| self.answer(PATH, "a key that is not UTF-8".into()))?;
            kvs.push((key, decode("value")?));
        }
        Ok(Range { revision, kvs })
    }

    /// Sets `key` to `value`.
    pub async fn put(&self, key: &str, value: &[u8]) -> Result<(), EtcdError> {
        self.call(
            "/v3/kv/put",
            &json!({ "key": B64.encode(key), "value": B64.encode(value) }),
        )
        .await
        .map(drop)
    }

    /// Deletes `key`.
    pub async fn delete(&self, key: &str) -> Result<(), EtcdError> {
        self.call("/v3/kv/deleterange", &json!({ "key": B64.encode(key) }))
            .await
            .map(drop)
    }

    /// Returns when a key under `prefix` changed at `start_revision` or
    /// later.
    pub async fn wait_change(&self, prefix: &str, start_revision: i64) -> Result<(), EtcdError> {
        const PATH: &str = "/v3/watch";
        let ended = |reason: String| EtcdError::WatchEnded {
            prefix: prefix.to_owned(),
            reason,
        };
        let request = json!({ "create_request": {
            "key": B64.encode(prefix),
            "range_end": B64.encode(prefix_end(prefix)),
            "start_revision": start_revision.to_string(),
        }});
        let mut body = self.request(PATH, &request).await?.into_body();
        // The gateway streams one JSON object per watch response.
        let mut buffer = Vec::new();
        loop {
            let frame = body
                .frame()
                .await
                .ok_or_else(|| ended("etcd closed it".into()))?
                .map_err(|source| EtcdError::Http {
                    addr: self.addr.clone(),
                    source,
                })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buffer.extend_from_slice(&data);
            let mut objects = serde_json::Deserializer::from_slice(&buffer).into_iter::<Value>();
            let mut used = 0;
            while let Some(object) = objects.next() {
                match object {
                    Ok(object) => {
                        used = objects.byte_offset();
                        if let Some(error) = object.get("error") {
                            return Err(ended(error.to_string()));
                        }
                        let result = &object["result"];
                        if result["canceled"] == true {
                            // E.g. the start revision was compacted away.
                            return Err(ended(format!("canceled: {result}")));
                        }
                        if result["events"].as_array().is_some_and(|e| !e.is_empty()) {
                            return Ok(());
                        }
                    }
                    Err(e) if e.is_eof() => break,
                    Err(e) => return Err(self.answer(PATH, e.to_string())),
                }
            }
            buffer.drain(..used);
        }
    }
}

/// The end of the range of keys starting with `prefix`: the prefix with its
/// last byte increased (etcd's `WithPrefix`).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte 0xff (or empty): the whole key space.
    vec![0]
}

/// etcd's JSON gateway writes 64-bit integers as strings.
fn int(value: &Value) -> Option<i64> {
    value
        .as_i64()
        .or_else(|| value.as_str().and_then(|s| s.parse().ok()))
}

/// The relative path of `key` in the mirror folder, if it is one: below
/// `prefix`, with only normal components.
fn relative_path(prefix: &str, key: &str) -> Option<PathBuf> {
    let rest = Path::new(key.strip_prefix(prefix)?);
    let normal = rest.components().all(|c| matches!(c, Component::Normal(_)));
    (normal && !rest.as_os_str().is_empty() && !key.ends_with('/')).then(|| rest.to_owned())
}

/// A private folder holding etcd's keys as files; removed when dropped.
#[derive(Debug)]
pub struct Mirror {
    root: PathBuf,
    generation: u64,
}

impl Mirror {
    pub fn new() -> Result<Self, EtcdError> {
        let root = std::env::temp_dir().join(format!("mmesh-controlplane-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).map_err(|source| EtcdError::Mirror {
            path: root.display().to_string(),
            source,
        })?;
        Ok(Self {
            root,
            generation: 0,
        })
    }

    /// Writes `range` into a new folder and reads it as a policy folder.
    fn load(
        &mut self,
        prefix: &str,
        range: &Range,
        limits: &ReadLimits,
        previous: &Catalog,
    ) -> Result<Catalog, EtcdError> {
        self.generation += 1;
        let dir = self.root.join(self.generation.to_string());
        let mirror = |source| EtcdError::Mirror {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(mirror)?;
        for (key, value) in &range.kvs {
            let Some(relative) = relative_path(prefix, key) else {
                tracing::warn!("etcd key {key:?} ignored: not a file path below {prefix}");
                continue;
            };
            let path = dir.join(relative);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(mirror)?;
            }
            std::fs::write(&path, value).map_err(mirror)?;
        }
        let catalog = folder::load(&dir, Some(prefix), limits, previous);
        // The previous generation is no longer read.
        let _ = std::fs::remove_dir_all(self.root.join((self.generation - 1).to_string()));
        Ok(catalog?)
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Reads the policies under `prefix`, publishes them, and again after each
/// change, for ever. While etcd cannot be read, what was read before is
/// still served.
pub async fn serve(
    etcd: Etcd,
    prefix: String,
    mut mirror: Mirror,
    limits: ReadLimits,
    tx: watch::Sender<Arc<Catalog>>,
) {
    let mut retry = RETRY;
    loop {
        let range = match etcd.range(&prefix).await {
            Ok(range) => range,
            Err(e) => {
                tracing::warn!("{e}; still serving what was read before, retrying in {retry:?}");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(MAX_RETRY);
                continue;
            }
        };
        retry = RETRY;
        let previous = Arc::clone(&tx.borrow());
        let (prefix_, limits_) = (prefix.clone(), limits.clone());
        let loaded = tokio::task::spawn_blocking(move || {
            let result = mirror.load(&prefix_, &range, &limits_, &previous);
            (mirror, result, range.revision)
        })
        .await;
        let Ok((returned, result, revision)) = loaded else {
            tracing::error!("reading the etcd mirror panicked");
            return;
        };
        mirror = returned;
        match result {
            Ok(catalog) => folder::publish(&tx, catalog),
            Err(e) => tracing::error!("{e}; still serving what was read before"),
        }
        match etcd.wait_change(&prefix, revision + 1).await {
            // Changes come in bursts (a tool putting several keys): read
            // once after the burst.
            Ok(()) => tokio::time::sleep(folder::DEBOUNCE).await,
            Err(e) => {
                tracing::warn!("{e}; reading again");
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_become_relative_paths_below_the_prefix_only() {
        let p = "/mmesh/policies/";
        assert_eq!(
            relative_path(p, "/mmesh/policies/nodes/web-1.yaml"),
            Some(PathBuf::from("nodes/web-1.yaml"))
        );
        assert_eq!(
            relative_path(p, "/mmesh/policies/default.yaml"),
            Some(PathBuf::from("default.yaml"))
        );
        for bad in [
            "/mmesh/policies/../etc/passwd",
            "/mmesh/policies//abs",
            "/mmesh/policies/",
            "/mmesh/policies/nodes/",
            "/mmesh/policies/./x",
            "/other/x",
        ] {
            assert_eq!(relative_path(p, bad), None, "{bad}");
        }
    }

    #[test]
    fn the_prefix_range_ends_after_the_last_key_with_the_prefix() {
        assert_eq!(prefix_end("/a/"), b"/a0");
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80");
    }
}
