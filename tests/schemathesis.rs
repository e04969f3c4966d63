//! Schemathesis, the OpenAPI fuzzer from PyPI, against the admin API of a running gateway:
//! generated requests (valid and not) for every documented route, every answer checked
//! against the document (status listed, body fits its schema, no 5xx, 405 with `Allow`,
//! authentication never ignored).
//!
//! Needs the `st` command (`pip install schemathesis==4.32.5`). Without it the test says so and
//! passes, unless `MINIAPP_REQUIRE_SCHEMATHESIS=1` (set by `.ci/run`, which installs it) makes it
//! a failure.

mod common;

use std::process::Command;

use common::*;

const TOKEN: &str = "root-token";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing_the_document_does_not_allow() {
    if Command::new("st").arg("--version").output().is_err() {
        assert!(
            std::env::var("MINIAPP_REQUIRE_SCHEMATHESIS").is_err(),
            "MINIAPP_REQUIRE_SCHEMATHESIS is set but `st` (schemathesis) is not installed"
        );
        eprintln!("skipped: schemathesis is not installed (pip install schemathesis==4.32.5)");
        return;
    }
    let origin = Origin::start(&["api.shop.example"]).await;
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nadmin_token = \"{TOKEN}\"\n\n\
         [policy]\napps_dir = \"apps\"\n\n[resolve]\n\"api.shop.example\" = \"{}\"\n\n[[app]]\nid = \"main\"\n",
        origin.addr
    );
    let demo = "[[app]]\nid = \"demo\"\nserver_domains = [\"api.shop.example\", { domain = \"img.shop.example\", \
                remark = \"images\" }]\napi_whitelist = [\"shop.pay\"]\n";
    let gw = TestGateway::start_with_apps(&text, &[("demo.toml", demo)]).await;
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/schemathesis.toml");
    let schema = format!("http://{}/v1/openapi.json", gw.admin());
    // Schemathesis keeps a cache in its working directory: a scratch one, not the repository.
    let scratch = tempfile::tempdir().unwrap();
    let cwd = scratch.path().to_path_buf();
    let run = tokio::task::spawn_blocking(move || {
        Command::new("st")
            .current_dir(cwd)
            .args(["--no-color", "--config-file", config, "run", &schema])
            .args(["-H", &format!("Authorization: Bearer {TOKEN}")])
            .args(["--checks", "all", "--max-examples", "25", "--seed", "1", "--request-timeout", "10"])
            .output()
            .expect("run st")
    })
    .await
    .unwrap();
    let out = String::from_utf8_lossy(&run.stdout);
    let summary: Vec<&str> = out.lines().filter(|line| line.contains("generated") || line.contains("passed")).collect();
    eprintln!("{}", summary.join("\n"));
    assert!(run.status.success(), "schemathesis found failures:\n{out}\n{}", String::from_utf8_lossy(&run.stderr));
}
