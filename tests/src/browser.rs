//! Headless Chromium over WebDriver, for the pages' tests.

use super::*;

/// Headless Chromium driven over WebDriver (Debian's `chromium` and `chromium-driver`).
pub struct Browser {
    driver_addr: String,
    session: String,
    _driver: ChildGuard,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub async fn start() -> anyhow::Result<Self> {
        let driver = find_tool("CHROMEDRIVER", "chromedriver")
            .context("chromedriver not found: apt-get install chromium-driver")?;
        let chromium = find_tool("CHROMIUM", "chromium").context("chromium not found: apt-get install chromium")?;
        let port = free_port();
        let child = ChildGuard::spawn(
            "chromedriver",
            Command::new(driver)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
        let driver_addr = format!("127.0.0.1:{port}");
        wait_for_port(&driver_addr, Duration::from_secs(30))?;
        let profile = tempfile::tempdir()?;
        let capabilities = serde_json::json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-quic", "--no-first-run", "--window-size=1280,1400",
                format!("--user-data-dir={}", profile.path().display()),
            ]
        }}}});
        let response = http_request(&driver_addr, "POST", "/session", capabilities.to_string().as_bytes()).await?;
        let session = response.json()["value"]["sessionId"]
            .as_str()
            .with_context(|| format!("no WebDriver session: {}", response.body))?
            .to_owned();
        Ok(Self {
            driver_addr,
            session,
            _driver: child,
            _profile: profile,
        })
    }

    async fn command(&self, method: &str, path: &str, body: serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let target = format!("/session/{}{path}", self.session);
        let body = if body.is_null() {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        };
        let response = http_request(&self.driver_addr, method, &target, &body).await?;
        anyhow::ensure!(response.status == 200, "WebDriver {method} {path}: {}", response.body);
        Ok(response.json()["value"].take())
    }

    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.command("POST", "/url", serde_json::json!({ "url": url }))
            .await
            .map(drop)
    }

    /// Runs `script` (a function body; `return` gives the value) in the page.
    pub async fn eval(&self, script: &str) -> anyhow::Result<serde_json::Value> {
        self.command(
            "POST",
            "/execute/sync",
            serde_json::json!({ "script": script, "args": [] }),
        )
        .await
    }

    /// Saves a PNG of the viewport.
    pub async fn screenshot(&self, path: &Path) -> anyhow::Result<()> {
        use base64::Engine;
        let value = self.command("GET", "/screenshot", serde_json::Value::Null).await?;
        let png =
            base64::engine::general_purpose::STANDARD.decode(value.as_str().context("screenshot not a string")?)?;
        std::fs::write(path, png)?;
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends Chromium with the session; chromedriver itself is killed by its guard.
        use std::io::{Read, Write};
        if let Ok(mut stream) = std::net::TcpStream::connect(&self.driver_addr) {
            let request = format!(
                "DELETE /session/{} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                self.session, self.driver_addr
            );
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            if stream.write_all(request.as_bytes()).is_ok() {
                let _ = stream.read_to_end(&mut Vec::new());
            }
        }
    }
}
