//! AMQP 0-9-1 frames and the methods the raw client uses.
//!
//! Strict about framing (sizes are checked against what was received and
//! against the negotiated frame size, every frame ends in `0xCE`), lenient
//! about text: every short string is kept as bytes, never checked for UTF-8.
//!
//! One file, past 600 lines, because the framing and every method's
//! encoding share one set of bounds checks, and a fifth of it is the
//! tests that feed them captured and hostile frames.

use std::fmt;

/// A method frame.
pub(crate) const FRAME_METHOD: u8 = 1;
/// A content header frame.
pub(crate) const FRAME_HEADER: u8 = 2;
/// A content body frame.
pub(crate) const FRAME_BODY: u8 = 3;
/// A heartbeat frame.
pub(crate) const FRAME_HEARTBEAT: u8 = 8;
/// The byte every frame ends with.
pub(crate) const FRAME_END: u8 = 0xCE;
/// Type, channel and size before the payload, the end byte after it.
pub(crate) const FRAME_OVERHEAD: usize = 8;
/// The AMQP 0-9-1 protocol header.
pub(crate) const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";
/// The class id of `basic`, the only class with content.
pub(crate) const CLASS_BASIC: u16 = 60;

/// What can be wrong with bytes from the network.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// Fewer bytes than a field or a length prefix announced.
    #[error("truncated {what}: {needed} bytes needed, {left} left")]
    Truncated {
        /// The field being read.
        what: &'static str,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes that were left.
        left: usize,
    },
    /// A frame did not end in `0xCE`.
    #[error("frame end byte is {0:#04x}, not 0xce")]
    FrameEnd(u8),
    /// A frame larger than the negotiated maximum.
    #[error("frame of {size} bytes exceeds the negotiated maximum of {max}")]
    TooLarge {
        /// The frame's size, overhead included.
        size: usize,
        /// The maximum.
        max: usize,
    },
    /// A field-table value type that neither RabbitMQ nor lapin knows.
    #[error("unknown field value type {0:#04x}")]
    UnknownFieldType(u8),
    /// Bytes left over after a complete method, table or array.
    #[error("{left} bytes left over after {what}")]
    TrailingBytes {
        /// What was complete.
        what: &'static str,
        /// How many bytes followed it.
        left: usize,
    },
    /// A string too long for its length prefix.
    #[error("{what} of {len} bytes is too long for its length prefix")]
    TooLong {
        /// The field being written.
        what: &'static str,
        /// Its length.
        len: usize,
    },
    /// The server sent the protocol header back: it wants another version.
    #[error("the server does not speak AMQP 0-9-1 (it answered {0:02x?})")]
    ProtocolMismatch(Vec<u8>),
}

/// One frame: type, channel, payload.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Frame {
    pub kind: u8,
    pub channel: u16,
    pub payload: Vec<u8>,
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frame")
            .field("kind", &self.kind)
            .field("channel", &self.channel)
            .field("len", &self.payload.len())
            .finish()
    }
}

/// Appends one frame to `out`.
pub(crate) fn encode_frame(
    kind: u8,
    channel: u16,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    let len = u32::try_from(payload.len()).map_err(|_| CodecError::TooLong {
        what: "frame payload",
        len: payload.len(),
    })?;
    out.reserve(payload.len() + FRAME_OVERHEAD);
    out.push(kind);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    out.push(FRAME_END);
    Ok(())
}

/// The first frame of `buf`, with the bytes it took; `None` when `buf`
/// does not hold all of it yet. `max` bounds the frame size (overhead
/// included) before its payload is waited for.
pub(crate) fn decode_frame(buf: &[u8], max: usize) -> Result<Option<(Frame, usize)>, CodecError> {
    if buf.len() >= 4 && &buf[..4] == b"AMQP" {
        return Err(CodecError::ProtocolMismatch(
            buf[..buf.len().min(8)].to_vec(),
        ));
    }
    let Some(head) = buf.get(..7) else {
        return Ok(None);
    };
    let kind = head[0];
    let channel = u16::from_be_bytes([head[1], head[2]]);
    let len = u32::from_be_bytes([head[3], head[4], head[5], head[6]]);
    let len = usize::try_from(len).map_err(|_| CodecError::TooLarge {
        size: usize::MAX,
        max,
    })?;
    let size = len.saturating_add(FRAME_OVERHEAD);
    if size > max {
        return Err(CodecError::TooLarge { size, max });
    }
    let Some(end) = buf.get(7 + len) else {
        return Ok(None);
    };
    if *end != FRAME_END {
        return Err(CodecError::FrameEnd(*end));
    }
    let payload = buf[7..7 + len].to_vec();
    Ok(Some((
        Frame {
            kind,
            channel,
            payload,
        },
        size,
    )))
}

