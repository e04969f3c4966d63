//! The platforms' consent rules as data and one pure state machine, with no I/O.
//!
//! A [`Profile`] is one platform's scopes: which APIs each covers, the prompt's title and
//! text, whether it is silent (never prompted), whether it is a device scope (also subject to
//! the host's system-level permission) and which user fields it releases through an auth
//! code. [`Profile::builtin`] holds the rules the platforms publish; the operator extends them
//! with `[[scopes.scope]]`. [`decide`] turns (switch, API whitelist, consent state, system
//! permission) into the answer a call gets, and [`answered`] what a prompt's answer records
//! and returns, so every rule of the platforms lives here and is unit-tested here.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::policy::Action;

/// Whose consent rules apply to an app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    /// mPaaS: a denial sticks until the user changes it in the settings page.
    #[default]
    Mpaas,
    /// WeChat: a denial sticks until `openSetting` changes it; the record lasts until the
    /// miniapp is deleted.
    Wechat,
    /// SuperApp: a denial fails this call and the next call prompts again; the host's
    /// system-level permission is a second, independent level.
    Superapp,
}

impl Platform {
    pub const ALL: [Platform; 3] = [Platform::Mpaas, Platform::Wechat, Platform::Superapp];

    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Mpaas => "mpaas",
            Platform::Wechat => "wechat",
            Platform::Superapp => "superapp",
        }
    }

    pub fn parse(raw: &str) -> Option<Platform> {
        Platform::ALL.into_iter().find(|p| p.as_str() == raw)
    }

    /// Whether a denial answers later calls at once, without a prompt, until the settings
    /// page changes it.
    pub fn denial_is_sticky(self) -> bool {
        !matches!(self, Platform::Superapp)
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A field of the user directory that a user-information scope releases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserField {
    UserId,
    Nickname,
    Name,
    LoginId,
    /// The SHA-256 (hex) of the login id: identifies the user without revealing it.
    HashLoginId,
    Avatar,
    Gender,
    Birthday,
    Nationality,
    ContactInfo,
}

impl UserField {
    pub const ALL: [UserField; 10] = [
        UserField::UserId,
        UserField::Nickname,
        UserField::Name,
        UserField::LoginId,
        UserField::HashLoginId,
        UserField::Avatar,
        UserField::Gender,
        UserField::Birthday,
        UserField::Nationality,
        UserField::ContactInfo,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UserField::UserId => "user_id",
            UserField::Nickname => "nickname",
            UserField::Name => "name",
            UserField::LoginId => "login_id",
            UserField::HashLoginId => "hash_login_id",
            UserField::Avatar => "avatar",
            UserField::Gender => "gender",
            UserField::Birthday => "birthday",
            UserField::Nationality => "nationality",
            UserField::ContactInfo => "contact_info",
        }
    }

    pub fn parse(raw: &str) -> Option<UserField> {
        UserField::ALL.into_iter().find(|f| f.as_str() == raw)
    }
}

/// One scope of a platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeDef {
    pub name: Box<str>,
    /// The APIs (on the app's API whitelist) that need this scope's consent.
    pub apis: Vec<Box<str>>,
    /// The prompt. `{app}` in either stands for the app's name (or id).
    pub title: String,
    pub text: String,
    /// Never prompted, always granted (SuperApp's `auth_base`).
    pub silent: bool,
    /// Also needs the host's system-level permission (camera, location, …).
    pub device: bool,
    /// What an auth code for this scope releases; empty: not a user-information scope.
    pub fields: Vec<UserField>,
}

impl ScopeDef {
    fn device(name: &str, apis: &[&str], what: &str) -> ScopeDef {
        ScopeDef {
            name: name.into(),
            apis: apis.iter().map(|api| (*api).into()).collect(),
            title: format!("Allow access to your {what}?"),
            text: format!("{{app}} would like to use your {what}."),
            silent: false,
            device: true,
            fields: Vec::new(),
        }
    }

    fn user(name: &str, what: &str, fields: &[UserField]) -> ScopeDef {
        ScopeDef {
            name: name.into(),
            apis: Vec::new(),
            title: format!("Share your {what}?"),
            text: format!("{{app}} would like to get your {what}."),
            silent: false,
            device: false,
            fields: fields.to_vec(),
        }
    }

    /// The prompt's title and text for `app`.
    pub fn prompt(&self, app: &str) -> (String, String) {
        (self.title.replace("{app}", app), self.text.replace("{app}", app))
    }
}

