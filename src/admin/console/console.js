// The console: one miniapp at a time, its permission switch and three whitelists, a URL
// tester, what the proxy refused it lately, and its history. Everything it shows is put in
// the page as text (textContent, never markup), and everything it does is a /v1 call.

import * as api from "./api.js";

const $ = (id) => document.getElementById(id);

/** The platform consoles' limit on each domain list (the gateway's 422 names its own). */
const MAX_ENTRIES = 30;
const MAX_REMARK = 200;

const LISTS = {
  server_domains: {
    label: "server domain whitelist",
    item: "server domain",
    column: "Domain",
    rules: "Only HTTPS domains are supported (https:// or wss://, or a bare host), at most 30.",
    max: MAX_ENTRIES,
  },
  api_whitelist: {
    label: "API whitelist",
    item: "API",
    column: "API name",
    rules: "JSAPI names the app may call, such as shop.pay.",
    max: null,
  },
  webview_domains: {
    label: "built-in WebView domain whitelist",
    item: "WebView domain",
    column: "Domain",
    rules: "Only HTTPS domains are supported (https:// or a bare host), at most 30.",
    max: MAX_ENTRIES,
  },
};

const state = {
  me: null,
  listed: new Map(),
  appId: null,
  app: null,
  etag: null,
  list: "server_domains",
  editing: null,
  confirmed: null,
  allowing: null,
  stream: null,
  decisionsTimer: null,
};

/** An element with properties (`class`, `dataset` keys as `data-…`) and text or node children. */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") {
      node.className = value;
    } else if (key.startsWith("data-") || key.startsWith("aria-")) {
      node.setAttribute(key, value);
    } else {
      node[key] = value;
    }
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : String(child));
    }
  }
  return node;
}

function show(node, visible) {
  node.hidden = !visible;
}

const canEdit = () => state.me && (state.me.role === "editor" || state.me.role === "admin");
const canRestore = () => state.me && state.me.role === "admin";
const writable = () => canEdit() && state.app && state.app.revision !== null;

function notice(text) {
  $("notice").textContent = text;
  show($("notice"), Boolean(text));
}

function when(iso) {
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
}

// Every list's entries as { domain, remark }: API entries come as { api, remark }.
function entriesOf(app, list) {
  const raw = (app && app[list]) || [];
  return raw.map((entry) => {
    if (typeof entry === "string") {
      return { domain: entry, remark: null };
    }
    return { domain: entry.domain ?? entry.api, remark: entry.remark ?? null };
  });
}

// ---- signing in ----------------------------------------------------------------------

async function start() {
  try {
    const { body } = await api.call("GET", "/v1/me");
    await enter(body);
  } catch (error) {
    if (error instanceof api.ApiError && error.status === 401) {
      api.setToken("");
      showSignIn("");
    } else {
      notice(`The gateway did not answer: ${error.message}`);
    }
  }
}

function showSignIn(message) {
  show($("console"), false);
  show($("session"), false);
  show($("signin"), true);
  $("signin-error").textContent = message;
  $("token").value = "";
  $("token").focus();
}

async function signIn(event) {
  event.preventDefault();
  const value = $("token").value.trim();
  if (!value) {
    $("signin-error").textContent = "Enter the token.";
    return;
  }
  api.setToken(value);
  try {
    const { body } = await api.call("GET", "/v1/me");
    await enter(body);
  } catch (error) {
    api.setToken("");
    const message =
      error instanceof api.ApiError && error.status === 401 ? "This token is not one of this gateway's." : error.message;
    showSignIn(message);
  }
}

function signOut() {
  api.setToken("");
  stopEvents();
  state.me = null;
  state.app = null;
  notice("");
  showSignIn("");
}

async function enter(me) {
  state.me = me;
  show($("signin"), false);
  show($("session"), true);
  show($("sign-out"), me.auth);
  $("who").textContent = me.auth
    ? `${me.user} (${me.role})`
    : "no admin users configured: anyone who reaches this listener may change apps";
  document.body.classList.toggle("viewer", !canEdit());
  for (const node of document.querySelectorAll("[data-edit]")) {
    show(node, canEdit());
  }
  for (const node of document.querySelectorAll("[data-restore]")) {
    show(node, canRestore());
  }
  show($("console"), true);
  const wanted = new URLSearchParams(location.hash.slice(1)).get("app");
  await searchApps($("app-filter").value, wanted);
}

