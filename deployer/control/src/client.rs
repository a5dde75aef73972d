//! A client of the control node's API (what `bootcache deploy`, `inspect`
//! and `destroy` use, and orchestrators embedding the crate).

use std::time::Duration;

use bootcache_api::Name;
use bootcache_api::lab::LabSource;
use bootcache_http::auth::Credential;

use bootcache_api::control::routes;
pub use bootcache_api::control::{InstanceView, LabSummary, NodeView, Remaining};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The control node refused it (its status and message).
    #[error("the control node answered {status}: {message}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// What it said.
        message: String,
    },
    /// It could not be reached.
    #[error("the control node at {base} does not answer")]
    Unreachable {
        /// Its address.
        base: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
}

impl ClientError {
    /// Whether trying again later may work (the control node restarting).
    pub fn is_transient(&self) -> bool {
        matches!(self, ClientError::Unreachable { .. }) || matches!(self, ClientError::Refused { status, .. } if *status >= 500)
    }
}

/// The control node at a base URL, with its credential.
#[derive(Clone, Debug)]
pub struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    /// A client of the control node at `base` (`http://host:port`).
    ///
    /// # Errors
    /// The credential is not a header value.
    pub fn new(base: &str, credential: &Credential) -> Result<Client, ClientError> {
        let mut headers = reqwest::header::HeaderMap::new();
        let value = credential
            .authorization()
            .parse()
            .map_err(|_| ClientError::Refused { status: 0, message: "the token is not a valid header value".into() })?;
        headers.insert(reqwest::header::AUTHORIZATION, value);
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(Duration::from_secs(120))
            .connect_timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ClientError::Unreachable { base: base.into(), source: e })?;
        Ok(Client { base: base.trim_end_matches('/').to_owned(), http })
    }

    async fn call<T: serde::de::DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> Result<T, ClientError> {
        let r = req.send().await.map_err(|e| ClientError::Unreachable { base: self.base.clone(), source: e })?;
        let status = r.status();
        if !status.is_success() {
            let message = r.text().await.unwrap_or_default().trim().chars().take(2000).collect();
            return Err(ClientError::Refused { status: status.as_u16(), message });
        }
        if status == reqwest::StatusCode::NO_CONTENT {
            return serde_json::from_value(serde_json::Value::Null)
                .map_err(|e| ClientError::Refused { status: 204, message: e.to_string() });
        }
        r.json().await.map_err(|e| ClientError::Unreachable { base: self.base.clone(), source: e })
    }

    /// Deploys a lab file with the files it names; the lab's instances.
    ///
    /// # Errors
    /// A bad lab file (400, naming the line), an image that cannot be read (502), unreachable.
    pub async fn deploy(&self, source: &LabSource) -> Result<Vec<InstanceView>, ClientError> {
        let post = self.http.post(format!("{}{}", self.base, routes::LABS));
        let post = if source.files.is_empty() {
            post.header("content-type", "application/yaml").body(source.text.clone())
        } else {
            post.json(source)
        };
        self.call(post).await
    }

    /// The labs deployed.
    ///
    /// # Errors
    /// Unreachable, refused.
    pub async fn labs(&self) -> Result<Vec<LabSummary>, ClientError> {
        self.call(self.http.get(format!("{}{}", self.base, routes::LABS))).await
    }

    /// A lab's instances.
    ///
    /// # Errors
    /// No such lab (404), unreachable.
    pub async fn instances(&self, lab: &Name) -> Result<Vec<InstanceView>, ClientError> {
        self.call(self.http.get(format!("{}{}", self.base, routes::instances(lab)))).await
    }

    /// Destroys a lab (nothing if it is not there).
    ///
    /// # Errors
    /// Unreachable, refused.
    pub async fn destroy(&self, lab: &Name) -> Result<(), ClientError> {
        self.call::<Option<()>>(self.http.delete(format!("{}{}", self.base, routes::lab(lab)))).await.map(drop)
    }

    /// What nodes still run of `lab`.
    ///
    /// # Errors
    /// Unreachable, refused.
    pub async fn remaining(&self, lab: &Name) -> Result<Remaining, ClientError> {
        self.call(self.http.get(format!("{}{}", self.base, routes::remaining(lab)))).await
    }

    /// Stops (`running` false) or starts an instance; its agent does it at
    /// its next heartbeat.
    ///
    /// # Errors
    /// No such instance (404), unreachable.
    pub async fn set_running(&self, lab: &Name, name: &Name, running: bool) -> Result<(), ClientError> {
        self.call::<Option<()>>(self.http.post(format!("{}{}", self.base, routes::instance_action(lab, name, running)))).await.map(drop)
    }

    /// Runs `argv` in instance `name` of `lab` (no shell), waiting at most
    /// `timeout` for it: its exit code and output (through its node).
    ///
    /// # Errors
    /// No such instance (404), one on no node (409), its node did not
    /// answer (504), unreachable.
    pub async fn exec(
        &self,
        lab: &Name,
        name: &Name,
        argv: &[String],
        timeout: Duration,
    ) -> Result<bootcache_api::agent::TaskResult, ClientError> {
        let req = bootcache_api::control::ExecRequest { argv: argv.to_vec(), timeout_s: Some(timeout.as_secs()) };
        self.call(
            self.http.post(format!("{}{}", self.base, routes::exec(lab, name))).json(&req).timeout(timeout + Duration::from_secs(120)),
        )
        .await
    }

    /// What instance `name` of `lab` printed (its console or log, the end of it).
    ///
    /// # Errors
    /// As [`Client::exec`].
    pub async fn logs(&self, lab: &Name, name: &Name) -> Result<bootcache_api::agent::TaskResult, ClientError> {
        self.call(self.http.get(format!("{}{}", self.base, routes::logs(lab, name)))).await
    }

    /// Removes a node (its credential revoked, its instances placed again).
    ///
    /// # Errors
    /// No such node (404), unreachable, refused.
    pub async fn remove_node(&self, node: &Name) -> Result<(), ClientError> {
        self.call::<Option<()>>(self.http.delete(format!("{}{}", self.base, routes::node(node)))).await.map(drop)
    }

    /// The nodes.
    ///
    /// # Errors
    /// Unreachable, refused.
    pub async fn nodes(&self) -> Result<Vec<NodeView>, ClientError> {
        self.call(self.http.get(format!("{}{}", self.base, routes::NODES))).await
    }
}