/// An operator's `[[scopes.scope]]`: a new scope, or more APIs and another prompt for one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScopeExtension {
    pub platform: Platform,
    pub scope: String,
    pub apis: Vec<String>,
    pub title: Option<String>,
    pub text: Option<String>,
    pub fields: Vec<UserField>,
    /// For a new scope: whether the system-level permission also applies (default: it does
    /// for a scope with APIs, not for a user-information one).
    pub device: Option<bool>,
}

/// Why an extension was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtensionError {
    #[error("API {api:?} is already covered by scope {scope:?} of {platform}; an API needs one scope")]
    ApiTaken { api: String, scope: String, platform: Platform },
    #[error("a new scope needs apis (a device scope) or fields (a user-information scope)")]
    Empty,
    #[error("only superapp issues auth codes; fields are not allowed for {0}")]
    FieldsNotAllowed(Platform),
    #[error("a scope name is 1 to 64 characters of A-Z a-z 0-9 _ . -")]
    BadName,
}

/// One platform's scopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub platform: Platform,
    scopes: Vec<ScopeDef>,
}

impl Profile {
    /// The rules the platform publishes. SuperApp's documents name its device scopes but not
    /// the APIs behind them; the APIs here are the gateway's choice (the README lists them).
    pub fn builtin(platform: Platform) -> Profile {
        use UserField::*;
        let scopes = match platform {
            Platform::Mpaas => vec![
                ScopeDef::device("camera", &["scan", "chooseImage", "chooseVideo"], "camera"),
                ScopeDef::device("album", &["saveImage", "saveVideosToPhotosAlbum"], "photo album"),
                ScopeDef::device("location", &["getLocation", "getCurrentLocation"], "location"),
                ScopeDef::device(
                    "audioRecord",
                    &["startAudioRecord", "stopAudioRecord", "cancelAudioRecord"],
                    "microphone",
                ),
            ],
            Platform::Wechat => vec![
                ScopeDef { apis: vec!["getUserInfo".into()], ..ScopeDef::user("scope.userInfo", "profile", &[]) },
                ScopeDef::device("scope.userLocation", &["getLocation"], "location"),
                ScopeDef::device("scope.userFuzzyLocation", &["getFuzzyLocation"], "approximate location"),
                ScopeDef::device("scope.writePhotosAlbum", &["saveImageToPhotosAlbum"], "photo album"),
            ],
            Platform::Superapp => vec![
                ScopeDef::device("location", &["getLocation"], "location"),
                ScopeDef::device("camera", &["scan", "chooseImage", "chooseVideo"], "camera"),
                ScopeDef::device("bluetooth", &["openBluetoothAdapter"], "Bluetooth"),
                ScopeDef::device("album", &["saveImage", "saveVideoToPhotosAlbum"], "photo album"),
                ScopeDef::device("contacts", &["choosePhoneContact"], "contacts"),
                ScopeDef::device("microphone", &["startRecord"], "microphone"),
                ScopeDef::device("file", &["chooseFile"], "files"),
                ScopeDef::device("call", &["makePhoneCall"], "phone"),
                ScopeDef::device("vibrate", &["vibrate"], "vibration"),
                ScopeDef::device("screen", &["setScreenBrightness"], "screen"),
                ScopeDef::user("USER_ID", "user ID", &[UserId]),
                ScopeDef::user("USER_NICKNAME", "nickname", &[Nickname]),
                ScopeDef::user("USER_NAME", "name", &[Name]),
                ScopeDef::user("USER_LOGIN_ID", "login ID", &[LoginId]),
                ScopeDef::user("HASH_LOGIN_ID", "login ID (hashed)", &[HashLoginId]),
                ScopeDef::user("USER_AVATAR", "avatar", &[Avatar]),
                ScopeDef::user("USER_GENDER", "gender", &[Gender]),
                ScopeDef::user("USER_BIRTHDAY", "birthday", &[Birthday]),
                ScopeDef::user("USER_NATIONALITY", "nationality", &[Nationality]),
                ScopeDef::user("USER_CONTACTINFO", "contact information", &[ContactInfo]),
                ScopeDef { silent: true, ..ScopeDef::user("auth_base", "user ID", &[UserId]) },
                ScopeDef::user("auth_user", "basic profile", &[UserId, Nickname, Avatar, Gender]),
            ],
        };
        Profile { platform, scopes }
    }

