//! The hub's authorization from the sites' ownership maps: each site's
//! access file names the leafnode identity its leaf links with, so the hub
//! admits exactly those, each to its own site's subjects.

use super::access::{Access, AccessError};
use super::identity::check_public_key;
use crate::naming::{NameError, Site};
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum HubAclError {
    #[error("{0:?} is not SITE=ACCESS_FILE (e.g. home=/etc/presenced/home-access.toml)")]
    Pair(String),
    #[error(transparent)]
    Site(#[from] NameError),
    #[error(transparent)]
    Access(#[from] AccessError),
    #[error("{path}: no `leafnode` identity: the hub cannot admit site {site}'s leaf without its public key")]
    NoLeafnode { path: String, site: String },
    #[error("site {0} is listed twice")]
    Twice(String),
    #[error("--admin-nkey: {0}")]
    Admin(String),
    #[error("--viewer-nkey: {0}")]
    Viewer(String),
}

/// Parses `SITE=FILE`.
pub fn parse_pair(text: &str) -> Result<(Site, PathBuf), HubAclError> {
    let (site, file) = text
        .split_once('=')
        .filter(|(s, f)| !s.is_empty() && !f.is_empty())
        .ok_or_else(|| HubAclError::Pair(text.to_owned()))?;
    Ok((Site::new(site)?, PathBuf::from(file)))
}

/// The leafnode identity of every site, in site order, from their files.
pub fn leafnodes(pairs: &[(Site, PathBuf)]) -> Result<Vec<(Site, String)>, HubAclError> {
    let mut out: Vec<(Site, String)> = Vec::new();
    for (site, file) in pairs {
        if out.iter().any(|(s, _)| s == site) {
            return Err(HubAclError::Twice(site.to_string()));
        }
        let access = Access::load(file)?;
        let key = access.leafnode.ok_or_else(|| HubAclError::NoLeafnode {
            path: file.display().to_string(),
            site: site.to_string(),
        })?;
        out.push((site.clone(), key));
    }
    out.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
    Ok(out)
}

/// `presenced acl-hub`: the hub's authorization block.
pub fn render_files(
    admin: Option<&str>,
    viewers: &[String],
    pairs: &[String],
) -> Result<String, HubAclError> {
    if let Some(key) = admin {
        check_public_key(key).map_err(|e| HubAclError::Admin(e.to_string()))?;
    }
    for key in viewers {
        check_public_key(key).map_err(|e| HubAclError::Viewer(e.to_string()))?;
    }
    let pairs = pairs
        .iter()
        .map(|p| parse_pair(p))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(super::render::render_hub_with_viewers(
        admin,
        viewers,
        &leafnodes(&pairs)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs() {
        assert!(parse_pair("home=/a.toml").is_ok());
        assert!(matches!(parse_pair("home"), Err(HubAclError::Pair(_))));
        assert!(matches!(parse_pair("=x"), Err(HubAclError::Pair(_))));
        assert!(matches!(parse_pair("Home=x"), Err(HubAclError::Site(_))));
    }
}
