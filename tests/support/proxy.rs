//! A loopback TCP proxy that can cut, stall and restore the link it
//! carries: how tests take a leaf's link to the hub away, or make an S3
//! endpoint hang, without touching either server.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

struct Shared {
    cut: AtomicBool,
    /// Bytes from clients to the target are read and dropped, as a link
    /// that loses one direction does.
    mute_upstream: AtomicBool,
    /// New connections are accepted and never answered; bytes on open
    /// ones are dropped both ways: a peer that hangs.
    stall: AtomicBool,
    /// Connections accepted while stalled, held open until restored.
    held: Mutex<Vec<TcpStream>>,
    stop: AtomicBool,
    live: Mutex<Vec<TcpStream>>,
}

/// Forwards 127.0.0.1:`port` to `target`; stops on `Drop`.
pub struct Proxy {
    pub port: u16,
    shared: Arc<Shared>,
    accept: Option<thread::JoinHandle<()>>,
}

impl Proxy {
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy on loopback");
        let port = listener.local_addr().expect("proxy address").port();
        listener
            .set_nonblocking(true)
            .expect("non-blocking proxy listener");
        let shared = Arc::new(Shared {
            cut: AtomicBool::new(false),
            mute_upstream: AtomicBool::new(false),
            stall: AtomicBool::new(false),
            held: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            live: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let accept = thread::spawn(move || {
            while !s.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        if s.cut.load(Ordering::SeqCst) {
                            // Refused as a dead link refuses: closed at once.
                            drop(client);
                            continue;
                        }
                        if s.stall.load(Ordering::SeqCst) {
                            s.held.lock().unwrap().push(client);
                            continue;
                        }
                        let _ = client.set_nonblocking(false);
                        let Ok(server) = TcpStream::connect(target) else {
                            continue;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        {
                            let mut live = s.live.lock().unwrap();
                            live.push(client.try_clone().unwrap());
                            live.push(server.try_clone().unwrap());
                        }
                        pipe(
                            client.try_clone().unwrap(),
                            server.try_clone().unwrap(),
                            s.clone(),
                            true,
                        );
                        pipe(server, client, s.clone(), false);
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Proxy {
            port,
            shared,
            accept: Some(accept),
        }
    }

    /// `nats-leaf://` URL of the proxy.
    pub fn leaf_url(&self) -> String {
        format!("nats-leaf://127.0.0.1:{}", self.port)
    }

    /// Cuts the link: closes every connection it carries and closes new
    /// ones at once until [`Proxy::restore`].
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        for stream in self.shared.live.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// Lets connections through again (both directions); connections
    /// held by [`Proxy::stall`] are closed.
    pub fn restore(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
        self.shared.mute_upstream.store(false, Ordering::SeqCst);
        self.shared.stall.store(false, Ordering::SeqCst);
        for stream in self.shared.held.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// Hangs the link: new connections are accepted and never answered,
    /// bytes on open ones go nowhere, until [`Proxy::restore`].
    pub fn stall(&self) {
        self.shared.stall.store(true, Ordering::SeqCst);
    }

    /// Drops everything clients send to the target from now on, while the
    /// target's bytes still reach the clients: e.g. an MQTT client that
    /// receives and stores a message but whose PUBACK never arrives.
    pub fn mute_upstream(&self) {
        self.shared.mute_upstream.store(true, Ordering::SeqCst);
    }
}

/// Copies `from` to `to`; `upstream` is true for the client-to-target
/// direction (which [`Proxy::mute_upstream`] drops). While stalled,
/// nothing is copied either way.
fn pipe(mut from: TcpStream, mut to: TcpStream, shared: Arc<Shared>, upstream: bool) {
    thread::spawn(move || {
        let mut buf = [0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if (upstream && shared.mute_upstream.load(Ordering::SeqCst))
                        || shared.stall.load(Ordering::SeqCst)
                    {
                        continue;
                    }
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
        let _ = from.shutdown(Shutdown::Read);
    });
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.restore();
        self.cut();
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}