// ---- picking an app ------------------------------------------------------------------

let searchTimer = null;

async function searchApps(query, wanted) {
  const { body } = await api.call("GET", `/v1/apps?limit=100&q=${encodeURIComponent(query || "")}`);
  const select = $("app-select");
  select.replaceChildren();
  state.listed = new Map(body.apps.map((app) => [app.id, app]));
  for (const app of body.apps) {
    select.append(el("option", { value: app.id }, app.name ? `${app.name} (${app.id})` : app.id));
  }
  const count = body.apps.length;
  $("app-count").textContent =
    count === 0 ? "No miniapp matches." : body.next ? `The first ${count} matches: search to narrow them.` : "";
  const pick = [wanted, state.appId].find((id) => id && state.listed.has(id)) || (count ? body.apps[0].id : null);
  if (pick) {
    select.value = pick;
    if (pick !== state.appId || !state.app) {
      await selectApp(pick);
    }
  } else if (!query) {
    state.appId = null;
    state.app = null;
    renderNoApp();
  }
}

function renderNoApp() {
  for (const id of ["app", "test", "refused", "history"]) {
    show($(id), false);
  }
  stopEvents();
}

async function selectApp(id) {
  state.appId = id;
  history.replaceState(null, "", `#app=${encodeURIComponent(id)}`);
  await loadApp();
  await Promise.all([loadDecisions(), loadHistory()]);
  startEvents();
}

/** Read the app again; render it (and its history, with `andHistory`) only if it changed. */
async function loadApp(andHistory) {
  const id = state.appId;
  try {
    const { body, etag } = await api.call("GET", api.app(id));
    if (id !== state.appId) {
      return;
    }
    const changed = !state.app || state.app.id !== id || etag !== state.etag || etag === null;
    state.app = body;
    state.etag = etag;
    if (changed) {
      renderApp();
      scheduleDecisions();
      if (andHistory) {
        loadHistory();
      }
    }
  } catch (error) {
    if (error.status === 404) {
      state.app = null;
      renderNoApp();
      notice(`App ${id} no longer exists.`);
    } else {
      notice(error.message);
    }
  }
}

function renderApp() {
  const app = state.app;
  for (const id of ["app", "test", "refused", "history"]) {
    show($(id), true);
  }
  $("app-name").textContent = app.name || app.id;
  $("app-id").textContent = app.id;
  $("app-readonly").textContent =
    app.revision === null ? "Defined in the main config file: read-only here (move it to apps_dir to manage it)." : "";
  show($("delete-app"), writable());
  const listed = state.listed.get(app.id);
  const action = app.action || (listed && listed.action) || "enforce";
  for (const radio of document.querySelectorAll('input[name="action"]')) {
    radio.checked = radio.value === action;
    radio.disabled = !writable();
  }
  renderList();
}

// ---- the whitelists ------------------------------------------------------------------

function selectTab(list, focus) {
  state.list = list;
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    const selected = tab.dataset.list === list;
    tab.setAttribute("aria-selected", String(selected));
    tab.tabIndex = selected ? 0 : -1;
    if (selected && focus) {
      tab.focus();
    }
  }
  $("list-panel").setAttribute("aria-labelledby", `tab-${list}`);
  renderList();
}

function renderList() {
  if (!state.app) {
    return;
  }
  const list = LISTS[state.list];
  const entries = entriesOf(state.app, state.list);
  $("list-note").textContent = list.rules;
  $("entries-col").textContent = list.column;
  const full = list.max !== null && entries.length >= list.max;
  $("list-count").textContent = list.max === null ? `${entries.length}` : `${entries.length} / ${list.max}`;
  $("add-entry").disabled = full;
  $("add-entry").title = full ? `At most ${list.max} entries: delete one to add another.` : "";
  show($("add-entry"), writable());
  $("list-error").textContent = full ? `The ${list.label} is full: at most ${list.max} entries.` : "";
  const rows = entries.map((entry) => {
    const ops = writable()
      ? el(
          "td",
          { class: "ops" },
          el("button", { type: "button", class: "link", onclick: () => openEntryDialog(entry) }, "Edit"),
          el("button", { type: "button", class: "link danger", onclick: () => confirmDelete(entry) }, "Delete"),
        )
      : null;
    return el(
      "tr",
      {},
      el("td", {}, el("code", {}, entry.domain)),
      el("td", { class: "remark" }, entry.remark || ""),
      ops,
    );
  });
  if (rows.length === 0) {
    rows.push(el("tr", {}, el("td", { colSpan: 3, class: "hint" }, "No entries.")));
  }
  $("entries").tBodies[0].replaceChildren(...rows);
  for (const node of $("entries").querySelectorAll("th[data-edit]")) {
    show(node, writable());
  }
}

