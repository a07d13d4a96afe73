//! A minimal AMQP 0-9-1 client over a plain TCP stream: one channel with
//! publisher confirms, `basic.get`, `basic.publish`, `basic.ack` and
//! `basic.nack`. Every read is bounded by a timeout; nothing from the
//! network is trusted (lengths are checked, text is kept as bytes).
//!
//! One file, past 600 lines: one connection's handshake, channel and
//! operations, each bounded by the same read deadline.

use std::time::Duration;

use lapin::uri::{AMQPScheme, AMQPUri, SASLMechanism};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::codec::{
    CLASS_BASIC, Close, CodecError, ContentHeader, FRAME_BODY, FRAME_HEADER, FRAME_HEARTBEAT,
    FRAME_METHOD, FRAME_OVERHEAD, Frame, Method, PROTOCOL_HEADER, decode_frame, encode_frame,
};
use super::props::{RawProperties, RawValue};

/// The only channel the client opens.
const CHANNEL: u16 = 1;
/// The frame size the client asks for (RabbitMQ's default).
const FRAME_MAX: u32 = 131_072;
/// The frame size accepted before tuning (the server's `connection.start`
/// is far smaller).
const PRE_TUNE_FRAME_MAX: usize = 1 << 20;
/// The largest body the client accepts (RabbitMQ allows 128 MiB at most
/// on 3.x, 16 MiB by default on 4.x).
const MAX_BODY: u64 = 512 << 20;
/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 64 * 1024;

/// What can go wrong with the raw client.
#[derive(Debug, thiserror::Error)]
pub enum RawError {
    /// The socket failed.
    #[error("raw AMQP client: I/O error while {during}: {source}")]
    Io {
        /// What the client was doing.
        during: &'static str,
        /// The socket's error.
        #[source]
        source: std::io::Error,
    },
    /// The server did not answer in time.
    #[error("raw AMQP client: no answer within {after:?} while {during}")]
    Timeout {
        /// What the client was doing.
        during: &'static str,
        /// The time limit.
        after: Duration,
    },
    /// The server closed the TCP connection.
    #[error("raw AMQP client: the server closed the socket while {during}")]
    Eof {
        /// What the client was doing.
        during: &'static str,
    },
    /// Bytes from the server that are not AMQP 0-9-1.
    #[error("raw AMQP client: malformed data from the server: {0}")]
    Codec(#[from] CodecError),
    /// A valid frame, but not the one the protocol calls for.
    #[error("raw AMQP client: unexpected {got} while {during}")]
    Unexpected {
        /// What the client was doing.
        during: &'static str,
        /// What came.
        got: String,
    },
    /// The server closed the connection (`connection.close`).
    #[error("RabbitMQ closed the connection: {code} {text}")]
    ConnectionClosed {
        /// The reply code (403: access refused, 530: vhost not allowed...).
        code: u16,
        /// The reply text.
        text: String,
    },
    /// The server closed the channel (`channel.close`).
    #[error("RabbitMQ closed the channel: {code} {text}")]
    ChannelClosed {
        /// The reply code (404: no such queue, 406: precondition failed...).
        code: u16,
        /// The reply text.
        text: String,
    },
    /// What the client does not do: TLS, SASL mechanisms other than PLAIN.
    #[error("raw AMQP client: {0} is not supported")]
    Unsupported(String),
    /// A mandatory publish that no queue took.
    #[error("publish to `{queue}` was returned by RabbitMQ: {code} {text}")]
    Returned {
        /// The routing key (the queue).
        queue: String,
        /// The reply code (312: no route).
        code: u16,
        /// The reply text.
        text: String,
    },
    /// A publish the server nacked.
    #[error("publish to `{queue}` was not confirmed (basic.nack)")]
    Nacked {
        /// The routing key (the queue).
        queue: String,
    },
}

impl RawError {
    fn io(during: &'static str) -> impl FnOnce(std::io::Error) -> RawError {
        move |source| RawError::Io { during, source }
    }
}

/// A message taken with `basic.get`, as the server sent it.
#[derive(Clone, Debug)]
pub(crate) struct GotMessage {
    pub delivery_tag: u64,
    pub redelivered: bool,
    pub exchange: Vec<u8>,
    pub routing_key: Vec<u8>,
    /// Messages left in the queue after this one.
    pub message_count: u32,
    /// The encoded properties (flags first), as received.
    pub properties: Vec<u8>,
    pub body: Vec<u8>,
}

/// One connection with one channel in confirm mode.
pub(crate) struct RawClient {
    stream: TcpStream,
    buf: Vec<u8>,
    frame_max: usize,
    io_timeout: Duration,
    /// Publishes sent on the channel (the confirm sequence number).
    published: u64,
}

impl RawClient {
    /// Connects, authenticates with PLAIN, opens the vhost and a channel in
    /// confirm mode. `io_timeout` bounds every read and write.
    pub async fn connect(
        uri: &AMQPUri,
        connection_name: &str,
        io_timeout: Duration,
    ) -> Result<RawClient, RawError> {
        if uri.scheme == AMQPScheme::AMQPS {
            return Err(RawError::Unsupported("TLS (amqps://)".into()));
        }
        let mechanism = uri.query.auth_mechanism.unwrap_or_default();
        if mechanism != SASLMechanism::Plain {
            return Err(RawError::Unsupported(format!(
                "the SASL mechanism {}",
                mechanism.name()
            )));
        }
        const CONNECT: &str = "connecting";
        let addr = (uri.authority.host.as_str(), uri.authority.port);
        let stream = timeout(io_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| RawError::Timeout {
                during: CONNECT,
                after: io_timeout,
            })?
            .map_err(RawError::io(CONNECT))?;
        let _ = stream.set_nodelay(true);
        let mut client = RawClient {
            stream,
            buf: Vec::with_capacity(READ_CHUNK),
            frame_max: PRE_TUNE_FRAME_MAX,
            io_timeout,
            published: 0,
        };
        client.handshake(uri, connection_name).await?;
        Ok(client)
    }

