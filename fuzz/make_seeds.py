#!/usr/bin/env python3
"""Writes the hand-made seed corpus of every target into corpus/<target>/."""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def short(s):
    return bytes([len(s)]) + s


def long(s):
    return struct.pack(">I", len(s)) + s


def table(pairs):
    return b"".join(short(k) + v for k, v in pairs)


def S(s):
    return b"S" + long(s)


def l(i):
    return b"l" + struct.pack(">q", i)


def A(items):
    return b"A" + long(b"".join(items))


def F(pairs):
    return b"F" + long(table(pairs))


# Property flags, bit 15 first: content-type, content-encoding, headers,
# delivery-mode, priority, correlation-id, reply-to, expiration,
# message-id, timestamp, type, user-id, app-id, cluster-id.
def props(message_id=None, headers=None, content_type=None, delivery_mode=None):
    flags, out = 0, b""
    if content_type is not None:
        flags |= 1 << 15
        out += short(content_type)
    if headers is not None:
        flags |= 1 << 13
        out += long(headers)
    if delivery_mode is not None:
        flags |= 1 << 12
        out += bytes([delivery_mode])
    if message_id is not None:
        flags |= 1 << 7
        out += short(message_id)
    return struct.pack(">H", flags) + out


x_death = table([(b"x-death", A([F([(b"reason", S(b"delivery_limit")),
                                     (b"queue", S(b"orders")),
                                     (b"count", l(2)),
                                     (b"time", b"T" + struct.pack(">Q", 1_700_000_000))])]))])
idemq_dead = table([(b"x-idemq-reason", S(b"max-attempts")),
                    (b"x-idemq-attempts", l(5)),
                    (b"x-idemq-scope", S(b"orders")),
                    (b"x-idemq-key", S(b"order-1")),
                    (b"x-delivery-count", l(3))])
every_type = table([(b"t", b"t\x01"), (b"b", b"b\xff"), (b"B", b"B\x01"), (b"s", b"s\x00\x01"),
                    (b"u", b"u\x00\x01"), (b"I", b"I\x00\x00\x00\x01"), (b"i", b"i\xff\xff\xff\xff"),
                    (b"L", b"L" + bytes(8)), (b"l", l(-1)), (b"f", b"f\x3f\xc0\x00\x00"),
                    (b"d", b"d\x7f\xf8" + bytes(6)), (b"D", b"D\x02\x00\x00\x30\x39"),
                    (b"T", b"T" + bytes(8)), (b"S", S(b"\xff\xfe")), (b"x", b"x" + long(b"\x00\x01")),
                    (b"V", b"V"), (b"A", A([l(1), b"V"])), (b"F", F([(b"k", S(b"v"))]))])
bad_key = table([(b"k\xff", S(b"v")), (b"nested", F([(b"\xfe", b"V")]))])

properties = {
    "empty": props(),
    "message_id": props(message_id=b"order-1", content_type=b"application/json", delivery_mode=2),
    "x_death": props(message_id=b"order-2", headers=x_death),
    "idemq_dead_letter": props(message_id=b"order-3", headers=idemq_dead),
    "every_type": props(headers=every_type),
    "bad_message_id": props(message_id=b"\xff\xfeorder-4"),
    "bad_header_key": props(message_id=b"order-5", headers=bad_key),
}


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


for name, p in properties.items():
    write("amqp_properties", name, p)
    write("raw_properties", name, b"\x08" + p)  # frame_max 131072
write("raw_properties", "bad_routing_key_small_frame", b"\x01" + properties["bad_header_key"])
write("raw_properties", "table_only", b"\x00" + every_type)


def frame(kind, channel, payload):
    return bytes([kind]) + struct.pack(">HI", channel, len(payload)) + payload + b"\xce"


get_ok = struct.pack(">HHQ", 60, 71, 7) + b"\x00" + short(b"") + short(b"q\xff") + struct.pack(">I", 0)
header = struct.pack(">HHQ", 60, 0, 4) + properties["x_death"]
start = (struct.pack(">HHBB", 10, 10, 0, 9) + long(table([(b"product", S(b"RabbitMQ"))]))
         + long(b"PLAIN AMQPLAIN") + long(b"en_US"))
close = struct.pack(">HHH", 20, 40, 404) + short(b"NOT_FOUND - no queue") + struct.pack(">HH", 60, 70)
write("raw_frames", "basic_get_ok", b"\x03" + frame(1, 1, get_ok) + frame(2, 1, header) + frame(3, 1, b"body"))
write("raw_frames", "connection_start", b"\x02" + frame(1, 0, start) + frame(8, 0, b""))
write("raw_frames", "channel_close", b"\x02" + frame(1, 1, close))
write("raw_frames", "too_large", b"\x01" + frame(3, 1, bytes(100)))

# Arbitrary-driven targets: any bytes decode to an input; a few shapes.
for target in ["key", "dead_letter_info", "header_values"]:
    write(target, "text", b"order-42\x00x-idemq-reason\x01\x02permanent\x00\x05")
    write(target, "hostile", b"{a}:b \xff\xfe~sha256:" + bytes(range(0, 64)))
    write(target, "longer", bytes(range(256)) * 2)