function clearErrors(...ids) {
  for (const id of ids) {
    $(id).textContent = "";
  }
}

function openEntryDialog(entry) {
  const list = LISTS[state.list];
  const isApi = state.list === "api_whitelist";
  const count = entriesOf(state.app, state.list).length;
  state.editing = entry;
  $("entry-title").textContent = `${entry ? "Edit" : "Add"} ${list.item}`;
  $("entry-rules").textContent =
    list.max === null ? list.rules : `${list.rules} ${count} / ${list.max} used.`;
  $("entry-value-label").textContent = isApi ? "API name" : "Domain";
  $("entry-value").value = entry ? entry.domain : "";
  $("entry-remark").value = entry && entry.remark ? entry.remark : "";
  updateRemarkCount();
  clearErrors("entry-value-error", "entry-remark-error", "entry-error");
  $("entry-dialog").showModal();
  $("entry-value").focus();
}

function updateRemarkCount() {
  $("entry-remark-count").textContent = `${$("entry-remark").value.length} / ${MAX_REMARK}`;
}

/** Put each validation error next to the field it concerns; the rest under the form. */
function placeErrors(error, fields, general) {
  const errors = error.fieldErrors;
  if (errors.length === 0) {
    $(general).textContent = error.message;
    return;
  }
  for (const { path, message } of errors) {
    const target = fields.find(([test]) => test(path || ""));
    const id = target ? target[1] : general;
    $(id).textContent = $(id).textContent ? `${$(id).textContent} ${message}` : message;
  }
}

async function saveEntry(event) {
  event.preventDefault();
  clearErrors("entry-value-error", "entry-remark-error", "entry-error");
  const list = state.list;
  const isApi = list === "api_whitelist";
  const value = $("entry-value").value.trim();
  const remark = $("entry-remark").value.trim();
  if (!value) {
    $("entry-value-error").textContent = isApi ? "Enter an API name." : "Enter a domain.";
    $("entry-value").focus();
    return;
  }
  if (remark.length > MAX_REMARK) {
    $("entry-remark-error").textContent = `A remark is at most ${MAX_REMARK} characters.`;
    return;
  }
  const editing = state.editing;
  try {
    let answer;
    if (editing) {
      const body = { entry: value, remark: remark || null };
      answer = await api.call("PUT", api.entry(state.appId, list, editing.domain), body);
    } else {
      const body = remark ? { entry: value, remark } : { entry: value };
      answer = await api.call("POST", `${api.app(state.appId)}/${list}`, body);
    }
    $("entry-dialog").close();
    applyWrite(answer);
  } catch (error) {
    if (!(error instanceof api.ApiError)) {
      $("entry-error").textContent = error.message;
      return;
    }
    if (error.status === 409 && !error.fieldErrors.length) {
      $("entry-value-error").textContent = error.message;
      return;
    }
    placeErrors(
      error,
      [
        [(path) => path.startsWith(list) && path.endsWith(".remark"), "entry-remark-error"],
        [(path) => path.startsWith(list), "entry-value-error"],
      ],
      "entry-error",
    );
  }
}

/** A write's answer is the app as it now is. */
function applyWrite(answer) {
  if (answer.body && answer.body.id === state.appId) {
    state.app = answer.body;
    state.etag = answer.etag;
    renderApp();
  }
  loadHistory();
  scheduleDecisions();
}

function ask(text, action) {
  state.confirmed = action;
  $("confirm-text").textContent = text;
  $("confirm-error").textContent = "";
  $("confirm-dialog").showModal();
  $("confirm-cancel").focus();
}

