"""Cancels a running query with libpq 17+'s cancel API, as psycopg 3's Ctrl-C handling does.

Usage: cancel_safe.py DSN
Connects (psycopg 3 with its bundled libpq), runs pg_sleep(10) and, 0.5 s in, calls
conn.cancel_safe() from another thread (PQcancelCreate/PQcancelBlocking: the cancel
connection negotiates sslmode like a normal one). Prints one JSON line:
{"libpq": ..., "cancelled": bool, "seconds": float, "after_cancel": float (from the
 cancel call to the query's end), "cancel_error": str|null, "query_error": str|null}
"""

import json
import sys
import threading
import time

import psycopg


def main() -> None:
    dsn = sys.argv[1]
    result = {"libpq": psycopg.pq.version(), "cancel_error": None, "query_error": None}
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        started = time.monotonic()

        cancel_at = []

        def cancel() -> None:
            time.sleep(0.5)
            cancel_at.append(time.monotonic())
            try:
                conn.cancel_safe(timeout=5)
            except Exception as e:  # reported, not raised: the caller checks it
                result["cancel_error"] = f"{type(e).__name__}: {e}"

        t = threading.Thread(target=cancel)
        t.start()
        try:
            conn.execute("SELECT pg_sleep(10)")
            result["cancelled"] = False
        except psycopg.errors.QueryCanceled:
            result["cancelled"] = True
        except Exception as e:
            result["cancelled"] = False
            result["query_error"] = f"{type(e).__name__}: {e}"
        ended = time.monotonic()
        t.join()
        result["seconds"] = round(ended - started, 3)
        result["after_cancel"] = round(ended - cancel_at[0], 3) if cancel_at else None
        # The session is still usable after the cancel.
        conn.execute("SELECT 1")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
