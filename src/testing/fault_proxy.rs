//! A loopback TCP proxy that can cut or stall connections on command, to
//! test how backends behave when the network breaks.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Pass,
    Cut,
    Blackhole,
}

/// A TCP proxy on `127.0.0.1:<random port>` in front of one upstream.
///
/// Point a client at [`FaultProxy::addr`] instead of the server, then:
/// [`FaultProxy::cut`] closes every open connection and refuses new ones
/// (closes them on accept); [`FaultProxy::blackhole`] keeps connections
/// open but forwards nothing (a hung network, for timeouts);
/// [`FaultProxy::restore`] lets traffic through again (connections that
/// were stalled are closed then, as their streams lost bytes). Dropping
/// the proxy stops it.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    accepted: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl FaultProxy {
    /// Starts a proxy to `upstream`.
    pub async fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (mode, _) = watch::channel(Mode::Pass);
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(
            listener,
            upstream,
            mode.subscribe(),
            accepted.clone(),
            stop.clone(),
        ));
        Ok(FaultProxy {
            addr,
            mode,
            accepted,
            stop,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes all connections and refuses new ones until [`FaultProxy::restore`].
    pub fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
    }

    /// Stalls all traffic (connections stay open) until [`FaultProxy::restore`].
    pub fn blackhole(&self) {
        self.mode.send_replace(Mode::Blackhole);
    }

    /// Lets traffic through again.
    pub fn restore(&self) {
        self.mode.send_replace(Mode::Pass);
    }

    /// How many client connections the proxy accepted so far (reconnects
    /// show up here).
    pub fn connections_accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mode: watch::Receiver<Mode>,
    accepted: Arc<AtomicUsize>,
    stop: CancellationToken,
) {
    loop {
        let client = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((client, _)) => client,
                Err(_) => continue,
            },
        };
        accepted.fetch_add(1, Ordering::SeqCst);
        let current = *mode.borrow();
        match current {
            Mode::Cut => drop(client),
            Mode::Pass | Mode::Blackhole => {
                tokio::spawn(serve(client, upstream, mode.clone(), stop.clone(), current));
            }
        }
    }
}

async fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    stop: CancellationToken,
    started_in: Mode,
) {
    if started_in == Mode::Blackhole {
        // Hold the connection, forward nothing, until anything changes.
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = mode.wait_for(|m| *m != Mode::Blackhole) => {}
        }
        return;
    }
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let stalled = tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => false,
        m = mode.wait_for(|m| *m != Mode::Pass) => m.is_ok_and(|m| *m == Mode::Blackhole),
    };
    if stalled {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = mode.wait_for(|m| *m != Mode::Blackhole) => {}
        }
    }
    // Both sockets drop here: the connection is closed on both sides.
}