async function confirmed(event) {
  event.preventDefault();
  try {
    await state.confirmed();
    $("confirm-dialog").close();
  } catch (error) {
    $("confirm-error").textContent = error.message;
  }
}

function confirmDelete(entry) {
  const list = state.list;
  const name = state.app.name || state.app.id;
  ask(`Delete ${entry.domain} from the ${LISTS[list].label} of ${name}?`, async () => {
    await api.call("DELETE", api.entry(state.appId, list, entry.domain));
    await loadApp(true);
  });
}

async function setAction(event) {
  const radio = event.target;
  $("switch-error").textContent = "";
  try {
    applyWrite(await api.call("PUT", `${api.app(state.appId)}/action`, { action: radio.value }));
  } catch (error) {
    $("switch-error").textContent = error.message;
    renderApp();
  }
}

// ---- creating and deleting apps ------------------------------------------------------

function openAppDialog() {
  $("new-app-id").value = "";
  $("new-app-name").value = "";
  clearErrors("new-app-id-error", "app-dialog-error");
  $("app-dialog").showModal();
  $("new-app-id").focus();
}

async function createApp(event) {
  event.preventDefault();
  clearErrors("new-app-id-error", "app-dialog-error");
  const id = $("new-app-id").value.trim();
  const name = $("new-app-name").value.trim();
  if (!/^[A-Za-z0-9_.-]{1,64}$/.test(id)) {
    $("new-app-id-error").textContent = "An AppId is 1 to 64 characters of A-Z a-z 0-9 _ - .";
    return;
  }
  try {
    await api.call("PUT", api.app(id), name ? { name } : {}, { "If-None-Match": "*" });
    $("app-dialog").close();
    $("app-filter").value = "";
    await searchApps("", id);
  } catch (error) {
    if (error.status === 412) {
      $("new-app-id-error").textContent = `An app ${id} exists already.`;
    } else if (error.status === 400) {
      $("new-app-id-error").textContent = error.message;
    } else {
      placeErrors(error, [[(path) => path === "id", "new-app-id-error"]], "app-dialog-error");
    }
  }
}

function confirmDeleteApp() {
  const app = state.app;
  ask(`Delete app ${app.name || app.id} (${app.id}) and its three whitelists?`, async () => {
    await api.call("DELETE", api.app(app.id), undefined, { "If-Match": state.etag });
    state.appId = null;
    state.app = null;
    await searchApps($("app-filter").value);
  });
}

// ---- testing a URL -------------------------------------------------------------------

async function testUrl(event) {
  event.preventDefault();
  clearErrors("test-error");
  show($("test-result"), false);
  const channel = $("test-channel").value;
  const extra = $("test-extra").value.trim();
  const list = channel === "webview" ? "webview_domains" : "server_domains";
  let app = state.appId;
  let decidedOn = state.app;
  if (extra) {
    const draft = { ...state.app, [list]: [...entriesOf(state.app, list), { domain: extra }] };
    delete draft.has_token;
    delete draft.revision;
    delete draft.generation;
    app = draft;
    decidedOn = draft;
  }
  try {
    const { body } = await api.call("POST", "/v1/check", { app, channel, url: $("test-url").value.trim() });
    $("test-decision").textContent = body.decision;
    $("test-decision").className = `verdict ${body.decision}`;
    $("test-reason").textContent = body.reason;
    $("test-rule").textContent = body.rule ? `by ${body.rule}: ${ruleEntry(decidedOn, body.rule)}` : "";
    $("test-message").textContent = body.message || "";
    show($("test-result"), true);
  } catch (error) {
    if (error.fieldErrors && error.fieldErrors.length) {
      $("test-error").textContent = error.fieldErrors.map((e) => `${e.path}: ${e.message}`).join(" ");
    } else {
      $("test-error").textContent = error.message;
    }
  }
}

/** The entry a rule such as `server_domains[2]` names, in `app`. */
function ruleEntry(app, rule) {
  const match = /^(\w+)\[(\d+)\]$/.exec(rule);
  if (!match) {
    return "";
  }
  const entry = entriesOf(app, match[1])[Number(match[2])];
  return entry ? entry.domain : "";
}

