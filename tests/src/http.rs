//! A small HTTP/1.1 file server for artifacts (GET with `Range`), on a thread,
//! bound to 127.0.0.1. Stops when dropped.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// A running server.
#[derive(Debug)]
pub struct FileServer {
    port: u16,
    files: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    stop: Arc<AtomicBool>,
}

impl FileServer {
    pub fn start() -> std::io::Result<FileServer> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        let files: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (f, s) = (files.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in l.incoming() {
                if s.load(Ordering::Relaxed) {
                    return;
                }
                if let Ok(c) = conn {
                    let f = f.clone();
                    std::thread::spawn(move || {
                        let _ = serve(c, &f);
                    });
                }
            }
        });
        Ok(FileServer { port, files, stop })
    }

    /// Base URL (`http://127.0.0.1:port`).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Serves `data` at `/{name}`; returns its URL.
    pub fn put(&self, name: &str, data: Vec<u8>) -> String {
        if let Ok(mut m) = self.files.lock() {
            m.insert(format!("/{name}"), data);
        }
        format!("http://127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve(c: TcpStream, files: &Mutex<HashMap<String, Vec<u8>>>) -> std::io::Result<()> {
    let mut r = BufReader::new(c.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
            range = v.trim().trim_end_matches('-').parse::<usize>().ok();
        }
    }
    let data = files.lock().ok().and_then(|m| m.get(&path).cloned());
    let mut w = c;
    match data {
        None => {
            w.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        }
        Some(d) => {
            let (head, body) = match range {
                Some(s) if s < d.len() => (
                    format!(
                        "206 Partial Content\r\nContent-Range: bytes {s}-{}/{}",
                        d.len() - 1,
                        d.len()
                    ),
                    &d[s..],
                ),
                _ => ("200 OK".to_string(), &d[..]),
            };
            w.write_all(
                format!(
                    "HTTP/1.1 {head}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            )?;
            w.write_all(body)
        }
    }
}
