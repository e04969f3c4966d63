//! `/v1/apps/{id}…`: reading and changing one app through the [`Store`].
//!
//! Every write takes the same steps, one write at a time: find where the app is defined
//! (apps outside the store's own files are read-only: `409` naming the file), check the
//! request's precondition against the app's revision (`If-Match`, `If-None-Match: *`), build
//! the new app, validate the whole config as it would be with check's rules (`422` with every
//! error as a field path), and, unless it is a dry run, write it and reload: the answer comes
//! once the change is in force, with the generation that carries it.

// A refusal is the response itself; these run once per admin request, far from the hot path.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{ETAG, HeaderValue, IF_MATCH, IF_NONE_MATCH};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::{Body, error, json_response, method_not_allowed, read_body};
use crate::audit::Record;
use crate::config::ConfigErrors;
use crate::policy::Action;
use crate::proxy::Shared;
use crate::reload::{Reloader, Trigger};
use crate::store::{AppDoc, EntryDoc, Place, Store, Stored, WriteError};

/// One write at a time: a precondition is checked and the write made under the same lock.
pub(crate) type WriteLock = tokio::sync::Mutex<()>;

/// The lists an entry can be added to, edited in and deleted from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum List {
    ServerDomains,
    WebviewDomains,
    ApiWhitelist,
}

impl List {
    fn parse(raw: &str) -> Option<List> {
        match raw {
            "server_domains" => Some(List::ServerDomains),
            "webview_domains" => Some(List::WebviewDomains),
            "api_whitelist" => Some(List::ApiWhitelist),
            _ => None,
        }
    }
}

/// What a request asks of the app's revision.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Precondition {
    None,
    /// `If-None-Match: *`: the app must not exist.
    Absent,
    /// `If-Match: "N"` (or `"N-<hash>"` for an app changed by hand): the entity tag, unquoted.
    Tag(String),
}

fn precondition(req: &Request<Incoming>) -> Result<Precondition, Response<Body>> {
    if req.headers().get(IF_NONE_MATCH).is_some_and(|v| v.as_bytes() == b"*") {
        return Ok(Precondition::Absent);
    }
    let Some(value) = req.headers().get(IF_MATCH) else { return Ok(Precondition::None) };
    let text = value.to_str().unwrap_or("").trim().trim_matches('"');
    let (revision, hash) = text.split_once('-').unwrap_or((text, ""));
    let valid = revision.parse::<u64>().is_ok()
        && (hash.is_empty() || (hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit())));
    if !valid {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "If-Match takes the app's ETag as GET shows it: \"N\" (or \"N-<hash>\")",
        ));
    }
    Ok(Precondition::Tag(text.to_owned()))
}

fn etag(tag: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{tag}\"")).expect("digits, a dash, hex and quotes")
}

/// An app as answered: the document, its revision, and (after a write) the generation.
fn app_response(status: StatusCode, stored: &Stored, generation: Option<u64>) -> Response<Body> {
    let mut value = serde_json::to_value(&stored.doc).unwrap_or_default();
    value["revision"] = json!(stored.revision);
    if let Some(generation) = generation {
        value["generation"] = json!(generation);
    }
    let mut response = json_response(status, &value);
    response.headers_mut().insert(ETAG, etag(&stored.tag()));
    response
}

fn store(reloader: &Reloader) -> Arc<dyn Store> {
    reloader.store()
}

