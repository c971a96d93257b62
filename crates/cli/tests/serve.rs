//! `vigil serve` as a process: its answers equal `vigil predict`'s files bit for bit on the demo
//! class, SIGTERM lets the request in flight finish, SIGHUP reloads the model.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn vigil() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vigil"));
    c.env("VIGIL_NO_PROGRESS", "1");
    c
}

fn ok(args: &[&str]) {
    let out = vigil().args(args).output().unwrap();
    assert!(out.status.success(), "vigil {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn demo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/demo/PA_BDP01_TL")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A running `vigil serve` and the address it listens on (port 0: the system picks one).
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(model: &Path) -> Server {
        let mut child = vigil()
            .args([
                "serve",
                "--model",
                &format!("demo={}", s(model)),
                "--bind",
                "127.0.0.1:0",
                "--workers",
                "2",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut first).unwrap();
        let addr = first
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_else(|| panic!("no address in {first:?}"))
            .to_string();
        Server { child, addr }
    }

    fn signal(&self, name: &str) {
        let status =
            Command::new("sh").args(["-c", &format!("kill -{name} {}", self.child.id())]).status().unwrap();
        assert!(status.success());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request on a fresh connection: status and body.
fn http(addr: &str, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").expect("an HTTP answer");
    let head = String::from_utf8_lossy(&answer[..split]).to_string();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    assert!(!head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "{head}");
    (status, answer[split + 4..].to_vec())
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(body)))
}

#[test]
fn serve_answers_what_predict_writes_bit_for_bit_on_the_demo_class() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("demo.vigil");
    ok(&["fit", "-m", "acontrario", "--train", s(&demo()), "-o", s(&model)]);
    let out = dir.path().join("predict");
    ok(&["predict", "--model", s(&model), s(&demo().join("test")), "-o", s(&out)]);
    let table = json(&std::fs::read(out.join("scores.json")).unwrap());
    let rows = table["images"].as_array().unwrap();
    assert_eq!(rows.len(), 64, "every demo test image");

    let server = Server::start(&model);
    let mut flagged = 0;
    for row in rows {
        let path = PathBuf::from(row["path"].as_str().unwrap());
        let image = std::fs::read(&path).unwrap();
        let (status, body) = http(&server.addr, "POST", "/v1/models/demo/score", &image);
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let j = json(&body);
        let what = path.display();
        // Same f32 and f64 bits, same decisions.
        assert_eq!(j["score"].as_f64().unwrap() as f32, row["score"].as_f64().unwrap() as f32, "{what}");
        assert_eq!(
            j["decided_value"].as_f64().unwrap().to_bits(),
            row["decided_value"].as_f64().unwrap().to_bits()
        );
        assert_eq!(j["anomalous"], row["anomalous"], "{what}");
        assert_eq!(j["threshold"], row["threshold"], "{what}");
        assert_eq!(j["anomalous_pixels"], row["anomalous_pixels"], "{what}");
        assert_eq!((&j["width"], &j["height"]), (&row["width"], &row["height"]));
        // The map predict wrote, byte for byte.
        let (status, map) = http(&server.addr, "POST", "/v1/models/demo/score?map=tiff", &image);
        assert_eq!(status, 200);
        assert!(map == std::fs::read(row["map"].as_str().unwrap()).unwrap(), "map of {what}");
        if j["anomalous"] == true && flagged < 8 {
            flagged += 1;
            let (status, overlay) = http(&server.addr, "POST", "/v1/models/demo/score?overlay=png", &image);
            assert_eq!(status, 200);
            assert!(overlay == std::fs::read(row["overlay"].as_str().unwrap()).unwrap(), "overlay of {what}");
        }
    }
    assert!(flagged > 0, "some demo images are flagged");
}

fn enlarged_demo_png(factor: u32) -> Vec<u8> {
    let path = demo().join("test/impurity/PA_BDP01_TL_S_D_01_1.png");
    let img = image::open(path).unwrap().to_rgb8();
    let big =
        image::imageops::resize(&img, img.width() * factor, img.height() * factor, image::imageops::Nearest);
    let mut bytes = std::io::Cursor::new(Vec::new());
    big.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
    bytes.into_inner()
}

#[test]
fn sigterm_lets_the_request_in_flight_finish_and_sighup_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("demo.vigil");
    let other = dir.path().join("other.vigil");
    ok(&["fit", "-m", "acontrario", "--train", s(&demo()), "-o", s(&model)]);
    ok(&["fit", "-m", "acontrario", "--train", s(&demo()), "-o", s(&other), "--threshold", "nfa:2"]);
    let served = dir.path().join("served.vigil");
    std::fs::copy(&model, &served).unwrap();
    let mut server = Server::start(&served);
    let sha = |addr: &str| json(&http(addr, "GET", "/v1/models", b"").1)["models"][0]["file_sha256"].clone();
    let before = sha(&server.addr);

    // SIGHUP with a damaged file keeps the model in service; with a good one it swaps it.
    std::fs::write(&served, b"damaged").unwrap();
    server.signal("HUP");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(sha(&server.addr), before);
    std::fs::copy(&other, &served).unwrap();
    server.signal("HUP");
    let start = Instant::now();
    while sha(&server.addr) == before {
        assert!(start.elapsed() < Duration::from_secs(30), "SIGHUP did not reload the model");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, models) = http(&server.addr, "GET", "/v1/models", b"");
    assert_eq!(json(&models)["models"][0]["image_threshold"]["kind"]["k"], 2.0);

    // SIGTERM while an image is being scored: it is answered, then the server exits cleanly.
    let addr = server.addr.clone();
    let slow = enlarged_demo_png(6);
    let in_flight = std::thread::spawn(move || http(&addr, "POST", "/v1/models/demo/score", &slow));
    std::thread::sleep(Duration::from_millis(300));
    server.signal("TERM");
    let (status, body) = in_flight.join().unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let exit = server.child.wait().unwrap();
    assert!(exit.success(), "{exit:?}");
    let mut stderr = String::new();
    server.child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(stderr.contains("SIGHUP reload failed") && stderr.contains("kept"), "{stderr}");
}
