/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* "Too big" errors from the proxy (RFC 792 Destination Unreachable code 4,
 * RFC 4443 Packet Too Big; path MTU discovery: RFC 1191, RFC 8201): a segment
 * that no longer fits the egress MTU once encapsulated is answered with the
 * MTU that does fit, instead of vanishing. The error quotes the segment's IP
 * header and its first 8 TCP bytes (ports and sequence number: what the
 * sender's stack matches against its socket). Built on the stack, written over
 * the segment by the caller.
 */
#ifndef SF_ICMP_H
#define SF_ICMP_H

#include "sf_net.h"
#include "sf_csum.h"

#define SF_ICMP_DEST_UNREACH 3
#define SF_ICMP_FRAG_NEEDED 4
#define SF_ICMPV6_PKT_TOOBIG 2
#define SF_IPPROTO_ICMPV6 58
#define SF_IPV6_MIN_MTU 1280
#define SF_IPV4_MIN_MTU 68
#define SF_TOO_BIG_QUOTE_TCP 8

/* The 2-byte lead puts the IP header on a 4-byte boundary (aligned stack). */
struct too_big_v4 {
	__u8 lead[2];
	struct ethhdr eth;
	struct iphdr ip;
	struct icmphdr icmp;
	__u8 quote[sizeof(struct iphdr) + SF_TOO_BIG_QUOTE_TCP];
};

struct too_big_v6 {
	__u8 lead[2];
	struct ethhdr eth;
	struct ipv6hdr ip6;
	struct icmp6hdr icmp6;
	__u8 quote[sizeof(struct ipv6hdr) + SF_TOO_BIG_QUOTE_TCP];
};

#define SF_TOO_BIG_V4_LEN (sizeof(struct too_big_v4) - 2)
#define SF_TOO_BIG_V6_LEN (sizeof(struct too_big_v6) - 2)

static __always_inline void too_big_eth(struct ethhdr *out, const struct ethhdr *in, __u16 proto)
{
	__builtin_memcpy(out->h_dest, in->h_source, ETH_ALEN);
	__builtin_memcpy(out->h_source, in->h_dest, ETH_ALEN);
	out->h_proto = bpf_htons(proto);
}

/* `r->quote` holds the segment's IPv4 header (no options) and 8 TCP bytes;
 * the error goes from `from` to the segment's source. */
static __always_inline void too_big_v4_build(struct too_big_v4 *r, const struct ethhdr *in, __be32 from,
					     __u32 mtu)
{
	const struct iphdr *seg = (const struct iphdr *)r->quote;

	too_big_eth(&r->eth, in, ETH_P_IP);
	r->ip.version = 4;
	r->ip.ihl = 5;
	r->ip.tot_len = bpf_htons(SF_TOO_BIG_V4_LEN - sizeof(struct ethhdr));
	r->ip.ttl = 64;
	r->ip.protocol = IPPROTO_ICMP;
	r->ip.saddr = from;
	r->ip.daddr = seg->saddr;
	r->ip.check = csum_fold32((__u32)bpf_csum_diff(NULL, 0, (__be32 *)&r->ip, sizeof(r->ip), 0));
	r->icmp.type = SF_ICMP_DEST_UNREACH;
	r->icmp.code = SF_ICMP_FRAG_NEEDED;
	r->icmp.un.frag.mtu = bpf_htons(mtu);
	r->icmp.checksum = csum_fold32((__u32)bpf_csum_diff(NULL, 0, (__be32 *)&r->icmp,
							    sizeof(r->icmp) + sizeof(r->quote), 0));
}

/* `r->quote` holds the segment's IPv6 header and 8 TCP bytes. */
static __always_inline void too_big_v6_build(struct too_big_v6 *r, const struct ethhdr *in,
					     const void *from, __u32 mtu)
{
	const struct ipv6hdr *seg = (const struct ipv6hdr *)r->quote;
	__u32 icmp_len = sizeof(r->icmp6) + sizeof(r->quote);
	__s64 csum;

	too_big_eth(&r->eth, in, ETH_P_IPV6);
	*(__be32 *)&r->ip6 = bpf_htonl(0x60000000);
	r->ip6.payload_len = bpf_htons(icmp_len);
	r->ip6.nexthdr = SF_IPPROTO_ICMPV6;
	r->ip6.hop_limit = 64;
	__builtin_memcpy(&r->ip6.saddr, from, 16);
	__builtin_memcpy(&r->ip6.daddr, &seg->saddr, 16);
	r->icmp6.icmp6_type = SF_ICMPV6_PKT_TOOBIG;
	r->icmp6.icmp6_code = 0;
	r->icmp6.icmp6_dataun.un_data32[0] = bpf_htonl(mtu);
	csum = bpf_csum_diff(NULL, 0, (__be32 *)&r->icmp6, icmp_len, 0);
	r->icmp6.icmp6_cksum = csum_fold32((__u32)csum + csum_pseudo_v6((const __u32 *)&r->ip6.saddr,
									(const __u32 *)&r->ip6.daddr,
									SF_IPPROTO_ICMPV6, icmp_len));
}

#endif /* SF_ICMP_H */
