//! Checking a copy against the sha256 and size the snapshot was taken
//! with: the remote one after an upload and before a restore, the local
//! one before a restore or an upload.

use super::s3::Remote;
use super::{hex, ArchiveError};
use async_nats::jetstream::object_store::ObjectStore;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

/// Size and hex SHA-256 of some bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Digested {
    pub size: u64,
    pub sha256: String,
}

/// Compares a copy with what was expected; the error says what differs.
pub fn compare(
    id: &str,
    copy: &str,
    expected: &Digested,
    got: &Digested,
) -> Result<(), ArchiveError> {
    if got.size != expected.size {
        return Err(ArchiveError::Verify {
            id: id.to_owned(),
            what: format!(
                "{copy} copy has {} bytes, expected {}",
                got.size, expected.size
            ),
        });
    }
    if got.sha256 != expected.sha256 {
        return Err(ArchiveError::Verify {
            id: id.to_owned(),
            what: format!(
                "{copy} copy has sha256 {}, expected {}",
                got.sha256, expected.sha256
            ),
        });
    }
    Ok(())
}

pub async fn digest_local(store: &ObjectStore, id: &str) -> Result<Digested, ArchiveError> {
    let mut object = store
        .get(id)
        .await
        .map_err(|e| ArchiveError::nats(format!("reading snapshot {id}"), e))?;
    let mut sha = Sha256::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = object
            .read(&mut buf)
            .await
            .map_err(|e| ArchiveError::nats(format!("reading snapshot {id}"), e))?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
        size += n as u64;
    }
    Ok(Digested {
        size,
        sha256: hex(&sha.finalize()),
    })
}

pub async fn digest_remote(remote: &Remote, id: &str) -> Result<Digested, ArchiveError> {
    let mut body = remote.read(id).await?;
    let mut sha = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        sha.update(&chunk);
        size += chunk.len() as u64;
    }
    Ok(Digested {
        size,
        sha256: hex(&sha.finalize()),
    })
}

/// The remote copy exists, has the expected size (HEAD, cheap) and the
/// expected sha256 (GET, reads it all).
pub async fn verify_remote(
    remote: &Remote,
    id: &str,
    expected: &Digested,
) -> Result<Digested, ArchiveError> {
    match remote.head(id).await? {
        None => {
            return Err(ArchiveError::Verify {
                id: id.to_owned(),
                what: format!("no remote copy at {}{id}", remote.location),
            })
        }
        Some((meta, _)) if meta.size != expected.size => {
            return Err(ArchiveError::Verify {
                id: id.to_owned(),
                what: format!(
                    "remote copy has {} bytes, expected {}",
                    meta.size, expected.size
                ),
            })
        }
        Some(_) => {}
    }
    let got = digest_remote(remote, id).await?;
    compare(id, "remote", expected, &got)?;
    Ok(got)
}
