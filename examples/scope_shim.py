#!/usr/bin/env python3
"""A miniapp container's permission shim, in front of miniapp-gateway's scope service.

A container (or an emulator, or a test rig hosting a miniapp) calls the gateway instead of
keeping the platforms' consent rules itself: before each device or user-data API call it asks
/v1/scopes/decide and does what the answer says. This file shows every call a container makes;
Python standard library only.

    python3 examples/scope_shim.py --admin http://127.0.0.1:9090 --token console-demo-token demo

runs a short scenario against a gateway (see the README, "Scope authorization"): it creates
two apps, calls APIs as their miniapps would, shows the prompts a user would see, answers
them as the user, and exchanges an auth code as the app's backend would.
"""

import argparse
import json
import sys
import urllib.error
import urllib.request


class Gateway:
    """The admin listener's scope routes. `token` is a bearer token: a viewer's for the calls
    a container makes, an editor's to answer prompts and change settings."""

    def __init__(self, admin, token=None):
        self.admin = admin.rstrip("/")
        self.token = token

    def _call(self, method, path, body=None, token=True, headers=()):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.admin + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        for name, value in headers:
            request.add_header(name, value)
        if token and self.token:
            request.add_header("Authorization", "Bearer " + self.token)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                text = response.read()
                return response.status, (json.loads(text) if text else None)
        except urllib.error.HTTPError as error:
            text = error.read()
            return error.code, (json.loads(text) if text else None)

    # --- what the container calls -------------------------------------------------------

    def decide(self, app, user, api, system_permission="granted", wait=True):
        """Before an API call: allow (call it), deny (fail it; `guide` says where to send the
        user: openSetting or showAuthGuide), prompt (show `prompt`, then answer it), or
        report (call it: the app only records what enforcement would do)."""
        body = {"app": app, "user": user, "api": api, "system_permission": system_permission, "wait": wait}
        return self._call("POST", "/v1/scopes/decide", body)[1]

    def authorize(self, app, user, scope, wait=True):
        """my.authorize / wx.authorize / wv.authorize: ask for a scope in advance."""
        return self._call("POST", "/v1/scopes/authorize", {"app": app, "user": user, "scope": scope, "wait": wait})[1]

    def get_setting(self, app, user):
        """getSetting: every scope of the app's platform and its state for the user."""
        return self._call("GET", f"/v1/scopes/settings?app={app}&user={user}")[1]

    def open_setting(self, app, user, scope, state):
        """openSetting: the user turns a scope on or off (needs an editor's token)."""
        return self._call("PUT", "/v1/scopes/settings", {"app": app, "user": user, "scope": scope, "state": state})

    def get_auth_code(self, app, user, scopes, wait=True):
        """getAuthCode (SuperApp): consent for user-information scopes, then a one-time code
        the miniapp hands to its backend."""
        return self._call("POST", "/v1/auth-codes", {"app": app, "user": user, "scopes": scopes, "wait": wait})[1]

    def pending_prompts(self):
        """The prompts waiting for a user's answer (a rig polls this)."""
        return self._call("GET", "/v1/scopes/prompts")[1]["prompts"]

    def answer(self, prompt_id, answer):
        """The user's answer to a prompt: allow or deny (needs an editor's token)."""
        return self._call("POST", f"/v1/scopes/prompts/{prompt_id}", {"answer": answer})

    # --- what the app's backend calls ---------------------------------------------------

    def exchange(self, app, secret, code):
        """The backend exchanges a code, with the app's secret (no bearer token), for the
        consented fields of the user. Once."""
        return self._call("POST", "/v1/auth-codes/exchange", {"app": app, "secret": secret, "code": code}, token=False)


def call_api(gw, app, user, api, ask_user, system_permission="granted"):
    """What a container does around one API call: decide; on a prompt, show it to the user
    (`ask_user(prompt) -> "allow" | "deny"`), answer it, and decide again."""
    decision = gw.decide(app, user, api, system_permission, wait=False)
    if decision["decision"] == "prompt":
        prompt = decision["prompt"]
        gw.answer(prompt["id"], ask_user(prompt))
        decision = gw.decide(app, user, api, system_permission, wait=False)
    return decision


def show(label, value):
    print(f"{label}: {json.dumps(value, sort_keys=True)}")


# A user of the shipped user directory (config/users.toml).
USER = "2088000000000001"


def demo(gw):
    wechat = {"name": "Shim WeChat app", "platform": "wechat", "api_whitelist": ["getLocation", "chooseImage"]}
    superapp = {"name": "Shim SuperApp app", "platform": "superapp", "secret": "backend-secret", "api_whitelist": ["scan"]}
    for app_id, app in (("shimwx", wechat), ("shimsuper", superapp)):
        # an editor's write, as an operator (not a container) makes it; 412: it exists already
        status, _ = gw._call("PUT", f"/v1/apps/{app_id}", app, headers=[("If-None-Match", "*")])
        if status not in (201, 412):
            sys.exit(f"cannot create app {app_id}: {status}")

    def user_says(answer):
        def ask_user(prompt):
            print(f"  prompt shown: {prompt['title']} / {prompt['text']} -> the user taps {answer}")
            return answer
        return ask_user

    show("shimwx getLocation", call_api(gw, "shimwx", USER, "getLocation", user_says("deny")))
    show("shimwx getLocation again", gw.decide("shimwx", USER, "getLocation"))
    gw.open_setting("shimwx", USER, "scope.userLocation", "granted")
    show("shimwx getLocation after openSetting", gw.decide("shimwx", USER, "getLocation"))
    show("shimwx chooseImage (not a scope API here)", gw.decide("shimwx", USER, "chooseImage"))
    show("shimsuper scan, camera denied for good by the host", gw.decide("shimsuper", USER, "scan", "denied_forever"))
    show("shimsuper scan, camera allowed by the host", call_api(gw, "shimsuper", USER, "scan", user_says("allow")))
    issued = gw.get_auth_code("shimsuper", USER, ["USER_NICKNAME"], wait=False)
    if issued["decision"] == "prompt":
        gw.answer(issued["prompt"]["id"], user_says("allow")(issued["prompt"]))
        issued = gw.get_auth_code("shimsuper", USER, ["USER_NICKNAME"])
    status, user = gw.exchange("shimsuper", "backend-secret", issued["code"])
    show(f"backend exchange ({status})", user)
    status, again = gw.exchange("shimsuper", "backend-secret", issued["code"])
    show(f"backend exchange again ({status})", again)
    show("shimwx settings", gw.get_setting("shimwx", USER)["scopes"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--admin", default="http://127.0.0.1:9090", help="the gateway's admin listener")
    parser.add_argument("--token", default=None, help="a bearer token (an editor's, for the demo)")
    parser.add_argument("command", choices=["demo"], help="demo: the scenario of the module docs")
    args = parser.parse_args()
    demo(Gateway(args.admin, args.token))


if __name__ == "__main__":
    main()
