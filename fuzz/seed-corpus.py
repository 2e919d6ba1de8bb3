#!/usr/bin/env python3
"""Writes fuzz/corpus/<target>/ seed files from specs/vectors (run from the repo root)."""
import hashlib, json, os, struct

V = "specs/vectors"
OUT = "fuzz/corpus"
TYPES = {1: "client_hello", 2: "server_hello", 3: "key_register", 4: "key_ack",
         5: "infer_request", 6: "infer_response", 7: "request_error", 8: "close"}

def put(target, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()), "wb") as f:
        f.write(data)

for name in ("messages.json", "invalid.json"):
    for v in json.load(open(os.path.join(V, name)))["vectors"]:
        b = bytes.fromhex(v["hex"])
        put("decode_frame", b)
        if len(b) >= 6 and b[1] in TYPES:
            put("decode_" + TYPES[b[1]], b[6:])
for v in json.load(open(os.path.join(V, "transcripts.json")))["vectors"]:
    stream = b"".join(bytes.fromhex(s["hex"]) for s in v["steps"] if s.get("op") == "input")
    target = "session_cloud_bytes" if v["role"] == "cloud" else "session_device_bytes"
    put(target, bytes([0x3f]) + stream)  # chunk-size byte, then the stream
    if target == "session_device_bytes":
        put(target, bytes([0x80 | 0x1f]) + stream)
