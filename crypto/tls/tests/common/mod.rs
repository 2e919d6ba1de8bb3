//! Loopback mTLS harness: a server thread and a client, both plain std TCP + rustls.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use tandem_tls::rustls::{self, ClientConfig, ClientConnection, ServerConfig, ServerConnection};
use tandem_tls::{established, server_name, Established};

/// Bytes the client sends as its first application data, and the server's answer.
pub const PING: &[u8] = b"hello";
pub const PONG: &[u8] = b"world";

/// What the server saw.
#[derive(Debug)]
pub enum ServerOutcome {
    /// The handshake failed: the server never reached the point of reading application data.
    HandshakeFailed(rustls::Error),
    /// The handshake completed; `established` is this crate's post-handshake check and `app`
    /// the first application bytes read afterwards.
    Completed {
        established: Result<Established, tandem_tls::Error>,
        app: Vec<u8>,
    },
}

/// What the client saw.
#[derive(Debug)]
pub enum ClientOutcome {
    /// The client's own handshake failed.
    HandshakeFailed(rustls::Error),
    /// The client's handshake completed; `pong` is whether the server's answer arrived.
    Completed {
        established: Result<Established, tandem_tls::Error>,
        pong: bool,
    },
}

fn rustls_error(e: &std::io::Error) -> rustls::Error {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .cloned()
        .unwrap_or_else(|| rustls::Error::General(format!("io: {e}")))
}

fn handshake<D, C>(conn: &mut C, sock: &mut TcpStream) -> Result<(), rustls::Error>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>,
{
    let mut rounds = 0;
    while conn.is_handshaking() {
        rounds += 1;
        assert!(rounds < 100, "handshake does not progress");
        match conn.complete_io(sock) {
            Ok((0, 0)) if conn.is_handshaking() => {
                return Err(rustls::Error::General(
                    "peer closed during handshake".into(),
                ))
            }
            Ok(_) => {}
            Err(e) => return Err(rustls_error(&e)),
        }
    }
    Ok(())
}

fn serve(listener: TcpListener, config: Arc<ServerConfig>) -> ServerOutcome {
    let (mut sock, _) = listener.accept().unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut conn = ServerConnection::new(config).unwrap();
    if let Err(e) = handshake(&mut conn, &mut sock) {
        return ServerOutcome::HandshakeFailed(e);
    }
    // Only now, after a successful handshake, does the server look at application data.
    let established = established(&conn);
    let mut stream = rustls::StreamOwned::new(conn, sock);
    let mut app = vec![0u8; PING.len()];
    match stream.read_exact(&mut app) {
        Ok(()) => {
            let _ = stream.write_all(PONG);
            let _ = stream.flush();
        }
        Err(_) => app.clear(),
    }
    stream.conn.send_close_notify();
    let _ = stream.flush();
    ServerOutcome::Completed { established, app }
}

/// Runs one connection: the server with `server`, the client with `client` connecting to
/// `name`. Returns both outcomes.
pub fn run(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    name: &str,
) -> (ServerOutcome, ClientOutcome) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server_thread = thread::spawn(move || serve(listener, server));

    let mut sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut conn = ClientConnection::new(client, server_name(name).unwrap()).unwrap();
    let client_outcome = match handshake(&mut conn, &mut sock) {
        Err(e) => ClientOutcome::HandshakeFailed(e),
        Ok(()) => {
            let established = established(&conn);
            let mut stream = rustls::StreamOwned::new(conn, sock);
            let mut pong = vec![0u8; PONG.len()];
            let ok = stream.write_all(PING).is_ok()
                && stream.flush().is_ok()
                && stream.read_exact(&mut pong).is_ok()
                && pong == PONG;
            ClientOutcome::Completed {
                established,
                pong: ok,
            }
        }
    };
    // Dropping the client socket unblocks a server still waiting.
    let server_outcome = server_thread.join().unwrap();
    (server_outcome, client_outcome)
}

/// Asserts the server refused the client during the handshake (before reading any
/// application byte) and returns the server's error. The client never gets an answer.
pub fn expect_server_rejects(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    name: &str,
) -> rustls::Error {
    let (s, c) = run(server, client, name);
    let err = match s {
        ServerOutcome::HandshakeFailed(e) => e,
        other => panic!("server accepted the connection: {other:?}"),
    };
    if let ClientOutcome::Completed { pong, .. } = c {
        assert!(!pong, "client got application data from a refusing server");
    }
    err
}
