//! The scope service: consent records, prompts, auth codes and the consent history, behind
//! the admin listener's `/v1/scopes/*` and `/v1/auth-codes*` routes.
//!
//! Consent records live in memory and in one JSON file (`[scopes].consent_file`), rewritten
//! atomically on every change before the change is answered, so they survive reloads and
//! restarts; the records of an app go when a reload finds the app gone. A prompt is asked of
//! the configured [`Prompter`] and waits at most `prompt_timeout` for its answer: callers
//! asking about the same (app, user, scope) meanwhile share it, an answer is recorded when it
//! arrives, and a prompt that times out or whose webhook fails records nothing. Auth codes
//! are random, held in memory only (a restart voids them), bound to (app, user, scopes),
//! single-use and short-lived. Every consent change is a line in the consent history beside
//! the consent file.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Request;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;
use prometheus::IntCounterVec;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tokio::sync::watch;
use tokio::time::Instant;

use super::rules::{self, Call, Consent, Decision, Guide, Platform, Reason, ScopeDef, SystemPermission, Verdict};
use super::{Prompter, Settings, WebhookUrl};
use crate::audit::AuditLog;
use crate::config::Config;
use crate::policy::{Action, App, Policy};

/// Prompts waiting at once; beyond it a call that needs one fails (`prompt_failed`).
pub const MAX_PENDING_PROMPTS: usize = 1024;
/// Prompts one app may have waiting at once: one app's callers cannot take every other app's.
pub const MAX_PENDING_PROMPTS_PER_APP: usize = 128;
/// Outstanding auth codes of one (app, user): the oldest goes when a new one comes.
pub const MAX_AUTH_CODES_PER_USER: usize = 5;
/// Calls waiting for a prompt's answer at once. Each holds an admin connection, and the admin
/// listener serves 64: beyond this, a call answers `prompt` at once (as with `"wait": false`),
/// so that a rig can always connect to answer.
pub const MAX_WAITING_CALLS: usize = 32;
/// Auth codes outstanding at once; beyond it, issuing one is refused until some expire.
pub const MAX_AUTH_CODES: usize = 10_000;
/// A webhook's answer is a small JSON document.
const MAX_WEBHOOK_ANSWER: usize = 16 * 1024;

/// Why a request could not be served (the admin listener maps each to a status).
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("no app {0:?}")]
    UnknownApp(String),
    #[error("{platform} has no scope {scope:?}")]
    UnknownScope { platform: Platform, scope: String },
    #[error("user {0:?} is not in the user directory ([scopes].users)")]
    UnknownUser(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{MAX_AUTH_CODES} auth codes are outstanding; try again when some have expired")]
    TooManyCodes,
    #[error("cannot write the consent records, so nothing changed: {0}")]
    Io(#[from] std::io::Error),
}

/// Why an auth code exchange failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeError {
    /// No app, no secret, or the wrong one.
    #[error("the app's secret is wrong (or the app has none)")]
    BadSecret,
    #[error("no such code: never issued, or already used")]
    UnknownCode,
    #[error("the code has expired")]
    Expired,
    #[error("the code was issued to another app (it is void now)")]
    OtherApp,
}

impl ExchangeError {
    pub fn reason(self) -> &'static str {
        match self {
            ExchangeError::BadSecret => "bad_secret",
            ExchangeError::UnknownCode => "code_unknown",
            ExchangeError::Expired => "code_expired",
            ExchangeError::OtherApp => "code_other_app",
        }
    }
}

/// One consent record as the file keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StoredConsent {
    app: String,
    user: String,
    scope: String,
    state: Consent,
    time: String,
}

/// The consent file.
#[derive(Debug, Default, Serialize, Deserialize)]
struct ConsentFile {
    consents: Vec<StoredConsent>,
}

/// One line of the consent history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsentChange {
    pub time: String,
    pub app: String,
    pub user: String,
    pub scope: String,
    pub before: Consent,
    pub after: Consent,
    /// `prompt` (an answer to a prompt), `setting` (openSetting) or `app_deleted`.
    pub cause: String,
    /// Who answered or changed it: the prompter (`allow`, `deny`, `webhook`), or the admin
    /// user of the request.
    pub by: String,
    /// `applied`, or `write_failed` when the consent file could not be written after the line
    /// was (the change then did not happen, and the history leaves both lines out).
    pub outcome: String,
}

type ConsentKey = (String, String, String);