    pub fn scopes(&self) -> &[ScopeDef] {
        &self.scopes
    }

    pub fn scope(&self, name: &str) -> Option<&ScopeDef> {
        self.scopes.iter().find(|s| &*s.name == name)
    }

    /// The scope whose consent `api` needs, if any.
    pub fn scope_of_api(&self, api: &str) -> Option<&ScopeDef> {
        self.scopes.iter().find(|s| s.apis.iter().any(|a| &**a == api))
    }

    /// Apply an operator's extension: a scope named anew is added; one that exists gets the
    /// APIs (added), and the title, text and fields (replaced) that the extension gives.
    pub fn extend(&mut self, ext: &ScopeExtension) -> Result<(), ExtensionError> {
        let valid_name = (1..=64).contains(&ext.scope.len())
            && ext.scope.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !valid_name {
            return Err(ExtensionError::BadName);
        }
        if !ext.fields.is_empty() && self.platform != Platform::Superapp {
            return Err(ExtensionError::FieldsNotAllowed(self.platform));
        }
        for api in &ext.apis {
            if let Some(other) = self.scope_of_api(api).filter(|s| *s.name != *ext.scope) {
                return Err(ExtensionError::ApiTaken {
                    api: api.clone(),
                    scope: other.name.to_string(),
                    platform: self.platform,
                });
            }
        }
        let index = match self.scopes.iter().position(|s| *s.name == *ext.scope) {
            Some(index) => index,
            None => {
                if ext.apis.is_empty() && ext.fields.is_empty() {
                    return Err(ExtensionError::Empty);
                }
                let device = ext.device.unwrap_or(ext.fields.is_empty());
                let mut def = ScopeDef::user(&ext.scope, &ext.scope, &[]);
                def.title = format!("Allow {}?", ext.scope);
                def.text = format!("{{app}} would like to use {}.", ext.scope);
                def.device = device;
                self.scopes.push(def);
                self.scopes.len() - 1
            }
        };
        let def = &mut self.scopes[index];
        for api in &ext.apis {
            if !def.apis.iter().any(|a| **a == **api) {
                def.apis.push(api.as_str().into());
            }
        }
        if let Some(title) = &ext.title {
            def.title = title.clone();
        }
        if let Some(text) = &ext.text {
            def.text = text.clone();
        }
        if !ext.fields.is_empty() {
            def.fields = ext.fields.clone();
        }
        if let Some(device) = ext.device {
            def.device = device;
        }
        Ok(())
    }
}

/// Every platform's profile, as the config (built-in rules plus extensions) makes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profiles([Profile; 3]);

impl Default for Profiles {
    fn default() -> Self {
        Profiles(Platform::ALL.map(Profile::builtin))
    }
}

impl Profiles {
    pub fn get(&self, platform: Platform) -> &Profile {
        &self.0[platform as usize]
    }

    pub fn get_mut(&mut self, platform: Platform) -> &mut Profile {
        &mut self.0[platform as usize]
    }
}

/// What a user said about one scope of one app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consent {
    #[default]
    NotAsked,
    Granted,
    Denied,
}

impl Consent {
    pub fn as_str(self) -> &'static str {
        match self {
            Consent::NotAsked => "not_asked",
            Consent::Granted => "granted",
            Consent::Denied => "denied",
        }
    }
}

/// The host's system-level permission for a device scope, as the container reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SystemPermission {
    /// The host holds it (the default: a container that says nothing has it).
    #[default]
    Granted,
    /// Refused; the system may ask again.
    Denied,
    /// Refused with "don't ask again": only the system settings can change it.
    DeniedForever,
}

/// What a call gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
    /// The user must be asked first.
    Prompt,
    /// The app is in `report` mode: the call proceeds; `reason` is what enforce would say.
    Report,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::Prompt => "prompt",
            Verdict::Report => "report",
        }
    }
}

/// Why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The API needs no scope, the scope is silent, or the app's switch is off.
    NoConsentNeeded,
    ScopeGranted,
    ApiNotWhitelisted,
    ScopeDenied,
    SystemPermissionDenied,
    /// Not asked yet (or, on SuperApp, denied before): a prompt decides.
    ConsentRequired,
    /// The prompt went unanswered within `prompt_timeout`; nothing was recorded.
    PromptTimeout,
    /// The prompter could not be asked (a webhook that failed); nothing was recorded.
    PromptFailed,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoConsentNeeded => "no_consent_needed",
            Reason::ScopeGranted => "scope_granted",
            Reason::ApiNotWhitelisted => "api_not_whitelisted",
            Reason::ScopeDenied => "scope_denied",
            Reason::SystemPermissionDenied => "system_permission_denied",
            Reason::ConsentRequired => "consent_required",
            Reason::PromptTimeout => "prompt_timeout",
            Reason::PromptFailed => "prompt_failed",
        }
    }
}