/// Run `f` on the store off the async workers: its reads and writes are file (or database)
/// I/O, some of it synced, and must not hold up the proxy's tasks.
async fn off<T: Send + 'static>(store: &Arc<dyn Store>, f: impl FnOnce(&dyn Store) -> T + Send + 'static) -> T {
    let store = store.clone();
    match tokio::task::spawn_blocking(move || f(store.as_ref())).await {
        Ok(value) => value,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// `GET /v1/apps/{id}` for an app the store can write: its document and revision. `None`
/// for apps it cannot (the caller shows the policy's view).
pub(crate) async fn get(reloader: &Reloader, policy: &crate::policy::Policy, id: &str) -> Option<Response<Body>> {
    // Never a path outside apps_dir; and an app the policy in force does not know is not
    // looked for in every file of the store (a hostile client could ask for many).
    if !crate::policy::is_valid_app_id(id) || policy.app(id).is_none() {
        return None;
    }
    let id = id.to_owned();
    match off(&store(reloader), move |store| store.place(&id)).await {
        Ok(Place::Writable(stored)) => Some(app_response(StatusCode::OK, &stored, None)),
        _ => None,
    }
}

/// The config as it would be with the draft app `doc` saved (nothing is saved): what
/// `POST /v1/check` decides a draft against, or `422` with its errors as field paths.
pub(crate) async fn draft(reloader: &Reloader, doc: AppDoc) -> Result<crate::config::Config, Response<Body>> {
    if !crate::policy::is_valid_app_id(&doc.id) {
        return Err(error(StatusCode::BAD_REQUEST, "a draft app needs an id: 1 to 64 characters of A-Z a-z 0-9 _ - ."));
    }
    let store = store(reloader);
    let id = doc.id.clone();
    if let Ok(Place::ReadOnly(file)) = off(&store, move |store| store.place(&id)).await {
        return Err(read_only(&doc.id, &file));
    }
    let rendered = store.render(&doc.id, Some(&doc), 1);
    let change = vec![(rendered.file.clone(), rendered.text.clone())];
    reloader.check_candidate(change).await.map_err(|errors| invalid(&errors, &rendered))
}

/// Who is writing, for the audit record.
pub(crate) struct Who {
    pub user: String,
    pub client: String,
}

/// `GET /v1/apps/{id}/history`: the app's applied changes, newest first.
pub(crate) async fn history(reloader: &Reloader, id: &str) -> Response<Body> {
    if !crate::policy::is_valid_app_id(id) {
        return error(StatusCode::NOT_FOUND, &format!("no app {id:?}"));
    }
    let owned = id.to_owned();
    match off(&store(reloader), move |store| store.history(&owned)).await {
        Ok(records) => {
            // Consent changes are kept apart (they are the users', not the app's), and linked here.
            let consents = format!("/v1/scopes/history?app={id}");
            json_response(StatusCode::OK, &json!({ "revisions": records, "consent_history": consents }))
        }
        Err(e) => store_failed("cannot read the app's history", &e),
    }
}

/// How long a client is asked to wait before writing again while the store is unreachable.
const STORE_RETRY_AFTER_SECONDS: u32 = 5;

/// `503` with `Retry-After` when the store cannot be reached (the database is down: the policy
/// in force stays, and writes wait until it is back), `500` for any other failure.
fn store_failed(what: &str, e: &std::io::Error) -> Response<Body> {
    if e.kind() == std::io::ErrorKind::NotConnected {
        let message = format!("{what}: the store cannot be reached ({e}); the policy in force stays, try again later");
        let mut response = error(StatusCode::SERVICE_UNAVAILABLE, &message);
        response.headers_mut().insert(hyper::header::RETRY_AFTER, HeaderValue::from(STORE_RETRY_AFTER_SECONDS));
        return response;
    }
    error(StatusCode::INTERNAL_SERVER_ERROR, &format!("{what}: {e}"))
}

/// `409` for an app defined where the store does not write.
fn read_only(id: &str, file: &std::path::Path) -> Response<Body> {
    let message = format!(
        "app {id:?} is defined in {}, which the admin API does not write: move its [[app]] table to \
         apps_dir/{id}.toml (one app per file) to manage it here",
        file.display()
    );
    error(StatusCode::CONFLICT, &message)
}

/// Route a write under `/v1/apps/{id}`; `rest` is what follows the id.
pub(crate) async fn write(
    req: Request<Incoming>,
    shared: &Shared,
    reloader: &Reloader,
    lock: &WriteLock,
    who: &Who,
    id: &str,
    rest: &str,
) -> Response<Body> {
    let method = req.method().clone();
    let segments: Vec<&str> = if rest.is_empty() { Vec::new() } else { rest.split('/').collect() };
    // The method first: a request this path never takes is 405 whatever else it carries.
    let allow = match segments.as_slice() {
        [] => "GET, PUT, DELETE",
        ["action"] => "PUT",
        ["rollback"] => "POST",
        ["history" | "decisions"] => "GET",
        [list] | [list, _] if List::parse(list).is_none() => {
            return error(StatusCode::NOT_FOUND, &format!("no list {list:?}"));
        }
        [_] => "POST",
        [_, _] => "PUT, DELETE",
        _ => return error(StatusCode::NOT_FOUND, &format!("no admin path under /v1/apps/{id}/")),
    };
    if !allow.split(", ").any(|allowed| allowed == method.as_str()) {
        return method_not_allowed(&method, allow);
    }
    let mut dry_run = false;
    for (key, value) in url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
        match (&*key, &*value) {
            ("dry_run", "true") => dry_run = true,
            ("dry_run", "false") => dry_run = false,
            ("dry_run", _) => return error(StatusCode::BAD_REQUEST, "dry_run is true or false"),
            _ => {}
        }
    }
    let pre = match precondition(&req) {
        Ok(pre) => pre,
        Err(refusal) => return refusal,
    };
    let body = match read_body(req).await {
        Ok(body) => body,
        Err(refusal) => return refusal,
    };
    let change: Change = match (&method, segments.as_slice()) {
        (&Method::PUT, []) => match parse::<AppDoc>(&body) {
            Ok(doc) if !doc.id.is_empty() && doc.id != id => {
                return error(StatusCode::BAD_REQUEST, &format!("the body names app {:?}, the path {id:?}", doc.id));
            }
            Ok(doc) => Change::Replace(doc),
            Err(refusal) => return refusal,
        },
        (&Method::DELETE, []) => Change::Delete,
        (&Method::PUT, ["action"]) => match parse::<ActionBody>(&body) {
            Ok(body) => Change::Action(body.action),
            Err(refusal) => return refusal,
        },
        (&Method::POST, ["rollback"]) => match parse::<RollbackBody>(&body) {
            Ok(RollbackBody { revision }) => {
                let owned = id.to_owned();
                let found = match off(&store(reloader), move |store| store.history(&owned)).await {
                    Ok(records) => records.into_iter().find(|r| r.revision == Some(revision)),
                    Err(e) => return store_failed("cannot read the app's history", &e),
                };
                match found {
                    Some(record) => Change::Rollback(record.after.map(Box::new)),
                    None => return error(StatusCode::NOT_FOUND, &format!("no revision {revision} of app {id:?}")),
                }
            }
            Err(refusal) => return refusal,
        },
        (&Method::POST, [list]) => match (List::parse(list), parse::<EntryBody>(&body)) {
            (Some(list), Ok(EntryBody { entry: Some(entry), remark })) => Change::Add(list, entry, remark),
            (Some(_), Ok(_)) => return error(StatusCode::BAD_REQUEST, "send {\"entry\", \"remark\"?}"),
            (Some(_), Err(refusal)) => return refusal,
            (None, _) => return error(StatusCode::NOT_FOUND, &format!("no list {list:?}")),
        },
        (&Method::PUT | &Method::DELETE, [list, entry]) => {
            let Some(list) = List::parse(list) else {
                return error(StatusCode::NOT_FOUND, &format!("no list {list:?}"));
            };
            let entry = percent_encoding::percent_decode_str(entry).decode_utf8_lossy().into_owned();
            if method == Method::DELETE {
                Change::Remove(list, entry)
            } else {
                match parse::<EntryBody>(&body) {
                    Ok(edit) => Change::Edit(list, entry, edit),
                    Err(refusal) => return refusal,
                }
            }
        }
        _ => return method_not_allowed(&method, allow),
    };
    apply(Write { shared, reloader, who, id, pre, dry_run }, lock, change).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    revision: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    action: Action,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryBody {
    entry: Option<String>,
    #[serde(default, deserialize_with = "some_or_null")]
    remark: Option<Option<String>>,
}

fn some_or_null<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(de).map(Some)
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, Response<Body>> {
    serde_json::from_slice(body).map_err(|e| error(StatusCode::BAD_REQUEST, &format!("malformed JSON: {e}")))
}

/// What a write does to the app.
enum Change {
    Replace(AppDoc),
    Delete,
    Action(Action),
    /// Add an entry (with a remark) to a list.
    Add(List, String, Option<Option<String>>),
    /// Edit the entry of a list that is now the given value: its value and/or remark.
    Edit(List, String, EntryBody),
    Remove(List, String),
    /// Restore the app as a revision left it (`None`: it was deleted then).
    Rollback(Option<Box<AppDoc>>),
}

impl Change {
    /// The word the audit record and `gateway_app_changes_total` use.
    fn kind(&self, exists: bool) -> &'static str {
        match self {
            Change::Replace(_) if exists => "replace",
            Change::Replace(_) => "create",
            Change::Delete => "delete",
            Change::Action(_) => "action",
            Change::Add(..) => "add",
            Change::Edit(..) => "edit",
            Change::Remove(..) => "remove",
            Change::Rollback(_) => "rollback",
        }
    }
}

/// The entries of `list`.
fn entries(doc: &mut AppDoc, list: List) -> &mut Vec<EntryDoc> {
    match list {
        List::ServerDomains => &mut doc.server_domains,
        List::WebviewDomains => &mut doc.webview_domains,
        List::ApiWhitelist => &mut doc.api_whitelist,
    }
}

fn position(entries: &[EntryDoc], value: &str) -> Option<usize> {
    entries.iter().position(|entry| entry.value == value)
}

/// The new app (or `None` to delete it) that `change` makes of `current`, or the refusal.
fn changed(id: &str, current: Option<&AppDoc>, change: Change) -> Result<Option<AppDoc>, Response<Body>> {
    let missing = || error(StatusCode::NOT_FOUND, &format!("no app {id:?}"));
    let gone = |value: &str| error(StatusCode::NOT_FOUND, &format!("{value:?} is no longer on the list"));
    match change {
        Change::Replace(mut doc) => {
            doc.id = id.to_owned();
            doc.token = Some(doc.token_after(current));
            doc.secret = Some(doc.secret_after(current));
            Ok(Some(doc))
        }
        Change::Delete => current.map(|_| None).ok_or_else(missing),
        Change::Rollback(None) => current.map(|_| None).ok_or_else(missing),
        Change::Rollback(Some(doc)) => {
            let mut doc = *doc;
            doc.id = id.to_owned();
            doc.token = None; // a record holds no token: the current one stays
            doc.token = Some(doc.token_after(current));
            doc.secret = None; // nor a secret
            doc.secret = Some(doc.secret_after(current));
            Ok(Some(doc))
        }
        Change::Action(action) => {
            let mut doc = current.cloned().ok_or_else(missing)?;
            doc.action = Some(action);
            Ok(Some(doc))
        }
        Change::Add(list, value, remark) => {
            let mut doc = current.cloned().ok_or_else(missing)?;
            let entries = entries(&mut doc, list);
            if position(entries, &value).is_some() {
                return Err(error(StatusCode::CONFLICT, &format!("{value:?} is already on the list")));
            }
            entries.push(EntryDoc { value, remark: remark.flatten() });
            Ok(Some(doc))
        }
        Change::Edit(list, value, edit) => {
            let mut doc = current.cloned().ok_or_else(missing)?;
            let entries = entries(&mut doc, list);
            let index = position(entries, &value).ok_or_else(|| gone(&value))?;
            let entry = &mut entries[index];
            if let Some(new) = edit.entry {
                entry.value = new;
            }
            if let Some(remark) = edit.remark {
                entry.remark = remark;
            }
            Ok(Some(doc))
        }
        Change::Remove(list, value) => {
            let mut doc = current.cloned().ok_or_else(missing)?;
            let entries = entries(&mut doc, list);
            let index = position(entries, &value).ok_or_else(|| gone(&value))?;
            entries.remove(index);
            Ok(Some(doc))
        }
    }
}

/// One write request: who asks what of which app.
struct Write<'a> {
    shared: &'a Shared,
    reloader: &'a Reloader,
    who: &'a Who,
    id: &'a str,
    pre: Precondition,
    dry_run: bool,
}

