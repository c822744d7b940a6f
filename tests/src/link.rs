//! A TCP proxy in front of a broker that a test can cut: every open connection
//! is dropped and new ones are refused until it is up again (a device or an
//! operator losing its network).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

#[derive(Debug)]
pub struct Proxy {
    /// Where clients connect (127.0.0.1).
    pub port: u16,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `127.0.0.1:target`.
    pub async fn start(target: u16) -> std::io::Result<Proxy> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let port = l.local_addr()?.port();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (u, c) = (up.clone(), conns.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = l.accept().await else {
                    return;
                };
                if !u.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let h = tokio::spawn(async move {
                    let Ok(mut out) = TcpStream::connect(("127.0.0.1", target)).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                });
                c.lock().unwrap_or_else(PoisonError::into_inner).push(h);
            }
        });
        Ok(Proxy { port, up, conns })
    }

    /// `false` cuts every connection and refuses new ones; `true` lets clients
    /// connect again.
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            for h in self
                .conns
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .drain(..)
            {
                h.abort();
            }
        }
    }
}