/// Where the container should send the user after a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guide {
    /// The miniapp's settings page (`openSetting`): a sticky denial.
    OpenSetting,
    /// The system settings (`showAuthGuide`): a system permission denied for good.
    ShowAuthGuide,
}

impl Guide {
    pub fn as_str(self) -> &'static str {
        match self {
            Guide::OpenSetting => "openSetting",
            Guide::ShowAuthGuide => "showAuthGuide",
        }
    }
}

/// A decision: verdict, reason, and where to send the user when refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub reason: Reason,
    pub guide: Option<Guide>,
}

impl Decision {
    const fn new(verdict: Verdict, reason: Reason, guide: Option<Guide>) -> Decision {
        Decision { verdict, reason, guide }
    }
    const fn allow(reason: Reason) -> Decision {
        Decision::new(Verdict::Allow, reason, None)
    }
}

/// Everything a decision depends on.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    pub platform: Platform,
    /// The app's switch: `enforce` is permission control on, `open` off, `report` records.
    pub action: Action,
    /// Whether the API is on the app's API whitelist (`true` for `authorize`).
    pub whitelisted: bool,
    /// The scope the API needs (`None`: none).
    pub scope: Option<&'a ScopeDef>,
    pub consent: Consent,
    pub system: SystemPermission,
}

/// The decision for a call, in the platforms' order: the API whitelist, then the user's
/// consent for the miniapp (only with the switch on), then the host's system permission.
/// `report` decides as `enforce` and answers [`Verdict::Report`] with the reason enforce
/// would give, whatever it is.
pub fn decide(call: Call<'_>) -> Decision {
    if call.action == Action::Report {
        let enforced = decide(Call { action: Action::Enforce, ..call });
        return Decision::new(Verdict::Report, enforced.reason, enforced.guide);
    }
    if !call.whitelisted {
        return Decision::new(Verdict::Deny, Reason::ApiNotWhitelisted, None);
    }
    let Some(scope) = call.scope else { return Decision::allow(Reason::NoConsentNeeded) };
    if call.action == Action::Open || scope.silent {
        return system_level(scope, call.system, Reason::NoConsentNeeded);
    }
    match call.consent {
        Consent::Granted => system_level(scope, call.system, Reason::ScopeGranted),
        Consent::Denied if call.platform.denial_is_sticky() => {
            Decision::new(Verdict::Deny, Reason::ScopeDenied, Some(Guide::OpenSetting))
        }
        // Asking the user is pointless when the system will refuse whatever they say.
        Consent::NotAsked | Consent::Denied if scope.device && call.system == SystemPermission::DeniedForever => {
            Decision::new(Verdict::Deny, Reason::SystemPermissionDenied, Some(Guide::ShowAuthGuide))
        }
        Consent::NotAsked | Consent::Denied => Decision::new(Verdict::Prompt, Reason::ConsentRequired, None),
    }
}

/// The second level: a device scope also needs the host's permission.
fn system_level(scope: &ScopeDef, system: SystemPermission, granted: Reason) -> Decision {
    match system {
        _ if !scope.device => Decision::allow(granted),
        SystemPermission::Granted => Decision::allow(granted),
        SystemPermission::Denied => Decision::new(Verdict::Deny, Reason::SystemPermissionDenied, None),
        SystemPermission::DeniedForever => {
            Decision::new(Verdict::Deny, Reason::SystemPermissionDenied, Some(Guide::ShowAuthGuide))
        }
    }
}

/// A prompt's answer: the consent to record, and the call's decision.
pub fn answered(platform: Platform, scope: &ScopeDef, allow: bool, system: SystemPermission) -> (Consent, Decision) {
    if allow {
        (Consent::Granted, system_level(scope, system, Reason::ScopeGranted))
    } else {
        let guide = platform.denial_is_sticky().then_some(Guide::OpenSetting);
        (Consent::Denied, Decision::new(Verdict::Deny, Reason::ScopeDenied, guide))
    }
}

