//! What the HTTP tests share: models fitted on the demo class, a running server, a small client.
#![allow(dead_code)] // each test file uses its own part of this module

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use vigil_engine::run::ImageFilter;
use vigil_engine::{fit, training_images, FitOptions, MethodSpec, PipelineOptions};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn demo() -> PathBuf {
    repo().join("data/demo/PA_BDP01_TL")
}

pub fn demo_image(kind: &str, index: usize) -> PathBuf {
    let dir = demo().join("test").join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files[index].clone()
}

pub struct Fixture {
    _dir: tempfile::TempDir,
    /// The a contrario detector with statistics from each test image (the demo's method).
    pub model: PathBuf,
    /// The same with an ignore mask of the demo's 128x128 size: other sizes are refused.
    pub masked: PathBuf,
    pub root: PathBuf,
}

/// Models fitted once per test binary.
pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let train = training_images(&demo(), &ImageFilter::default()).unwrap();
        let spec = MethodSpec::parse("acontrario", &[]).unwrap();
        let model = root.join("demo.vigil");
        fit(&spec, train.clone(), &PipelineOptions::default(), FitOptions::default())
            .unwrap()
            .save(&model, false)
            .unwrap();
        let mask_path = root.join("ignore.png");
        let mut mask = image::GrayImage::new(128, 128);
        for y in 0..8 {
            for x in 0..8 {
                mask.put_pixel(x, y, image::Luma([255]));
            }
        }
        mask.save(&mask_path).unwrap();
        let masked = root.join("masked.vigil");
        let pipeline = PipelineOptions { ignore: Some(mask_path), ..Default::default() };
        fit(&spec, train, &pipeline, FitOptions::default()).unwrap().save(&masked, false).unwrap();
        Fixture { _dir: dir, model, masked, root }
    })
}

pub fn options(models: &[(&str, &Path)]) -> vigil_serve::Options {
    let sources =
        models.iter().map(|(n, p)| vigil_serve::ModelSource { name: n.to_string(), path: p.to_path_buf() });
    vigil_serve::Options::new(sources.collect(), "127.0.0.1:0".parse().unwrap())
}

/// An answer: status, headers asked for, body.
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<String>,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn error(&self) -> String {
        let j = self.json();
        assert_eq!(j["status"], self.status, "{j}");
        j["error"].as_str().unwrap().to_string()
    }
}

fn answer(result: Result<ureq::Response, ureq::Error>) -> Answer {
    let response = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("no HTTP answer: {e}"),
    };
    let status = response.status();
    let retry_after = response.header("retry-after").map(str::to_string);
    let content_type = response.header("content-type").map(str::to_string);
    let mut body = Vec::new();
    response.into_reader().read_to_end(&mut body).unwrap();
    Answer { status, retry_after, content_type, body }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout(Duration::from_secs(120)).build()
}

pub fn get(url: &str) -> Answer {
    answer(agent().get(url).call())
}

pub fn post(url: &str, body: &[u8]) -> Answer {
    answer(agent().post(url).send_bytes(body))
}

pub fn request(method: &str, url: &str) -> Answer {
    answer(agent().request(method, url).call())
}

/// A multipart/form-data batch of (file name, bytes) parts.
pub fn post_multipart(url: &str, parts: &[(&str, &[u8])]) -> Answer {
    let boundary = "vigil-test-boundary-7d1c";
    let mut body = Vec::new();
    for (name, bytes) in parts {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n\
                 Content-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    answer(
        agent()
            .post(url)
            .set("Content-Type", &format!("multipart/form-data; boundary={boundary}"))
            .send_bytes(&body),
    )
}

pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// A demo image enlarged `factor` times (nearest neighbour), as PNG: slower to score.
pub fn enlarged_png(path: &Path, factor: u32) -> Vec<u8> {
    let img = image::open(path).unwrap().to_rgb8();
    let big =
        image::imageops::resize(&img, img.width() * factor, img.height() * factor, image::imageops::Nearest);
    let mut bytes = std::io::Cursor::new(Vec::new());
    big.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
    bytes.into_inner()
}
