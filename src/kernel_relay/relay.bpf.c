// SPDX-License-Identifier: Apache-2.0
/*
 * pglb's kernel relay: an sk_skb stream-verdict program attached to a SOCKHASH of
 * relayed sockets. Each socket's data is redirected to the send side of its peer (the
 * client's to its server and back), so the bytes of a session no longer travel through
 * pglb's process after the login.
 *
 * The program also follows the PostgreSQL framing of each stream, message header by
 * message header, with the position kept per socket in `flows` across packet
 * boundaries (the kernel's stream parser is of no use here: it sees segments, not the
 * stream, and refuses messages larger than the receive buffer). That gives pglb, which
 * no longer sees the traffic, what it needs: bytes moved, last activity, requests sent
 * and ReadyForQuery received with its status, and so the moment a drained session is
 * idle outside a transaction. At that moment the program stops redirecting and hands the
 * session back: from then on every byte is passed up to pglb's socket reads.
 *
 * User space writes `flows` (once, before the sockets enter `socks`) and `control`;
 * this program writes `flows` only.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* flow.flags */
#define F_SERVER 1      /* the server's socket: backend messages arrive on it */
#define F_OPAQUE 2      /* the stream stopped making sense: framing abandoned */
#define F_BACK 4        /* handed back: pass everything up to user space */
#define F_LOST_PEER 8   /* a redirect failed (the peer left the map) */
#define F_AT_REST 16    /* server: the last data ended right after a ReadyForQuery */

/* control word, per session */
#define C_DRAIN 1       /* hand back at the next idle ReadyForQuery */
#define C_PASS 2        /* hand back now */

/* flow.have: header bytes held (0..4), or waiting for ReadyForQuery's status byte */
#define WANT_STATUS 6

/* One per relayed socket, keyed by its socket cookie. All u64: user space reads it as
 * an array of words (src/kernel_relay/maps.rs names the same indexes). */
struct flow {
	__u64 peer;     /* cookie of the other socket of the session */
	__u64 session;  /* key of the session's control word */
	__u64 bytes;    /* bytes redirected to the peer */
	__u64 last_ns;  /* CLOCK_MONOTONIC of the last data */
	__u64 messages; /* client: requests (Query, Sync, FunctionCall); server: ReadyForQuery */
	__u64 skip;     /* bytes of the current message still to pass */
	__u64 header;   /* a header split across packets, first byte lowest */
	__u64 have;     /* header bytes held, or WANT_STATUS */
	__u64 status;   /* status byte of the last ReadyForQuery */
	__u64 flags;
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u32);
} socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct flow);
} flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 32768);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, __u64);
} control SEC(".maps");

/* The walk over one packet, for bpf_loop's callback. */
struct walk {
	struct __sk_buff *skb;
	struct flow *f;
	__u32 off;
	__u32 len;
	/* Offset just after the last ReadyForQuery in this packet, + 1 (0: none). */
	__u32 ready_end;
};

/* A complete header: what follows it. Returns 1 to stop the walk. */
static __always_inline long header(struct walk *w, __u8 type, __u32 len)
{
	struct flow *f = w->f;

	if (len < 4) {
		__sync_fetch_and_or(&f->flags, F_OPAQUE);
		return 1;
	}
	f->skip = len - 4;
	if (f->flags & F_SERVER) {
		if (type == 'Z' && len == 5) {
			f->skip = 0;
			f->have = WANT_STATUS;
		}
	} else if (type == 'Q' || type == 'S' || type == 'F') {
		f->messages++;
	}
	return 0;
}