/// Reads fields off a byte slice; every read checks the length.
pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    /// The bytes not read yet.
    pub fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }

    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], CodecError> {
        let left = self.remaining();
        if n > left {
            return Err(CodecError::Truncated {
                what,
                needed: n,
                left,
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], CodecError> {
        let bytes = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, CodecError> {
        Ok(self.array::<1>(what)?[0])
    }

    pub fn u16(&mut self, what: &'static str) -> Result<u16, CodecError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, CodecError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    pub fn u64(&mut self, what: &'static str) -> Result<u64, CodecError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    /// A short string (one length byte), as bytes.
    pub fn short_str(&mut self, what: &'static str) -> Result<&'a [u8], CodecError> {
        let len = self.u8(what)?;
        self.take(usize::from(len), what)
    }

    /// A long string, byte array or table (four length bytes), as bytes.
    pub fn long_str(&mut self, what: &'static str) -> Result<&'a [u8], CodecError> {
        let len = self.u32(what)?;
        let len = usize::try_from(len).map_err(|_| CodecError::Truncated {
            what,
            needed: usize::MAX,
            left: self.remaining(),
        })?;
        self.take(len, what)
    }

    /// Fails when bytes are left after `what`.
    pub fn finish(&self, what: &'static str) -> Result<(), CodecError> {
        match self.remaining() {
            0 => Ok(()),
            left => Err(CodecError::TrailingBytes { what, left }),
        }
    }
}

/// Appends a short string (at most 255 bytes).
pub(crate) fn put_short_str(
    out: &mut Vec<u8>,
    what: &'static str,
    s: &[u8],
) -> Result<(), CodecError> {
    let len = u8::try_from(s.len()).map_err(|_| CodecError::TooLong { what, len: s.len() })?;
    out.push(len);
    out.extend_from_slice(s);
    Ok(())
}

/// Appends a long string, byte array or table body with its length.
pub(crate) fn put_long_str(
    out: &mut Vec<u8>,
    what: &'static str,
    s: &[u8],
) -> Result<(), CodecError> {
    let len = u32::try_from(s.len()).map_err(|_| CodecError::TooLong { what, len: s.len() })?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s);
    Ok(())
}

/// The methods the raw client sends or understands. Short strings are
/// bytes; tables are their encoded bodies (without the length prefix).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Method {
    ConnectionStart {
        version_major: u8,
        version_minor: u8,
        server_properties: Vec<u8>,
        mechanisms: Vec<u8>,
        locales: Vec<u8>,
    },
    ConnectionStartOk {
        client_properties: Vec<u8>,
        mechanism: Vec<u8>,
        response: Vec<u8>,
        locale: Vec<u8>,
    },
    ConnectionSecure {
        challenge: Vec<u8>,
    },
    ConnectionTune {
        channel_max: u16,
        frame_max: u32,
        heartbeat: u16,
    },
    ConnectionTuneOk {
        channel_max: u16,
        frame_max: u32,
        heartbeat: u16,
    },
    ConnectionOpen {
        vhost: Vec<u8>,
    },
    ConnectionOpenOk,
    ConnectionClose(Close),
    ConnectionCloseOk,
    ConnectionBlocked {
        reason: Vec<u8>,
    },
    ConnectionUnblocked,
    ChannelOpen,
    ChannelOpenOk,
    ChannelFlow {
        active: bool,
    },
    ChannelFlowOk {
        active: bool,
    },
    ChannelClose(Close),
    ChannelCloseOk,
    ConfirmSelect,
    ConfirmSelectOk,
    BasicGet {
        queue: Vec<u8>,
        no_ack: bool,
    },
    BasicGetOk {
        delivery_tag: u64,
        redelivered: bool,
        exchange: Vec<u8>,
        routing_key: Vec<u8>,
        message_count: u32,
    },
    BasicGetEmpty,
    BasicPublish {
        exchange: Vec<u8>,
        routing_key: Vec<u8>,
        mandatory: bool,
        immediate: bool,
    },
    BasicReturn {
        reply_code: u16,
        reply_text: Vec<u8>,
        exchange: Vec<u8>,
        routing_key: Vec<u8>,
    },
    BasicAck {
        delivery_tag: u64,
        multiple: bool,
    },
    BasicNack {
        delivery_tag: u64,
        multiple: bool,
        requeue: bool,
    },
    /// Any method the client has no use for.
    Other {
        class_id: u16,
        method_id: u16,
    },
}

/// The arguments of `connection.close` and `channel.close`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Close {
    pub reply_code: u16,
    pub reply_text: Vec<u8>,
    pub class_id: u16,
    pub method_id: u16,
}

impl Close {
    fn decode(c: &mut Cursor<'_>) -> Result<Close, CodecError> {
        Ok(Close {
            reply_code: c.u16("reply-code")?,
            reply_text: c.short_str("reply-text")?.to_vec(),
            class_id: c.u16("class-id")?,
            method_id: c.u16("method-id")?,
        })
    }

    fn encode(&self, out: &mut Vec<u8>) -> Result<(), CodecError> {
        out.extend_from_slice(&self.reply_code.to_be_bytes());
        put_short_str(out, "reply-text", &self.reply_text)?;
        out.extend_from_slice(&self.class_id.to_be_bytes());
        out.extend_from_slice(&self.method_id.to_be_bytes());
        Ok(())
    }

    /// The reply text, readable.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.reply_text).into_owned()
    }
}

impl Method {
    /// (class id, method id).
    pub fn id(&self) -> (u16, u16) {
        match self {
            Method::ConnectionStart { .. } => (10, 10),
            Method::ConnectionStartOk { .. } => (10, 11),
            Method::ConnectionSecure { .. } => (10, 20),
            Method::ConnectionTune { .. } => (10, 30),
            Method::ConnectionTuneOk { .. } => (10, 31),
            Method::ConnectionOpen { .. } => (10, 40),
            Method::ConnectionOpenOk => (10, 41),
            Method::ConnectionClose(_) => (10, 50),
            Method::ConnectionCloseOk => (10, 51),
            Method::ConnectionBlocked { .. } => (10, 60),
            Method::ConnectionUnblocked => (10, 61),
            Method::ChannelOpen => (20, 10),
            Method::ChannelOpenOk => (20, 11),
            Method::ChannelFlow { .. } => (20, 20),
            Method::ChannelFlowOk { .. } => (20, 21),
            Method::ChannelClose(_) => (20, 40),
            Method::ChannelCloseOk => (20, 41),
            Method::ConfirmSelect => (85, 10),
            Method::ConfirmSelectOk => (85, 11),
            Method::BasicGet { .. } => (60, 70),
            Method::BasicGetOk { .. } => (60, 71),
            Method::BasicGetEmpty => (60, 72),
            Method::BasicPublish { .. } => (60, 40),
            Method::BasicReturn { .. } => (60, 50),
            Method::BasicAck { .. } => (60, 80),
            Method::BasicNack { .. } => (60, 120),
            Method::Other {
                class_id,
                method_id,
            } => (*class_id, *method_id),
        }
    }

    /// A short name for errors and logs.
    pub fn name(&self) -> String {
        let (class, method) = self.id();
        let known = match (class, method) {
            (10, 10) => "connection.start",
            (10, 11) => "connection.start-ok",
            (10, 20) => "connection.secure",
            (10, 30) => "connection.tune",
            (10, 31) => "connection.tune-ok",
            (10, 40) => "connection.open",
            (10, 41) => "connection.open-ok",
            (10, 50) => "connection.close",
            (10, 51) => "connection.close-ok",
            (10, 60) => "connection.blocked",
            (10, 61) => "connection.unblocked",
            (20, 10) => "channel.open",
            (20, 11) => "channel.open-ok",
            (20, 20) => "channel.flow",
            (20, 21) => "channel.flow-ok",
            (20, 40) => "channel.close",
            (20, 41) => "channel.close-ok",
            (85, 10) => "confirm.select",
            (85, 11) => "confirm.select-ok",
            (60, 40) => "basic.publish",
            (60, 50) => "basic.return",
            (60, 70) => "basic.get",
            (60, 71) => "basic.get-ok",
            (60, 72) => "basic.get-empty",
            (60, 80) => "basic.ack",
            (60, 120) => "basic.nack",
            _ => return format!("method {class}.{method}"),
        };
        known.to_owned()
    }

    /// The method frame's payload.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        let mut out = Vec::with_capacity(32);
        let (class, method) = self.id();
        out.extend_from_slice(&class.to_be_bytes());
        out.extend_from_slice(&method.to_be_bytes());
        match self {
            Method::ConnectionStart {
                version_major,
                version_minor,
                server_properties,
                mechanisms,
                locales,
            } => {
                out.push(*version_major);
                out.push(*version_minor);
                put_long_str(&mut out, "server-properties", server_properties)?;
                put_long_str(&mut out, "mechanisms", mechanisms)?;
                put_long_str(&mut out, "locales", locales)?;
            }
            Method::ConnectionStartOk {
                client_properties,
                mechanism,
                response,
                locale,
            } => {
                put_long_str(&mut out, "client-properties", client_properties)?;
                put_short_str(&mut out, "mechanism", mechanism)?;
                put_long_str(&mut out, "response", response)?;
                put_short_str(&mut out, "locale", locale)?;
            }
            Method::ConnectionSecure { challenge } => {
                put_long_str(&mut out, "challenge", challenge)?;
            }
            Method::ConnectionTune {
                channel_max,
                frame_max,
                heartbeat,
            }
            | Method::ConnectionTuneOk {
                channel_max,
                frame_max,
                heartbeat,
            } => {
                out.extend_from_slice(&channel_max.to_be_bytes());
                out.extend_from_slice(&frame_max.to_be_bytes());
                out.extend_from_slice(&heartbeat.to_be_bytes());
            }
            Method::ConnectionOpen { vhost } => {
                put_short_str(&mut out, "vhost", vhost)?;
                put_short_str(&mut out, "reserved", b"")?;
                out.push(0);
            }
            Method::ConnectionOpenOk => put_short_str(&mut out, "reserved", b"")?,
            Method::ConnectionClose(close) | Method::ChannelClose(close) => {
                close.encode(&mut out)?
            }
            Method::ConnectionBlocked { reason } => put_short_str(&mut out, "reason", reason)?,
            Method::ChannelOpen => put_short_str(&mut out, "reserved", b"")?,
            Method::ChannelOpenOk => put_long_str(&mut out, "reserved", b"")?,
            Method::ChannelFlow { active } | Method::ChannelFlowOk { active } => {
                out.push(u8::from(*active));
            }
            Method::ConfirmSelect => out.push(0),
            Method::BasicGet { queue, no_ack } => {
                out.extend_from_slice(&0u16.to_be_bytes());
                put_short_str(&mut out, "queue", queue)?;
                out.push(u8::from(*no_ack));
            }
            Method::BasicGetOk {
                delivery_tag,
                redelivered,
                exchange,
                routing_key,
                message_count,
            } => {
                out.extend_from_slice(&delivery_tag.to_be_bytes());
                out.push(u8::from(*redelivered));
                put_short_str(&mut out, "exchange", exchange)?;
                put_short_str(&mut out, "routing-key", routing_key)?;
                out.extend_from_slice(&message_count.to_be_bytes());
            }
            Method::BasicGetEmpty => put_short_str(&mut out, "reserved", b"")?,
            Method::BasicPublish {
                exchange,
                routing_key,
                mandatory,
                immediate,
            } => {
                out.extend_from_slice(&0u16.to_be_bytes());
                put_short_str(&mut out, "exchange", exchange)?;
                put_short_str(&mut out, "routing-key", routing_key)?;
                out.push(u8::from(*mandatory) | (u8::from(*immediate) << 1));
            }
            Method::BasicReturn {
                reply_code,
                reply_text,
                exchange,
                routing_key,
            } => {
                out.extend_from_slice(&reply_code.to_be_bytes());
                put_short_str(&mut out, "reply-text", reply_text)?;
                put_short_str(&mut out, "exchange", exchange)?;
                put_short_str(&mut out, "routing-key", routing_key)?;
            }
            Method::BasicAck {
                delivery_tag,
                multiple,
            } => {
                out.extend_from_slice(&delivery_tag.to_be_bytes());
                out.push(u8::from(*multiple));
            }
            Method::BasicNack {
                delivery_tag,
                multiple,
                requeue,
            } => {
                out.extend_from_slice(&delivery_tag.to_be_bytes());
                out.push(u8::from(*multiple) | (u8::from(*requeue) << 1));
            }
            Method::ConnectionCloseOk
            | Method::ConnectionUnblocked
            | Method::ChannelCloseOk
            | Method::ConfirmSelectOk
            | Method::Other { .. } => {}
        }
        Ok(out)
    }

    /// Decodes a method frame's payload. Methods the client has no use for
    /// are [`Method::Other`], their arguments unread.
    pub fn decode(payload: &[u8]) -> Result<Method, CodecError> {
        let mut c = Cursor::new(payload);
        let class_id = c.u16("class-id")?;
        let method_id = c.u16("method-id")?;
        let m = match (class_id, method_id) {
            (10, 10) => Method::ConnectionStart {
                version_major: c.u8("version-major")?,
                version_minor: c.u8("version-minor")?,
                server_properties: c.long_str("server-properties")?.to_vec(),
                mechanisms: c.long_str("mechanisms")?.to_vec(),
                locales: c.long_str("locales")?.to_vec(),
            },
            (10, 11) => Method::ConnectionStartOk {
                client_properties: c.long_str("client-properties")?.to_vec(),
                mechanism: c.short_str("mechanism")?.to_vec(),
                response: c.long_str("response")?.to_vec(),
                locale: c.short_str("locale")?.to_vec(),
            },
            (10, 20) => Method::ConnectionSecure {
                challenge: c.long_str("challenge")?.to_vec(),
            },
            (10, 30) | (10, 31) => {
                let channel_max = c.u16("channel-max")?;
                let frame_max = c.u32("frame-max")?;
                let heartbeat = c.u16("heartbeat")?;
                if method_id == 30 {
                    Method::ConnectionTune {
                        channel_max,
                        frame_max,
                        heartbeat,
                    }
                } else {
                    Method::ConnectionTuneOk {
                        channel_max,
                        frame_max,
                        heartbeat,
                    }
                }
            }
            (10, 40) => {
                let vhost = c.short_str("vhost")?.to_vec();
                c.short_str("reserved")?;
                c.u8("reserved")?;
                Method::ConnectionOpen { vhost }
            }
            (10, 41) => {
                c.short_str("reserved")?;
                Method::ConnectionOpenOk
            }
            (10, 50) => Method::ConnectionClose(Close::decode(&mut c)?),
            (10, 51) => Method::ConnectionCloseOk,
            (10, 60) => Method::ConnectionBlocked {
                reason: c.short_str("reason")?.to_vec(),
            },
            (10, 61) => Method::ConnectionUnblocked,
            (20, 10) => {
                c.short_str("reserved")?;
                Method::ChannelOpen
            }
            (20, 11) => {
                c.long_str("reserved")?;
                Method::ChannelOpenOk
            }
            (20, 20) => Method::ChannelFlow {
                active: c.u8("active")? & 1 != 0,
            },
            (20, 21) => Method::ChannelFlowOk {
                active: c.u8("active")? & 1 != 0,
            },
            (20, 40) => Method::ChannelClose(Close::decode(&mut c)?),
            (20, 41) => Method::ChannelCloseOk,
            (85, 10) => {
                c.u8("nowait")?;
                Method::ConfirmSelect
            }
            (85, 11) => Method::ConfirmSelectOk,
            (60, 70) => {
                c.u16("reserved")?;
                let queue = c.short_str("queue")?.to_vec();
                let no_ack = c.u8("no-ack")? & 1 != 0;
                Method::BasicGet { queue, no_ack }
            }
            (60, 71) => Method::BasicGetOk {
                delivery_tag: c.u64("delivery-tag")?,
                redelivered: c.u8("redelivered")? & 1 != 0,
                exchange: c.short_str("exchange")?.to_vec(),
                routing_key: c.short_str("routing-key")?.to_vec(),
                message_count: c.u32("message-count")?,
            },
            (60, 72) => {
                c.short_str("reserved")?;
                Method::BasicGetEmpty
            }
            (60, 40) => {
                c.u16("reserved")?;
                let exchange = c.short_str("exchange")?.to_vec();
                let routing_key = c.short_str("routing-key")?.to_vec();
                let bits = c.u8("flags")?;
                Method::BasicPublish {
                    exchange,
                    routing_key,
                    mandatory: bits & 1 != 0,
                    immediate: bits & 2 != 0,
                }
            }
            (60, 50) => Method::BasicReturn {
                reply_code: c.u16("reply-code")?,
                reply_text: c.short_str("reply-text")?.to_vec(),
                exchange: c.short_str("exchange")?.to_vec(),
                routing_key: c.short_str("routing-key")?.to_vec(),
            },
            (60, 80) => Method::BasicAck {
                delivery_tag: c.u64("delivery-tag")?,
                multiple: c.u8("multiple")? & 1 != 0,
            },
            (60, 120) => {
                let delivery_tag = c.u64("delivery-tag")?;
                let bits = c.u8("flags")?;
                Method::BasicNack {
                    delivery_tag,
                    multiple: bits & 1 != 0,
                    requeue: bits & 2 != 0,
                }
            }
            _ => {
                return Ok(Method::Other {
                    class_id,
                    method_id,
                });
            }
        };
        c.finish("method arguments")?;
        Ok(m)
    }
}

