/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* On-wire formats and map layouts shared by the proxy and backend programs
 * and mirrored, field for field, by synfleet.abi in Python.
 * Every struct here is part of the agent <-> data plane ABI: change both sides
 * together and bump SF_ABI_VERSION.
 */
#ifndef SYNFLEET_H
#define SYNFLEET_H

#define SF_ABI_VERSION 6

/* Policy ids are cluster-wide (the encapsulation header carries one, 16 bits). */
#define SF_MAX_POLICIES 8192
#define SF_MAX_SERVICES 65536
#define SF_MAX_BACKENDS 4096
#define SF_MAX_PROXIES 4096
/* Maglev table size: a prime well above 100x a typical backend count. */
#define SF_RING_SIZE 4099
/* Maglev tables per configuration half: one per backend set, which policies
 * share (a backend pool's policies all send to its nodes), so the id space
 * does not size the largest map. */
#define SF_MAX_TABLES 256
/* Salts by epoch, slot = epoch % SF_SALT_SLOTS: the agent keeps up to an hour
 * or more of future epochs loaded, so the data plane outlives its control plane. */
#define SF_SALT_SLOTS 4096
#define SF_SALT_SLOT_MASK (SF_SALT_SLOTS - 1)
/* Every configuration table exists twice; `active` names the half packets read. */
#define SF_CONFIG_SLOTS 2

#define SF_FAMILY_IPV4 4
#define SF_FAMILY_IPV6 6

/* ---- encapsulation: outer IP / UDP / sf_encap_hdr [/ previous] / inner IP packet ----
 * Version 1: the 4-byte header. Version 2: the header, then the flow's previous
 * backend (daisy chaining, docs/dataplane.md): 4 bytes under an IPv4 outer
 * header, 16 under IPv6. A proxy sends version 2 only while a flow's slot
 * names a previous backend, so backends of the release before keep receiving
 * everything else during a rolling upgrade.
 */
#define SF_ENCAP_VERSION 1
#define SF_ENCAP_VERSION_PREVIOUS 2
#define SF_ENCAP_F_VALIDATED 0x01
/* Sent while the proxy has no salt for the epoch and its policy fails open:
 * the backend's kernel judges the segment with its own SYN cookies. */
#define SF_ENCAP_F_UNGUARDED 0x02
/* Handed on by the current backend, which had no socket for the flow, to the
 * previous one it names: never handed on again. */
#define SF_ENCAP_F_CHAINED 0x04

struct sf_encap_hdr {
	__u8 version;
	__u8 flags;
	__be16 policy_id;
};

#define SF_ENCAP_HDR_LEN 4
#define SF_ENCAP_PREVIOUS_LEN_V4 4
#define SF_ENCAP_PREVIOUS_LEN_V6 16
#define SF_UDP_HDR_LEN 8
/* The most an encapsulation adds, previous backend included: what the
 * advertised MSS leaves room for. */
#define SF_ENCAP_OVERHEAD_V4 (20 + SF_UDP_HDR_LEN + SF_ENCAP_HDR_LEN + SF_ENCAP_PREVIOUS_LEN_V4)
#define SF_ENCAP_OVERHEAD_V6 (40 + SF_UDP_HDR_LEN + SF_ENCAP_HDR_LEN + SF_ENCAP_PREVIOUS_LEN_V6)
/* UDP source ports carry the flow hash in this range (RFC 7510 style). */
#define SF_ENCAP_SPORT_BASE 49152
#define SF_ENCAP_SPORT_SPAN 16384

/* ---- cookie: the 32-bit ISN of the proxy's SYN+ACK ----
 *  31                  10 9   8 7   6  5     4     3      0
 * +----------------------+-----+-----+-----+------+--------+
 * |   SipHash bits (22)  |epoch| MSS | ECN | SACK | WScale |
 * +----------------------+-----+-----+-----+------+--------+
 * The low 10 bits ("attribute bits") are hashed too, so a flipped bit anywhere
 * fails validation. WScale 15 means the client sent no window scale option.
 * docs/cookie.md has the hash input and the epoch rule.
 */
#define SF_COOKIE_WSCALE_MASK 0x0fu
#define SF_COOKIE_WSCALE_NONE 0x0fu
#define SF_COOKIE_SACK 0x10u
#define SF_COOKIE_ECN 0x20u
#define SF_COOKIE_MSS_SHIFT 6
#define SF_COOKIE_MSS_MASK 0x3u
#define SF_COOKIE_EPOCH_SHIFT 8
#define SF_COOKIE_EPOCH_MASK 0x3u
#define SF_COOKIE_ATTR_MASK 0x3ffu
#define SF_COOKIE_HASH_MASK 0xfffffc00u
/* Hashed with the attribute bits but never carried in the cookie: the SYN+ACK
 * had timestamps, whose TSval is the lower half of the same SipHash. An ACK
 * that carries the option must echo it; one that does not hashes without the
 * bit, so stripping the option from a timestamped handshake fails too. */
#define SF_COOKIE_HASHED_TS 0x10000u
#define SF_MAX_WSCALE 14

