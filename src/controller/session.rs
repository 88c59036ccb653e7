//! The session-token service: each GpuInstance's worker token, kept in a Secret the
//! instance owns (so Kubernetes garbage-collects it with the instance), read once per
//! process and then served from memory by instance UID.
//!
//! The instance reconciler creates the token before it rents the machine (the worker gets it
//! in its environment); the pool and the job reconcilers read it to send a job. None of them
//! calls another for it.

use std::{collections::HashMap, sync::Mutex};

use k8s_openapi::{api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::OwnerReference};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, PostParams},
};
use rand::RngCore;

use crate::{
    crd::{GpuInstance, INSTANCE_LABEL, MANAGED_BY, MANAGED_BY_LABEL, SESSION_SECRET_PREFIX},
    provider::Credentials,
};

use super::{Error, Result};

pub use crate::crd::SESSION_TOKEN_KEY;

/// Name of the Secret holding an instance's session token.
pub fn secret_name(gi: &GpuInstance) -> String {
    format!("{SESSION_SECRET_PREFIX}{}", gi.uid().unwrap_or_default())
}

/// The tokens this process has read or made, by GpuInstance UID; an entry goes when its
/// instance is torn down.
#[derive(Default)]
pub struct SessionTokens {
    by_uid: Mutex<HashMap<String, Credentials>>,
}

impl SessionTokens {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Credentials>> {
        self.by_uid.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remember(&self, gi: &GpuInstance, token: &Credentials) {
        self.lock()
            .insert(gi.uid().unwrap_or_default(), token.clone());
    }

    /// How many tokens are held (for tests and the memory benchmark).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The instance's token if its Secret exists; an existing Secret without a usable token
    /// is a [`Error::BadReference`].
    pub async fn existing(&self, client: &Client, gi: &GpuInstance) -> Result<Option<Credentials>> {
        if let Some(token) = self.lock().get(&gi.uid().unwrap_or_default()) {
            return Ok(Some(token.clone()));
        }
        let ns = gi.namespace().unwrap_or_default();
        let name = secret_name(gi);
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
        let Some(s) = secrets.get_opt(&name).await? else {
            return Ok(None);
        };
        let token = s
            .data
            .as_ref()
            .and_then(|d| d.get(SESSION_TOKEN_KEY))
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Error::BadReference(format!("Secret {ns}/{name} has no session token"))
            })?;
        let token = Credentials::new(token);
        self.remember(gi, &token);
        Ok(Some(token))
    }

    /// The instance's token, made and stored in a new Secret owned by the instance the first
    /// time. A create that races another (409) fails this reconcile; the next reads it back.
    pub async fn ensure(&self, client: &Client, gi: &GpuInstance) -> Result<Credentials> {
        if let Some(token) = self.existing(client, gi).await? {
            return Ok(token);
        }
        let secrets: Api<Secret> =
            Api::namespaced(client.clone(), &gi.namespace().unwrap_or_default());
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        secrets
            .create(&PostParams::default(), &token_secret(gi, &token)?)
            .await?;
        let token = Credentials::new(token);
        self.remember(gi, &token);
        Ok(token)
    }

    /// Forgets the instance's token and deletes its Secret (best effort: the owner reference
    /// lets the garbage collector delete it otherwise).
    pub async fn delete(&self, client: &Client, gi: &GpuInstance) {
        self.forget(&gi.uid().unwrap_or_default());
        let secrets: Api<Secret> =
            Api::namespaced(client.clone(), &gi.namespace().unwrap_or_default());
        if let Err(e) = secrets
            .delete(&secret_name(gi), &DeleteParams::default())
            .await
            && !matches!(&e, kube::Error::Api(s) if s.code == 404)
        {
            tracing::debug!(error = %e, "session secret not deleted; owner-reference GC will");
        }
    }

    pub fn forget(&self, instance_uid: &str) {
        self.lock().remove(instance_uid);
    }
}

/// The Secret that holds `token` for `gi`, owned by it.
fn token_secret(gi: &GpuInstance, token: &str) -> Result<Secret> {
    let mut secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {
            "name": secret_name(gi),
            "labels": {MANAGED_BY_LABEL: MANAGED_BY, INSTANCE_LABEL: gi.name_any()},
        },
        "type": "Opaque",
        "stringData": {SESSION_TOKEN_KEY: token},
    }))?;
    secret.metadata.owner_references = Some(vec![OwnerReference {
        api_version: GpuInstance::api_version(&()).into_owned(),
        kind: GpuInstance::kind(&()).into_owned(),
        name: gi.name_any(),
        uid: gi.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(false),
    }]);
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_is_owned_by_its_instance_and_holds_the_token_under_its_key() {
        let mut gi = GpuInstance::new(
            "gi-1",
            crate::crd::GpuInstanceSpec {
                pool: "p".into(),
                provider: "vast".into(),
                capacity_type: Default::default(),
            },
        );
        gi.metadata.uid = Some("u-1".into());
        let s = token_secret(&gi, "abc").unwrap();
        assert_eq!(s.metadata.name.as_deref(), Some("gpupool-session-u-1"));
        let owner = &s.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.uid.as_str(), owner.controller), ("u-1", Some(true)));
        assert_eq!(
            s.string_data
                .unwrap()
                .get(SESSION_TOKEN_KEY)
                .map(String::as_str),
            Some("abc")
        );
    }
}