/// A content header: class, body size and the encoded properties (flags
/// included), kept as they came.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ContentHeader {
    pub class_id: u16,
    pub body_size: u64,
    pub properties: Vec<u8>,
}

impl ContentHeader {
    pub fn decode(payload: &[u8]) -> Result<ContentHeader, CodecError> {
        let mut c = Cursor::new(payload);
        let class_id = c.u16("class-id")?;
        c.u16("weight")?;
        let body_size = c.u64("body-size")?;
        Ok(ContentHeader {
            class_id,
            body_size,
            properties: c.rest().to_vec(),
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(12 + self.properties.len());
        out.extend_from_slice(&self.class_id.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(&self.body_size.to_be_bytes());
        out.extend_from_slice(&self.properties);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_methods() -> Vec<Method> {
        let close = Close {
            reply_code: 406,
            reply_text: b"PRECONDITION_FAILED - \xff".to_vec(),
            class_id: 60,
            method_id: 40,
        };
        vec![
            Method::ConnectionStart {
                version_major: 0,
                version_minor: 9,
                server_properties: vec![1, b'k', b'V'],
                mechanisms: b"AMQPLAIN PLAIN".to_vec(),
                locales: b"en_US".to_vec(),
            },
            Method::ConnectionStartOk {
                client_properties: vec![],
                mechanism: b"PLAIN".to_vec(),
                response: b"\0guest\0guest".to_vec(),
                locale: b"en_US".to_vec(),
            },
            Method::ConnectionSecure {
                challenge: b"c".to_vec(),
            },
            Method::ConnectionTune {
                channel_max: 2047,
                frame_max: 131_072,
                heartbeat: 60,
            },
            Method::ConnectionTuneOk {
                channel_max: 1,
                frame_max: 4096,
                heartbeat: 0,
            },
            Method::ConnectionOpen {
                vhost: b"/".to_vec(),
            },
            Method::ConnectionOpenOk,
            Method::ConnectionClose(close.clone()),
            Method::ConnectionCloseOk,
            Method::ConnectionBlocked {
                reason: b"low on memory".to_vec(),
            },
            Method::ConnectionUnblocked,
            Method::ChannelOpen,
            Method::ChannelOpenOk,
            Method::ChannelFlow { active: true },
            Method::ChannelFlowOk { active: false },
            Method::ChannelClose(close),
            Method::ChannelCloseOk,
            Method::ConfirmSelect,
            Method::ConfirmSelectOk,
            Method::BasicGet {
                queue: b"q".to_vec(),
                no_ack: false,
            },
            Method::BasicGetOk {
                delivery_tag: u64::MAX,
                redelivered: true,
                exchange: vec![],
                routing_key: b"\xff\xfe".to_vec(),
                message_count: 7,
            },
            Method::BasicGetEmpty,
            Method::BasicPublish {
                exchange: vec![],
                routing_key: b"q.dlq".to_vec(),
                mandatory: true,
                immediate: false,
            },
            Method::BasicReturn {
                reply_code: 312,
                reply_text: b"NO_ROUTE".to_vec(),
                exchange: vec![],
                routing_key: b"nowhere".to_vec(),
            },
            Method::BasicAck {
                delivery_tag: 3,
                multiple: true,
            },
            Method::BasicNack {
                delivery_tag: 9,
                multiple: false,
                requeue: true,
            },
        ]
    }

    #[test]
    fn methods_round_trip() {
        for m in all_methods() {
            let bytes = m.encode().expect("encode");
            assert_eq!(Method::decode(&bytes).expect("decode"), m, "{}", m.name());
        }
    }

    #[test]
    fn truncated_methods_are_errors_not_panics() {
        for m in all_methods() {
            let bytes = m.encode().expect("encode");
            for cut in 0..bytes.len() {
                assert!(
                    Method::decode(&bytes[..cut]).is_err(),
                    "{} cut at {cut} decoded",
                    m.name()
                );
            }
        }
    }

    #[test]
    fn trailing_bytes_are_errors() {
        let mut bytes = Method::BasicAck {
            delivery_tag: 1,
            multiple: false,
        }
        .encode()
        .expect("encode");
        bytes.push(0);
        assert!(matches!(
            Method::decode(&bytes),
            Err(CodecError::TrailingBytes { .. })
        ));
    }

    #[test]
    fn unknown_methods_are_other() {
        let bytes = [0, 90, 0, 11, 1, 2, 3];
        assert_eq!(
            Method::decode(&bytes),
            Ok(Method::Other {
                class_id: 90,
                method_id: 11
            })
        );
    }

    #[test]
    fn frames_round_trip_and_wait_for_all_their_bytes() {
        let mut buf = Vec::new();
        encode_frame(FRAME_METHOD, 1, b"hello", &mut buf).expect("frame");
        encode_frame(FRAME_HEARTBEAT, 0, b"", &mut buf).expect("frame");
        let first_len = 5 + FRAME_OVERHEAD;
        for cut in 0..first_len {
            assert_eq!(decode_frame(&buf[..cut], 4096), Ok(None), "cut {cut}");
        }
        let (frame, used) = decode_frame(&buf, 4096).expect("ok").expect("frame");
        assert_eq!(used, first_len);
        assert_eq!(
            frame,
            Frame {
                kind: FRAME_METHOD,
                channel: 1,
                payload: b"hello".to_vec()
            }
        );
        let (hb, used2) = decode_frame(&buf[used..], 4096)
            .expect("ok")
            .expect("frame");
        assert_eq!((hb.kind, hb.payload.len(), used2), (FRAME_HEARTBEAT, 0, 8));
    }

    #[test]
    fn bad_frames_are_errors() {
        let mut buf = Vec::new();
        encode_frame(FRAME_BODY, 1, &[7; 100], &mut buf).expect("frame");
        // Too large for the negotiated size, before the payload arrives.
        assert!(matches!(
            decode_frame(&buf[..7], 50),
            Err(CodecError::TooLarge { size: 108, max: 50 })
        ));
        // A wrong end byte.
        let last = buf.len() - 1;
        buf[last] = 0;
        assert_eq!(decode_frame(&buf, 4096), Err(CodecError::FrameEnd(0)));
        // A huge announced length never allocates.
        let huge = [3u8, 0, 1, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            decode_frame(&huge, 131_072),
            Err(CodecError::TooLarge { .. })
        ));
        // The server's protocol header (version mismatch).
        assert!(matches!(
            decode_frame(b"AMQP\x00\x00\x09\x01", 4096),
            Err(CodecError::ProtocolMismatch(_))
        ));
    }

    #[test]
    fn content_headers_round_trip() {
        let h = ContentHeader {
            class_id: CLASS_BASIC,
            body_size: 1 << 40,
            properties: vec![0x10, 0x00, 2],
        };
        assert_eq!(ContentHeader::decode(&h.encode()), Ok(h));
        assert!(ContentHeader::decode(&[0, 60, 0, 0, 1]).is_err());
    }

    #[test]
    fn overlong_strings_are_refused() {
        let mut out = Vec::new();
        assert!(put_short_str(&mut out, "x", &[b'a'; 256]).is_err());
        assert!(put_short_str(&mut out, "x", &[b'a'; 255]).is_ok());
    }
}