// ---- refused traffic -----------------------------------------------------------------

async function loadDecisions() {
  const id = state.appId;
  let body;
  try {
    ({ body } = await api.call("GET", `${api.app(id)}/decisions`));
  } catch {
    return;
  }
  if (id !== state.appId) {
    return;
  }
  const rows = body.decisions.map((group) => {
    const host = group.port === 443 ? group.host : `${group.host}:${group.port}`;
    let allow = null;
    if (group.now === "allow") {
      allow = el("span", { class: "hint" }, "allowed now");
    } else if (writable() && group.entry) {
      allow = el("button", { type: "button", class: "primary small", onclick: () => openAllowDialog(group) }, "Allow");
    }
    return el(
      "tr",
      {},
      el("td", {}, el("code", {}, host)),
      el("td", {}, group.channel),
      el("td", { class: "number" }, group.count),
      el("td", {}, when(group.last_seen)),
      el("td", {}, el("span", { class: `verdict ${group.decision}` }, group.decision), " ", el("code", {}, group.reason)),
      canEdit() ? el("td", { class: "ops" }, allow) : null,
    );
  });
  $("refusals").tBodies[0].replaceChildren(...rows);
  show($("refused-empty"), rows.length === 0);
}

function scheduleDecisions() {
  clearTimeout(state.decisionsTimer);
  state.decisionsTimer = setTimeout(loadDecisions, 150);
}

function openAllowDialog(group) {
  state.allowing = group;
  const host = group.port === 443 ? group.host : `${group.host}:${group.port}`;
  const list = LISTS[group.list];
  $("allow-title").textContent = `Allow ${host}`;
  $("allow-what").textContent = `Add to the ${list.label} of ${state.app.name || state.app.id} (${group.channel} channel):`;
  $("allow-exact-text").textContent = group.entry;
  $("allow-exact").checked = true;
  $("allow-wildcard-text").textContent = group.wildcard || "";
  show($("allow-wildcard-choice"), Boolean(group.wildcard));
  $("allow-error").textContent = "";
  $("allow-dialog").showModal();
  $("allow-exact").focus();
}

async function allow(event) {
  event.preventDefault();
  const group = state.allowing;
  const entry = $("allow-wildcard").checked && group.wildcard ? group.wildcard : group.entry;
  try {
    const answer = await api.call("POST", `${api.app(state.appId)}/${group.list}`, {
      entry,
      remark: `allowed from refused traffic (${group.reason})`,
    });
    $("allow-dialog").close();
    applyWrite(answer);
    scheduleDecisions();
  } catch (error) {
    const messages = error.fieldErrors && error.fieldErrors.length ? error.fieldErrors.map((e) => e.message) : [error.message];
    $("allow-error").textContent = messages.join(" ");
  }
}

// ---- live events ---------------------------------------------------------------------

function stopEvents() {
  if (state.stream) {
    state.stream.abort();
    state.stream = null;
  }
  $("live").textContent = "";
}

function startEvents() {
  stopEvents();
  const controller = new AbortController();
  state.stream = controller;
  const id = state.appId;
  $("live").textContent = "Live.";
  $("live").dataset.state = "live";
  api
    .events(`/v1/events?app=${encodeURIComponent(id)}`, controller.signal, (name, data) => {
      if (name === "decision") {
        scheduleDecisions();
      } else if (name === "change" || name === "reload") {
        // someone else's change, or an edit by hand: shown once it is in force
        loadApp(true);
      } else if (name === "lagged") {
        scheduleDecisions();
      }
    })
    .catch(() => {})
    .finally(() => {
      if (state.stream === controller && !controller.signal.aborted) {
        $("live").textContent = "Reconnecting…";
        $("live").dataset.state = "down";
        setTimeout(() => state.stream === controller && startEvents(), 2000);
      }
    });
}

// ---- history -------------------------------------------------------------------------