    async fn handshake(&mut self, uri: &AMQPUri, name: &str) -> Result<(), RawError> {
        self.write_all(PROTOCOL_HEADER, "sending the protocol header")
            .await?;
        const START: &str = "waiting for connection.start";
        let mechanisms = match self.read_method(START).await? {
            (0, Method::ConnectionStart { mechanisms, .. }) => mechanisms,
            (_, other) => return Err(unexpected(START, &other)),
        };
        if !mechanisms.split(|b| *b == b' ').any(|m| m == b"PLAIN") {
            return Err(RawError::Unsupported(format!(
                "a server without PLAIN authentication (it offers {})",
                String::from_utf8_lossy(&mechanisms)
            )));
        }
        let user = &uri.authority.userinfo;
        let mut response = vec![0];
        response.extend_from_slice(user.username.as_bytes());
        response.push(0);
        response.extend_from_slice(user.password.as_bytes());
        let client_properties = RawValue::encode_table(&[
            (b"product".to_vec(), RawValue::text("idemq-rabbitmq")),
            (
                b"version".to_vec(),
                RawValue::text(env!("CARGO_PKG_VERSION")),
            ),
            (b"connection_name".to_vec(), RawValue::text(name)),
            (
                b"capabilities".to_vec(),
                RawValue::Table(vec![(
                    b"authentication_failure_close".to_vec(),
                    RawValue::Scalar {
                        tag: b't',
                        bytes: vec![1],
                    },
                )]),
            ),
        ])?;
        self.send_method(
            0,
            &Method::ConnectionStartOk {
                client_properties,
                mechanism: b"PLAIN".to_vec(),
                response,
                locale: b"en_US".to_vec(),
            },
        )
        .await?;
        const TUNE: &str = "waiting for connection.tune";
        let (channel_max, server_frame_max) = match self.read_method(TUNE).await? {
            (
                0,
                Method::ConnectionTune {
                    channel_max,
                    frame_max,
                    ..
                },
            ) => (channel_max, frame_max),
            (_, other) => return Err(unexpected(TUNE, &other)),
        };
        let wanted = uri.query.frame_max.unwrap_or(FRAME_MAX).max(4096);
        let frame_max = match server_frame_max {
            0 => wanted,
            server => wanted.min(server),
        };
        self.send_method(
            0,
            &Method::ConnectionTuneOk {
                channel_max,
                frame_max,
                heartbeat: 0,
            },
        )
        .await?;
        self.frame_max = usize::try_from(frame_max).unwrap_or(PRE_TUNE_FRAME_MAX);
        self.send_method(
            0,
            &Method::ConnectionOpen {
                vhost: uri.vhost.as_bytes().to_vec(),
            },
        )
        .await?;
        const OPEN: &str = "waiting for connection.open-ok";
        match self.read_method(OPEN).await? {
            (0, Method::ConnectionOpenOk) => {}
            (_, other) => return Err(unexpected(OPEN, &other)),
        }
        self.send_method(CHANNEL, &Method::ChannelOpen).await?;
        const CHANNEL_OPEN: &str = "waiting for channel.open-ok";
        match self.read_method(CHANNEL_OPEN).await? {
            (CHANNEL, Method::ChannelOpenOk) => {}
            (_, other) => return Err(unexpected(CHANNEL_OPEN, &other)),
        }
        self.send_method(CHANNEL, &Method::ConfirmSelect).await?;
        const SELECT: &str = "waiting for confirm.select-ok";
        match self.read_method(SELECT).await? {
            (CHANNEL, Method::ConfirmSelectOk) => Ok(()),
            (_, other) => Err(unexpected(SELECT, &other)),
        }
    }