/* ---- maps ---- */

/* Key of `services` (address + TCP port) and of the address-only maps
 * `protected_addrs` and `encap_sources` (port 0), and a `backends` entry.
 * `slot` is the configuration half a key belongs to (0 in `backends`). */
struct sf_endpoint {
	__u8 family;
	__u8 slot;
	__be16 port;
	__u8 addr[16]; /* IPv4 in the first 4 bytes, the rest zero */
};

struct sf_service {
	__u32 policy_id;
};

#define SF_POLICY_ACTIVE 0x01
#define SF_POLICY_ENFORCE 0x02
#define SF_POLICY_TIMESTAMPS 0x04
#define SF_POLICY_ECN 0x08
#define SF_POLICY_SACK 0x10
/* No salt for the epoch: send SYNs (and ACKs) to the backend unguarded
 * instead of dropping them (failurePolicy: open). */
#define SF_POLICY_FAIL_OPEN 0x20

struct sf_policy {
	__u16 mss_v4[4];   /* client MSS table, ascending; index goes in the cookie */
	__u16 mss_v6[4];
	__u16 adv_mss_v4;  /* MSS the proxy advertises, encapsulation already taken off */
	__u16 adv_mss_v6;
	__u8 wscale;       /* window scale advertised for the server (attrs.rcv_wscale) */
	__u8 flags;        /* SF_POLICY_* */
	__u16 table;       /* proxies: the policy's backend set's Maglev table in `maglev_slots` */
};

struct sf_salt {
	__u64 epoch;
	__u64 k0;          /* SipHash key, little-endian halves of the 16 key bytes */
	__u64 k1;
	__u32 valid;
	__u32 pad;
};

struct sf_config {
	__u64 rotation_ns;  /* salt epoch length; epoch = (TAI ns + clock_offset_ns) / rotation_ns */
	__be16 encap_port;  /* UDP destination port of the encapsulation */
	__u16 slot;         /* the configuration half this entry heads */
	__be32 node_addr_v4; /* outer source address of encapsulated packets */
	__u8 node_addr_v6[16];
	__s64 clock_offset_ns; /* correction for a node whose clock is known to be off */
};

/* A Maglev slot of `maglev_slots`: indexes into the same half of `backends`.
 * `previous` is the backend the slot had before the last change of the
 * backend set, for as long as the policy's drain period keeps it. */
struct sf_ring_slot {
	__u16 current;
	__u16 previous;
};

#define SF_RING_NONE 0xffffu

/* Values of `encap_sources`: what a source may send a backend. */
#define SF_SOURCE_PROXY 0x1	/* encapsulated segments from clients */
#define SF_SOURCE_PEER 0x2	/* segments chained by another backend of the pool */

/* Counters, one per-CPU array slot each; names mirrored in Python. */
enum sf_counter {
	/* proxy */
	SF_CTR_SYN_ANSWERED,
	SF_CTR_COOKIE_VALID,
	SF_CTR_COOKIE_REJECTED,
	SF_CTR_COOKIE_STALE,
	SF_CTR_FORWARDED,
	SF_CTR_SALT_MISSING,
	SF_CTR_NO_BACKEND,
	SF_CTR_ROUTE_FAILED,
	SF_CTR_ENCAP_FAILED,
	SF_CTR_MALFORMED,
	SF_CTR_FRAGMENT,
	SF_CTR_EXT_HEADER,
	SF_CTR_NO_POLICY,
	/* backend */
	SF_CTR_DECAPSULATED,
	SF_CTR_REQSK_CREATED,
	SF_CTR_REQSK_FAILED,
	SF_CTR_ACK_UNVALIDATED,
	SF_CTR_BYPASS_SYN,
	SF_CTR_BYPASS_ACK,
	SF_CTR_UNKNOWN_SOURCE,
	SF_CTR_BAD_ENCAP,
	SF_CTR_MONITOR_PASSED,
	SF_CTR_TW_RECYCLED,
	SF_CTR_TW_REFUSED,
	/* both: segments sent (proxy) or passed (backend) unguarded */
	SF_CTR_FAIL_OPEN,
	/* proxy: SYNs no host would answer */
	SF_CTR_MARTIAN,
	SF_CTR_BAD_CHECKSUM,
	/* proxy: a segment too big once encapsulated, answered with ICMP(v6) */
	SF_CTR_TOO_BIG,
	/* proxy: sent naming the flow's previous backend */
	SF_CTR_PREVIOUS_NAMED,
	/* backend: daisy chaining (handed on, received, refused, no route) */
	SF_CTR_CHAINED,
	SF_CTR_CHAIN_RECEIVED,
	SF_CTR_CHAIN_REFUSED,
	SF_CTR_CHAIN_FAILED,
	SF_CTR_MAX,
};

/* Slots in `counters`: room to add counters without changing the map's
 * definition, so that an upgraded agent keeps re-using the pinned map. */
#define SF_CTR_CAPACITY 64
_Static_assert(SF_CTR_MAX <= SF_CTR_CAPACITY, "counters map too small");

#endif /* SYNFLEET_H */
