/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* SipHash-2-4 over fixed-size messages, and the synfleet cookie built on it.
 * The Python reference is synfleet.cookie; tests compare the two bit for bit.
 */
#ifndef SF_COOKIE_H
#define SF_COOKIE_H

#include "synfleet.h"

#define SF_ROTL64(x, b) (__u64)(((x) << (b)) | ((x) >> (64 - (b))))

#define SF_SIPROUND(v0, v1, v2, v3)                                            \
	do {                                                                   \
		v0 += v1; v1 = SF_ROTL64(v1, 13); v1 ^= v0; v0 = SF_ROTL64(v0, 32); \
		v2 += v3; v3 = SF_ROTL64(v3, 16); v3 ^= v2;                    \
		v0 += v3; v3 = SF_ROTL64(v3, 21); v3 ^= v0;                    \
		v2 += v1; v1 = SF_ROTL64(v1, 17); v1 ^= v2; v2 = SF_ROTL64(v2, 32); \
	} while (0)

struct siphash_state {
	__u64 v0, v1, v2, v3;
};

static __always_inline void siphash_init(struct siphash_state *s, __u64 k0, __u64 k1)
{
	s->v0 = 0x736f6d6570736575ULL ^ k0;
	s->v1 = 0x646f72616e646f6dULL ^ k1;
	s->v2 = 0x6c7967656e657261ULL ^ k0;
	s->v3 = 0x7465646279746573ULL ^ k1;
}

static __always_inline void siphash_word(struct siphash_state *s, __u64 m)
{
	__u64 v0 = s->v0, v1 = s->v1, v2 = s->v2, v3 = s->v3;

	v3 ^= m;
	SF_SIPROUND(v0, v1, v2, v3);
	SF_SIPROUND(v0, v1, v2, v3);
	v0 ^= m;
	s->v0 = v0; s->v1 = v1; s->v2 = v2; s->v3 = v3;
}

/* Finalisation for a message of `len` bytes, len a multiple of 8. */
static __always_inline __u64 siphash_final(struct siphash_state *s, __u64 len)
{
	__u64 v0, v1, v2, v3;

	siphash_word(s, len << 56);
	v0 = s->v0; v1 = s->v1; v2 = s->v2 ^ 0xff; v3 = s->v3;
	SF_SIPROUND(v0, v1, v2, v3);
	SF_SIPROUND(v0, v1, v2, v3);
	SF_SIPROUND(v0, v1, v2, v3);
	SF_SIPROUND(v0, v1, v2, v3);
	return v0 ^ v1 ^ v2 ^ v3;
}

/* The 4-tuple as SipHash words, byte-for-byte the packet's own network-order
 * fields read little-endian (the BPF target is little-endian). */
struct cookie_tuple {
	__u64 addr[4];   /* v4: addr[0] = saddr|daddr; v6: saddr (2 words), daddr (2 words) */
	__u32 ports;     /* sport|dport as on the wire */
	__u8 family;
};

/* Last word of the message: salt epoch (low 32 bits), the attribute bits and
 * SF_COOKIE_HASHED_TS. */
static __always_inline __u64 cookie_tail_word(__u64 epoch, __u32 hashed)
{
	return (epoch & 0xffffffffULL) |
	       ((__u64)(hashed & (SF_COOKIE_ATTR_MASK | SF_COOKIE_HASHED_TS)) << 32);
}

/* The whole 64-bit SipHash: its upper half's top 22 bits go into the cookie,
 * its lower half is the TSval of a SYN+ACK with timestamps. A subprogram: its
 * state stays out of the callers' frames, which the SYN path's stack budget
 * cannot spare. */
static __noinline __u64 cookie_hash(const struct cookie_tuple *t, __be32 client_isn,
					 const struct sf_salt *salt, __u32 hashed)
{
	struct siphash_state s;
	__u64 len;

	siphash_init(&s, salt->k0, salt->k1);
	siphash_word(&s, t->addr[0]);
	if (t->family == SF_FAMILY_IPV6) {
		siphash_word(&s, t->addr[1]);
		siphash_word(&s, t->addr[2]);
		siphash_word(&s, t->addr[3]);
		len = 48;
	} else {
		len = 24;
	}
	siphash_word(&s, (__u64)t->ports | ((__u64)client_isn << 32));
	siphash_word(&s, cookie_tail_word(salt->epoch, hashed));
	return siphash_final(&s, len);
}

static __always_inline __u32 cookie_hashed_attrs(__u32 attrs, bool ts)
{
	return (attrs & SF_COOKIE_ATTR_MASK) | (ts ? SF_COOKIE_HASHED_TS : 0);
}

/* attrs: the low 10 bits; the salt's epoch supplies the epoch bits. With `ts`
 * (the SYN+ACK carries timestamps) `*tsval` is its keyed TSval. */
static __always_inline __u32 cookie_make(const struct cookie_tuple *t, __be32 client_isn,
					 const struct sf_salt *salt, __u32 attrs, bool ts,
					 __u32 *tsval)
{
	__u64 h;

	attrs &= ~(SF_COOKIE_EPOCH_MASK << SF_COOKIE_EPOCH_SHIFT);
	attrs |= (__u32)(salt->epoch & SF_COOKIE_EPOCH_MASK) << SF_COOKIE_EPOCH_SHIFT;
	h = cookie_hash(t, client_isn, salt, cookie_hashed_attrs(attrs, ts));
	*tsval = (__u32)h;
	return ((__u32)(h >> 32) & SF_COOKIE_HASH_MASK) | attrs;
}

static __always_inline __u32 cookie_epoch_bits(__u32 cookie)
{
	return (cookie >> SF_COOKIE_EPOCH_SHIFT) & SF_COOKIE_EPOCH_MASK;
}

/* The epoch a cookie's two epoch bits name: of now-1 (previous cookies stay
 * good one more epoch), now, and now+1 (a peer proxy whose clock runs ahead),
 * the one whose low bits they are; false when none is. */
static __always_inline bool cookie_epoch(__u32 bits, __u64 now, __u64 *epoch)
{
	__u64 back = (now + 1 - bits) & SF_COOKIE_EPOCH_MASK;

	if (back > 2)
		return false;
	*epoch = now + 1 - back;
	return true;
}

/* One hash checks both the cookie's 22 bits and, when the ACK carries
 * timestamps (`ts`), all 32 bits of its TSecr. */
static __always_inline bool cookie_check(const struct cookie_tuple *t, __be32 client_isn,
					 const struct sf_salt *salt, __u32 cookie, bool ts,
					 __u32 tsecr)
{
	__u64 h = cookie_hash(t, client_isn, salt, cookie_hashed_attrs(cookie, ts));

	if ((((__u32)(h >> 32) ^ cookie) & SF_COOKIE_HASH_MASK) != 0)
		return false;
	return !ts || (__u32)h == tsecr;
}

#endif /* SF_COOKIE_H */