/// The state `getSetting` shows: silent scopes are always granted.
pub fn shown_state(scope: &ScopeDef, recorded: Consent) -> Consent {
    if scope.silent { Consent::Granted } else { recorded }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call<'a>(platform: Platform, scope: &'a ScopeDef, consent: Consent) -> Call<'a> {
        Call {
            platform,
            action: Action::Enforce,
            whitelisted: true,
            scope: Some(scope),
            consent,
            system: SystemPermission::Granted,
        }
    }

    fn scope(platform: Platform, name: &str) -> ScopeDef {
        Profile::builtin(platform).scope(name).unwrap().clone()
    }

    #[test]
    fn the_platform_tables_map_apis_to_scopes() {
        let mpaas = Profile::builtin(Platform::Mpaas);
        assert_eq!(&*mpaas.scope_of_api("chooseVideo").unwrap().name, "camera");
        assert_eq!(&*mpaas.scope_of_api("saveVideosToPhotosAlbum").unwrap().name, "album");
        assert_eq!(&*mpaas.scope_of_api("getCurrentLocation").unwrap().name, "location");
        assert_eq!(&*mpaas.scope_of_api("cancelAudioRecord").unwrap().name, "audioRecord");
        assert!(mpaas.scope_of_api("request").is_none());
        let wechat = Profile::builtin(Platform::Wechat);
        assert_eq!(&*wechat.scope_of_api("getUserInfo").unwrap().name, "scope.userInfo");
        assert_eq!(&*wechat.scope_of_api("getFuzzyLocation").unwrap().name, "scope.userFuzzyLocation");
        assert_eq!(&*wechat.scope_of_api("saveImageToPhotosAlbum").unwrap().name, "scope.writePhotosAlbum");
        let superapp = Profile::builtin(Platform::Superapp);
        assert_eq!(superapp.scopes().len(), 22);
        assert!(superapp.scope("auth_base").unwrap().silent);
        assert_eq!(superapp.scope("HASH_LOGIN_ID").unwrap().fields, [UserField::HashLoginId]);
        // every API names one scope per platform
        for platform in Platform::ALL {
            let profile = Profile::builtin(platform);
            for s in profile.scopes() {
                for api in &s.apis {
                    assert_eq!(profile.scope_of_api(api).unwrap().name, s.name, "{platform} {api}");
                }
            }
        }
    }

    #[test]
    fn the_whitelist_comes_before_any_scope_question() {
        let camera = scope(Platform::Mpaas, "camera");
        let refused = decide(Call { whitelisted: false, ..call(Platform::Mpaas, &camera, Consent::Granted) });
        assert_eq!((refused.verdict, refused.reason), (Verdict::Deny, Reason::ApiNotWhitelisted));
        let open =
            Call { whitelisted: false, action: Action::Open, ..call(Platform::Mpaas, &camera, Consent::NotAsked) };
        assert_eq!(decide(open).reason, Reason::ApiNotWhitelisted, "the switch does not lift the whitelist");
        let none = Call { scope: None, ..call(Platform::Mpaas, &camera, Consent::NotAsked) };
        assert_eq!(decide(none), Decision::allow(Reason::NoConsentNeeded));
    }

    #[test]
    fn wechat_denial_sticks_and_superapp_asks_again() {
        let location = scope(Platform::Wechat, "scope.userLocation");
        assert_eq!(decide(call(Platform::Wechat, &location, Consent::NotAsked)).verdict, Verdict::Prompt);
        let (recorded, now) = answered(Platform::Wechat, &location, false, SystemPermission::Granted);
        assert_eq!((recorded, now.reason, now.guide), (Consent::Denied, Reason::ScopeDenied, Some(Guide::OpenSetting)));
        let later = decide(call(Platform::Wechat, &location, recorded));
        assert_eq!((later.verdict, later.guide), (Verdict::Deny, Some(Guide::OpenSetting)));
        assert_eq!(decide(call(Platform::Wechat, &location, Consent::Granted)).reason, Reason::ScopeGranted);

        let camera = scope(Platform::Superapp, "camera");
        let (recorded, now) = answered(Platform::Superapp, &camera, false, SystemPermission::Granted);
        assert_eq!((now.verdict, now.guide), (Verdict::Deny, None));
        assert_eq!(decide(call(Platform::Superapp, &camera, recorded)).verdict, Verdict::Prompt);
        assert_eq!(decide(call(Platform::Mpaas, &scope(Platform::Mpaas, "camera"), recorded)).verdict, Verdict::Deny);
    }

    #[test]
    fn two_levels_each_needed() {
        let camera = scope(Platform::Superapp, "camera");
        let denied = Call { system: SystemPermission::Denied, ..call(Platform::Superapp, &camera, Consent::Granted) };
        assert_eq!(decide(denied), Decision::new(Verdict::Deny, Reason::SystemPermissionDenied, None));
        let forever = Call { system: SystemPermission::DeniedForever, ..denied };
        assert_eq!(decide(forever).guide, Some(Guide::ShowAuthGuide));
        // never asked, but the system refuses for good: no prompt, at once to the system settings
        let unasked = Call { consent: Consent::NotAsked, ..forever };
        assert_eq!(
            decide(unasked),
            Decision::new(Verdict::Deny, Reason::SystemPermissionDenied, Some(Guide::ShowAuthGuide))
        );
        // a denied system permission that may ask again still lets the user be asked first
        assert_eq!(decide(Call { consent: Consent::NotAsked, ..denied }).verdict, Verdict::Prompt);
        let (recorded, now) = answered(Platform::Superapp, &camera, true, SystemPermission::Denied);
        assert_eq!((recorded, now.reason), (Consent::Granted, Reason::SystemPermissionDenied));
        // user-information scopes have no system level
        let nickname = scope(Platform::Superapp, "USER_NICKNAME");
        let call =
            Call { system: SystemPermission::DeniedForever, ..call(Platform::Superapp, &nickname, Consent::Granted) };
        assert_eq!(decide(call).verdict, Verdict::Allow);
    }

    #[test]
    fn silent_scopes_and_the_switch_need_no_consent() {
        let base = scope(Platform::Superapp, "auth_base");
        assert_eq!(
            decide(call(Platform::Superapp, &base, Consent::NotAsked)),
            Decision::allow(Reason::NoConsentNeeded)
        );
        assert_eq!(shown_state(&base, Consent::NotAsked), Consent::Granted);
        let camera = scope(Platform::Mpaas, "camera");
        let open = Call { action: Action::Open, ..call(Platform::Mpaas, &camera, Consent::Denied) };
        assert_eq!(decide(open), Decision::allow(Reason::NoConsentNeeded));
        let open_system = Call { system: SystemPermission::Denied, ..open };
        assert_eq!(decide(open_system).reason, Reason::SystemPermissionDenied, "the host's level stays");
        let report = Call { action: Action::Report, ..call(Platform::Mpaas, &camera, Consent::NotAsked) };
        assert_eq!(decide(report), Decision::new(Verdict::Report, Reason::ConsentRequired, None));
        let report = Call { whitelisted: false, ..report };
        assert_eq!(decide(report).reason, Reason::ApiNotWhitelisted);
    }

    #[test]
    fn extensions_add_scopes_and_apis_and_customise_prompts() {
        let mut profile = Profile::builtin(Platform::Mpaas);
        let ext = ScopeExtension {
            platform: Platform::Mpaas,
            scope: "camera".into(),
            apis: vec!["scanCode".into()],
            title: Some("Camera for {app}".into()),
            ..ScopeExtension::default()
        };
        profile.extend(&ext).unwrap();
        let camera = profile.scope_of_api("scanCode").unwrap();
        assert_eq!(camera.prompt("Shop").0, "Camera for Shop");
        assert_eq!(camera.apis.len(), 4);
        let taken = ScopeExtension { scope: "album".into(), apis: vec!["scan".into()], ..ext.clone() };
        assert!(matches!(profile.extend(&taken), Err(ExtensionError::ApiTaken { .. })));
        let new = ScopeExtension {
            scope: "bluetooth".into(),
            apis: vec!["openBluetooth".into()],
            title: None,
            ..ext.clone()
        };
        profile.extend(&new).unwrap();
        assert!(profile.scope("bluetooth").unwrap().device);
        let empty = ScopeExtension { scope: "nothing".into(), apis: vec![], title: None, ..ext.clone() };
        assert_eq!(profile.extend(&empty), Err(ExtensionError::Empty));
        let fields = ScopeExtension { fields: vec![UserField::Name], ..new };
        assert_eq!(profile.extend(&fields), Err(ExtensionError::FieldsNotAllowed(Platform::Mpaas)));
    }
}