    /// The negotiated frame size.
    pub fn frame_max(&self) -> usize {
        self.frame_max
    }

    /// Takes the message at the head of `queue`, unacked; `None` when the
    /// queue is empty.
    pub async fn basic_get(&mut self, queue: &[u8]) -> Result<Option<GotMessage>, RawError> {
        self.send_method(
            CHANNEL,
            &Method::BasicGet {
                queue: queue.to_vec(),
                no_ack: false,
            },
        )
        .await?;
        const GET: &str = "waiting for basic.get-ok";
        let (delivery_tag, redelivered, exchange, routing_key, message_count) =
            match self.read_method(GET).await? {
                (CHANNEL, Method::BasicGetEmpty) => return Ok(None),
                (
                    CHANNEL,
                    Method::BasicGetOk {
                        delivery_tag,
                        redelivered,
                        exchange,
                        routing_key,
                        message_count,
                    },
                ) => (
                    delivery_tag,
                    redelivered,
                    exchange,
                    routing_key,
                    message_count,
                ),
                (_, other) => return Err(unexpected(GET, &other)),
            };
        let (header, body) = self.read_content("reading a message of basic.get").await?;
        Ok(Some(GotMessage {
            delivery_tag,
            redelivered,
            exchange,
            routing_key,
            message_count,
            properties: header.properties,
            body,
        }))
    }

    /// Publishes to `exchange` with `routing_key`, mandatory, and waits for
    /// the broker's confirm. A returned (unroutable) or nacked publish is
    /// an error.
    pub async fn publish_confirmed(
        &mut self,
        exchange: &[u8],
        routing_key: &[u8],
        properties: &RawProperties,
        body: &[u8],
    ) -> Result<(), RawError> {
        let mut out = Vec::with_capacity(body.len() + 512);
        let method = Method::BasicPublish {
            exchange: exchange.to_vec(),
            routing_key: routing_key.to_vec(),
            mandatory: true,
            immediate: false,
        }
        .encode()?;
        encode_frame(FRAME_METHOD, CHANNEL, &method, &mut out)?;
        let header = ContentHeader {
            class_id: CLASS_BASIC,
            body_size: body.len() as u64,
            properties: properties.encode()?,
        }
        .encode();
        if header.len() + FRAME_OVERHEAD > self.frame_max {
            return Err(CodecError::TooLarge {
                size: header.len() + FRAME_OVERHEAD,
                max: self.frame_max,
            }
            .into());
        }
        encode_frame(FRAME_HEADER, CHANNEL, &header, &mut out)?;
        let chunk = self.frame_max.saturating_sub(FRAME_OVERHEAD).max(1);
        for part in body.chunks(chunk) {
            encode_frame(FRAME_BODY, CHANNEL, part, &mut out)?;
        }
        self.write_all(&out, "publishing").await?;
        self.published += 1;
        let seq = self.published;
        let queue = || String::from_utf8_lossy(routing_key).into_owned();
        let mut returned: Option<(u16, String)> = None;
        const CONFIRM: &str = "waiting for a publisher confirm";
        loop {
            match self.read_method(CONFIRM).await? {
                (
                    CHANNEL,
                    Method::BasicReturn {
                        reply_code,
                        reply_text,
                        ..
                    },
                ) => {
                    self.read_content("reading a returned message").await?;
                    returned = Some((reply_code, String::from_utf8_lossy(&reply_text).into()));
                }
                (
                    CHANNEL,
                    Method::BasicAck {
                        delivery_tag,
                        multiple,
                    },
                ) if delivery_tag == seq || (multiple && delivery_tag > seq) => {
                    return match returned {
                        Some((code, text)) => Err(RawError::Returned {
                            queue: queue(),
                            code,
                            text,
                        }),
                        None => Ok(()),
                    };
                }
                (
                    CHANNEL,
                    Method::BasicNack {
                        delivery_tag,
                        multiple,
                        ..
                    },
                ) if delivery_tag == seq || (multiple && delivery_tag > seq) => {
                    return Err(RawError::Nacked { queue: queue() });
                }
                // Confirms of earlier publishes.
                (CHANNEL, Method::BasicAck { .. } | Method::BasicNack { .. }) => {}
                (_, other) => return Err(unexpected(CONFIRM, &other)),
            }
        }
    }

