"""authenc: AES-CTR encrypt and decrypt a message with pyaes, check the round trip (FunctionBench pyaes)."""

import hashlib
import json
import time

import pyaes


def main(args):
    length = args.get("length", 10000)
    rounds = args.get("rounds", 2)
    key = args.get("key", "medes-authenc-key-0123456789abcd")  # 32 bytes: AES-256
    message = args.get("message")
    if not isinstance(key, str) or len(key.encode()) not in (16, 24, 32):
        return {"error": "key must be a string of 16, 24 or 32 bytes"}
    if not isinstance(rounds, int) or isinstance(rounds, bool) or not 1 <= rounds <= 100:
        return {"error": "rounds must be an integer in [1, 100]"}
    if message is None:
        if not isinstance(length, int) or isinstance(length, bool) or not 1 <= length <= 1_000_000:
            return {"error": "length must be an integer in [1, 1000000]"}
        alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 "
        message = "".join(alphabet[(i * 7 + i // 37) % len(alphabet)] for i in range(length))
    elif not isinstance(message, str) or len(message) > 1_000_000:
        return {"error": "message must be a string of at most 1000000 characters"}
    t0 = time.perf_counter()
    plain = message.encode("utf-8")
    kb = key.encode()
    ok = True
    cipher = b""
    for _ in range(rounds):
        cipher = pyaes.AESModeOfOperationCTR(kb).encrypt(plain)
        ok = ok and pyaes.AESModeOfOperationCTR(kb).decrypt(cipher) == plain
    token = json.dumps({"len": len(plain), "sha256": hashlib.sha256(cipher).hexdigest()}, sort_keys=True)
    return {
        "ok": ok,
        "bytes": len(plain),
        "cipher_digest": hashlib.sha256(cipher).hexdigest(),
        "token": token,
        "elapsed_ms": round((time.perf_counter() - t0) * 1e3, 3),
    }
