/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Flow hash: MurmurHash3 (x86_32) with a fixed seed over the 4-tuple words.
 * Every proxy computes the same value for a flow, so any proxy picks the same
 * backend; the UDP source port of the encapsulation carries it for ECMP.
 */
#ifndef SF_FLOW_H
#define SF_FLOW_H

#include "sf_cookie.h"

#define SF_FLOW_SEED 0x5f1ee7u

static __always_inline __u32 rotl32(__u32 x, __u32 b)
{
	return (x << b) | (x >> (32 - b));
}

static __always_inline __u32 flow_mix(__u32 h, __u32 k)
{
	k *= 0xcc9e2d51u;
	k = rotl32(k, 15);
	k *= 0x1b873593u;
	h ^= k;
	h = rotl32(h, 13);
	return h * 5 + 0xe6546b64u;
}

/* Words in order: source address, destination address, ports, as u32s read
 * little-endian from the packet bytes. */
static __always_inline __u32 flow_hash(const struct cookie_tuple *t)
{
	__u32 h = SF_FLOW_SEED, len;
	int i;

	if (t->family == SF_FAMILY_IPV6) {
#pragma unroll
		for (i = 0; i < 4; i++) {
			h = flow_mix(h, (__u32)t->addr[i]);
			h = flow_mix(h, (__u32)(t->addr[i] >> 32));
		}
		len = 36;
	} else {
		h = flow_mix(h, (__u32)t->addr[0]);
		h = flow_mix(h, (__u32)(t->addr[0] >> 32));
		len = 12;
	}
	h = flow_mix(h, t->ports);
	h ^= len;
	h ^= h >> 16;
	h *= 0x85ebca6bu;
	h ^= h >> 13;
	h *= 0xc2b2ae35u;
	h ^= h >> 16;
	return h;
}

#endif /* SF_FLOW_H */