    /// Acks one message.
    pub async fn ack(&mut self, delivery_tag: u64) -> Result<(), RawError> {
        self.send_method(
            CHANNEL,
            &Method::BasicAck {
                delivery_tag,
                multiple: false,
            },
        )
        .await
    }

    /// Nacks one message, requeueing it or not.
    pub async fn nack(&mut self, delivery_tag: u64, requeue: bool) -> Result<(), RawError> {
        self.send_method(
            CHANNEL,
            &Method::BasicNack {
                delivery_tag,
                multiple: false,
                requeue,
            },
        )
        .await
    }

    /// Closes the connection and waits (bounded) for the server to confirm:
    /// every frame sent before was processed then.
    pub async fn close(mut self) -> Result<(), RawError> {
        self.send_method(
            0,
            &Method::ConnectionClose(Close {
                reply_code: 200,
                reply_text: b"idemq: done".to_vec(),
                class_id: 0,
                method_id: 0,
            }),
        )
        .await?;
        const CLOSE: &str = "waiting for connection.close-ok";
        loop {
            let frame = self.read_frame(CLOSE).await?;
            if frame.kind == FRAME_METHOD
                && frame.channel == 0
                && let Ok(Method::ConnectionCloseOk | Method::ConnectionClose(_)) =
                    Method::decode(&frame.payload)
            {
                let _ = self.stream.shutdown().await;
                return Ok(());
            }
        }
    }

    async fn send_method(&mut self, channel: u16, method: &Method) -> Result<(), RawError> {
        let mut out = Vec::with_capacity(64);
        encode_frame(FRAME_METHOD, channel, &method.encode()?, &mut out)?;
        self.write_all(&out, "sending a method").await
    }

    async fn write_all(&mut self, bytes: &[u8], during: &'static str) -> Result<(), RawError> {
        timeout(self.io_timeout, self.stream.write_all(bytes))
            .await
            .map_err(|_| RawError::Timeout {
                during,
                after: self.io_timeout,
            })?
            .map_err(RawError::io(during))
    }

    async fn read_frame(&mut self, during: &'static str) -> Result<Frame, RawError> {
        loop {
            if let Some((frame, used)) = decode_frame(&self.buf, self.frame_max)? {
                self.buf.drain(..used);
                return Ok(frame);
            }
            let start = self.buf.len();
            self.buf.resize(start + READ_CHUNK, 0);
            let read = timeout(self.io_timeout, self.stream.read(&mut self.buf[start..])).await;
            let n = match read {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => {
                    self.buf.truncate(start);
                    return Err(RawError::Io { during, source: e });
                }
                Err(_) => {
                    self.buf.truncate(start);
                    return Err(RawError::Timeout {
                        during,
                        after: self.io_timeout,
                    });
                }
            };
            self.buf.truncate(start + n);
            if n == 0 {
                return Err(RawError::Eof { during });
            }
        }
    }