/// A prompt as `GET /v1/scopes/prompts` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PromptView {
    pub id: String,
    pub app: String,
    pub user: String,
    pub scope: String,
    pub title: String,
    pub text: String,
    /// Seconds until it times out.
    pub expires_in: u64,
}

/// What became of a prompt.
type Settled = Option<Result<bool, String>>;

struct Pending {
    view: PromptView,
    expires: Instant,
    settled: watch::Sender<Settled>,
}

struct AuthCode {
    app: String,
    user: String,
    scopes: Vec<String>,
    expires: Instant,
}

/// The outcome of one prompt for a caller.
enum Prompted {
    Answered(bool),
    /// Not waited for: the prompt, for the caller to show and answer.
    Open(PromptView),
    TimedOut,
    Failed(String),
}

/// The answer to a decide, authorize or auth code request (the fields each route shows).
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    pub decision: &'static str,
    pub reason: &'static str,
    pub app: String,
    pub user: String,
    pub scope: Option<String>,
    /// Whether a prompt was answered for this call.
    pub prompted: bool,
    /// Where to send the user after a refusal: `openSetting` or `showAuthGuide`.
    pub guide: Option<&'static str>,
    /// For a `prompt` decision: the prompt to show and answer.
    pub prompt: Option<PromptView>,
}

impl Answer {
    /// `authorize`'s state: granted, denied or prompt.
    pub fn state(&self) -> &'static str {
        match self.decision {
            "allow" => "granted",
            "prompt" => "prompt",
            _ => "denied",
        }
    }
}

/// What a container sends about one call.
#[derive(Debug, Clone, Default)]
pub struct Ask {
    pub app: String,
    pub user: String,
    pub system: SystemPermission,
    /// Wait for the prompter's answer (the default), or answer `prompt` at once.
    pub wait: bool,
}

/// The scope service (see the module docs).
pub struct ScopeService {
    consent_file: PathBuf,
    consents: Mutex<BTreeMap<ConsentKey, StoredConsent>>,
    prompts: Mutex<HashMap<String, Pending>>,
    codes: Mutex<HashMap<String, AuthCode>>,
    history: AuditLog,
    decisions: IntCounterVec,
    waiting: tokio::sync::Semaphore,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn random_hex(bytes: usize) -> Result<String, std::io::Error> {
    let mut buf = vec![0u8; bytes];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut buf)
        .map_err(|_| std::io::Error::other("the system's random number generator failed"))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// The consent history beside the consent file: `consent.json` → `consent.history.jsonl`.
pub fn history_path(consent_file: &Path) -> PathBuf {
    let stem = consent_file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "consent".into());
    consent_file.with_file_name(format!("{stem}.history.jsonl"))
}