/* One step of the walk: skip a body, read a status byte, or read (part of) a header. */
static long step(__u32 i, void *ctx)
{
	struct walk *w = ctx;
	struct flow *f = w->f;
	__u8 h[5];
	__u32 left;

	if (w->off >= w->len)
		return 1;
	left = w->len - w->off;
	if (f->skip) {
		__u64 n = f->skip < left ? f->skip : left;

		f->skip -= n;
		w->off += n;
		return 0;
	}
	if (f->have == WANT_STATUS) {
		if (bpf_skb_load_bytes(w->skb, w->off, h, 1))
			goto lost;
		f->status = h[0];
		f->messages++;
		f->have = 0;
		w->off += 1;
		w->ready_end = w->off + 1;
		return 0;
	}
	if (f->have == 0 && left >= 5) {
		if (bpf_skb_load_bytes(w->skb, w->off, h, 5))
			goto lost;
		w->off += 5;
		return header(w, h[0], ((__u32)h[1] << 24) | ((__u32)h[2] << 16) |
					       ((__u32)h[3] << 8) | h[4]);
	}
	/* A header split across packets: one byte at a time. */
	if (f->have > 4 || bpf_skb_load_bytes(w->skb, w->off, h, 1))
		goto lost;
	f->header |= (__u64)h[0] << (8 * f->have);
	f->have++;
	w->off += 1;
	if (f->have == 5) {
		__u64 x = f->header;

		f->header = 0;
		f->have = 0;
		return header(w, x & 0xff, ((x >> 8 & 0xff) << 24) | ((x >> 16 & 0xff) << 16) |
						   ((x >> 24 & 0xff) << 8) | (x >> 32 & 0xff));
	}
	return 0;
lost:
	__sync_fetch_and_or(&f->flags, F_OPAQUE);
	return 1;
}

/* Whether a drain may end the session after this packet: the server's data ended right
 * after ReadyForQuery 'I' and every request the client sent has been answered. */
static __always_inline int idle_at_end(struct flow *f, struct walk *w)
{
	struct flow *client;
	__u64 peer = f->peer;

	if (!(f->flags & F_SERVER) || (f->flags & F_OPAQUE))
		return 0;
	if (w->ready_end != w->len + 1 || f->status != 'I')
		return 0;
	client = bpf_map_lookup_elem(&flows, &peer);
	return client && !(client->flags & F_OPAQUE) && client->messages == f->messages;
}

SEC("sk_skb/stream_verdict")
int pglb_verdict(struct __sk_buff *skb)
{
	__u64 me = bpf_get_socket_cookie(skb);
	struct flow *f = bpf_map_lookup_elem(&flows, &me);
	struct walk w = { .skb = skb, .off = 0, .len = skb->len, .ready_end = 0 };
	__u64 session, peer, ctl = 0, *c;

	if (!f || (f->flags & F_BACK))
		return SK_PASS;
	session = f->session;
	c = bpf_map_lookup_elem(&control, &session);
	if (c)
		ctl = *c;
	if (ctl & C_PASS) {
		__sync_fetch_and_or(&f->flags, F_BACK);
		return SK_PASS;
	}
	f->last_ns = bpf_ktime_get_ns();
	if (!(f->flags & F_OPAQUE)) {
		w.f = f;
		bpf_loop(w.len + 1, step, &w, 0);
		if (f->flags & F_SERVER) {
			if (w.ready_end == w.len + 1)
				__sync_fetch_and_or(&f->flags, F_AT_REST);
			else
				__sync_fetch_and_and(&f->flags, ~(__u64)F_AT_REST);
		}
	}
	if ((ctl & C_DRAIN) && idle_at_end(f, &w)) {
		struct flow *client;

		/* This packet still goes to the client; everything after it goes up. */
		peer = f->peer;
		client = bpf_map_lookup_elem(&flows, &peer);
		if (client)
			__sync_fetch_and_or(&client->flags, F_BACK);
		__sync_fetch_and_or(&f->flags, F_BACK);
	}
	peer = f->peer;
	if (bpf_sk_redirect_hash(skb, &socks, &peer, 0) != SK_PASS) {
		__sync_fetch_and_or(&f->flags, F_LOST_PEER);
		return SK_PASS;
	}
	__sync_fetch_and_add(&f->bytes, skb->len);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "Apache-2.0";
