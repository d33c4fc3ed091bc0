#!/usr/bin/env python3
"""Opens many authenticated, idle PostgreSQL client connections and holds them.

Standard library only: a minimal PostgreSQL v3 startup with a SCRAM-SHA-256 client
(RFC 5802/7677, as libpq does it: no channel binding). Used by bench.py to measure a
proxy's memory per idle client.

    idle_clients.py --port P --user U --password W --database D --counts 2000,12000

After each count is reached (or when no more connections can be opened) it prints one
line, `HELD <n> errors=<e> first_error=<text>`, and waits for a line on stdin: `next`
opens more up to the next count, anything else (or EOF) closes every connection and
exits.
"""

import argparse
import asyncio
import base64
import hashlib
import hmac
import os
import struct
import sys

CONCURRENT_LOGINS = 48  # logins in flight at once
ATTEMPTS = 3  # per connection, before it counts as an error
MAX_ERRORS = 50  # give up on the current count after this many failed connections


class LoginError(Exception):
    pass


def message(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("!I", len(payload) + 4) + payload


def startup_message(user: str, database: str) -> bytes:
    params = b""
    for key, value in (("user", user), ("database", database), ("application_name", "bench-idle")):
        params += key.encode() + b"\0" + value.encode() + b"\0"
    payload = struct.pack("!I", 196608) + params + b"\0"
    return struct.pack("!I", len(payload) + 4) + payload


async def read_message(reader: asyncio.StreamReader):
    header = await reader.readexactly(5)
    kind, length = header[:1], struct.unpack("!I", header[1:])[0]
    return kind, await reader.readexactly(length - 4)


def error_text(payload: bytes) -> str:
    fields = {}
    for part in payload.split(b"\0"):
        if part:
            fields[part[:1]] = part[1:].decode(errors="replace")
    return f"{fields.get(b'C', '?')} {fields.get(b'M', '?')}"


class Scram:
    """Client side of SCRAM-SHA-256 without channel binding."""

    def __init__(self, password: str):
        self.password = password.encode()
        self.nonce = base64.b64encode(os.urandom(18)).decode()
        self.client_first_bare = f"n=,r={self.nonce}"
        self.server_signature = b""

    def initial_response(self) -> bytes:
        data = ("n,," + self.client_first_bare).encode()
        return message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!I", len(data)) + data)

    def final_response(self, server_first: str, salted_password: bytes) -> bytes:
        attrs = dict(item.split("=", 1) for item in server_first.split(","))
        if not attrs["r"].startswith(self.nonce):
            raise LoginError("server nonce does not extend ours")
        without_proof = f"c=biws,r={attrs['r']}"
        auth_message = f"{self.client_first_bare},{server_first},{without_proof}".encode()
        client_key = hmac.digest(salted_password, b"Client Key", "sha256")
        stored_key = hashlib.sha256(client_key).digest()
        signature = hmac.digest(stored_key, auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        server_key = hmac.digest(salted_password, b"Server Key", "sha256")
        self.server_signature = hmac.digest(server_key, auth_message, "sha256")
        final = f"{without_proof},p={base64.b64encode(proof).decode()}"
        return message(b"p", final.encode())

    def salt_and_iterations(self, server_first: str):
        attrs = dict(item.split("=", 1) for item in server_first.split(","))
        return base64.b64decode(attrs["s"]), int(attrs["i"])

    def verify_server_final(self, server_final: str):
        expected = "v=" + base64.b64encode(self.server_signature).decode()
        if server_final != expected:
            raise LoginError("server signature mismatch")


SALTED = {}  # (password, salt, iterations) -> salted password: one PBKDF2 per salt


async def salted_password(loop, password, salt, iterations):
    key = (password, salt, iterations)
    if key not in SALTED:
        SALTED[key] = await loop.run_in_executor(
            None, hashlib.pbkdf2_hmac, "sha256", password, salt, iterations)
    return SALTED[key]


async def login(args, loop):
    """Connects and authenticates; returns the open (reader, writer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", args.port)
    try:
        writer.write(startup_message(args.user, args.database))
        scram = Scram(args.password)
        while True:
            kind, payload = await read_message(reader)
            if kind == b"E":
                raise LoginError(error_text(payload))
            if kind == b"Z":
                return reader, writer
            if kind != b"R":
                continue  # ParameterStatus, BackendKeyData, NoticeResponse
            code = struct.unpack("!I", payload[:4])[0]
            if code == 10:  # AuthenticationSASL
                if b"SCRAM-SHA-256" not in payload[4:].split(b"\0"):
                    raise LoginError("server offers no SCRAM-SHA-256")
                writer.write(scram.initial_response())
            elif code == 11:  # AuthenticationSASLContinue
                server_first = payload[4:].decode()
                salt, iterations = scram.salt_and_iterations(server_first)
                salted = await salted_password(loop, scram.password, salt, iterations)
                writer.write(scram.final_response(server_first, salted))
            elif code == 12:  # AuthenticationSASLFinal
                scram.verify_server_final(payload[4:].decode())
            elif code != 0:  # 0 is AuthenticationOk
                raise LoginError(f"unsupported authentication request {code}")
    except BaseException:
        writer.close()
        raise


class Holder:
    def __init__(self, args):
        self.args = args
        self.held = []
        self.errors = 0
        self.first_error = ""

    async def open_one(self, loop, gate):
        async with gate:
            for attempt in range(ATTEMPTS):
                try:
                    self.held.append(await asyncio.wait_for(login(self.args, loop), 15))
                    return
                except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, LoginError) as e:
                    last = f"{type(e).__name__}: {e}"
                    await asyncio.sleep(0.05 * (attempt + 1))
            self.errors += 1
            self.first_error = self.first_error or last

    async def grow_to(self, count, loop):
        gate = asyncio.Semaphore(CONCURRENT_LOGINS)
        while len(self.held) < count and self.errors < MAX_ERRORS:
            batch = min(count - len(self.held), 1000)
            await asyncio.gather(*(self.open_one(loop, gate) for _ in range(batch)))

    def close_all(self):
        for _, writer in self.held:
            writer.write(message(b"X", b""))  # Terminate
            writer.close()


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--database", required=True)
    parser.add_argument("--counts", required=True, help="comma-separated, increasing")
    args = parser.parse_args()
    loop = asyncio.get_running_loop()
    holder = Holder(args)
    for count in (int(c) for c in args.counts.split(",")):
        await holder.grow_to(count, loop)
        print(f"HELD {len(holder.held)} errors={holder.errors} first_error={holder.first_error}",
              flush=True)
        command = await loop.run_in_executor(None, sys.stdin.readline)
        if command.strip() != "next" or holder.errors >= MAX_ERRORS:
            break
    holder.close_all()
    await asyncio.sleep(0.5)


if __name__ == "__main__":
    asyncio.run(main())