impl ScopeService {
    /// Open the consent records of `settings.consent_file` (none yet when it does not exist).
    pub fn open(settings: &Settings, decisions: IntCounterVec) -> std::io::Result<ScopeService> {
        let file = &settings.consent_file;
        let stored: ConsentFile = match std::fs::read(file) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::other(format!("the consent file {} is not readable JSON: {e}", file.display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ConsentFile::default(),
            Err(e) => return Err(std::io::Error::new(e.kind(), format!("cannot read {}: {e}", file.display()))),
        };
        let consents =
            stored.consents.into_iter().map(|c| ((c.app.clone(), c.user.clone(), c.scope.clone()), c)).collect();
        Ok(ScopeService {
            consent_file: file.clone(),
            consents: Mutex::new(consents),
            prompts: Mutex::new(HashMap::new()),
            codes: Mutex::new(HashMap::new()),
            history: AuditLog::at(history_path(file)),
            decisions,
            waiting: tokio::sync::Semaphore::new(MAX_WAITING_CALLS),
        })
    }

    /// The consent file in use (fixed at start).
    pub fn consent_file(&self) -> &Path {
        &self.consent_file
    }

    fn consent(&self, app: &str, user: &str, scope: &str) -> Consent {
        let key = (app.to_owned(), user.to_owned(), scope.to_owned());
        lock(&self.consents).get(&key).map_or(Consent::NotAsked, |c| c.state)
    }

    /// Change one consent record: the history line first, then the file, then memory.
    fn set_consent(&self, key: ConsentKey, after: Consent, cause: &str, by: &str) -> Result<Consent, std::io::Error> {
        let mut consents = lock(&self.consents);
        let before = consents.get(&key).map_or(Consent::NotAsked, |c| c.state);
        if before == after {
            return Ok(before);
        }
        let time = crate::audit::Record::now();
        let (app, user, scope) = key.clone();
        let mut change = ConsentChange {
            time: time.clone(),
            app: app.clone(),
            user: user.clone(),
            scope: scope.clone(),
            before,
            after,
            cause: cause.to_owned(),
            by: by.to_owned(),
            outcome: "applied".to_owned(),
        };
        self.history.append_value(&change)?;
        let mut next = consents.clone();
        match after {
            Consent::NotAsked => drop(next.remove(&key)),
            state => drop(next.insert(key, StoredConsent { app, user, scope, state, time })),
        }
        if let Err(e) = self.write(&next) {
            change.outcome = "write_failed".to_owned();
            let _ = self.history.append_value(&change);
            return Err(e);
        }
        *consents = next;
        tracing::info!(
            app = change.app,
            user = change.user,
            scope = change.scope,
            before = before.as_str(),
            after = after.as_str(),
            cause,
            by,
            "consent changed"
        );
        Ok(before)
    }

    fn write(&self, consents: &BTreeMap<ConsentKey, StoredConsent>) -> std::io::Result<()> {
        let file = ConsentFile { consents: consents.values().cloned().collect() };
        let mut bytes = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
        bytes.push(b'\n');
        crate::store::write_atomically(&self.consent_file, &bytes)
    }

    /// Drop the consent records and auth codes of every app `policy` no longer has (an app
    /// deleted: WeChat keeps a denial "until the miniapp is deleted"). Called after a reload.
    pub fn forget_apps_not_in(&self, policy: &Policy) {
        lock(&self.codes).retain(|_, code| policy.app(&code.app).is_some());
        let mut consents = lock(&self.consents);
        let gone: Vec<ConsentKey> = consents.keys().filter(|(app, _, _)| policy.app(app).is_none()).cloned().collect();
        if gone.is_empty() {
            return;
        }
        // Every record of the deleted apps in one write of the file (not one write a record).
        let time = crate::audit::Record::now();
        let changes: Vec<ConsentChange> = gone
            .iter()
            .map(|(app, user, scope)| ConsentChange {
                time: time.clone(),
                app: app.clone(),
                user: user.clone(),
                scope: scope.clone(),
                before: consents
                    .get(&(app.clone(), user.clone(), scope.clone()))
                    .map_or(Consent::NotAsked, |c| c.state),
                after: Consent::NotAsked,
                cause: "app_deleted".to_owned(),
                by: "reload".to_owned(),
                outcome: "applied".to_owned(),
            })
            .collect();
        for change in &changes {
            if let Err(e) = self.history.append_value(change) {
                tracing::error!(error = %e, app = change.app, "cannot record the consent records of a deleted app going");
                return;
            }
        }
        let mut next = consents.clone();
        for key in &gone {
            next.remove(key);
        }
        match self.write(&next) {
            Ok(()) => {
                *consents = next;
                tracing::info!(records = gone.len(), "consent records of deleted apps dropped");
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot drop the consent records of deleted apps");
                for mut change in changes {
                    change.outcome = "write_failed".to_owned();
                    let _ = self.history.append_value(&change);
                }
            }
        }
    }

    fn count(&self, app: &str, scope: Option<&str>, answer: &Answer) {
        self.decisions.with_label_values(&[app, scope.unwrap_or(""), answer.decision]).inc();
    }

    /// `POST /v1/scopes/decide`: one API call, through the API whitelist, the scope and the
    /// system level, prompting when the rules say so.
    pub async fn decide(self: &Arc<Self>, config: &Config, ask: &Ask, api: &str) -> Result<Answer, ServiceError> {
        let app = config.policy.app(&ask.app).ok_or_else(|| ServiceError::UnknownApp(ask.app.clone()))?;
        let profile = config.scopes.profiles.get(app.platform);
        let scope = profile.scope_of_api(api);
        let consent = scope.map_or(Consent::NotAsked, |s| self.consent(&app.id, &ask.user, &s.name));
        let call = Call {
            platform: app.platform,
            action: app.action,
            whitelisted: app.api_whitelist.contains(api),
            scope,
            consent,
            system: ask.system,
        };
        let answer = self.resolve(config, app, ask, scope, rules::decide(call)).await?;
        let scope_name = scope.map(|s| &*s.name);
        self.count(&app.id, scope_name, &answer);
        tracing::info!(app = %app.id, user = ask.user, api, scope = scope_name.unwrap_or(""), decision = answer.decision, reason = answer.reason, prompted = answer.prompted, "scope decision");
        Ok(answer)
    }

    /// `POST /v1/scopes/authorize`: ask for a scope in advance. `report` apps are asked as
    /// `enforce` ones (an explicit request for consent is served as asked).
    pub async fn authorize(self: &Arc<Self>, config: &Config, ask: &Ask, scope: &str) -> Result<Answer, ServiceError> {
        let app = config.policy.app(&ask.app).ok_or_else(|| ServiceError::UnknownApp(ask.app.clone()))?;
        let def = config
            .scopes
            .profiles
            .get(app.platform)
            .scope(scope)
            .ok_or_else(|| ServiceError::UnknownScope { platform: app.platform, scope: scope.to_owned() })?;
        let answer = self.ask_scope(config, app, ask, def).await?;
        self.count(&app.id, Some(scope), &answer);
        tracing::info!(app = %app.id, user = ask.user, scope, decision = answer.decision, reason = answer.reason, prompted = answer.prompted, "scope authorization");
        Ok(answer)
    }

    async fn ask_scope(
        self: &Arc<Self>,
        config: &Config,
        app: &App,
        ask: &Ask,
        def: &ScopeDef,
    ) -> Result<Answer, ServiceError> {
        let action = if app.action == Action::Report { Action::Enforce } else { app.action };
        let call = Call {
            platform: app.platform,
            action,
            whitelisted: true,
            scope: Some(def),
            consent: self.consent(&app.id, &ask.user, &def.name),
            system: ask.system,
        };
        self.resolve(config, app, ask, Some(def), rules::decide(call)).await
    }

    /// Turn a decision into an answer, asking the prompter first when it says `prompt`.
    async fn resolve(
        self: &Arc<Self>,
        config: &Config,
        app: &App,
        ask: &Ask,
        scope: Option<&ScopeDef>,
        decision: Decision,
    ) -> Result<Answer, ServiceError> {
        let answer = |decision: Decision, prompted: bool, prompt: Option<PromptView>| Answer {
            decision: decision.verdict.as_str(),
            reason: decision.reason.as_str(),
            app: app.id.to_string(),
            user: ask.user.clone(),
            scope: scope.map(|s| s.name.to_string()),
            prompted,
            guide: decision.guide.map(Guide::as_str),
            prompt,
        };
        let (Verdict::Prompt, Some(def)) = (decision.verdict, scope) else { return Ok(answer(decision, false, None)) };
        let failed = |reason: Reason| Decision { verdict: Verdict::Deny, reason, guide: None };
        match self.prompt(config, app, ask, def).await? {
            Prompted::Answered(allow) => {
                let (_, decided) = rules::answered(app.platform, def, allow, ask.system);
                Ok(answer(decided, true, None))
            }
            Prompted::Open(view) => Ok(answer(decision, false, Some(view))),
            Prompted::TimedOut => Ok(answer(failed(Reason::PromptTimeout), false, None)),
            Prompted::Failed(why) => {
                tracing::warn!(app = %app.id, user = ask.user, scope = %def.name, error = why, "the prompt failed");
                Ok(answer(failed(Reason::PromptFailed), false, None))
            }
        }
    }

    /// Ask the user about one scope, as the configured prompter does.
    async fn prompt(
        self: &Arc<Self>,
        config: &Config,
        app: &App,
        ask: &Ask,
        def: &ScopeDef,
    ) -> Result<Prompted, ServiceError> {
        let settings = &config.scopes;
        let key = (app.id.to_string(), ask.user.clone(), def.name.to_string());
        let by = settings.prompter.as_str();
        match &settings.prompter {
            Prompter::Allow | Prompter::Deny => {
                let allow = settings.prompter == Prompter::Allow;
                let (record, _) = rules::answered(app.platform, def, allow, ask.system);
                // The record is written and synced off the async workers.
                let this = self.clone();
                let written = tokio::task::spawn_blocking(move || this.set_consent(key, record, "prompt", by)).await;
                written.map_err(|e| ServiceError::Io(std::io::Error::other(e.to_string())))??;
                return Ok(Prompted::Answered(allow));
            }
            Prompter::Pending | Prompter::Webhook(_) => {}
        }
        let shown = app.name.as_deref().unwrap_or(&app.id);
        let (title, text) = def.prompt(shown);
        let (view, mut settled, expires, fresh) = {
            let mut prompts = lock(&self.prompts);
            let now = Instant::now();
            prompts.retain(|_, pending| pending.expires > now);
            let existing = prompts.values().find(|p| {
                (p.view.app.as_str(), p.view.user.as_str(), p.view.scope.as_str()) == (&key.0, &key.1, &key.2)
            });
            match existing {
                Some(pending) => (pending.view.clone(), pending.settled.subscribe(), pending.expires, false),
                None if prompts.len() >= MAX_PENDING_PROMPTS => {
                    return Ok(Prompted::Failed(format!("{MAX_PENDING_PROMPTS} prompts are already waiting")));
                }
                None if prompts.values().filter(|p| p.view.app == key.0).count() >= MAX_PENDING_PROMPTS_PER_APP => {
                    let message = format!("{MAX_PENDING_PROMPTS_PER_APP} prompts of app {} are already waiting", key.0);
                    return Ok(Prompted::Failed(message));
                }
                None => {
                    let id = random_hex(8)?;
                    let expires = now + settings.prompt_timeout;
                    let view = PromptView {
                        id: id.clone(),
                        app: key.0.clone(),
                        user: key.1.clone(),
                        scope: key.2.clone(),
                        title,
                        text,
                        expires_in: settings.prompt_timeout.as_secs(),
                    };
                    let (settled, receiver) = watch::channel(None);
                    prompts.insert(id, Pending { view: view.clone(), expires, settled });
                    (view, receiver, expires, true)
                }
            }
        };
        if let (true, Prompter::Webhook(url)) = (fresh, &settings.prompter) {
            let service = self.clone();
            let (url, view) = (url.clone(), view.clone());
            tokio::spawn(async move {
                match ask_webhook(&url, &view, expires).await {
                    Ok(allow) => drop(service.settle(&view.id, allow, "webhook")),
                    Err(Some(why)) => service.fail(&view.id, why),
                    // out of time: the prompt times out by itself, and nothing is recorded
                    Err(None) => {}
                }
            });
        }
        let Some(_waiting) = ask.wait.then(|| self.waiting.try_acquire().ok()).flatten() else {
            return Ok(Prompted::Open(view));
        };
        let waited = tokio::time::timeout_at(expires, settled.wait_for(Option::is_some)).await;
        let outcome = match waited.map(|value| value.map(|v| v.clone())) {
            Ok(Ok(value)) => value,
            _ => {
                // Timed out: withdraw the prompt unless an answer won the race.
                let removed = lock(&self.prompts).remove(&view.id).is_some();
                if removed { None } else { settled.borrow().clone() }
            }
        };
        Ok(match outcome {
            Some(Ok(allow)) => Prompted::Answered(allow),
            Some(Err(why)) => Prompted::Failed(why),
            None => Prompted::TimedOut,
        })
    }

    /// Answer a pending prompt (a rig, the container, or the webhook): record the consent,
    /// then wake whoever waits. `None` when no such prompt is waiting (answered, timed out).
    pub fn settle(&self, id: &str, allow: bool, by: &str) -> Option<Result<PromptView, ServiceError>> {
        let pending = {
            let mut prompts = lock(&self.prompts);
            let now = Instant::now();
            prompts.retain(|_, pending| pending.expires > now);
            prompts.remove(id)?
        };
        let view = pending.view;
        let key = (view.app.clone(), view.user.clone(), view.scope.clone());
        // Every platform records the answer; the rules read a denial per platform.
        let record = if allow { Consent::Granted } else { Consent::Denied };
        if let Err(e) = self.set_consent(key, record, "prompt", by) {
            pending.settled.send_replace(Some(Err(e.to_string())));
            return Some(Err(e.into()));
        }
        pending.settled.send_replace(Some(Ok(allow)));
        Some(Ok(view))
    }

    fn fail(&self, id: &str, why: String) {
        if let Some(pending) = lock(&self.prompts).remove(id) {
            pending.settled.send_replace(Some(Err(why)));
        }
    }

    /// `GET /v1/scopes/prompts`: the prompts waiting, oldest first (of `app`, when given).
    pub fn prompts(&self, app: Option<&str>) -> Vec<PromptView> {
        let now = Instant::now();
        let mut prompts = lock(&self.prompts);
        prompts.retain(|_, pending| pending.expires > now);
        let mut listed: Vec<(Instant, PromptView)> = prompts
            .values()
            .filter(|p| app.is_none_or(|app| p.view.app == app))
            .map(|p| {
                let mut view = p.view.clone();
                view.expires_in = p.expires.saturating_duration_since(now).as_secs();
                (p.expires, view)
            })
            .collect();
        listed.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.id.cmp(&b.1.id)));
        listed.into_iter().map(|(_, view)| view).collect()
    }

    /// `GET /v1/scopes/settings` (getSetting): every scope of the app's platform and its state.
    pub fn settings(&self, config: &Config, app: &str, user: &str) -> Result<serde_json::Value, ServiceError> {
        let app = config.policy.app(app).ok_or_else(|| ServiceError::UnknownApp(app.to_owned()))?;
        let profile = config.scopes.profiles.get(app.platform);
        let scopes: serde_json::Map<String, serde_json::Value> = profile
            .scopes()
            .iter()
            .map(|def| {
                let state = rules::shown_state(def, self.consent(&app.id, user, &def.name));
                (def.name.to_string(), state.as_str().into())
            })
            .collect();
        Ok(serde_json::json!({
            "app": app.id.as_ref(),
            "user": user,
            "platform": app.platform.as_str(),
            "permission_control": app.action.as_str(),
            "scopes": scopes,
        }))
    }

    /// `PUT /v1/scopes/settings` (openSetting): the user changes one scope.
    pub fn change_setting(
        &self,
        config: &Config,
        app: &str,
        user: &str,
        scope: &str,
        state: Consent,
        by: &str,
    ) -> Result<serde_json::Value, ServiceError> {
        let found = config.policy.app(app).ok_or_else(|| ServiceError::UnknownApp(app.to_owned()))?;
        let def = config
            .scopes
            .profiles
            .get(found.platform)
            .scope(scope)
            .ok_or_else(|| ServiceError::UnknownScope { platform: found.platform, scope: scope.to_owned() })?;
        if def.silent {
            return Err(ServiceError::Invalid(format!("{scope} is silent: always granted, never changed")));
        }
        self.set_consent((app.to_owned(), user.to_owned(), scope.to_owned()), state, "setting", by)?;
        self.settings(config, app, user)
    }

    /// `GET /v1/scopes/history`: consent changes of `app` (and `user`), newest first.
    pub fn history(&self, app: &str, user: Option<&str>) -> std::io::Result<Vec<ConsentChange>> {
        let mut changes: Vec<ConsentChange> = self
            .history
            .read_all::<ConsentChange>()?
            .into_iter()
            .filter(|c| c.app == app && user.is_none_or(|user| c.user == user))
            .collect();
        // A change whose file write failed did not happen: both its lines are left out.
        let failed: std::collections::HashSet<(String, String, String)> = changes
            .iter()
            .filter(|c| c.outcome == "write_failed")
            .map(|c| (c.time.clone(), c.user.clone(), c.scope.clone()))
            .collect();
        changes
            .retain(|c| c.outcome == "applied" && !failed.contains(&(c.time.clone(), c.user.clone(), c.scope.clone())));
        changes.reverse();
        Ok(changes)
    }

    /// `POST /v1/auth-codes` (getAuthCode): consent for every user-information scope asked,
    /// prompting as needed, then a single-use code bound to (app, user, scopes).
    pub async fn issue_code(
        self: &Arc<Self>,
        config: &Config,
        ask: &Ask,
        scopes: &[String],
    ) -> Result<serde_json::Value, ServiceError> {
        let app = config.policy.app(&ask.app).ok_or_else(|| ServiceError::UnknownApp(ask.app.clone()))?;
        if app.platform != Platform::Superapp {
            let message = format!("auth codes are SuperApp's getAuthCode; app {} is on {}", app.id, app.platform);
            return Err(ServiceError::Invalid(message));
        }
        if scopes.is_empty() {
            return Err(ServiceError::Invalid("name at least one scope".to_owned()));
        }
        let profile = config.scopes.profiles.get(app.platform);
        let mut defs = Vec::with_capacity(scopes.len());
        for scope in scopes {
            let def = profile
                .scope(scope)
                .ok_or_else(|| ServiceError::UnknownScope { platform: app.platform, scope: scope.clone() })?;
            if def.fields.is_empty() {
                return Err(ServiceError::Invalid(format!("{scope} is not a user-information scope")));
            }
            defs.push(def);
        }
        if !config.scopes.users.contains(&ask.user) {
            return Err(ServiceError::UnknownUser(ask.user.clone()));
        }
        let mut prompted = false;
        for def in defs {
            let answer = self.ask_scope(config, app, ask, def).await?;
            prompted |= answer.prompted;
            self.count(&app.id, Some(&def.name), &answer);
            if answer.decision != "allow" {
                tracing::info!(app = %app.id, user = ask.user, scope = %def.name, decision = answer.decision, reason = answer.reason, "auth code refused");
                let mut value = serde_json::to_value(&answer).unwrap_or_default();
                value["prompted"] = prompted.into();
                return Ok(value);
            }
        }
        let code = random_hex(32)?;
        let ttl = config.scopes.code_ttl;
        {
            let mut codes = lock(&self.codes);
            let now = Instant::now();
            codes.retain(|_, code| code.expires > now);
            // One user's codes are few: asking again voids the oldest, so no caller can fill
            // the table that every app shares.
            let mut theirs: Vec<(String, Instant)> = codes
                .iter()
                .filter(|(_, code)| code.app == *app.id && code.user == ask.user)
                .map(|(key, code)| (key.clone(), code.expires))
                .collect();
            if theirs.len() >= MAX_AUTH_CODES_PER_USER {
                theirs.sort_by_key(|(_, expires)| *expires);
                for (key, _) in theirs.iter().take(theirs.len() + 1 - MAX_AUTH_CODES_PER_USER) {
                    codes.remove(key);
                }
            }
            if codes.len() >= MAX_AUTH_CODES {
                return Err(ServiceError::TooManyCodes);
            }
            let entry = AuthCode {
                app: app.id.to_string(),
                user: ask.user.clone(),
                scopes: scopes.to_vec(),
                expires: now + ttl,
            };
            codes.insert(code.clone(), entry);
        }
        tracing::info!(app = %app.id, user = ask.user, scopes = scopes.join(","), "auth code issued");
        Ok(serde_json::json!({
            "decision": "allow",
            "reason": "scope_granted",
            "app": app.id.as_ref(),
            "user": ask.user,
            "scopes": scopes,
            "prompted": prompted,
            "code": code,
            "expires_in": ttl.as_secs_f64().ceil() as u64,
        }))
    }

    /// `POST /v1/auth-codes/exchange`: the consented fields of the code's user, once. The
    /// secret is checked first (in constant time), so a caller without it cannot burn codes;
    /// a code presented by another app that knows its own secret is void from then on.
    pub fn exchange(
        &self,
        config: &Config,
        app_id: &str,
        secret: &str,
        code: &str,
    ) -> Result<serde_json::Value, ExchangeError> {
        let secret_ok = config
            .policy
            .app(app_id)
            .and_then(|app| app.secret.as_deref())
            // Digests of equal length: the comparison tells nothing of the secret's length.
            .is_some_and(|expected| {
                let (expected, given) = (crate::config::token_sha256(expected), crate::config::token_sha256(secret));
                bool::from(expected.ct_eq(&given))
            });
        if !secret_ok {
            return Err(ExchangeError::BadSecret);
        }
        let issued = lock(&self.codes).remove(code).ok_or(ExchangeError::UnknownCode)?;
        if issued.app != app_id {
            tracing::warn!(
                app = app_id,
                issued_to = issued.app,
                "an auth code of another app was presented; it is void"
            );
            return Err(ExchangeError::OtherApp);
        }
        if Instant::now() >= issued.expires {
            return Err(ExchangeError::Expired);
        }
        let app = config.policy.app(app_id).ok_or(ExchangeError::BadSecret)?;
        let profile = config.scopes.profiles.get(app.platform);
        let fields: BTreeSet<rules::UserField> =
            issued.scopes.iter().filter_map(|s| profile.scope(s)).flat_map(|def| def.fields.iter().copied()).collect();
        let values: serde_json::Map<String, serde_json::Value> = fields
            .into_iter()
            .filter_map(|field| {
                config.scopes.users.field(&issued.user, field).map(|v| (field.as_str().to_owned(), v.into()))
            })
            .collect();
        tracing::info!(app = app_id, user = issued.user, scopes = issued.scopes.join(","), "auth code exchanged");
        Ok(serde_json::json!({ "app": app_id, "user": issued.user, "scopes": issued.scopes, "fields": values }))
    }
}