/** What changed between two versions of an app, as lines of text. */
function diff(before, after) {
  const lines = [];
  if (!before && after) {
    lines.push("created");
  }
  if (before && !after) {
    return ["deleted"];
  }
  const b = before || {};
  const a = after || {};
  if ((b.name || "") !== (a.name || "") && before) {
    lines.push(`name: ${b.name || "(none)"} → ${a.name || "(none)"}`);
  }
  if ((b.action || "default") !== (a.action || "default")) {
    lines.push(`switch: ${b.action || "default"} → ${a.action || "default"}`);
  }
  for (const list of ["server_domains", "webview_domains", "api_whitelist"]) {
    const old = new Map(entriesOf(b, list).map((e) => [e.domain, e.remark || ""]));
    const now = new Map(entriesOf(a, list).map((e) => [e.domain, e.remark || ""]));
    for (const [domain, remark] of now) {
      if (!old.has(domain)) {
        lines.push(`+ ${LISTS[list].item} ${domain}${remark ? ` (${remark})` : ""}`);
      } else if (old.get(domain) !== remark) {
        lines.push(`${LISTS[list].item} ${domain}: remark “${old.get(domain)}” → “${remark}”`);
      }
    }
    for (const domain of old.keys()) {
      if (!now.has(domain)) {
        lines.push(`− ${LISTS[list].item} ${domain}`);
      }
    }
  }
  return lines;
}

async function loadHistory() {
  const id = state.appId;
  let body;
  try {
    ({ body } = await api.call("GET", `${api.app(id)}/history`));
    $("history-error").textContent = "";
  } catch (error) {
    $("history-error").textContent = error.message;
    return;
  }
  if (id !== state.appId) {
    return;
  }
  const rows = body.revisions.map((record, index) => {
    const changes = diff(record.before, record.after);
    const restore =
      canRestore() && index > 0 && record.after && state.app && state.app.revision !== null
        ? el("button", { type: "button", class: "link", onclick: () => confirmRestore(record) }, "Restore")
        : null;
    return el(
      "tr",
      { "data-revision": record.revision },
      el("td", { class: "number" }, record.revision),
      el("td", {}, when(record.time)),
      el("td", {}, record.user),
      el(
        "td",
        {},
        el("strong", {}, record.change),
        el("ul", { class: "diff" }, ...changes.map((line) => el("li", {}, line))),
      ),
      canRestore() ? el("td", { class: "ops" }, restore) : null,
    );
  });
  $("revisions").tBodies[0].replaceChildren(...rows);
}

function confirmRestore(record) {
  ask(`Restore revision ${record.revision}? The app becomes as it was then, as a new revision.`, async () => {
    const answer = await api.call("POST", `${api.app(state.appId)}/rollback`, { revision: record.revision });
    applyWrite(answer);
  });
}

// ---- wiring --------------------------------------------------------------------------

function wire() {
  $("signin-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
  $("app-filter").addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => searchApps($("app-filter").value).catch((e) => notice(e.message)), 200);
  });
  $("app-select").addEventListener("change", () => selectApp($("app-select").value));
  $("new-app").addEventListener("click", openAppDialog);
  $("app-form").addEventListener("submit", createApp);
  $("app-cancel").addEventListener("click", () => $("app-dialog").close());
  $("delete-app").addEventListener("click", confirmDeleteApp);
  for (const radio of document.querySelectorAll('input[name="action"]')) {
    radio.addEventListener("change", setAction);
  }
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  for (const tab of tabs) {
    tab.addEventListener("click", () => selectTab(tab.dataset.list, false));
    tab.addEventListener("keydown", (event) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
      if (step) {
        const next = tabs[(tabs.indexOf(tab) + step + tabs.length) % tabs.length];
        selectTab(next.dataset.list, true);
        event.preventDefault();
      }
    });
  }
  $("add-entry").addEventListener("click", () => openEntryDialog(null));
  $("entry-form").addEventListener("submit", saveEntry);
  $("entry-cancel").addEventListener("click", () => $("entry-dialog").close());
  $("entry-remark").addEventListener("input", updateRemarkCount);
  $("confirm-form").addEventListener("submit", confirmed);
  $("confirm-cancel").addEventListener("click", () => $("confirm-dialog").close());
  $("test-form").addEventListener("submit", testUrl);
  $("allow-form").addEventListener("submit", allow);
  $("allow-cancel").addEventListener("click", () => $("allow-dialog").close());
  for (const form of document.querySelectorAll("form")) {
    form.noValidate = true;
  }
  selectTab("server_domains", false);
}

wire();
start();
