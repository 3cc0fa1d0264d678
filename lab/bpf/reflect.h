/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The flood benchmark's floors (reflect.bpf.c, xdp_reflect.bpf.c): swap the
 * Ethernet, IPv4 and TCP addresses of an IPv4 TCP packet in place. Swapping
 * leaves every checksum valid, so sending the packet back is packet I/O with
 * no defence work at all. */
#ifndef LAB_REFLECT_H
#define LAB_REFLECT_H

#include "sf_net.h"

static __always_inline void swap_bytes(__u8 *a, __u8 *b, int n)
{
	for (int i = 0; i < n; i++) {
		__u8 t = a[i];

		a[i] = b[i];
		b[i] = t;
	}
}

/* False, untouched, when the packet is not IPv4 TCP without IP options. */
static __always_inline bool reflect_headers(void *data, void *end)
{
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	struct tcphdr *tcp = data + sizeof(*eth) + sizeof(*ip);
	__be16 port;
	__be32 addr;

	if ((void *)(tcp + 1) > end)
		return false;
	if (eth->h_proto != bpf_htons(ETH_P_IP) || ip->ihl != 5 || ip->protocol != IPPROTO_TCP)
		return false;
	swap_bytes(eth->h_dest, eth->h_source, ETH_ALEN);
	addr = ip->saddr;
	ip->saddr = ip->daddr;
	ip->daddr = addr;
	port = tcp->source;
	tcp->source = tcp->dest;
	tcp->dest = port;
	return true;
}

#endif /* LAB_REFLECT_H */
