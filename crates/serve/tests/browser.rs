//! The web page in a real browser: Debian's chromium driven through chromedriver (WebDriver over
//! loopback), uploading a flagged demo image and reading the verdict and the overlay. The
//! screenshot is kept in target/serve-browser/ as the test's artefact. `.ci/run` installs
//! chromium and chromium-driver; without them this test fails, it is never skipped.

mod common;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};

/// The WebDriver name of an element reference in JSON.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

struct Driver {
    process: Child,
    base: String,
    session: Option<String>,
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(id) = self.session.take() {
            let _ = ureq::delete(&format!("{}/session/{id}", self.base)).call();
        }
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

fn call(method: &str, url: &str, body: Option<Value>) -> Value {
    let request = ureq::request(method, url).timeout(Duration::from_secs(60));
    let response = match body {
        Some(b) => request.send_string(&b.to_string()),
        None => request.call(),
    };
    let text = match response {
        Ok(r) => r.into_string().unwrap(),
        Err(ureq::Error::Status(code, r)) => {
            panic!("WebDriver {method} {url}: {code} {}", r.into_string().unwrap())
        }
        Err(e) => panic!("WebDriver {method} {url}: {e}"),
    };
    serde_json::from_str::<Value>(&text).unwrap()["value"].clone()
}

impl Driver {
    fn start(profile: &std::path::Path) -> Driver {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let process = Command::new("chromedriver")
            .args([format!("--port={port}"), "--allowed-ips=127.0.0.1".into()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver is not installed: apt-get install chromium chromium-driver (.ci/run does)");
        let base = format!("http://127.0.0.1:{port}");
        let start = Instant::now();
        while ureq::get(&format!("{base}/status")).call().is_err() {
            assert!(start.elapsed() < Duration::from_secs(30), "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut driver = Driver { process, base, session: None };
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1100,1300",
        ]
        .map(String::from)
        .into_iter()
        .chain([format!("--user-data-dir={}", profile.display())])
        .collect::<Vec<_>>();
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": "/usr/bin/chromium", "args": args },
        }}});
        let session = call("POST", &format!("{}/session", driver.base), Some(caps));
        driver.session = Some(session["sessionId"].as_str().unwrap().to_string());
        driver
    }

    fn url(&self, path: &str) -> String {
        format!("{}/session/{}{path}", self.base, self.session.as_deref().unwrap())
    }

    fn go(&self, url: &str) {
        call("POST", &self.url("/url"), Some(json!({ "url": url })));
    }

    fn script(&self, script: &str) -> Value {
        call("POST", &self.url("/execute/sync"), Some(json!({ "script": script, "args": [] })))
    }

    /// Runs `script` until it returns something other than null or false.
    fn wait_for(&self, script: &str, what: &str) -> Value {
        let start = Instant::now();
        loop {
            let v = self.script(script);
            if !(v.is_null() || v == false) {
                return v;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn find(&self, css: &str) -> String {
        let e = call("POST", &self.url("/element"), Some(json!({ "using": "css selector", "value": css })));
        e[ELEMENT].as_str().unwrap().to_string()
    }

    fn screenshot(&self) -> Vec<u8> {
        let b64 = call("GET", &self.url("/screenshot"), None);
        base64::engine::general_purpose::STANDARD.decode(b64.as_str().unwrap()).unwrap()
    }
}

fn artefacts() -> PathBuf {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo().join("target"));
    let dir = target.join("serve-browser");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn the_page_scores_an_uploaded_image_and_shows_its_verdict_and_overlay() {
    let f = fixture();
    let server = vigil_serve::start(options(&[("demo", &f.model)])).unwrap();
    let profile = tempfile::tempdir().unwrap();
    let driver = Driver::start(profile.path());
    driver.go(&format!("http://{}/", server.addr));
    driver.wait_for("return document.querySelectorAll('#model option').length > 0", "the model list");
    assert_eq!(driver.script("return document.getElementById('model').value"), "demo");

    let normal = demo_image("good", 0).canonicalize().unwrap();
    let flagged = demo_image("impurity", 0).canonicalize().unwrap();
    // The file input takes a path typed into it, as a user choosing a file.
    for (n, path) in [normal, flagged.clone()].iter().enumerate() {
        let input = driver.find("#files");
        call(
            "POST",
            &driver.url(&format!("/element/{input}/value")),
            Some(json!({ "text": path.to_str().unwrap() })),
        );
        driver.wait_for(
            &format!("return document.querySelectorAll('#history tbody tr').length === {}", n + 1),
            "the history row",
        );
    }
    // The newest result is first: the flagged image, its verdict and its overlay drawn.
    let verdict = driver.wait_for(
        "const v = document.querySelector('#results .result .verdict'); return v && v.textContent",
        "the verdict",
    );
    assert_eq!(verdict, "anomalous");
    let title = driver.script("return document.querySelector('#results .result h3').textContent");
    assert_eq!(title, flagged.file_name().unwrap().to_str().unwrap());
    let overlay = driver.wait_for(
        "const i = document.querySelector('#results .result img.overlay'); \
         return i && i.complete && i.naturalWidth > 0 && [i.naturalWidth, i.naturalHeight, i.alt]",
        "the overlay",
    );
    assert_eq!((&overlay[0], &overlay[1]), (&json!(128), &json!(128)));
    assert!(overlay[2].as_str().unwrap().starts_with("overlay of"));
    // The history holds both images, sorted by score, highest first.
    let scores = driver.script(
        "return [...document.querySelectorAll('#history tbody tr')].map(r => parseFloat(r.cells[2].textContent))",
    );
    let scores: Vec<f64> = scores.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(scores.len(), 2);
    assert!(scores[0] >= scores[1], "{scores:?}");
    // The status line read by screen readers says what happened.
    let status = driver.script("return document.getElementById('status').textContent");
    assert!(status.as_str().unwrap().ends_with("anomalous"), "{status}");

    let png = driver.screenshot();
    let shot = artefacts().join("flagged-overlay.png");
    std::fs::write(&shot, &png).unwrap();
    let img = image::load_from_memory(&png).unwrap();
    assert!(img.width() >= 800 && img.height() >= 800, "screenshot {}x{}", img.width(), img.height());
    eprintln!("screenshot: {}", shot.display());
    drop(driver);
    server.stop().unwrap();
}