impl Write<'_> {
    /// The record of this request's change with `outcome`.
    fn record(
        &self,
        kind: &str,
        outcome: &str,
        revision: Option<u64>,
        before: Option<&AppDoc>,
        after: Option<&AppDoc>,
    ) -> Record {
        Record {
            time: Record::now(),
            app: self.id.to_owned(),
            revision,
            user: self.who.user.clone(),
            client: self.who.client.clone(),
            change: kind.to_owned(),
            outcome: outcome.to_owned(),
            before: before.cloned(),
            after: after.cloned(),
        }
    }

    /// Keep the record of an attempt that changed nothing (a failure to keep it is logged by
    /// the store: the answer is the refusal either way).
    async fn note(&self, store: &Arc<dyn Store>, kind: &str, outcome: &str, revision: Option<u64>) {
        let record = self.record(kind, outcome, revision, None, None);
        let _ = off(store, move |store| store.note(&record)).await;
    }
}

async fn apply(write: Write<'_>, lock: &WriteLock, change: Change) -> Response<Body> {
    let Write { shared, reloader, who, id, dry_run, .. } = write;
    let pre = write.pre.clone();
    if !crate::policy::is_valid_app_id(id) {
        return error(StatusCode::BAD_REQUEST, "an app id is 1 to 64 characters of A-Z a-z 0-9 _ - .");
    }
    let _one_at_a_time = lock.lock().await;
    let store = &store(reloader);
    let owned = id.to_owned();
    let current = match off(store, move |store| store.place(&owned)).await {
        Ok(Place::Writable(stored)) => Some(*stored),
        Ok(Place::Free) => None,
        Ok(Place::ReadOnly(file)) => return read_only(id, &file),
        Err(e) => return store_failed("cannot read the app", &e),
    };
    let revision = current.as_ref().map(|stored| stored.revision);
    let stale = |current: Option<&Stored>| {
        let mut response = json_response(
            StatusCode::PRECONDITION_FAILED,
            &json!({
                "error": "the app changed since that revision (or does not exist)",
                "revision": current.map(|stored| stored.revision),
            }),
        );
        if let Some(current) = current {
            response.headers_mut().insert(ETAG, etag(&current.tag()));
        }
        response
    };
    let whole = matches!(change, Change::Replace(_) | Change::Delete);
    let kind = change.kind(current.is_some());
    let before = current.as_ref().map(|stored| &stored.doc);
    match (&pre, &current) {
        (Precondition::Absent, Some(found)) => {
            write.note(store, kind, "precondition_failed", revision).await;
            return stale(Some(found));
        }
        (Precondition::Tag(tag), Some(found)) if *tag != found.tag() => {
            write.note(store, kind, "precondition_failed", revision).await;
            return stale(Some(found));
        }
        (Precondition::Tag(_), None) => {
            write.note(store, kind, "precondition_failed", None).await;
            return stale(None);
        }
        (Precondition::None, _) if whole => {
            let message = "a whole-app write needs a precondition: If-Match: \"<revision>\" to replace or delete, \
                           If-None-Match: * to create";
            return error(StatusCode::PRECONDITION_REQUIRED, message);
        }
        _ => {}
    }
    let created = current.is_none() || matches!(change, Change::Add(..));
    let no_content = matches!(change, Change::Delete | Change::Remove(..));
    let doc = match changed(id, before, change) {
        Ok(doc) => doc,
        Err(refusal) => {
            write.note(store, kind, "refused", revision).await;
            return refusal;
        }
    };
    let (owned, read) = (id.to_owned(), current.clone());
    let next = match off(store, move |store| store.next_revision(&owned, read.as_ref())).await {
        Ok(next) => next,
        Err(e) => return store_failed("cannot read the app's history", &e),
    };
    if let Some(doc) = &doc
        && doc.has_token
        && doc.token.as_ref().is_none_or(Option::is_none)
    {
        // A rollback or import of an app that had a token, where none is left to keep.
        write.note(store, kind, "refused", revision).await;
        let message = "the app had a token, which records do not keep: send it (\"token\") to restore the app";
        return error(StatusCode::UNPROCESSABLE_ENTITY, message);
    }
    let rendered = store.render(id, doc.as_ref(), next);
    if let Err(errors) = reloader.check_candidate(vec![(rendered.file.clone(), rendered.text.clone())]).await {
        write.note(store, kind, "invalid", revision).await;
        return invalid(&errors, &rendered);
    }
    let shown = doc.map(|mut doc| {
        doc.has_token = doc.token.as_ref().is_some_and(Option::is_some);
        doc.has_secret = doc.secret.as_ref().is_some_and(Option::is_some);
        Stored { doc, revision: next, text: String::new(), edited: None }
    });
    if dry_run {
        write.note(store, kind, "dry_run", Some(next)).await;
        let mut value = shown.as_ref().map(|s| serde_json::to_value(&s.doc).unwrap_or_default()).unwrap_or(json!(null));
        if let Some(stored) = &shown {
            value["revision"] = json!(stored.revision);
        }
        return json_response(StatusCode::OK, &json!({ "dry_run": true, "app": value }));
    }
    let record = write.record(kind, "applied", Some(next), before, shown.as_ref().map(|stored| &stored.doc));
    let (to_put, read) = (rendered.clone(), current.clone());
    match off(store, move |store| store.put(&to_put, read.as_ref(), &record)).await {
        Ok(()) => {}
        Err(WriteError::Changed) => {
            write.note(store, kind, "conflict", revision).await;
            let message = "the app's file changed since it was read (an edit by hand?): read it again and retry";
            return error(StatusCode::CONFLICT, message);
        }
        Err(WriteError::Io(e)) => return store_failed("the change was not made", &e),
    }
    shared.metrics.app_changes.with_label_values(&[kind]).inc();
    tracing::info!(app = id, change = kind, revision = next, user = %who.user, client = %who.client, "app changed");
    match reloader.reload(Trigger::Write).await {
        Ok(_) if !reloader.writes_in_force() => {
            // Committed to the store, which went away before this replica could read it back.
            let message = "the change was saved in the store, which then could not be reached: it is not in force on \
                           this gateway yet and will be once the store answers (read the app again before writing it)";
            let mut response = error(StatusCode::SERVICE_UNAVAILABLE, message);
            response.headers_mut().insert(hyper::header::RETRY_AFTER, HeaderValue::from(STORE_RETRY_AFTER_SECONDS));
            response
        }
        Ok(generation) => {
            write.shared.events.publish(Some(id), "change", || {
                json!({ "app": id, "change": kind, "revision": next, "user": write.who.user, "generation": generation })
            });
            changed_response(shown.filter(|_| !no_content), created, generation)
        }
        Err(errors) => {
            // Not in force, so not kept: the app goes back to what it was.
            let undone = write.record(kind, "reload_failed", Some(next), None, None);
            let (to_undo, previous) = (rendered.clone(), current.clone());
            let kept = match off(store, move |store| store.restore(&to_undo, previous.as_ref(), &undone)).await {
                Ok(()) => "the change was undone",
                Err(_) => "and undoing it failed too",
            };
            error(StatusCode::INTERNAL_SERVER_ERROR, &format!("the reload failed ({kept}):\n{errors}"))
        }
    }
}

/// The answer to a write in force: the app as it is now, or `204` when it is gone.
fn changed_response(shown: Option<Stored>, created: bool, generation: u64) -> Response<Body> {
    match shown {
        Some(stored) => {
            let status = if created { StatusCode::CREATED } else { StatusCode::OK };
            app_response(status, &stored, Some(generation))
        }
        None => {
            let mut response = Response::new(super::full(Bytes::new()));
            *response.status_mut() = StatusCode::NO_CONTENT;
            response.headers_mut().insert("x-gateway-generation", HeaderValue::from(generation));
            response
        }
    }
}

/// `422` with every error, those in the written file as field paths.
fn invalid(errors: &ConfigErrors, rendered: &crate::store::Rendered) -> Response<Body> {
    let errors: Vec<serde_json::Value> = errors
        .0
        .iter()
        .map(|e| {
            let (path, message) = if e.path == rendered.file {
                (rendered.field_at(e.line, &e.message), e.message.clone())
            } else {
                (String::new(), e.to_string())
            };
            json!({ "path": path, "message": message })
        })
        .collect();
    json_response(StatusCode::UNPROCESSABLE_ENTITY, &json!({ "errors": errors }))
}
