//! A headless Chromium driven through ChromeDriver (Debian's `chromium` and
//! `chromium-driver`) with the W3C WebDriver protocol, both inside a test's namespace: a
//! minimal client over HTTP/1.1 (JSON in, JSON out), enough to load a page, find elements,
//! click, type, run a script and take a screenshot.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::{testbed::TempDir, Netns, Process};

/// The W3C WebDriver element key.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A browser session; the browser and its driver end on drop.
pub struct Browser<'a> {
    ns: &'a Netns,
    port: u16,
    session: String,
    _driver: Process,
    _profile: TempDir,
}

impl<'a> Browser<'a> {
    /// Starts ChromeDriver on `port` in `ns` and a headless Chromium session through it.
    pub fn start(ns: &'a Netns, port: u16) -> Result<Self> {
        let driver = ns
            .spawn("chromedriver", &[&format!("--port={port}"), "--allowed-ips=127.0.0.1"])
            .context("chromedriver (apt package chromium-driver)")?;
        let profile = TempDir::new("chromium")?;
        let mut browser = Self { ns, port, session: String::new(), _driver: driver, _profile: profile };
        let deadline = Instant::now() + Duration::from_secs(30);
        while browser.call("GET", "/status", None).is_err() {
            if Instant::now() > deadline {
                bail!("chromedriver did not answer on port {port}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Without the background-networking switches Chromium reaches for Google's hosts.
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
            "--window-size=1360,1100",
            &format!("--user-data-dir={}", browser._profile.path().display()),
        ];
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": "/usr/bin/chromium", "args": args },
        }}});
        let created = browser.call("POST", "/session", Some(capabilities))?;
        browser.session = created["sessionId"].as_str().context("no session id")?.to_string();
        Ok(browser)
    }

    /// One WebDriver command; returns its `value`.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.port,
            body.len()
        );
        let port = self.port;
        let response = self.ns.enter(move || -> Result<String> {
            let mut stream = TcpStream::connect(("127.0.0.1", port))?;
            stream.set_read_timeout(Some(Duration::from_secs(60)))?;
            stream.write_all(request.as_bytes())?;
            // ChromeDriver keeps the connection open: read the head, then Content-Length bytes.
            let mut received = Vec::new();
            let mut buf = [0u8; 16 << 10];
            let (head_end, length) = loop {
                let n = stream.read(&mut buf)?;
                if n == 0 {
                    bail!("the driver closed the connection");
                }
                received.extend_from_slice(&buf[..n]);
                if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&received[..end]).to_ascii_lowercase();
                    let length = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .context("no Content-Length from the driver")?;
                    break (end + 4, length);
                }
            };
            while received.len() < head_end + length {
                let n = stream.read(&mut buf)?;
                if n == 0 {
                    bail!("the driver closed the connection mid-answer");
                }
                received.extend_from_slice(&buf[..n]);
            }
            Ok(String::from_utf8_lossy(&received[..head_end + length]).into_owned())
        })??;
        let (head, body) = response.split_once("\r\n\r\n").context("no end of the HTTP head")?;
        let value: Value = serde_json::from_str(body).with_context(|| format!("WebDriver answer to {method} {path}: {head}"))?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!("WebDriver {method} {path}: {}", value["value"]["message"].as_str().unwrap_or(body));
        }
        Ok(value["value"].clone())
    }

    fn session_call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    pub fn goto(&self, url: &str) -> Result<()> {
        self.session_call("POST", "/url", Some(json!({ "url": url }))).map(drop)
    }

    /// The element a CSS selector finds, waiting up to `timeout` for it.
    pub fn find(&self, css: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.session_call("POST", "/element", Some(json!({ "using": "css selector", "value": css }))) {
                Ok(found) => return found[ELEMENT].as_str().map(str::to_string).context("no element id"),
                Err(e) if Instant::now() > deadline => return Err(e.context(format!("no element {css}"))),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    pub fn click(&self, element: &str) -> Result<()> {
        self.session_call("POST", &format!("/element/{element}/click"), Some(json!({}))).map(drop)
    }

    /// Types `text` into an element (WebDriver key codes such as `\u{E014}`, arrow right).
    pub fn send_keys(&self, element: &str, text: &str) -> Result<()> {
        self.session_call("POST", &format!("/element/{element}/value"), Some(json!({ "text": text }))).map(drop)
    }

    pub fn clear(&self, element: &str) -> Result<()> {
        self.session_call("POST", &format!("/element/{element}/clear"), Some(json!({}))).map(drop)
    }

    /// Replaces the text of the field `css` finds with `text`, finding it again when the
    /// page re-rendered it in between.
    pub fn type_into(&self, css: &str, text: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let typed = self.find(css, timeout).and_then(|e| {
                self.clear(&e)?;
                self.send_keys(&e, text)
            });
            match typed {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e.context(format!("typing into {css}"))),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    pub fn text(&self, element: &str) -> Result<String> {
        Ok(self.session_call("GET", &format!("/element/{element}/text"), None)?.as_str().unwrap_or_default().to_string())
    }

    /// Runs a script in the page; returns what it returns.
    pub fn script(&self, script: &str) -> Result<Value> {
        self.session_call("POST", "/execute/sync", Some(json!({ "script": script, "args": [] })))
    }

    /// Waits until the text of the element `css` satisfies `done`; returns it.
    pub fn wait_text(&self, css: &str, timeout: Duration, done: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.find(css, timeout).and_then(|e| self.text(&e)).unwrap_or_default();
            if done(&text) {
                return Ok(text);
            }
            if Instant::now() > deadline {
                bail!("{css} never showed what was expected; last: {text:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The page as a PNG.
    pub fn screenshot(&self) -> Result<Vec<u8>> {
        let encoded = self.session_call("GET", "/screenshot", None)?;
        base64_decode(encoded.as_str().context("no screenshot")?)
    }
}

impl Drop for Browser<'_> {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.call("DELETE", &format!("/session/{}", self.session), None);
        }
    }
}

/// Standard base64 (RFC 4648, with padding).
pub fn base64_decode(text: &str) -> Result<Vec<u8>> {
    let value = |c: u8| -> Result<u32> {
        Ok(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => bail!("not base64: {:?}", c as char),
        } as u32)
    };
    let bytes: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for chunk in bytes.chunks(4) {
        let digits = chunk.iter().take_while(|&&c| c != b'=').map(|&c| value(c)).collect::<Result<Vec<u32>>>()?;
        let n = digits.iter().enumerate().fold(0u32, |acc, (i, d)| acc | d << (18 - 6 * i));
        out.extend_from_slice(&n.to_be_bytes()[1..digits.len().max(1)]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_decodes_with_and_without_padding() {
        assert_eq!(super::base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(super::base64_decode("aGVsbG8h").unwrap(), b"hello!");
        assert_eq!(super::base64_decode("aGk=").unwrap(), b"hi");
        assert_eq!(super::base64_decode("YQ==").unwrap(), b"a");
        assert!(super::base64_decode("a*==").is_err());
    }
}