    /// The next method, with its channel. Heartbeats, flow control and
    /// resource alarms are dealt with here; a close from the server is an
    /// error (after the client confirmed it).
    async fn read_method(&mut self, during: &'static str) -> Result<(u16, Method), RawError> {
        loop {
            let frame = self.read_frame(during).await?;
            match frame.kind {
                FRAME_HEARTBEAT => continue,
                FRAME_METHOD => {}
                other => {
                    return Err(RawError::Unexpected {
                        during,
                        got: format!("a frame of type {other} on channel {}", frame.channel),
                    });
                }
            }
            match Method::decode(&frame.payload)? {
                Method::ConnectionClose(close) => {
                    let _ = self.send_method(0, &Method::ConnectionCloseOk).await;
                    return Err(RawError::ConnectionClosed {
                        code: close.reply_code,
                        text: close.text(),
                    });
                }
                Method::ChannelClose(close) => {
                    let _ = self
                        .send_method(frame.channel, &Method::ChannelCloseOk)
                        .await;
                    return Err(RawError::ChannelClosed {
                        code: close.reply_code,
                        text: close.text(),
                    });
                }
                Method::ConnectionBlocked { .. } | Method::ConnectionUnblocked => continue,
                Method::ChannelFlow { active } => {
                    self.send_method(frame.channel, &Method::ChannelFlowOk { active })
                        .await?;
                }
                m => return Ok((frame.channel, m)),
            }
        }
    }

    /// A content header and the body frames that follow it.
    async fn read_content(
        &mut self,
        during: &'static str,
    ) -> Result<(ContentHeader, Vec<u8>), RawError> {
        let frame = self.next_content_frame(during).await?;
        if frame.kind != FRAME_HEADER {
            return Err(RawError::Unexpected {
                during,
                got: format!("a frame of type {} instead of a content header", frame.kind),
            });
        }
        let header = ContentHeader::decode(&frame.payload)?;
        if header.body_size > MAX_BODY {
            return Err(RawError::Unexpected {
                during,
                got: format!("a body of {} bytes", header.body_size),
            });
        }
        let size = usize::try_from(header.body_size).unwrap_or(usize::MAX);
        let mut body = Vec::with_capacity(size.min(1 << 20));
        while body.len() < size {
            let frame = self.next_content_frame(during).await?;
            if frame.kind != FRAME_BODY {
                return Err(RawError::Unexpected {
                    during,
                    got: format!("a frame of type {} instead of a body frame", frame.kind),
                });
            }
            if body.len() + frame.payload.len() > size {
                return Err(RawError::Unexpected {
                    during,
                    got: format!("more body than the {size} bytes the content header announced"),
                });
            }
            body.extend_from_slice(&frame.payload);
        }
        Ok((header, body))
    }

    /// The next frame of the channel's content; connection-level frames in
    /// between (heartbeats, alarms, a close) are dealt with.
    async fn next_content_frame(&mut self, during: &'static str) -> Result<Frame, RawError> {
        loop {
            let frame = self.read_frame(during).await?;
            match (frame.kind, frame.channel) {
                (FRAME_HEARTBEAT, _) => {}
                (FRAME_METHOD, 0) => match Method::decode(&frame.payload)? {
                    Method::ConnectionClose(close) => {
                        let _ = self.send_method(0, &Method::ConnectionCloseOk).await;
                        return Err(RawError::ConnectionClosed {
                            code: close.reply_code,
                            text: close.text(),
                        });
                    }
                    Method::ConnectionBlocked { .. } | Method::ConnectionUnblocked => {}
                    other => return Err(unexpected(during, &other)),
                },
                (FRAME_METHOD, _) => {
                    let m = Method::decode(&frame.payload)?;
                    if let Method::ChannelClose(close) = m {
                        let _ = self
                            .send_method(frame.channel, &Method::ChannelCloseOk)
                            .await;
                        return Err(RawError::ChannelClosed {
                            code: close.reply_code,
                            text: close.text(),
                        });
                    }
                    return Err(unexpected(during, &m));
                }
                (_, CHANNEL) => return Ok(frame),
                (kind, channel) => {
                    return Err(RawError::Unexpected {
                        during,
                        got: format!("a frame of type {kind} on channel {channel}"),
                    });
                }
            }
        }
    }
}

fn unexpected(during: &'static str, got: &Method) -> RawError {
    RawError::Unexpected {
        during,
        got: got.name(),
    }
}
