//! The S3 side: an `object_store` AmazonS3 client for Wasabi or any
//! S3-compatible server, built from `[archive.s3]` and credential files.
//!
//! The client's own retries are kept short (two, within 30 s): the outbox
//! retries forever with its own backoff, and a long hidden retry loop
//! would only delay the report that S3 is down.

use super::config::S3Config;
use super::{ArchiveError, SnapshotMeta};
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{
    Attribute, AttributeValue, Attributes, ClientOptions, GetOptions, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, RetryConfig, WriteMultipart,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;

#[derive(Clone, Debug)]
pub struct Remote {
    store: Arc<AmazonS3>,
    prefix: String,
    part_size: usize,
    /// `s3://<bucket>/<prefix>`, for messages.
    pub location: String,
}

fn read_key_file(field: &str, path: &std::path::Path) -> Result<String, ArchiveError> {
    let text = crate::base::secrets::read_secret(path).map_err(|e| {
        ArchiveError::Credentials(format!("{field}: cannot read {}: {e}", path.display()))
    })?;
    let key = text.trim();
    if key.is_empty() {
        return Err(ArchiveError::Credentials(format!(
            "{field}: {} is empty",
            path.display()
        )));
    }
    Ok(key.to_owned())
}

impl Remote {
    pub fn from_config(cfg: &S3Config) -> Result<Remote, ArchiveError> {
        let access = read_key_file("access_key_file", &cfg.access_key_file)?;
        let secret = read_key_file("secret_key_file", &cfg.secret_key_file)?;
        let client = ClientOptions::new()
            .with_allow_http(cfg.endpoint.starts_with("http://"))
            .with_timeout(cfg.timeout)
            .with_connect_timeout(Duration::from_secs(5));
        let retry = RetryConfig {
            max_retries: 2,
            retry_timeout: Duration::from_secs(30),
            ..Default::default()
        };
        let store = AmazonS3Builder::new()
            .with_endpoint(cfg.endpoint.trim_end_matches('/'))
            .with_region(&cfg.region)
            .with_bucket_name(&cfg.bucket)
            .with_access_key_id(access)
            .with_secret_access_key(secret)
            .with_virtual_hosted_style_request(!cfg.path_style)
            .with_client_options(client)
            .with_retry(retry)
            .build()
            .map_err(|e| ArchiveError::Credentials(format!("cannot build the S3 client: {e}")))?;
        let mut prefix = cfg.prefix.trim_matches('/').to_owned();
        if !prefix.is_empty() {
            prefix.push('/');
        }
        Ok(Remote {
            store: Arc::new(store),
            location: format!("s3://{}/{}", cfg.bucket, prefix),
            prefix,
            part_size: usize::try_from(cfg.part_size).unwrap_or(8 << 20),
        })
    }

    /// The S3 key of a snapshot: prefix + snapshot id.
    pub fn key(&self, id: &str) -> Path {
        Path::from(format!("{}{}", self.prefix, id))
    }

    /// The snapshot id of an S3 key under the prefix.
    pub fn id_of(&self, key: &Path) -> Option<String> {
        key.as_ref().strip_prefix(&self.prefix).map(str::to_owned)
    }

    fn attributes(meta: &SnapshotMeta) -> Attributes {
        let mut a = Attributes::new();
        a.insert(
            Attribute::ContentType,
            AttributeValue::from("application/gzip"),
        );
        for (k, v) in meta.to_map() {
            a.insert(Attribute::Metadata(k.into()), AttributeValue::from(v));
        }
        a
    }

    /// Copies a snapshot from the object store to S3; single PUT up to
    /// `part_size`, multipart above. Returns the ETag.
    pub async fn upload(
        &self,
        local: &async_nats::jetstream::object_store::ObjectStore,
        meta: &SnapshotMeta,
    ) -> Result<Option<String>, ArchiveError> {
        let id = &meta.id;
        let key = self.key(id);
        let mut object = local
            .get(id)
            .await
            .map_err(|e| ArchiveError::nats(format!("reading snapshot {id}"), e))?;
        let read_err = |e| ArchiveError::nats(format!("reading snapshot {id}"), e);
        if meta.size <= self.part_size as u64 {
            let mut buf = Vec::with_capacity(meta.size as usize);
            object.read_to_end(&mut buf).await.map_err(read_err)?;
            let opts = PutOptions {
                attributes: Self::attributes(meta),
                ..Default::default()
            };
            let r = self
                .store
                .put_opts(&key, PutPayload::from(buf), opts)
                .await
                .map_err(|e| ArchiveError::s3(format!("PUT {key}"), e))?;
            return Ok(r.e_tag);
        }
        let opts = PutMultipartOptions {
            attributes: Self::attributes(meta),
            ..Default::default()
        };
        let upload = self
            .store
            .put_multipart_opts(&key, opts)
            .await
            .map_err(|e| ArchiveError::s3(format!("starting multipart upload of {key}"), e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, self.part_size);
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = match object.read(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(read_err(e));
                }
            };
            if n == 0 {
                break;
            }
            // Two parts in flight at most: bounded memory on the edge host.
            if let Err(e) = writer.wait_for_capacity(2).await {
                let _ = writer.abort().await;
                return Err(ArchiveError::s3(format!("multipart upload of {key}"), e));
            }
            writer.write(&buf[..n]);
        }
        let r = writer
            .finish()
            .await
            .map_err(|e| ArchiveError::s3(format!("completing multipart upload of {key}"), e))?;
        Ok(r.e_tag)
    }

    /// Size and our metadata of a remote snapshot; `None` if absent.
    pub async fn head(
        &self,
        id: &str,
    ) -> Result<Option<(ObjectMeta, HashMap<String, String>)>, ArchiveError> {
        let key = self.key(id);
        let opts = GetOptions {
            head: true,
            ..Default::default()
        };
        match self.store.get_opts(&key, opts).await {
            Ok(r) => {
                let m = r
                    .attributes
                    .iter()
                    .filter_map(|(k, v)| match k {
                        Attribute::Metadata(name) => {
                            Some((name.to_string(), v.as_ref().to_owned()))
                        }
                        _ => None,
                    })
                    .collect();
                Ok(Some((r.meta, m)))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(ArchiveError::s3(format!("HEAD {key}"), e)),
        }
    }

    /// The bytes of a remote snapshot, as they arrive.
    pub async fn read(
        &self,
        id: &str,
    ) -> Result<BoxStream<'static, Result<Bytes, ArchiveError>>, ArchiveError> {
        let key = self.key(id);
        let r = self
            .store
            .get(&key)
            .await
            .map_err(|e| ArchiveError::s3(format!("GET {key}"), e))?;
        let shown = key.to_string();
        Ok(r.into_stream()
            .map(move |c| c.map_err(|e| ArchiveError::s3(format!("GET {shown}"), e)))
            .boxed())
    }

    /// Remote snapshots of `site` (keys `<prefix><site>/...`).
    pub async fn list(&self, site: &str) -> Result<Vec<ObjectMeta>, ArchiveError> {
        let prefix = Path::from(format!("{}{}", self.prefix, site));
        let mut out = Vec::new();
        let mut s = self.store.list(Some(&prefix));
        while let Some(m) = s.next().await {
            out.push(m.map_err(|e| ArchiveError::s3(format!("LIST {prefix}"), e))?);
        }
        out.sort_by(|a, b| a.location.as_ref().cmp(b.location.as_ref()));
        Ok(out)
    }

    pub async fn delete(&self, id: &str) -> Result<(), ArchiveError> {
        let key = self.key(id);
        self.store
            .delete(&key)
            .await
            .map_err(|e| ArchiveError::s3(format!("DELETE {key}"), e))
    }

    /// The underlying client (tests and benchmarks write through it).
    pub fn store(&self) -> Arc<AmazonS3> {
        self.store.clone()
    }
}