/// Ask the webhook about a prompt: `POST {app,user,scope,title,text}`, answer
/// `{"answer":"allow"|"deny"}`, all before `deadline`; `Err(None)` when time ran out.
async fn ask_webhook(url: &WebhookUrl, prompt: &PromptView, deadline: Instant) -> Result<bool, Option<String>> {
    #[derive(Deserialize)]
    struct WebhookAnswer {
        answer: String,
    }
    let body = serde_json::json!({
        "id": prompt.id,
        "app": prompt.app,
        "user": prompt.user,
        "scope": prompt.scope,
        "title": prompt.title,
        "text": prompt.text,
    });
    let asked = async {
        let stream = tokio::net::TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(|e| format!("cannot connect to the webhook: {e}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("webhook handshake: {e}"))?;
        let driver = tokio::spawn(connection);
        let authority = if url.host.contains(':') {
            format!("[{}]:{}", url.host, url.port)
        } else {
            format!("{}:{}", url.host, url.port)
        };
        let request = Request::post(url.path.as_str())
            .header(HOST, authority)
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| format!("webhook request: {e}"))?;
        let response = sender.send_request(request).await.map_err(|e| format!("webhook request failed: {e}"));
        let result = async {
            let response = response?;
            let status = response.status();
            let bytes = Limited::new(response.into_body(), MAX_WEBHOOK_ANSWER)
                .collect()
                .await
                .map_err(|e| format!("webhook answer: {e}"))?
                .to_bytes();
            if !status.is_success() {
                return Err(format!("the webhook answered {status}"));
            }
            let answer: WebhookAnswer = serde_json::from_slice(&bytes)
                .map_err(|e| format!("the webhook's answer is not {{\"answer\"}}: {e}"))?;
            match answer.answer.as_str() {
                "allow" => Ok(true),
                "deny" => Ok(false),
                other => Err(format!("the webhook answered {other:?}, not allow or deny")),
            }
        }
        .await;
        driver.abort();
        result
    };
    match tokio::time::timeout_at(deadline, asked).await {
        Ok(result) => result.map_err(Some),
        Err(_) => Err(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path) -> Settings {
        Settings::defaults(&dir.join("gateway.toml"))
    }

    fn counter() -> IntCounterVec {
        IntCounterVec::new(prometheus::Opts::new("t", "t"), &["app", "scope", "decision"]).unwrap()
    }

    #[test]
    fn a_change_is_in_the_history_and_the_file_before_it_is_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let service = ScopeService::open(&settings(dir.path()), counter()).unwrap();
        let key = ("wx".to_owned(), "u".to_owned(), "scope.userLocation".to_owned());
        assert_eq!(service.set_consent(key.clone(), Consent::Denied, "prompt", "deny").unwrap(), Consent::NotAsked);
        assert_eq!(service.set_consent(key.clone(), Consent::Denied, "prompt", "deny").unwrap(), Consent::Denied);
        use std::os::unix::fs::PermissionsExt;
        let file = dir.path().join("consent.json");
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        let reopened = ScopeService::open(&settings(dir.path()), counter()).unwrap();
        assert_eq!(reopened.consent("wx", "u", "scope.userLocation"), Consent::Denied);
        assert_eq!(reopened.consent("wx", "other", "scope.userLocation"), Consent::NotAsked);
        service.set_consent(key, Consent::NotAsked, "setting", "ed").unwrap();
        let history = service.history("wx", Some("u")).unwrap();
        let seen: Vec<(Consent, Consent, &str)> =
            history.iter().map(|c| (c.before, c.after, c.cause.as_str())).collect();
        assert_eq!(
            seen,
            [(Consent::Denied, Consent::NotAsked, "setting"), (Consent::NotAsked, Consent::Denied, "prompt")]
        );
        assert_eq!(history_path(&file), dir.path().join("consent.history.jsonl"));
        let text = std::fs::read_to_string(&file).unwrap();
        assert_eq!(serde_json::from_str::<serde_json::Value>(&text).unwrap(), serde_json::json!({ "consents": [] }));
    }

    #[test]
    fn a_consent_file_that_is_not_json_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("consent.json"), "{\"consents\": [").unwrap();
        let err = ScopeService::open(&settings(dir.path()), counter()).err().unwrap();
        assert!(err.to_string().contains("consent.json is not readable JSON"), "{err}");
    }

    #[test]
    fn a_failed_write_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = settings(dir.path());
        settings.consent_file = dir.path().join("missing-dir/consent.json");
        let service = ScopeService {
            history: AuditLog::at(dir.path().join("h.jsonl")),
            ..ScopeService::open(&settings, counter()).unwrap()
        };
        let key = ("a".to_owned(), "u".to_owned(), "camera".to_owned());
        assert!(service.set_consent(key, Consent::Granted, "setting", "ed").is_err());
        assert_eq!(service.consent("a", "u", "camera"), Consent::NotAsked);
        assert!(service.history("a", None).unwrap().is_empty(), "it did not happen");
        let lines = std::fs::read_to_string(dir.path().join("h.jsonl")).unwrap();
        assert!(lines.contains("\"outcome\":\"write_failed\""), "{lines}");
    }
}
